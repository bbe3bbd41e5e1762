"""One forward+backward pass that gathers LoRA-DA's per-layer statistics from hooks on the target layers.

For every target layer `y = W x` it sums (precisions: see `statistics.py` and `hooks.py`):
- `G`: per-example loss gradients `dL_i/dW = sum_t g_t x_t^T` (exact: every position), from the hooked `x_t` and
  output gradient `g_t` (so base weights need no `requires_grad` and may be quantized);
- `Z`: `x_t x_t^T`, once per distinct input tensor (q/k/v projections share one);
- `y`: `g_t * g_t`.
Under `torch.distributed` every rank passes over its own batches and the sums are all-reduced, or, sharded, each
layer's sums are reduced to the one rank that solves it.
Weights adapted through PEFT's `target_parameters` (mixture-of-experts stacks, routers) are seen where the model
applies them as linear maps (see `hooks.ParameterObserver`): each expert gets its own statistics, from the tokens
routed to it, with the routing weight in its output gradient.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import LoraDAConfig, LoraDAError
from .distributed import (
    all_gather_objects,
    all_reduce_counts,
    all_reduce_sum,
    communication_device,
    get_world_size,
    is_distributed,
    is_main_process,
    local_config,
    on_every_rank,
    raise_if_any_rank_failed,
    shard_batches,
)
from .gram import packed_size
from .hooks import Collector, unrouted_metadata
from .layers import ParameterTarget, is_expert, layer_shape, model_device, resolve_layers, unwrap_model
from .model_tasks import ModelTask, output_head, output_head_rows
from .statistics import GRADIENT_DTYPE, INPUT_DTYPE, OUTPUT_DTYPE, LoraDAStatistics, statistics_bytes

PerExampleLoss = Callable[[object, Mapping[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


def collect_statistics(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    target_modules: Sequence[str],
    config: LoraDAConfig,
    *,
    loss_fn: PerExampleLoss | None = None,
    shard: bool = False,
    shard_statistics: bool = False,
    input_chunks: bool = True,
) -> LoraDAStatistics:
    """Gather LoRA-DA statistics of the named linear layers in one forward+backward pass over `batches`.

    Under an initialized `torch.distributed` process group each rank passes over its own batches and the
    sums are all-reduced, so every rank returns the statistics of all ranks' data.

    Args:
        model: a transformers model (or a PEFT model wrapping one, or either inside DDP); its weights are not
            changed and its `requires_grad` flags, train/eval mode and hooks are restored afterwards.
        batches: dicts with `input_ids`, `attention_mask` and optional `labels` (-100 = ignored), any size.
        target_modules: names of the layers (`nn.Linear`, GPT-2 `Conv1D`, or PEFT LoRA layers around them), or of
            weights inside parameters (`layers.ParameterTarget`): an expert's slice of a 3-D stack of experts'
            weights, e.g. "model.layers.0.mlp.experts.gate_up_proj[3]", or a 2-D weight such as a router's,
            "model.layers.0.mlp.gate.weight". An expert that no calibration token reaches has no statistics (it is
            listed in the metadata under `hooks.UNROUTED_KEY`).
        config: token mask and output scaling are read from it.
        loss_fn: optional `(outputs, batch) -> (per-example losses [B], supervised counts [B])`; the default
            is the model's usual loss per example (shifted cross-entropy for causal LMs).
        shard: under `torch.distributed`, keep only batch i with i % world_size == rank (leave False when
            the batches come from a `DistributedSampler`, which shards already).
        shard_statistics: under `torch.distributed`, keep each layer's sums on the one rank that will solve it
            (`stats.owners`; reduced there batch by batch) instead of all sums on every rank: about 1/world_size
            of the memory, for one reduction per layer and batch. Every rank needs at least one batch.
        input_chunks: False: each batch's products of `Z` go straight into their float64 totals, without the
            float32 chunks that save float64 additions for batches of few tokens (a third less memory for `Z`).
    """
    model = unwrap_model(model)
    distributed = is_distributed()
    if shard and distributed:
        batches = shard_batches(batches)
    config = local_config(config)
    modules = resolve_layers(model, target_modules)
    if shard_statistics and distributed and any(is_expert(target) for target in modules.values()):
        raise LoraDAError(EXPERTS_NOT_SHARDED)
    if shard_statistics and distributed:
        collector = Collector(modules, config, sharded=True)
        _run_sharded_pass(model, batches, collector, config, loss_fn)
        stats = _sharded_result(collector, model_device(model))
        _record_settings(stats, config, collector)
        return stats
    collector = Collector(modules, config, input_chunks=input_chunks)
    on_every_rank(lambda: _run_pass(model, batches, collector, config, loss_fn))
    if distributed:
        stats = _all_reduce(collector, model_device(model))
    else:
        if collector.num_examples == 0:
            raise LoraDAError(_NO_EXAMPLE)
        stats = collector.result()
    _record_settings(stats, config, collector)
    stats.check_valid()
    return stats


def collect_in_two_passes(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    target_modules: Sequence[str],
    config: LoraDAConfig,
    *,
    loss_fn: PerExampleLoss | None = None,
    shard: bool = False,
) -> LoraDAStatistics:
    """The statistics of `collect_statistics` from two passes that hold less at once: a forward+backward that
    gathers `G` and `y` (the same sums), then a forward without gradients that gathers `Z` beside them (it keeps
    no activations for a backward; each batch's products go straight into the float64 totals, so `Z` agrees to
    float32 rounding). Layers of `nn.Linear` kind (no `target_parameters`); `batches` must give the same examples
    twice. Under `torch.distributed` each pass's sums are all-reduced after it, as in `collect_statistics`
    (`shard` as there)."""
    model = unwrap_model(model)
    distributed = is_distributed()
    if shard and distributed:
        batches = shard_batches(batches)
    config = local_config(config)
    modules = resolve_layers(model, target_modules)
    if any(isinstance(target, ParameterTarget) for target in modules.values()):
        raise LoraDAError("Statistics in two passes (G and y, then Z) are for linear layers, not for weights adapted "
                          "through `target_parameters`.")
    device = model_device(model)
    gradients = Collector(modules, config, gather="gradients")
    on_every_rank(lambda: _run_pass(model, batches, gradients, config, loss_fn))
    if distributed:
        stats = _all_reduce(gradients, device)
    else:
        if gradients.num_examples == 0:
            raise LoraDAError(_NO_EXAMPLE)
        stats = gradients.result()
    inputs = Collector(modules, config, gather="inputs")
    inputs.input_groups = stats.input_groups
    on_every_rank(lambda: _run_forward_pass(model, batches, inputs, config, loss_fn))
    widths = {stats.input_groups[name]: gradient.shape[1] for name, gradient in stats.gradient_sums.items()}
    if distributed:
        _all_reduce_inputs(inputs, widths, device)
    inputs.fold_all()
    if inputs.data_hash() != gradients.data_hash():
        raise LoraDAError("The second pass over `batches` saw other examples than the first: `batches` must give the "
                          "same examples each time it is iterated (a list or a DataLoader; shuffling is fine).")
    stats.input_sums = {group: inputs.input_sums[group] for group in widths}
    stats.input_token_counts = {group: inputs.input_token_counts[group] for group in widths}
    _record_settings(stats, config, gradients)
    stats.check_valid()
    return stats


def _run_forward_pass(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    collector: Collector,
    config: LoraDAConfig,
    loss_fn: PerExampleLoss | None,
) -> None:
    """One forward over `batches` without gradients, with the collector's hooks attached (it gathers `Z`)."""
    task, device = ModelTask.of(model), model_device(model)
    with _statistics_mode(model), collector.attached(model), torch.no_grad():
        for batch in tqdm(batches, desc="LoRA-DA statistics (Z)", unit="batch", disable=not config.show_progress):
            _forward(model, task, batch, device, collector, config, loss_fn, hash_it=True)


