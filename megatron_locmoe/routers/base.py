"""What every plugin router shares: the LocMoE config, the node map, drops and metrics.

Routers subclass Megatron's TopKRouter (so MoELayer, checkpoints, the aux-loss plumbing and
``set_layer_number`` work unchanged) and mix this in. Shapes: T tokens on this rank (after
sequence parallelism), E experts, k experts per token.
"""

from __future__ import annotations

import torch

from megatron_locmoe import metrics
from megatron_locmoe.config import LocMoEConfig
from megatron_locmoe.topology import current_topology


def drop_to_capacity(
    probs_TE: torch.Tensor, routing_map_TE: torch.Tensor, capacity: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep at most ``capacity`` tokens per expert, the highest-probability ones.

    Returns (probs, routing_map, dropped) with dropped = number of assignments removed.
    """
    T = routing_map_TE.shape[0]
    if capacity >= T:
        return probs_TE, routing_map_TE, routing_map_TE.new_zeros((), dtype=torch.long)
    masked = probs_TE.masked_fill(~routing_map_TE, -1.0)  # unrouted never beat routed (probs >= 0)
    top_idx_CE = masked.topk(capacity, dim=0, sorted=False).indices
    keep_TE = torch.zeros_like(routing_map_TE).scatter(0, top_idx_CE, True) & routing_map_TE
    dropped = routing_map_TE.sum() - keep_TE.sum()
    return probs_TE * keep_TE, keep_TE, dropped


class PluginRouterMixin:
    """Node map and routing metrics for a TopKRouter subclass."""

    locmoe: LocMoEConfig
    uses_locmoe_alpha = True
    """Switch-form balance loss with LocMoE's alpha (locmoe, switch); Megatron's own otherwise."""

    def get_aux_loss_coeff(self, aux_loss_type: str) -> float:
        """LocMoE's alpha for Megatron's Switch-form ``aux_loss``; its seq/global variants off."""
        if not self.uses_locmoe_alpha:
            return super().get_aux_loss_coeff(aux_loss_type)
        return self.locmoe.aux_loss_coeff if aux_loss_type == "aux_loss" else 0.0

    def _init_plugin(self, locmoe: LocMoEConfig | None) -> None:
        self.locmoe = (locmoe or LocMoEConfig()).validate(self.config)
        topo = current_topology()
        expert_nodes = torch.tensor(topo.expert_nodes(self.config.num_moe_experts))
        # [E] bool: experts hosted on this rank's node. Buffer so it follows .to(device).
        self.register_buffer("expert_is_local", expert_nodes == topo.node, persistent=False)

    def record_routing_metrics(
        self,
        probs_TE: torch.Tensor,
        routing_map_TE: torch.Tensor,
        dropped: torch.Tensor | int = 0,
        capacity: int = 0,
        locality_loss: torch.Tensor | float = 0.0,
        delta: torch.Tensor | float = 0.0,
        ec_min: torch.Tensor | float = 0.0,
    ) -> None:
        """Record the full metric set (zeros where a metric does not apply to this router)."""
        real_TE = routing_map_TE & (probs_TE > 0)  # padding-to-capacity slots carry prob 0
        metrics.record_layer(
            self,
            {
                metrics.LOCALITY_LOSS: locality_loss,
                metrics.NODE_LOCAL_FRACTION: metrics.node_local_fraction(
                    real_TE, self.expert_is_local
                ),
                metrics.LOAD_CV: metrics.load_cv(real_TE.sum(0)),
                metrics.TOKENS_DROPPED: dropped,
                metrics.EXPERT_CAPACITY: capacity,
                metrics.CAPACITY_DELTA: delta,
                metrics.CAPACITY_EC_MIN: ec_min,
            },
            routing_map_TE.device,
        )
