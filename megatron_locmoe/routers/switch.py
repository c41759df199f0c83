"""Switch Transformer baseline (Fedus et al. 2021) and Megatron's own router, with metrics.

Both keep Megatron's TopKRouter routing untouched and add the plugin's metric set, so a router
comparison logs the same keys for every router. Switch = learned linear gate, top-1 softmax,
alpha * n * sum_i f_i P_i, capacity factor with the overflow dropped (and counted).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_utils import get_capacity
from megatron.core.transformer.moe.router import TopKRouter

import megatron_locmoe.routers.node_selection as node_selection
import megatron_locmoe.routers.outgoing_cap as outgoing_cap
from megatron_locmoe.config import ConfigError, LocMoEConfig
from megatron_locmoe.routers.base import (
    MEGATRON_ROUTER_FORWARD,
    MEGATRON_ROUTING,
    PluginRouterMixin,
    megatron_keywords,
    megatron_router_args,
)


class _MeasuredTopKRouter(PluginRouterMixin, TopKRouter):
    """TopKRouter routing plus the plugin's metrics (dropped = top-k picks that were removed)."""

    supports_expert_placement = True
    """TopKRouter's top-k reads neither the expert index nor the node map (group-limited
    routing aside: analysis/placement.py's check_router refuses it)."""

    def __init__(
        self, config, pg_collection=None, is_mtp_layer=False, layer_number=None, *, locmoe=None
    ):
        super().__init__(**megatron_router_args(config, pg_collection, is_mtp_layer, layer_number))
        self._init_plugin(locmoe, layer_number)
        self._init_virtual()

    def route_tokens(self, input, padding_mask, input_ids, packed_seq_params):
        """Megatron's TopKRouter.forward; ``input_ids`` and ``packed_seq_params`` handed on
        where this Megatron's forward takes them."""
        extra = megatron_keywords(
            MEGATRON_ROUTER_FORWARD, input_ids=input_ids, packed_seq_params=packed_seq_params
        )
        return TopKRouter.forward(self, input, padding_mask=padding_mask, **extra)

    def _no_token_collectives(self, routing_map_TE: torch.Tensor) -> None:
        """Megatron's global aux loss reduces tokens per expert over the tp-dp-cp group:
        take part with zeros and count the step, as the token path does."""
        if not (self.training and torch.is_grad_enabled()):
            return
        if self.get_aux_loss_coeff("global_aux_loss") == 0:
            return
        from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

        tokens_E = reduce_from_tensor_model_parallel_region(
            routing_map_TE.sum(dim=0), self.tp_dp_cp_group
        )
        self.global_tokens_per_expert += tokens_E
        self.ga_steps += 1

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None, **kwargs):
        """Megatron's routing plus the metrics; ``kwargs`` (dev's input_ids,
        packed_seq_params) handed on where this Megatron's routing takes them. Megatron's
        padding mask is True on padding: its tokens are not counted as dropped."""
        extra = megatron_keywords(MEGATRON_ROUTING, **kwargs)
        probs_TE, routing_map_TE = super().routing(logits, padding_mask=padding_mask, **extra)
        T, E = routing_map_TE.shape
        capacity, dropped = 0, routing_map_TE.new_zeros((), dtype=torch.long)
        if self.config.moe_expert_capacity_factor is not None:
            capacity = get_capacity(T * self.topk, E, self.config.moe_expert_capacity_factor)
            kept_TE = routing_map_TE & (probs_TE > 0)
            if padding_mask is not None:
                valid_T = ~padding_mask.reshape(-1).bool()
                dropped = valid_T.sum() * self.topk - kept_TE[valid_T].sum()
            else:
                dropped = T * self.topk - kept_TE.sum()
        self.record_routing_metrics(probs_TE, routing_map_TE, dropped, capacity)
        return probs_TE, routing_map_TE