def _record_settings(stats: LoraDAStatistics, config: LoraDAConfig, collector: Collector) -> None:
    """The statistics' record of the token mask, the output scaling and the calibration data's hash."""
    stats.metadata.update({"token_mask": config.token_mask, "output_scaling": config.output_scaling,
                           "data_hash": collector.data_hash()})


@dataclass(frozen=True)
class BatchProbe:
    """What the statistics pass's forward of one batch shows before any statistics exist."""

    input_groups: dict[str, str]  # layer -> first layer of the group that reads its input (q/k/v, gate/up)
    activation_bytes: int  # for the batch's backward: tensors autograd saves, layer inputs the hooks hold, and
    # the gradients passing through it (see `probe_batch`)


def probe_batch(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    target_modules: Sequence[str],
    config: LoraDAConfig,
    loss_fn: PerExampleLoss | None = None,
) -> BatchProbe:
    """The statistics pass's forward of `batch`, its graph dropped unused: which target layers read one input (the
    memory plan then counts each group's `Z` once) and how many bytes the batch's backward needs (the plan leaves
    them to the activations): what the pass keeps for it, each storage once and the model's parameters and buffers
    not, and twice the largest of those for the gradients passing through the backward (the loss's gradient with
    respect to the log-probabilities and then to the logits are alive at once, each the logits' size)."""
    model = unwrap_model(model)
    modules = resolve_layers(model, target_modules)
    collector = Collector(modules, config)
    weights = {_storage(t) for t in itertools.chain(model.parameters(), model.buffers())}
    kept: set[tuple[int, int]] = set()

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        # a sharded model's gathered weights (and an expert's slice of them) are parameters, though not the model's
        weight = isinstance(tensor, nn.Parameter) or isinstance(tensor._base, nn.Parameter)
        storage = None if weight else _storage(tensor)
        if storage is not None and storage not in weights:
            kept.add(storage)
        return tensor

    collector.on_hold = keep
    with ExitStack() as stack:
        stack.enter_context(_statistics_mode(model))
        stack.enter_context(collector.attached(model))
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor))
        _forward(model, ModelTask.of(model), batch, model_device(model), collector, config, loss_fn, hash_it=False)
    collector.finalize_groups()
    sizes = [size for _, size in kept]
    return BatchProbe(collector.input_groups, sum(sizes) + 2 * max(sizes, default=0))


