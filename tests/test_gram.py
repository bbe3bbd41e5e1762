"""Packed Gram sums (`lora_da.gram`) against full matrices computed independently."""

import json

import pytest
import torch
from safetensors.torch import save_file

from lora_da import LoraDAError, LoraDAStatistics, gram
from lora_da.gram import PackedGram, add_gram, new_packed, pack, packed_size


def symmetric(n: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(3 * n + 1, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    z = x.T @ x
    return (z + z.T) / 2  # bitwise symmetric, like the sums' diagonal blocks once unpacked


@pytest.mark.parametrize("n", [1, 7, 10, 11, 33])
def test_pack_round_trip_diagonal_and_norm(monkeypatch, n):
    monkeypatch.setattr(gram, "GRAM_BLOCK", 4)  # several blocks, the last one shorter
    z = symmetric(n)
    packed = PackedGram(pack(z), n)
    assert packed.values.numel() == packed_size(n) < n * n or n == 1
    torch.testing.assert_close(packed.full(), z, rtol=0, atol=0)
    torch.testing.assert_close(packed.diagonal(), z.diagonal())
    torch.testing.assert_close(packed.norm(), z.norm())


def test_add_gram_sums_float32_products_into_float64(monkeypatch):
    monkeypatch.setattr(gram, "GRAM_BLOCK", 5)
    batches = [torch.randn(rows, 12, generator=torch.Generator().manual_seed(rows)) for rows in (3, 9, 1)]
    total = new_packed(12, torch.float64)
    add_gram(total, batches[0], overwrite=True)  # uninitialized storage: overwritten, not added to
    for xs in batches[1:]:
        add_gram(total, xs)
    rows = torch.cat(batches).double()
    torch.testing.assert_close(PackedGram(total, 12).full(), rows.T @ rows, rtol=1e-6, atol=1e-5)


def test_packed_storage_is_about_half():
    for n in (576, 1536, 4096, 11008):
        assert packed_size(n) / n**2 < 0.5 + gram.GRAM_BLOCK / n, n


def test_wrong_length_is_refused():
    with pytest.raises(ValueError, match="width 6"):
        PackedGram(torch.zeros(30), 6).full()


def test_statistics_pack_a_full_input_sum_and_read_format_1_files(tmp_path):
    z = symmetric(6)
    stats = LoraDAStatistics(
        gradient_sums={"a": torch.ones(3, 6)}, output_sq_sums={"a": torch.ones(3, dtype=torch.float64)},
        output_token_counts={"a": 4}, input_groups={"a": "a"}, input_sums={"a": z}, input_token_counts={"a": 4},
        num_examples=2,
    )
    assert stats.input_sums["a"].dim() == 1
    torch.testing.assert_close(stats.input_factor("a"), z / 4)
    # a file of format 1 (before Z was packed) holds the full matrix
    header = {"output_token_counts": {"a": 4}, "input_groups": {"a": "a"}, "input_token_counts": {"a": 4},
              "num_examples": 2, "layers": ["a"]}
    path = tmp_path / "old.safetensors"
    save_file({"G/a": torch.ones(3, 6), "y/a": torch.ones(3, dtype=torch.float64), "Z/a": z}, path,
              metadata={"lora_da_format": "1", "lora_da": json.dumps(header)})
    torch.testing.assert_close(LoraDAStatistics.load(path).input_factor("a"), z / 4)


def test_statistics_of_the_wrong_size_are_refused():
    stats = LoraDAStatistics(
        gradient_sums={"a": torch.ones(3, 6)}, output_sq_sums={"a": torch.ones(3, dtype=torch.float64)},
        output_token_counts={"a": 4}, input_groups={"a": "a"}, input_sums={"a": torch.ones(20, dtype=torch.float64)},
        input_token_counts={"a": 4}, num_examples=2,
    )
    with pytest.raises(LoraDAError, match="packed 6 x 6"):
        stats.check_valid()
