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
    """Coefficient of variation of the expert loads (std / mean, population std); 0 if empty."""
    load = tokens_per_expert.double()
    mean = load.mean()
    if mean == 0:
        return torch.zeros((), dtype=torch.float64, device=load.device)
    return load.std(unbiased=False) / mean


def node_local_fraction(
    routing_map_TE: torch.Tensor, expert_is_local_E: torch.Tensor
) -> torch.Tensor:
    """Share of token-expert assignments whose expert lives on this rank's node."""
    total = routing_map_TE.sum()
    if total == 0:
        return torch.ones((), device=routing_map_TE.device)
    local = (routing_map_TE & expert_is_local_E.unsqueeze(0)).sum()
    return local.double() / total.double()


def record(
    name: str, value, layer_number: int | None, num_layers: int, device: torch.device
) -> None:
    """Record one scalar for one layer (no-op before set_layer_number, like Megatron's).

    Values live on the routing device: the tracker all-reduces them with the job's backend.
    """
    if not torch.is_tensor(value):
        value = torch.tensor(float(value), device=device)
    get_moe_metrics_tracker().record(
        name, value.detach().float(), layer_number, num_layers, needs_dp_avg=True
    )