class MegatronRouter(_MeasuredTopKRouter):
    """Megatron-Core's TopKRouter, unchanged, with the plugin's metrics (router type megatron);
    with --locmoe-max-outgoing-fraction, FasterMoE's cap on the tokens that leave the node
    masks its top-k (routers/outgoing_cap.py); with --locmoe-node-margin,
    --locmoe-node-fill-mass or --locmoe-node-target-share (--locmoe-node-bias-mode selection),
    the node-aware choice of experts (routers/node_selection.py): Megatron's gate values and
    aux loss stay its own."""

    name = "megatron"
    label = "Megatron"
    is_plugin_router = False
    uses_locmoe_alpha = False
    has_outgoing_cap = has_node_selection = has_node_target = True

    def _init_plugin(self, resolution, layer_number=None) -> None:
        """The node map, then the node-target bias (a buffer: saved in checkpoints, one per
        virtual rank) where this rank's node hosts some but not all experts."""
        super()._init_plugin(resolution, layer_number)
        self.node_bias_on = node_selection.node_bias_applies(self.locmoe, self.expert_is_local)
        if self.node_bias_on:
            self.register_buffer("node_bias", torch.tensor(0.0))

    def per_rank_buffers(self) -> tuple[str, ...]:
        """The node bias: each rank steers its own node-local share."""
        return ("node_bias",) if self.node_bias_on else ()

    def __init__(
        self, config, pg_collection=None, is_mtp_layer=False, layer_number=None, *, locmoe=None
    ):
        super().__init__(config, pg_collection, is_mtp_layer, layer_number, locmoe=locmoe)
        fraction = self.locmoe.max_outgoing_fraction
        if fraction is not None:
            bank = self._virtual_bank  # every virtual rank's node, or this rank's
            table = self.expert_is_local[None] if bank is None else bank.derived["expert_is_local"]
            outgoing_cap.check_node_map(table, self.topk)
            self.router_replay = outgoing_cap.OutgoingCap(self, fraction)
        elif self.locmoe.node_margin or self.locmoe.node_fill_mass < 1 or self.node_bias_on:
            self.router_replay = node_selection.NodeSelection(
                self, self.locmoe, node_selection.scores_are_logits(config)
            )

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None, **kwargs):
        """Megatron's routing; then, in training, the node bias steps towards the target."""
        probs_TE, routing_map_TE = super().routing(logits, padding_mask=padding_mask, **kwargs)
        if self.node_bias_on and self.training and torch.is_grad_enabled():
            node_selection.step_node_bias(self, routing_map_TE, padding_mask)
        return probs_TE, routing_map_TE

    @classmethod
    def check_model(cls, locmoe: LocMoEConfig, tc) -> None:
        """Megatron's own router takes every setting Megatron takes, but for one its
        validation misses (its group-limited top-k then fails inside the first forward); the
        cap needs Megatron's unfused top-k and top-k experts on every node."""
        if locmoe.max_outgoing_fraction is not None:
            outgoing_cap.check_outgoing_cap(locmoe, tc)
        node_selection.check_node_selection(locmoe, tc)
        groups, limit = tc.moe_router_num_groups, tc.moe_router_group_topk
        if groups and limit and tc.moe_router_topk > limit * (tc.num_moe_experts // groups):
            raise ConfigError(
                f"--moe-router-topk {tc.moe_router_topk} experts cannot come from "
                f"--moe-router-group-topk {limit} of {groups} groups of "
                f"{tc.num_moe_experts // groups} experts: raise --moe-router-group-topk or use "
                "fewer groups"
            )


class SwitchRouter(_MeasuredTopKRouter):
    """Top-1 softmax with LocMoE's alpha for the Switch-form loss and a capacity factor."""

    name = "switch"
    label = "Switch"
    has_switch_balance_loss = True
    default_capacity_factor = 1.0

    @classmethod
    def check_model(cls, locmoe: LocMoEConfig, tc) -> None:
        if tc.moe_router_topk != 1:
            raise ConfigError(
                f"the switch router is top-1; got --moe-router-topk {tc.moe_router_topk}, use 1"
            )
        if tc.moe_expert_capacity_factor is None:
            raise ConfigError(
                "the switch router drops overflow at a capacity factor: set "
                "--moe-expert-capacity-factor (the Switch Transformer used 1.0-1.25)"
            )
        super().check_model(locmoe, tc)