def _storage(tensor: torch.Tensor) -> tuple[int, int] | None:
    """(address, bytes) of a tensor's storage, or None where it has none to read (e.g. a sharded parameter)."""
    try:
        storage = tensor.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError):
        return None


EXPERTS_NOT_SHARDED = (
    "Statistics of experts' weights cannot be sharded over ranks (each rank routes its tokens to other experts, "
    "so the ranks' per-expert reductions cannot run in step); pass shard_statistics=False."
)
_NO_EXAMPLE = (
    "No calibration example has a supervised token: the data is empty, or every label is -100 "
    "(e.g. prompts longer than max_length leave no completion)."
)


def _forward(
    model: nn.Module,
    task: ModelTask,
    batch: Mapping[str, torch.Tensor],
    device: torch.device,
    collector: Collector,
    config: LoraDAConfig,
    loss_fn: PerExampleLoss | None,
    *,
    hash_it: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch's forward with the collector's masks set: per-example losses and supervised counts, [B] each
    (`hash_it`: the batch counts towards the data hash)."""
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    labels = task.labels(batch)
    if hash_it:
        collector.hash_batch(batch, labels)
    counts = task.supervised_counts(batch, labels)
    collector.set_masks(task.token_masks(batch, labels, counts, config.token_mask), counts)
    # the vocabulary projection only where the loss reads it, unless a loss of the caller's or a hook on the head
    # needs every position
    head = output_head(model)
    hooked = head is not None and any(m is getattr(target, "owner", target) for m in head.modules()
                                      for target in collector.modules.values())
    rows = task.head_rows(labels) if loss_fn is None and not hooked else None
    with output_head_rows(model, rows) as selected:
        outputs = model(**task.model_inputs(batch, labels))
    if loss_fn is not None:
        return loss_fn(outputs, batch)
    if selected:
        return task.selected_losses(outputs.logits, labels, rows)
    return task.losses(outputs, labels)


def _run_pass(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    collector: Collector,
    config: LoraDAConfig,
    loss_fn: PerExampleLoss | None,
) -> None:
    """One forward+backward over `batches` with the collector's hooks attached."""
    task = ModelTask.of(model)
    device = model_device(model)
    with _statistics_mode(model), collector.attached(model):
        bar = tqdm(batches, desc="LoRA-DA statistics", unit="batch", disable=not config.show_progress)
        for index, batch in enumerate(bar):
            losses, counts = _forward(model, task, batch, device, collector, config, loss_fn, hash_it=True)
            valid = counts > 0
            if not valid.any():
                collector.discard_batch()
                continue
            total = losses[valid].sum()
            if not torch.isfinite(total.detach()):
                raise LoraDAError(f"The loss of calibration batch {index} is not finite ({total.detach().item()}).")
            collector.finalize_groups()
            total.backward()
            collector.num_examples += int(valid.sum())
            bar.set_postfix(examples=collector.num_examples)
    collector.check_observed()


def _run_sharded_pass(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    collector: Collector,
    config: LoraDAConfig,
    loss_fn: PerExampleLoss | None,
) -> None:
    """The pass with sharded sums: the ranks take their steps together, because every backward reduces each
    layer's contribution to its owner. A rank out of batches, or without a supervised token in its batch,
    repeats a batch at zero weight with no rows counted, so that it joins each of the step's reductions."""
    task = ModelTask.of(model)
    device = model_device(model)
    comm = communication_device(device)
    iterator, last = iter(batches), None
    with (
        _statistics_mode(model),
        collector.attached(model),
        tqdm(desc="LoRA-DA statistics", unit="batch", disable=not config.show_progress) as bar,
    ):
        while True:
            batch = next(iterator, None)
            if all_reduce_counts([int(batch is not None)], comm)[0] == 0:
                break
            real, valid_here, first, error = batch is not None, False, False, None
            try:
                if batch is None and last is None:
                    raise LoraDAError("This rank has no calibration batch; with shard_statistics=True every rank "
                                      "needs at least one (or pass shard_statistics=False).")
                batch = batch or last
                losses, counts = _forward(model, task, batch, device, collector, config, loss_fn, hash_it=real)
                valid = counts > 0
                valid_here = real and bool(valid.any())
                total = losses[valid].sum() if valid_here else losses.sum() * 0.0
                if valid_here and not torch.isfinite(total.detach()):
                    raise LoraDAError(f"The loss of a calibration batch is not finite ({total.detach().item()}).")
                first = collector.input_groups is None
                collector.finalize_groups()
            except Exception as exc:  # every rank must learn of it, or the others wait in a reduction
                error = exc
            failed, anyone_valid = all_reduce_counts([int(error is not None), int(valid_here)], comm)
            if failed:
                raise_if_any_rank_failed(error)
            if first:
                _check_same_layout(all_gather_objects(collector.layout()))
            last = batch
            if not anyone_valid:
                collector.discard_batch()
                continue
            collector.joining_only = not valid_here
            try:
                total.backward()
            finally:
                collector.joining_only = False
            if valid_here:
                collector.num_examples += int(valid.sum())
            bar.update(1)
            bar.set_postfix(examples=collector.num_examples)


def _sharded_result(collector: Collector, device: torch.device) -> LoraDAStatistics:
    """This rank's layers of sharded statistics, with every count summed over the ranks."""
    names = list(collector.modules)
    groups = collector.input_groups or {}
    leaders = list(dict.fromkeys(groups[name] for name in names)) if groups else []
    counts = all_reduce_counts(
        [collector.num_examples, *collector.data_hash_sums, len(collector.reached)]
        + [collector.output_token_counts.get(name, 0) for name in names]
        + [collector.input_token_counts.get(g, 0) for g in leaders],
        communication_device(device),
    )
    num_examples, collector.data_hash_sums, reached = counts[0], counts[1:4], counts[4]
    error = None
    if not groups or num_examples == 0:
        error = LoraDAError(_NO_EXAMPLE)
    elif reached < len(names) * get_world_size():  # the same layers are missed on every rank: one model
        unreached = next((name for name in names if name not in collector.reached), names[0])
        error = LoraDAError(
            f"Layer {unreached!r} received no gradient: it does not influence the loss of any calibration token."
        )
    if error is None:
        try:
            collector.check_observed()
        except LoraDAError as exc:
            error = exc
    if error is not None:
        raise_if_any_rank_failed(error)
    collector.fold_all()
    mine = [name for name in names if collector.owners.get(name) == collector.rank]
    my_leaders = [g for g in leaders if collector.owners[g] == collector.rank]
    output_counts = dict(zip(names, counts[5 : 5 + len(names)], strict=True))
    input_counts = dict(zip(leaders, counts[5 + len(names) :], strict=True))
    stats = LoraDAStatistics(
        gradient_sums={name: collector.gradient_sums[name] for name in mine},
        output_sq_sums={name: collector.output_sq_sums[name] for name in mine},
        output_token_counts=output_counts,  # counts of every layer: the same report on every rank
        input_groups={name: groups[name] for name in mine},
        input_sums={g: collector.input_sums[g] for g in my_leaders},
        input_token_counts=input_counts,
        num_examples=num_examples,
        owners=dict(collector.owners),
    )
    try:
        stats.check_valid()
    except LoraDAError as exc:
        error = exc
    raise_if_any_rank_failed(error)
    return stats


def _check_same_layout(layouts: list[dict]) -> None:
    """Every rank found the same shared-input groups and layer shapes."""
    groups = next((layout["groups"] for layout in layouts if layout["groups"] is not None), None)
    for rank, layout in enumerate(layouts):
        if layout["groups"] is not None and layout["groups"] != groups:
            raise LoraDAError(
                f"Rank {rank} found other shared-input groups than the other ranks: every rank must run the same "
                "model with the same target layers."
            )


def _all_reduce(collector: Collector, device: torch.device) -> LoraDAStatistics:
    """Sum every rank's accumulators; ranks with no (valid) batch contribute zeros."""
    layouts = all_gather_objects(collector.layout())
    _check_same_layout(layouts)
    groups = next((layout["groups"] for layout in layouts if layout["groups"] is not None), None)
    shapes: dict[str, list[int]] = {}
    for rank, layout in enumerate(layouts):
        for name, shape in layout["shapes"].items():
            if shapes.setdefault(name, shape) != shape:
                raise LoraDAError(f"Layer {name!r} has shape {shape} on rank {rank} but {shapes[name]} elsewhere.")
    if layouts[0]["data"][0] > 0 and all(layout["data"] == layouts[0]["data"] for layout in layouts):
        if is_main_process():
            warnings.warn(
                f"All {len(layouts)} ranks passed the same calibration batches: the statistics are right but the "
                "work was repeated on every rank; pass shard=True (or batches from a DistributedSampler).",
                stacklevel=3,
            )
    names = list(collector.modules)
    hash_counts = all_reduce_counts([collector.num_examples, *collector.data_hash_sums], communication_device(device))
    if groups is None or hash_counts[0] == 0:
        raise LoraDAError(_NO_EXAMPLE)
    unrouted = set(collector.unrouted(shapes))
    names = [name for name in names if name not in unrouted]
    # a collector of G and y alone has no Z to reduce: it comes from a pass of its own (collect_in_two_passes)
    leaders = list(dict.fromkeys(groups[name] for name in names)) if collector.gather == "all" else []

    def local(sums: dict[str, torch.Tensor], key: str, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
        return sums[key] if key in sums else torch.zeros(shape, dtype=dtype, device=device)

    collector.fold_all()
    gradient_sums = {name: local(collector.gradient_sums, name, shapes[name], GRADIENT_DTYPE) for name in names}
    output_sq_sums = {name: local(collector.output_sq_sums, name, shapes[name][:1], OUTPUT_DTYPE) for name in names}
    input_sums = {g: local(collector.input_sums, g, [packed_size(shapes[g][1])], INPUT_DTYPE) for g in leaders}
    comm = communication_device(device)
    all_reduce_sum(list(gradient_sums.values()), comm)
    all_reduce_sum([*output_sq_sums.values(), *input_sums.values()], comm)
    counts = all_reduce_counts(
        [collector.output_token_counts.get(name, 0) for name in names]
        + [collector.input_token_counts.get(g, 0) for g in leaders],
        comm,
    )
    collector.num_examples, collector.data_hash_sums = hash_counts[0], hash_counts[1:]
    return LoraDAStatistics(
        gradient_sums=gradient_sums,
        output_sq_sums=output_sq_sums,
        output_token_counts=dict(zip(names, counts[: len(names)], strict=True)),
        input_groups={name: groups[name] for name in names},
        input_sums=input_sums,
        input_token_counts=dict(zip(leaders, counts[len(names) :], strict=True)),
        num_examples=hash_counts[0],
        metadata=unrouted_metadata(unrouted),
    )


def _all_reduce_inputs(collector: Collector, widths: Mapping[str, int], device: torch.device) -> None:
    """Sum every rank's totals of `Z` (inputs of width `widths[group]`), their token counts and the data hash in
    place; a rank with no batch adds zeros."""
    collector.fold_all()
    for group, width in widths.items():
        collector.input_sums.setdefault(group, torch.zeros(packed_size(width), dtype=INPUT_DTYPE, device=device))
    comm = communication_device(device)
    all_reduce_sum([collector.input_sums[group] for group in widths], comm)
    counts = all_reduce_counts([collector.input_token_counts.get(group, 0) for group in widths]
                               + list(collector.data_hash_sums), comm)
    collector.input_token_counts = dict(zip(widths, counts[: len(widths)], strict=True))
    collector.data_hash_sums = counts[len(widths) :]


def estimate_statistics_bytes(model: nn.Module, target_modules: Sequence[str]) -> dict[str, int]:
    """Upper bound of the accumulators' bytes per layer: G [m, n] + y [m] + Z [n, n] (Z counted per layer,
    though layers that read one input, e.g. q/k/v, share a single one)."""
    model = unwrap_model(model)
    sizes = {}
    for name, module in resolve_layers(model, target_modules).items():
        m, n = layer_shape(module)
        sizes[name] = statistics_bytes(m, n)
    return sizes


@contextmanager
def _statistics_mode(model: nn.Module):
    """Eval mode (no dropout), no parameter gradients; flags and modes restored even on error."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    embeddings_hook = None
    try:
        model.eval()
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        # Each target layer's output is where gradients start to be needed (hooks.Collector makes it require one),
        # so the backward stops at the pass's earliest target layer; but a block under reentrant checkpointing runs
        # its backward only when its input requires a gradient, so there gradients flow from the embeddings on.
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if isinstance(embeddings, nn.Module) and any(getattr(m, "gradient_checkpointing", False) is True
                                                     for m in model.modules()):
            embeddings_hook = embeddings.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
        with torch.enable_grad():
            yield
    finally:
        if embeddings_hook is not None:
            embeddings_hook.remove()
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        for module, mode in modes:
            module.training = mode
