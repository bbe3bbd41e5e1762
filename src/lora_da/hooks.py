"""The hooks of the statistics pass and the accumulators they fill: per target layer, `G` (float32 sums of
in-place GEMMs), `y` (float64), and one `Z` per distinct input (float32 chunks folded into float64, both packed:
see `gram.py`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from contextlib import ExitStack, contextmanager

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from .config import LoraDAConfig, LoraDAError
from .distributed import get_rank, get_world_size, reduce_sum_to
from .gram import add_gram, float32_product, multiplies_half_into_float32, new_packed
from .layers import ParameterTarget, base_model_of, is_expert, layer_shape
from .schedule import group_owners
from .statistics import INPUT_CHUNK_DTYPE, INPUT_DTYPE, OUTPUT_DTYPE, LoraDAStatistics

# Metadata key of the statistics: the experts' weights that no calibration token reached (a JSON list).
UNROUTED_KEY = "lora_da_unrouted_experts"
# Z is summed in float32 over chunks of at least this many tokens (about what one large batch's product sums
# over anyway), then folded into its float64 total, so its precision does not fall with the number of batches.
FOLD_TOKENS = 1024


class Collector:
    """Hooks on the target layers and the float32 accumulators they fill.

    `sharded` (under `torch.distributed`): every layer's sums live on one owner rank (`owners`, decided at the
    first forward); each backward reduces the batch's contribution of a layer to its owner as soon as the layer's
    gradient arrives, so a rank holds its own layers' sums and one layer's contribution at a time. The ranks
    must then run their backward passes in step (see `collect._run_sharded_pass`).

    `gather`: "all" (G and y from each backward, Z with them), "gradients" (G and y only) or "inputs" (Z only,
    from forwards without gradients, for the input groups set in `input_groups` beforehand, each batch's product
    added straight into the float64 total): two passes that hold fewer bytes at once (see
    `collect.collect_in_two_passes`).

    `input_chunks`: a batch of fewer than FOLD_TOKENS tokens adds its `Z` product into a float32 chunk, folded into
    the float64 total every FOLD_TOKENS tokens (fewer float64 additions, for the chunk's memory); False: every
    product goes straight into the total (as precise, for a plan short of memory).
    """

    def __init__(self, modules: dict[str, nn.Module], config: LoraDAConfig, sharded: bool = False,
                 gather: str = "all", input_chunks: bool = True):
        self.modules = modules
        self.config = config
        self.sharded = sharded
        self.gather = gather
        self.input_chunks = input_chunks and gather != "inputs"
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
        self._flat_masks: dict[int, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = {}
        self._selects_all = True
        self.parameter_targets = {name: t for name, t in modules.items() if isinstance(t, ParameterTarget)}
        self.observer: ParameterObserver | None = None
        # called with each input the hooks hold until the backward (see `collect.probe_batch`)
        self.on_hold: Callable[[torch.Tensor], object] | None = None

    @contextmanager
    def attached(self, model: nn.Module):
        """The hooks on the target layers and, for weights adapted through `target_parameters`, an observer of
        the linear maps that apply them (with mixture-of-experts blocks run one expert at a time)."""
        modules = {name: m for name, m in self.modules.items() if name not in self.parameter_targets}
        with ExitStack() as stack:
            for name, module in modules.items():
                stack.callback(module.register_forward_hook(self._forward_hook(name)).remove)
            if self.parameter_targets:
                self.observer = ParameterObserver(self, self.parameter_targets)
                for owner in self.observer.owners:
                    hook = owner.register_forward_pre_hook(self.observer.owner_called, with_kwargs=True)
                    stack.callback(hook.remove)
                if any(is_expert(target) for target in self.parameter_targets.values()):
                    stack.enter_context(experts_one_at_a_time(model))
                stack.enter_context(self.observer)
            yield

    def set_masks(self, masks: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]], counts: torch.Tensor) -> None:
        """(example mask, token mask) by shape of the hooked inputs' leading dims, with per-token counts.

        The masks become row indices once per batch (None: every row): boolean indexing in every layer's hook
        would wait for the GPU (to learn the result's size) hundreds of times per batch.
        """
        self._masks = {}
        self._flat_masks = {}
        for shape, (example_mask, token_mask) in masks.items():
            per_token = counts.reshape(-1, *([1] * (len(shape) - 1))).expand(shape).reshape(-1).float()
            example_rows = _selected_rows(example_mask)
            token_rows = example_rows if token_mask is example_mask else _selected_rows(token_mask)
            self._masks[shape] = (example_rows, token_rows, _rows(per_token, token_rows))
            if self.parameter_targets:  # by token count: MoE blocks route the flattened [batch * length] tokens
                self._flat_masks.setdefault(example_mask.numel(), (example_mask.reshape(-1),
                                                                   None if token_mask is example_mask
                                                                   else token_mask.reshape(-1), per_token))
        self._selects_all = all(rows[0] is None and rows[1] is None for rows in self._masks.values())

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
        missing = [name for name in self.modules if name not in self._input_keys and name not in
                   self.parameter_targets]
        if missing:
            raise LoraDAError(f"Target layer {missing[0]!r} was not called in the forward pass.")
        if self.observer is not None:
            self.observer.check_owners_called()
        leaders: dict[tuple, str] = {}
        # a weight adapted through `target_parameters` has an input factor of its own: an expert's tokens vary
        self.input_groups = {name: name if name in self.parameter_targets else
                             leaders.setdefault(self._input_keys[name], name) for name in self.modules}
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
            if self.gather == "inputs":
                if self.input_groups is not None and self.input_groups[name] == name:
                    self._accumulate_input(name, x.detach(), self._masks.get(tuple(x.shape[:-1])))
                return
            if not torch.is_grad_enabled():
                return  # e.g. the no-grad first pass of reentrant checkpointing; the recompute counts
            x = x.detach()
            if self.on_hold is not None:
                self.on_hold(x)
            if not output.requires_grad:
                _start_graph(output)
            # Pairing x with g in one closure counts each token once, even if the forward is recomputed.
            output.register_hook(lambda grad: self._accumulate(name, x, grad, self._masks.get(tuple(x.shape[:-1]))))

        return hook

    def observe(self, name: str, x: torch.Tensor, output: torch.Tensor, rows: tuple[torch.Tensor, int] | None) -> None:
        """Accumulate weight `name` (a `ParameterTarget`) from the linear map `output = x w^T` once the output's
        gradient arrives; `rows`: (which rows of its block's flattened [batch * length] tokens `x` holds, their
        count), or None when `x` holds every token."""
        if not torch.is_grad_enabled():
            return
        masks = self._row_masks(name, tuple(x.shape[:-1]), rows)
        if not output.requires_grad:
            _start_graph(output)
        x = x.detach()
        if self.on_hold is not None:
            self.on_hold(x)
        output.register_hook(lambda grad: self._accumulate(name, x, grad, masks))

    def _row_masks(self, name: str, leading: tuple[int, ...], rows: tuple[torch.Tensor, int] | None):
        """The (example rows, token rows, per-token counts) of an input with leading dims `leading` that holds
        `rows` of its block's tokens (None: every token, in order)."""
        if rows is None:
            masks = self._masks.get(leading)
            if masks is None and len(leading) == 1 and leading[0] in self._flat_masks:
                example, token, per_token = self._flat_masks[leading[0]]
                masks = _masks_of(example, token, per_token, None)
            if masks is None and is_expert(self.modules[name]) and not self._selects_all:
                raise LoraDAError(
                    f"Cannot tell which calibration tokens expert weight {name!r} reads (its block does not pick "
                    "them by indexing its input), so the token mask cannot be applied; pass unpadded batches with "
                    "token_mask='attention'."
                )
            return masks
        index, count = rows
        if count not in self._flat_masks:
            return None
        example, token, per_token = self._flat_masks[count]
        return _masks_of(example, token, per_token, index)

    def _accumulate(self, name: str, x: torch.Tensor, grad: torch.Tensor, masks: tuple | None) -> None:
        n, m = x.shape[-1], grad.shape[-1]
        xs, gs = x.reshape(-1, n), grad.reshape(-1, m)
        if not (x.dtype == grad.dtype and multiplies_half_into_float32(x.device.type, x.dtype)):
            xs, gs = xs.float(), gs.float()  # else the GEMMs below take the half-precision rows as they are
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
        if self.input_groups[name] == name and self.gather == "all":
            self._add_input(name, xs, owner, here)

    def _accumulate_input(self, name: str, x: torch.Tensor, masks: tuple | None) -> None:
        """Add the rows of input `x` that the token mask keeps to `Z` of the group that `name` leads."""
        xs = x.reshape(-1, x.shape[-1])
        if not multiplies_half_into_float32(xs.device.type, xs.dtype):
            xs = xs.float()
        self._add_input(name, xs if masks is None else _rows(xs, masks[1]), self.rank, True)

    def _add_input(self, group: str, xs: torch.Tensor, owner: int, here: bool) -> None:
        """`Z` of `group` += xs^T xs for its selected rows `xs` [tokens, n] (sharded: reduced to its owner)."""
        self.input_token_counts[group] = self.input_token_counts.get(group, 0) + xs.shape[0]
        if self.sharded:  # the step's chunk (all ranks' tokens) is folded at once
            chunks = self._input_chunks if here else {}
            _add_gram(chunks, group, xs, INPUT_CHUNK_DTYPE, overwrite=True)
            reduce_sum_to(chunks[group], owner)
            if here:
                self._fold(group)
        elif not self.input_chunks or (not self._chunk_tokens.get(group, 0) and xs.shape[0] >= FOLD_TOKENS):
            # this pass keeps no float32 chunk (its memory was planned without), or a chunk would be folded at once
            self._add_to_total(group, xs)
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

    def check_observed(self) -> None:
        """After a pass with examples: every weight adapted through `target_parameters` was seen at work."""
        if self.observer is not None and self.num_examples > 0:
            self.observer.check_observed()

    def unrouted(self, reached) -> list[str]:
        """Experts' weights among the targets that are not in `reached` (no calibration token was routed to
        them); raise for any other target not in `reached`."""
        unreached = [name for name in self.modules if name not in reached]
        other = next((name for name in unreached if not is_expert(self.modules[name])), None)
        if other is not None:
            raise LoraDAError(
                f"Layer {other!r} received no gradient: it does not influence the loss of any calibration token."
            )
        return unreached

    def result(self) -> LoraDAStatistics:
        self.fold_all()
        unrouted = set(self.unrouted(self.gradient_sums))
        names = [name for name in self.modules if name not in unrouted]  # the given order, not the backward's
        leaders = list(dict.fromkeys(self.input_groups[name] for name in names))
        return LoraDAStatistics(
            gradient_sums={name: self.gradient_sums[name] for name in names},
            output_sq_sums={name: self.output_sq_sums[name] for name in names},
            output_token_counts={name: self.output_token_counts[name] for name in names},
            input_groups={name: self.input_groups[name] for name in names},
            input_sums={group: self.input_sums[group] for group in leaders if self.gather == "all"},
            input_token_counts={group: self.input_token_counts[group] for group in leaders if self.gather == "all"},
            num_examples=self.num_examples,
            metadata=unrouted_metadata(unrouted),
        )


def unrouted_metadata(unrouted) -> dict[str, str]:
    """The statistics' record of the experts' weights that no calibration token reached."""
    return {UNROUTED_KEY: json.dumps(sorted(unrouted))}


def _start_graph(output: torch.Tensor) -> None:
    """Make a layer's output, that nothing before needs a gradient of, the start of the graph: adding a zero that
    needs one, in place, leaves it a node that the model may still change in place (e.g. `out += residual`),
    where a leaf would have to be handed on as a copy, and gives the backward no gradient of its size to keep."""
    output.add_(torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True))


def _masks_of(example: torch.Tensor, token: torch.Tensor | None, per_token: torch.Tensor,
              index: torch.Tensor | None) -> tuple:
    """(example rows, token rows, per-token counts) of the flattened tokens `index` (None: all) of a block whose
    flat example mask is `example` (token mask `token`, None: the same)."""
    if index is not None:
        example, per_token = example[index], per_token[index]
        token = None if token is None else token[index]
    example_rows = _selected_rows(example)
    token_rows = example_rows if token is None else _selected_rows(token)
    return example_rows, token_rows, _rows(per_token, token_rows)


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


_MATMULS = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)


