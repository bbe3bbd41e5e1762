"""The LoRA-DA statistics container: per-layer sums with counts, means on access, safetensors save/load.

Sums (not means) are kept so that shards, batches and workers combine by addition.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import LoraDAError
from .files import write_atomic
from .gram import PackedGram, pack, packed_size

# Format 2 keeps each Z packed (see `gram.py`); files of format 1 (full Z) are still read.
FORMAT_VERSION = "2"
READABLE_FORMATS = ("1", FORMAT_VERSION)
# Precision of each sum (see `collect.py`): G enters the solve linearly and each batch's float32 product already
# carries float32 rounding, so a float32 sum adds little; y is tiny; Z is inverted with a damping of ~1e-6 of its
# scale, so its total is kept in float64 (float32 order effects moved the factors of a nearly singular GQA o_proj).
GRADIENT_DTYPE = torch.float32
OUTPUT_DTYPE = torch.float64
INPUT_DTYPE = torch.float64
INPUT_CHUNK_DTYPE = torch.float32


def statistics_bytes(m: int, n: int, input_chunk: bool = True) -> int:
    """Peak bytes of the accumulators of one [m, n] layer with its own input factor while they are gathered:
    G [m, n], y [m], Z packed (with its float32 chunk when `input_chunk`, see `hooks.Collector`)."""
    return (GRADIENT_DTYPE.itemsize * m * n + OUTPUT_DTYPE.itemsize * m
            + (INPUT_DTYPE.itemsize + input_chunk * INPUT_CHUNK_DTYPE.itemsize) * packed_size(n))


@dataclass
class LoraDAStatistics:
    """Summed LoRA-DA statistics of a set of layers; means are taken on access."""

    gradient_sums: dict[str, torch.Tensor]  # layer -> [m, n], sum over examples of dL_i/dW
    output_sq_sums: dict[str, torch.Tensor]  # layer -> [m], sum over tokens of g_t^2
    output_token_counts: dict[str, int]  # layer -> tokens summed into output_sq_sums
    input_groups: dict[str, str]  # layer -> key of the input it reads
    # input key -> sum over tokens of x_t x_t^T [n, n], packed (1-D, see `gram.py`; a full [n, n] given is packed)
    input_sums: dict[str, torch.Tensor]
    input_token_counts: dict[str, int]  # input key -> tokens summed into input_sums
    num_examples: int  # examples with at least one supervised token
    metadata: dict[str, str] = field(default_factory=dict)
    # Sharded over ranks (see `collect_statistics(shard_statistics=True)`): every layer of the pass -> the rank
    # that holds its sums; this rank holds only its own. Empty: every layer is here.
    owners: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.input_sums = {group: pack(z) if z.dim() == 2 else z for group, z in self.input_sums.items()}

    @property
    def layer_names(self) -> list[str]:
        """Layers in the order they were registered."""
        return list(self.gradient_sums)

    def shape(self, name: str) -> tuple[int, int]:
        """(out, in) of layer `name`."""
        m, n = self.gradient_sums[name].shape
        return int(m), int(n)

    def input_group(self, name: str) -> str:
        """Key of the input factor that layer `name` reads."""
        return self.input_groups[name]

    def gradient(self, name: str) -> torch.Tensor:
        """`G` [m, n] float32: mean over examples of dL_i/dW."""
        return (self.gradient_sums[name] / self.num_examples).float()

    def input_factor(self, name: str) -> torch.Tensor:
        """`Z` [n, n]: mean over tokens of x_t x_t^T, in the sums' float64 (float32 rounding can make a
        rank-deficient Z indefinite by more than a small damping)."""
        return self.packed_input_factor(name).full()

    def packed_input_factor(self, name: str) -> PackedGram:
        """`Z` as `input_factor`, packed (half the memory)."""
        group = self.input_groups[name]
        return PackedGram(self.input_sums[group] / self.input_token_counts[group], self.gradient_sums[name].shape[1])

    def output_factor(self, name: str) -> torch.Tensor:
        """`y` [m]: mean over tokens of g_t * g_t (float64, like the sums)."""
        return self.output_sq_sums[name] / self.output_token_counts[name]

    def pop_group(self, names: list[str]) -> tuple[PackedGram, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """Z and each layer's (G, y) of layers `names` that share one input, as means computed in the sums' own
        storage, and dropped from these statistics (the solve of big layers then holds no second copy)."""
        group = self.input_groups[names[0]]
        width = self.gradient_sums[names[0]].shape[1]
        z = PackedGram(self.input_sums.pop(group).div_(self.input_token_counts[group]), width)
        layers = {}
        for name in names:
            gradient = self.gradient_sums.pop(name).div_(self.num_examples)
            layers[name] = (gradient, self.output_sq_sums.pop(name).div_(self.output_token_counts[name]))
        return z, layers

    @property
    def num_tokens(self) -> int:
        """Tokens seen by the statistics (of the first input group)."""
        return next(iter(self.input_token_counts.values()), 0)

    def nbytes(self) -> int:
        """Memory held by the accumulators."""
        tensors = [*self.gradient_sums.values(), *self.output_sq_sums.values(), *self.input_sums.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def select(self, layers: Mapping[str, str]) -> LoraDAStatistics:
        """A view (tensors shared) whose layers are the keys of `layers`, each read from the stored layer it
        maps to; an input group led by a selected layer takes that layer's new name."""
        new_name = {stored: new for new, stored in layers.items()}
        missing = [stored for stored in layers.values() if stored not in self.gradient_sums]
        if missing:
            raise LoraDAError(f"The statistics have no layer {missing[0]!r}.")
        groups = {new: self.input_groups[stored] for new, stored in layers.items()}
        leaders = list(dict.fromkeys(groups.values()))
        return LoraDAStatistics(
            gradient_sums={new: self.gradient_sums[stored] for new, stored in layers.items()},
            output_sq_sums={new: self.output_sq_sums[stored] for new, stored in layers.items()},
            output_token_counts={new: self.output_token_counts[stored] for new, stored in layers.items()},
            input_groups={new: new_name.get(group, group) for new, group in groups.items()},
            input_sums={new_name.get(g, g): self.input_sums[g] for g in leaders},
            input_token_counts={new_name.get(g, g): self.input_token_counts[g] for g in leaders},
            num_examples=self.num_examples,
            metadata=dict(self.metadata),
        )

    def check_valid(self, source: str = "The statistics") -> None:
        """Raise naming the first layer whose statistics are not finite, or a count that is not positive."""
        if self.num_examples < 1:
            raise LoraDAError(f"{source} count {self.num_examples} examples; a positive count is needed.")
        for counts in (self.output_token_counts, self.input_token_counts):
            bad = next(((k, v) for k, v in counts.items() if int(v) < 1), None)
            if bad is not None:
                raise LoraDAError(f"{source} count {bad[1]} tokens for {bad[0]!r}; a positive count is needed.")
        checks, checked_groups = [], set()
        for name in self.layer_names:
            group = self.input_groups[name]
            width = self.gradient_sums[name].shape[1]
            if self.input_sums[group].numel() != packed_size(width):
                raise LoraDAError(f"Layer {name!r}: its input factor Z in {source.lower()} does not have the size of "
                                  f"a packed {width} x {width} matrix.")
            checks += [(name, "gradient G", self.gradient_sums[name]),
                       (name, "output factor y", self.output_sq_sums[name])]
            if group not in checked_groups:  # a Z shared by several layers is read once
                checked_groups.add(group)
                checks.append((name, "input factor Z", self.input_sums[group]))
        finite = _all_finite([tensor for _, _, tensor in checks])
        bad = next((check for check, ok in zip(checks, finite, strict=True) if not ok), None)
        if bad is not None:
            raise LoraDAError(f"Layer {bad[0]!r}: its {bad[1]} in {source.lower()} is not finite (overflow or NaN).")

    def save(self, path: str | os.PathLike) -> None:
        """Write to a safetensors file atomically (a killed write never leaves a valid-looking file)."""
        if self.owners:
            raise LoraDAError("These statistics are sharded over ranks (each holds its own layers); gather them "
                              "with shard_statistics=False to save them.")
        tensors = {f"G/{k}": v for k, v in self.gradient_sums.items()}
        tensors.update({f"y/{k}": v for k, v in self.output_sq_sums.items()})
        tensors.update({f"Z/{k}": v for k, v in self.input_sums.items()})
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        header = {
            "output_token_counts": self.output_token_counts,
            "input_groups": self.input_groups,
            "input_token_counts": self.input_token_counts,
            "num_examples": self.num_examples,
            "layers": self.layer_names,
        }
        metadata = {"lora_da_format": FORMAT_VERSION, "lora_da": json.dumps(header), **self.metadata}
        write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), suffix=".safetensors")

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> LoraDAStatistics:
        """Read a file written by `save`; a truncated, foreign or corrupt file raises `LoraDAError`."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No statistics file at {path!r}.")
        try:
            with safe_open(path, framework="pt", device=str(device)) as handle:
                metadata = dict(handle.metadata() or {})
                if metadata.get("lora_da_format") not in READABLE_FORMATS:
                    raise LoraDAError(f"{path!r} is not a LoRA-DA statistics file (or of another version).")
                header = json.loads(metadata.pop("lora_da"))
                metadata.pop("lora_da_format")
                groups = header["input_groups"]
                stats = cls(
                    gradient_sums={k: handle.get_tensor(f"G/{k}") for k in header["layers"]},
                    output_sq_sums={k: handle.get_tensor(f"y/{k}") for k in header["layers"]},
                    output_token_counts=header["output_token_counts"],
                    input_groups=groups,
                    input_sums={g: handle.get_tensor(f"Z/{g}") for g in dict.fromkeys(groups.values())},
                    input_token_counts=header["input_token_counts"],
                    num_examples=header["num_examples"],
                    metadata=metadata,
                )
        except LoraDAError:
            raise
        except Exception as exc:  # safetensors' own errors for truncated or garbled files
            raise LoraDAError(
                f"{path!r} is not a readable LoRA-DA statistics file (truncated or corrupt: {exc}); "
                "recompute it with `compute_and_save_statistics`."
            ) from exc
        stats.check_valid(f"The statistics in {path!r}")
        return stats


def _all_finite(tensors: list[torch.Tensor]) -> list[bool]:
    """Whether each tensor is finite (a NaN or inf survives its sum), read once per device, not once per tensor."""
    by_device: dict[torch.device, list[int]] = {}
    for index, tensor in enumerate(tensors):
        by_device.setdefault(tensor.device, []).append(index)
    finite = [True] * len(tensors)
    for indices in by_device.values():
        read = torch.stack([tensors[i].sum().isfinite() for i in indices]).tolist()
        for index, ok in zip(indices, read, strict=True):
            finite[index] = ok
    return finite
