"""Per-layer routing metrics, recorded through Megatron's MoE metrics tracker.

Every router records the same names on every rank (a PP all-reduce over differing names
hangs), so TensorBoard/W&B writers and the dashboards see one set of keys. Values are per-rank
per-micro-batch; Megatron's tracker sums them over micro-batches, scales by 1/num_microbatches
at report time and averages over data-parallel ranks and MoE layers.
"""

from __future__ import annotations

import operator

import torch
from megatron.core.transformer.moe.moe_logging import (
    MetricEntry,
    MoEMetricsTracker,
    get_moe_metrics_tracker,
    set_moe_metrics_tracker,
)

from megatron_locmoe.dispatch.traffic import SCHEME_BYTES

LOAD_BALANCING_LOSS = "load_balancing_loss"  # Megatron's own name for the aux loss
LOCALITY_LOSS = "locality_loss"
NODE_LOCAL_FRACTION = "node_local_fraction"
LOAD_CV = "load_cv"
TOKENS_DROPPED = "tokens_dropped"
EXPERT_CAPACITY = "expert_capacity"
CAPACITY_DELTA = "capacity_delta"
CAPACITY_EC_MIN = "capacity_ec_min"
"""LocMoE's lower bound on expert capacity, in tokens, as logged: capped at the capacity the
batch ran with. Below or inside [floor, ceiling] the bound is at most that capacity (C =
clamp(ceil(m * bound), floor, ceiling), m >= 1), so the value is the bound itself; a bound above
the ceiling (up to inf, where the tail probability underflows: tokens all along their gate
rows, e.g. every token on one expert) is logged as the ceiling it ran at, so the metric equals
``expert_capacity`` exactly when the bound asks for the ceiling or more. Finite, so the layer
and rank averages and the JSON records stay numbers; the router's own state
(``capacity_ec_min`` buffer, checkpoints) keeps the uncapped bound. Without a capacity (0) the
value is logged as it is."""
EXPERT_CHOICE = "expert_choice"
"""1 where the capacity schedule is in its expert-choice phase (locmoe_plus: the adaptive
capacity binds below the capacity-factor ceiling), 0 otherwise (token choice at the ceiling, or
no schedule); the layer average is the share of layers in that phase."""

ROUTER_METRICS = (
    LOCALITY_LOSS,
    NODE_LOCAL_FRACTION,
    LOAD_CV,
    TOKENS_DROPPED,
    EXPERT_CAPACITY,
    CAPACITY_DELTA,
    CAPACITY_EC_MIN,
    EXPERT_CHOICE,
)
"""Names every plugin router records (plus Megatron's load_balancing_loss)."""

INTRA_NODE_BYTES = "intra_node_bytes"
INTER_NODE_BYTES = "inter_node_bytes"
FLAT_INTER_NODE_BYTES = "flat_inter_node_bytes"
TWO_HOP_INTER_NODE_BYTES = "two_hop_inter_node_bytes"
DEDUP_INTER_NODE_BYTES = "dedup_inter_node_bytes"
RECEIVED_LOAD = "received_tokens_max_over_mean"
"""Token-expert assignments received per EP rank, max / mean over the EP group (1: even)."""
DISPATCH_METRICS = (INTRA_NODE_BYTES, INTER_NODE_BYTES, *SCHEME_BYTES, RECEIVED_LOAD)
assert {FLAT_INTER_NODE_BYTES, TWO_HOP_INTER_NODE_BYTES, DEDUP_INTER_NODE_BYTES} <= set(
    SCHEME_BYTES
)
"""Bytes this rank sends per layer and micro-batch (dispatch + combine) with the run's
dispatcher (``intra_node_bytes`` / ``inter_node_bytes``), what each scheme would send for the
same routing (flat All-to-All, two-hop, two-hop with per-node dedup; inter-node = to remote
nodes only), and the load of the EP ranks (tokens received, max / mean)."""

PLUGIN_METRICS = ROUTER_METRICS + DISPATCH_METRICS