class ParameterObserver(TorchFunctionMode):
    """Sees the weights adapted through `target_parameters` at work, for the collector: every `F.linear(x, w)`
    or `x @ w` whose `w` is a targeted 2-D parameter or one expert's slice `p[e]` of a targeted 3-D stack (how
    transformers' eager experts loop applies them) hands `x` and a hook on the output to `Collector.observe`. The
    output's gradient then carries whatever the model multiplies the expert's output by (its routing weight).
    Which of its block's tokens an expert reads comes from the block's `hidden_states[token_idx]`."""

    def __init__(self, collector: Collector, targets: Mapping[str, ParameterTarget]):
        super().__init__()
        self.collector = collector
        self.names: dict[int, tuple[torch.Tensor, dict[int | None, str]]] = {}  # id(parameter) -> names by expert
        for name, target in targets.items():
            parameter = target.parameter
            self.names.setdefault(id(parameter), (parameter, {}))[1][target.expert] = name
        self.owners = list({id(t.owner): t.owner for t in targets.values()}.values())
        # every expert stack of the owners: an expert's first projection tells its rows, targeted in this pass or not
        self.stacks = {id(p): p for owner in self.owners for p in owner.parameters(recurse=False) if p.dim() == 3}
        self.stacks.update({key: parameter for key, (parameter, _) in self.names.items() if parameter.dim() == 3})
        self.called: set[int] = set()  # id of each owner module that ran
        self.applied: set[int] = set()  # id of each targeted parameter seen in a linear map
        self._input: torch.Tensor | None = None  # the input of the owner module that runs now
        self._slices: dict[int, tuple[torch.Tensor, int, int]] = {}  # id(slice) -> (slice, id(parameter), expert)
        self._rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(rows of the input) -> (them, indices)
        self._expert_rows: dict[int, tuple[torch.Tensor, int]] = {}  # expert -> its rows in the running block

    def owner_called(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of each module that holds a targeted parameter: a new block call begins."""
        self.called.add(id(module))
        inputs = args[0] if args else kwargs.get("hidden_states")
        self._input = inputs if isinstance(inputs, torch.Tensor) and inputs.dim() == 2 else None
        self._slices.clear()
        self._rows.clear()
        self._expert_rows.clear()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if func is torch.Tensor.__getitem__ and len(args) == 2:
            self._indexed(args[0], args[1], result)
        elif func is F.linear:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            self._applied(args[0] if args else kwargs.get("input"), weight, result)
        elif func in _MATMULS and len(args) == 2:
            self._applied(args[0], args[1], result)
        return result

    def _indexed(self, source, index, result) -> None:
        """Tag `result = source[index]`: an expert's slice of a targeted stack, or rows of the block's input."""
        if self.stacks.get(id(source)) is source:
            expert = _single_index(index)
            if expert is not None:
                self._slices[id(result)] = (result, id(source), expert)
        elif self._input is not None and source is self._input:
            rows = index[0] if isinstance(index, tuple) and len(index) == 1 else index
            if isinstance(rows, torch.Tensor) and rows.dim() == 1 and not rows.is_floating_point():
                self._rows[id(result)] = (result, rows if rows.dtype != torch.bool else rows.nonzero().squeeze(1))

    def _applied(self, x, weight, output) -> None:
        """Hand a linear map of a targeted weight to the collector."""
        if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor):
            return
        sliced = self._slices.get(id(weight))
        if sliced is not None and sliced[0] is weight:
            parameter, expert = sliced[1], sliced[2]
        elif id(weight) in self.names and self.names[id(weight)][0] is weight:
            parameter, expert = id(weight), None
        else:
            return
        rows = None
        if expert is not None:  # the expert's rows, from its first projection, hold for its later ones
            tagged = self._rows.get(id(x))
            if tagged is not None and tagged[0] is x:
                self._expert_rows[expert] = (tagged[1], self._input.shape[0])
            rows = self._expert_rows.get(expert)
            if rows is not None and rows[0].numel() != x.reshape(-1, x.shape[-1]).shape[0]:
                rows = None
        if parameter not in self.names:
            return
        self.applied.add(parameter)
        name = self.names[parameter][1].get(expert)
        if name is not None:  # else an expert whose weights are not in this pass
            self.collector.observe(name, x, output, rows)

    def check_owners_called(self) -> None:
        """Every module that holds a targeted parameter ran in the first forward."""
        for name, target in self.collector.parameter_targets.items():
            if id(target.owner) not in self.called:
                raise LoraDAError(f"Target weight {name!r} was not used in the forward pass.")

    def check_observed(self) -> None:
        """Each targeted parameter was seen in a linear map (an expert stack: for at least one expert)."""
        for name, target in self.collector.parameter_targets.items():
            if id(target.parameter) not in self.applied:
                kind = "expert weights run one expert at a time" if is_expert(target) else "a linear map"
                raise LoraDAError(
                    f"LoRA-DA cannot see {type(target.owner).__name__}.{target.parameter_name} ({name!r}) used as "
                    f"{kind} (F.linear or a matmul of it), so it cannot gather its statistics; leave it out of "
                    "`target_parameters`."
                )


def _single_index(index) -> int | None:
    """The integer that `index` (an int or a 0-D integer tensor) selects along the first dim, else None."""
    if isinstance(index, int) and not isinstance(index, bool):
        return index
    if isinstance(index, torch.Tensor) and index.dim() == 0 and not index.is_floating_point():
        return int(index)
    return None


@contextmanager
def experts_one_at_a_time(model: nn.Module):
    """Within it, a transformers model's mixture-of-experts blocks run their eager loop over the experts (the
    one that `ParameterObserver` sees), whatever implementation (grouped or batched GEMMs) the model uses."""
    base = base_model_of(model)
    if not hasattr(base, "set_experts_implementation"):
        yield
        return
    saved = base.get_experts_implementation()
    base.set_experts_implementation("eager")
    try:
        yield
    finally:
        base.set_experts_implementation(saved)
