"""The hooks of the statistics pass and the accumulators they fill: per target layer, `G` (float32 sums of
in-place GEMMs), `y` (float64), and one `Z` per distinct input (float32 chunks folded into float64, both packed:
see `gram.py`)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from contextlib import contextmanager

import torch
from torch import nn

from .config import LoraDAConfig, LoraDAError
from .distributed import get_rank, get_world_size, reduce_sum_to
from .gram import add_gram, float32_product, multiplies_half_into_float32, new_packed
from .layers import layer_shape
from .schedule import group_owners
from .statistics import INPUT_CHUNK_DTYPE, INPUT_DTYPE, OUTPUT_DTYPE, LoraDAStatistics

# Z is summed in float32 over chunks of at least this many tokens (about what one large batch's product sums
# over anyway), then folded into its float64 total, so its precision does not fall with the number of batches.
FOLD_TOKENS = 1024


class Collector:
    """Hooks on the target layers and the float32 accumulators they fill.

    `sharded` (under `torch.distributed`): every layer's sums live on one owner rank (`owners`, decided at the
    first forward); each backward reduces the batch's contribution of a layer to its owner as soon as the layer's
    gradient arrives, so a rank holds its own layers' sums and one layer's contribution at a time. The ranks
    must then run their backward passes in step (see `collect._run_sharded_pass`).
    """

    def __init__(self, modules: dict[str, nn.Module], config: LoraDAConfig, sharded: bool = False):
        self.modules = modules
        self.config = config
        self.sharded = sharded
        self.owners: dict[str, int] = {}
        self.reached: set[str] = set()  # layers whose gradient arrived (sharded: the sums may be elsewhere)
        self.joining_only = False  # sharded: this rank has no example in this step, it only joins the reductions
        self.rank = get_rank()
        self.gradient_sums: dict[str, torch.Tensor] = {}
        self.output_sq_sums: dict[str, torch.Tensor] = {}
        self.output_token_counts = dict.fromkeys(modules, 0)
        self.input_sums: dict[str, torch.Tensor] = {}
        self.input_token_counts: dict[str, int] = {}
        self.input_groups: dict[str, str] | None = None
        self.num_examples = 0
        self.data_hash_sums = [0, 0, 0]  # examples seen, and two 31-bit sums of per-example hashes
        self._input_chunks: dict[str, torch.Tensor] = {}  # float32 packed sums of Z since the last fold
        self._chunk_tokens: dict[str, int] = {}
        self._input_keys: dict[str, tuple] = {}
        self._masks: dict[tuple[int, ...], tuple[torch.Tensor, ...]] = {}

    @contextmanager
    def attached(self, model: nn.Module):
        handles = [m.register_forward_hook(self._forward_hook(name)) for name, m in self.modules.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def set_masks(self, masks: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]], counts: torch.Tensor) -> None:
        """(example mask, token mask) by shape of the hooked inputs' leading dims, with per-token counts.

        The masks become row indices once per batch (None: every row): boolean indexing in every layer's hook
        would wait for the GPU (to learn the result's size) hundreds of times per batch.
        """
        self._masks = {}
        for shape, (example_mask, token_mask) in masks.items():
            per_token = counts.reshape(-1, *([1] * (len(shape) - 1))).expand(shape).reshape(-1).float()
            example_rows = _selected_rows(example_mask)
            token_rows = example_rows if token_mask is example_mask else _selected_rows(token_mask)
            self._masks[shape] = (example_rows, token_rows, _rows(per_token, token_rows))

    def discard_batch(self) -> None:
        self._input_keys.clear()

    def hash_batch(self, batch: Mapping[str, torch.Tensor], labels: torch.Tensor) -> None:
        """Add each example's hash (its unpadded ids and labels) to an order- and batching-free data hash."""
        ids = batch["input_ids"]
        attention = batch.get("attention_mask")
        attention = torch.ones_like(ids, dtype=torch.bool) if attention is None else attention.bool()
        ids, labels, attention = ids.cpu(), labels.cpu(), attention.cpu()
        for row in range(ids.shape[0]):
            keep = attention[row] if attention.dim() == ids.dim() else slice(None)
            payload = ids[row][keep].to(torch.int64).numpy().tobytes() + b"|"
            if labels.shape == ids.shape:
                payload += labels[row][keep].to(torch.int64).numpy().tobytes()
            else:
                payload += labels[row].to(torch.int64).numpy().tobytes()
            value = int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little")
            self.data_hash_sums[0] += 1
            self.data_hash_sums[1] += value & 0x7FFFFFFF
            self.data_hash_sums[2] += (value >> 31) & 0x7FFFFFFF

    def data_hash(self) -> str:
        """Hash of the multiset of calibration examples: the same for any batching, order or sharding."""
        text = "-".join(str(v) for v in self.data_hash_sums)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def layout(self) -> dict:
        """Input groups and gradient shapes found on this rank (None groups: no valid batch here)."""
        shapes = {k: list(v.shape) for k, v in self.gradient_sums.items()}
        return {"groups": self.input_groups, "shapes": shapes, "data": list(self.data_hash_sums)}

    def finalize_groups(self) -> None:
        """After the first forward: layers that read the same tensor (same parent) share one `Z`."""
        if self.input_groups is not None:
            return
        missing = [name for name in self.modules if name not in self._input_keys]
        if missing:
            raise LoraDAError(f"Target layer {missing[0]!r} was not called in the forward pass.")
        leaders: dict[tuple, str] = {}
        self.input_groups = {name: leaders.setdefault(self._input_keys[name], name) for name in self.modules}
        if self.sharded:
            shapes = {name: layer_shape(module) for name, module in self.modules.items()}
            self.owners = group_owners(shapes, self.input_groups, get_world_size())

    def _forward_hook(self, name: str):
        parent = name.rsplit(".", 1)[0] if "." in name else ""

        def hook(module, args, output):
            if not args or not isinstance(output, torch.Tensor):
                return
            x = args[0]
            if self.input_groups is None:
                self._input_keys[name] = (parent, x.data_ptr(), tuple(x.shape), x.dtype)
            if not torch.is_grad_enabled():
                return  # e.g. the no-grad first pass of reentrant checkpointing; the recompute counts
            if not output.requires_grad:
                output.requires_grad_(True)  # a leaf here: the layer's inputs and weight need no grad
            x = x.detach()
            # Pairing x with g in one closure counts each token once, even if the forward is recomputed.
            output.register_hook(lambda grad: self._accumulate(name, x, grad))

        return hook

    def _accumulate(self, name: str, x: torch.Tensor, grad: torch.Tensor) -> None:
        n, m = x.shape[-1], grad.shape[-1]
        xs, gs = x.reshape(-1, n), grad.reshape(-1, m)
        if not (x.dtype == grad.dtype and multiplies_half_into_float32(x.device.type, x.dtype)):
            xs, gs = xs.float(), gs.float()  # else the GEMMs below take the half-precision rows as they are
        masks = self._masks.get(tuple(x.shape[:-1]))
        if self.joining_only:  # no row counts: zero contributions of the right shapes
            xs, gs, masks = xs[:0], gs[:0], None
        if masks is not None:
            example_rows, token_rows, per_token_count = masks
            # G is the exact gradient (every position of a supervised example); Z and y use the token mask.
            xs_examples, gs_examples = _rows(xs, example_rows), _rows(gs, example_rows)
            if token_rows is example_rows:  # the default token mask: the same rows, selected once
                xs, gs = xs_examples, gs_examples
            else:
                xs, gs = _rows(xs, token_rows), _rows(gs, token_rows)
        else:
            xs_examples, gs_examples, per_token_count = xs, gs, None
        owner = self.owners.get(name, self.rank)
        here = owner == self.rank
        gradient_sums = self.gradient_sums if here else {}  # elsewhere: a temporary, reduced to the owner
        _add_product(gradient_sums, name, gs_examples.T, xs_examples)
        gs = gs.float()  # y's squares in float32: a half-precision square would round
        if self.config.output_scaling == "token" and per_token_count is not None:
            gs = gs * per_token_count[:, None]  # gradient of the summed (not averaged) token loss
        square_sum = (gs * gs).sum(0)  # float32 over one batch; no float64 copy of gs
        if here and name in self.output_sq_sums:
            self.output_sq_sums[name] += square_sum  # into the float64 sum, in one op
        else:
            square_sum = square_sum.to(OUTPUT_DTYPE)
            if here:
                self.output_sq_sums[name] = square_sum
        self.output_token_counts[name] += xs.shape[0]
        if self.sharded:
            self.reached.add(name)
            reduce_sum_to(gradient_sums[name], owner)
            reduce_sum_to(self.output_sq_sums[name] if here else square_sum, owner)
        group = self.input_groups[name]
        if group != name:
            return
        self.input_token_counts[group] = self.input_token_counts.get(group, 0) + xs.shape[0]
        if self.sharded:  # the step's chunk (all ranks' tokens) is folded at once
            chunks = self._input_chunks if here else {}
            _add_gram(chunks, group, xs, INPUT_CHUNK_DTYPE, overwrite=True)
            reduce_sum_to(chunks[group], owner)
            if here:
                self._fold(group)
        elif not self._chunk_tokens.get(group, 0) and xs.shape[0] >= FOLD_TOKENS:
            self._add_to_total(group, xs)  # a chunk would be folded at once: no float32 chunk needed
        else:
            _add_gram(self._input_chunks, group, xs, INPUT_CHUNK_DTYPE, overwrite=not self._chunk_tokens.get(group, 0))
            self._chunk_tokens[group] = self._chunk_tokens.get(group, 0) + xs.shape[0]
            if self._chunk_tokens[group] >= FOLD_TOKENS:
                self._fold(group)

    def _add_to_total(self, group: str, xs: torch.Tensor) -> None:
        """Add `xs^T xs` into Z's float64 total (float32 products a row block at a time)."""
        _add_gram(self.input_sums, group, xs, INPUT_DTYPE)

    def _fold(self, group: str) -> None:
        """Add the float32 chunk of `Z` into its float64 sum; the next product overwrites the chunk."""
        chunk = self._input_chunks[group]
        if group in self.input_sums:
            self.input_sums[group].add_(chunk)
        else:
            self.input_sums[group] = chunk.to(INPUT_DTYPE)
        self._chunk_tokens[group] = 0

    def fold_all(self) -> None:
        """Fold every pending `Z` chunk and free the chunks."""
        for group in list(self._input_chunks):
            if self._chunk_tokens.get(group, 0) or group not in self.input_sums:  # a total even from no token
                self._fold(group)
        self._input_chunks.clear()

    def result(self) -> LoraDAStatistics:
        self.fold_all()
        unreached = [name for name in self.modules if name not in self.gradient_sums]
        if unreached:
            raise LoraDAError(
                f"Layer {unreached[0]!r} received no gradient: it does not influence the loss of any "
                "calibration token."
            )
        names = list(self.modules)  # the given order, not the backward order in which the sums were created
        leaders = list(dict.fromkeys(self.input_groups[name] for name in names))
        return LoraDAStatistics(
            gradient_sums={name: self.gradient_sums[name] for name in names},
            output_sq_sums={name: self.output_sq_sums[name] for name in names},
            output_token_counts={name: self.output_token_counts[name] for name in names},
            input_groups={name: self.input_groups[name] for name in names},
            input_sums={group: self.input_sums[group] for group in leaders},
            input_token_counts={group: self.input_token_counts[group] for group in leaders},
            num_examples=self.num_examples,
        )


def _selected_rows(mask: torch.Tensor) -> torch.Tensor | None:
    """Indices of the true entries of `mask` (flattened); None when all are true (no copy is then needed)."""
    rows = mask.reshape(-1).nonzero().squeeze(1)
    return None if rows.numel() == mask.numel() else rows


def _rows(tensor: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """The rows `rows` of `tensor` (all of them, uncopied, for None)."""
    return tensor if rows is None else tensor.index_select(0, rows)


def _add_gram(sums: dict[str, torch.Tensor], key: str, xs: torch.Tensor, dtype: torch.dtype,
              overwrite: bool = False) -> None:
    """`sums[key] += xs^T xs` (`=` when `overwrite`) in packed storage of `dtype`, created on first use."""
    if key not in sums:
        sums[key] = new_packed(xs.shape[1], dtype, xs.device)
        overwrite = True
    add_gram(sums[key], xs, overwrite)


def _add_product(sums: dict[str, torch.Tensor], key: str, left: torch.Tensor, right: torch.Tensor) -> None:
    """`sums[key] += left @ right` in float32 (float32 inputs: one GEMM in place, no temporary)."""
    if key not in sums:
        sums[key] = float32_product(left, right)
    elif left.dtype == sums[key].dtype:
        sums[key].addmm_(left, right)
    else:
        sums[key] += float32_product(left, right)