def load_cv(tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Coefficient of variation of the expert loads (std / mean, population std); 0 if empty.

    Computed on the device without a branch on its value (no host sync in the forward)."""
    load = tokens_per_expert.double()
    return load.std(unbiased=False) / load.mean().clamp_min(1e-30)


def node_local_fraction(
    routing_map_TE: torch.Tensor, expert_is_local_E: torch.Tensor
) -> torch.Tensor:
    """Share of token-expert assignments whose expert lives on this rank's node (1 if none)."""
    total = routing_map_TE.sum().double()
    local = (routing_map_TE & expert_is_local_E.unsqueeze(0)).sum().double()
    return torch.where(total > 0, local / total.clamp_min(1), torch.ones_like(total))


def record_layer(module, values: dict, device: torch.device) -> None:
    """Record ``{name: value}`` for a router or MoE layer (``config``, ``layer_number``,
    ``is_mtp_layer``), indexed as Megatron indexes its aux losses (MTP layers after the
    decoder's): stacked on the device, one tracker write."""
    vector = torch.stack(
        [
            v.detach().float() if torch.is_tensor(v) else torch.full((), float(v), device=device)
            for v in values.values()
        ]
    )
    record_vector(module, tuple(values), vector)


def record_vector(module, names: tuple[str, ...], vector_K: torch.Tensor) -> None:
    """Record one value per name for this module's layer with a single in-place add.

    The tracker keeps a [num_layers] tensor per name and adds to one element per record: a
    handful of kernels and Python calls per metric. Here the names' entries are rows of one
    [K, num_layers] block (contiguous, so the tracker's all-reduces take them as they are), and
    a record is one column add. No-op before set_layer_number, like Megatron's record."""
    slot = layer_slot(module)
    if slot is None:
        return
    column, num_layers = slot
    block = tracker_block(names, num_layers, vector_K.device)
    block.select(1, column).add_(vector_K.detach().to(block.dtype))


def layer_slot(module) -> tuple[int, int] | None:
    """(0-based tracker column, tracker length) of a router or MoE layer (``config``,
    ``layer_number``, ``is_mtp_layer``), indexed as Megatron indexes its aux losses (MTP layers
    after the decoder's); None before set_layer_number, and None for a training forward without
    autograd: under activation recompute that forward runs again with autograd in the backward,
    and recording both would count the layer twice (Megatron records its aux loss in the same
    pass only)."""
    config, layer = module.config, module.layer_number
    if layer is None or (module.training and not torch.is_grad_enabled()):
        return None
    if module.is_mtp_layer:
        layer += config.num_layers
    return layer - 1, config.num_layers + (config.mtp_num_layers or 0)


def _peer_average_group():
    """The tensor/context-parallel group when it has peers, else None. Under sequence
    parallelism (and context parallelism) those peers route different tokens, so a per-rank
    metric is averaged over them as over data parallelism: every rank then reports one value."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None
    group = parallel_state.get_tensor_and_context_parallel_group(check_initialized=False)
    if group is None or torch.distributed.get_world_size(group) == 1:
        return None
    return group


def tracker_block(names: tuple[str, ...], num_layers: int, device) -> torch.Tensor:
    """The [K, num_layers] block behind ``names``' entries in the global tracker, (re)built when
    an entry is missing or was replaced (its values so far are carried over); averaged at
    report time over the tensor/context-parallel peers and the data-parallel ranks."""
    tracker = get_moe_metrics_tracker()
    blocks = tracker.__dict__.setdefault("_locmoe_blocks", {})
    block, owned = blocks.get(names, (None, ()))
    entries = tracker.metrics
    # every layer and micro-batch asks: a C-level identity check that the entries are still
    # the ones built here (Megatron replaces entries, never an entry's values)
    if (
        block is not None
        and all(map(operator.is_, map(entries.get, names), owned))
        and block.device == torch.device(device)
    ):
        return block
    block = torch.zeros(len(names), num_layers, device=device)
    owned, avg_group = [], _peer_average_group()
    for name, row in zip(names, block, strict=True):
        old = entries.get(name)
        if old is not None and old.values.shape == row.shape:
            row.copy_(old.values)  # across devices too
        entries[name] = MetricEntry(values=row, avg_group=avg_group, needs_dp_avg=True)
        owned.append(entries[name])
    blocks[names] = (block, tuple(owned))
    return block


def megatron_entry(name: str, num_layers: int, device, reduce_group) -> torch.Tensor:
    """The values of a tracker entry set up as Megatron's ``record`` leaves it (sum over
    ``reduce_group``, then the data-parallel average), for a kernel that adds to it directly."""
    tracker = get_moe_metrics_tracker()
    tracker.ensure_initialized(name, num_layers, device)
    entry = tracker.metrics[name]
    if entry.values.device != torch.device(device):  # e.g. pre-created elsewhere: the kernels
        entry.values = entry.values.to(device)  # write through a pointer on their own device
    entry.reduce_group, entry.avg_group, entry.needs_dp_avg = reduce_group, None, True
    return entry.values


class LocMoEMetricsTracker(MoEMetricsTracker):
    """Megatron's tracker, reporting the plugin's metrics too.

    Megatron's training_log passes only its own loss names as ``track_names``; this adds
    PLUGIN_METRICS on every rank (the same list everywhere, or the pipeline-parallel
    all-reduce hangs), so TensorBoard and W&B get them with Megatron's writers.
    """

    def report(self, *args, track_names=None, **kwargs):
        if track_names is not None:
            names = [track_names] if isinstance(track_names, str) else list(track_names)
            track_names = names + [n for n in PLUGIN_METRICS if n not in names]
        return super().report(*args, track_names=track_names, **kwargs)


def install_metrics_tracker() -> LocMoEMetricsTracker:
    """Make the plugin's tracker the global one (idempotent); routers record through it."""
    tracker = get_moe_metrics_tracker()
    if not isinstance(tracker, LocMoEMetricsTracker):
        tracker = LocMoEMetricsTracker()
        set_moe_metrics_tracker(tracker)
    return tracker
