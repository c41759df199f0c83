"""Per-layer routing metrics, recorded through Megatron's MoE metrics tracker.

Every router records the same names on every rank (a PP all-reduce over differing names
hangs), so TensorBoard/W&B writers and the dashboards see one set of keys. Values are per-rank
per-micro-batch; Megatron's tracker sums them over micro-batches, scales by 1/num_microbatches
at report time and averages over data-parallel ranks and MoE layers.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

LOAD_BALANCING_LOSS = "load_balancing_loss"  # Megatron's own name for the aux loss
LOCALITY_LOSS = "locality_loss"
NODE_LOCAL_FRACTION = "node_local_fraction"
LOAD_CV = "load_cv"
TOKENS_DROPPED = "tokens_dropped"
EXPERT_CAPACITY = "expert_capacity"
CAPACITY_DELTA = "capacity_delta"
CAPACITY_EC_MIN = "capacity_ec_min"

ROUTER_METRICS = (
    LOCALITY_LOSS,
    NODE_LOCAL_FRACTION,
    LOAD_CV,
    TOKENS_DROPPED,
    EXPERT_CAPACITY,
    CAPACITY_DELTA,
    CAPACITY_EC_MIN,
)
"""Names every plugin router records (plus Megatron's load_balancing_loss)."""


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


def record(
    name: str, value, layer_number: int | None, num_layers: int, device: torch.device
) -> None:
    """Record one scalar for one layer (no-op before set_layer_number, like Megatron's).

    Values live on the routing device: the tracker all-reduces them with the job's backend.
    """
    if not torch.is_tensor(value):
        value = torch.full((), float(value), device=device)  # a fill, not a host copy
    get_moe_metrics_tracker().record(
        name, value.detach().float(), layer_number, num_layers, needs_dp_avg=True
    )
