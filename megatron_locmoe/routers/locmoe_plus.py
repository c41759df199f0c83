"""The LocMoE+ router (Expert-Token Resonance, arXiv 2406.00023): affinity routing from token
choice to expert choice, with an adaptive capacity.

Affinity of token t and expert i: cos(x_t, w_i), w_i the expert's GrAP row (not W x: rows of
learnable block weights differ in norm). Token choice takes each token's top-k experts by
affinity; expert choice keeps, of the tokens routed to an expert, the C of highest affinity and
drops (and counts) the rest. C = clamp(ceil(m C*), floor, ceiling): C* is LocMoE's bound at the
measured delta (the paper's Remark 7), m = 2 (Corollary 6: expert choice needs C >= 2 C* once
features cluster), re-estimated every K steps. While features are isotropic C* is large and the
clamp holds C at the capacity-factor ceiling, token choice at the baseline's capacity; once
m C* falls below the ceiling the experts' choice binds (metric ``expert_choice``).

Interpretations (docs/design.md §1.6): the gate value scaling an expert's output is the
softmax of temperature * affinity (+ the optional GrAP bias, which then enters token choice);
the threshold on the cumulative affinity reads the gate values top-p style; delta is the
percentile of each token's largest routed affinity; losses, floor and ceiling are LocMoE's.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_utils import compute_routing_scores_for_aux_loss

import megatron_locmoe.routers.fused as fused
from megatron_locmoe.config import ConfigError, LocMoEConfig
from megatron_locmoe.routers.fused import affinity_route, grap_affinity, threshold_choice
from megatron_locmoe.routers.locmoe import LocMoERouter


class LocMoEPlusRouter(LocMoERouter):
    """LocMoE+ routing as a Megatron-Core router: LocMoE's gate, losses and capacity machinery
    with affinity in place of W x, drops by affinity and the capacity asked at m C*."""

    name = "locmoe_plus"
    label = "LocMoE+"
    has_affinity_routing = True
    default_reestimate_interval = 100
    default_capacity_factor = 1.1
    placement_obstacle = (
        "its GrAP affinity gives expert i hidden chunk i, so moving expert i would need the "
        "whole model's hidden dimension permuted"
    )

    @classmethod
    def check_model(cls, locmoe: LocMoEConfig, tc) -> None:
        if tc.moe_expert_capacity_factor is None:
            raise ConfigError(
                "the locmoe_plus router keeps an adaptive capacity below the capacity-factor "
                "capacity: set --moe-expert-capacity-factor (the paper's baseline: 1.1)"
            )
        if locmoe.capacity_mode == "none":
            raise ConfigError(
                "--locmoe-capacity-mode none switches off LocMoE+'s adaptive capacity, which is "
                "the method: use auto or bound (for the capacity-factor baseline, "
                "--moe-router-type switch or megatron)"
            )
        if tc.moe_router_topk_scaling_factor is not None:
            raise ConfigError(
                "--moe-router-topk-scaling-factor: the locmoe_plus gate value is the softmax "
                "of the affinities, unscaled; drop the flag"
            )
        if locmoe.plus_affinity_threshold > 0 and not tc.moe_router_pre_softmax:
            raise ConfigError(
                f"--locmoe-plus-affinity-threshold {locmoe.plus_affinity_threshold} keeps the "
                "fewest experts whose softmax over all experts reaches it, but at top-k > 1 "
                "without --moe-router-pre-softmax the gate values are the softmax over the "
                "chosen k: add --moe-router-pre-softmax"
            )
        super().check_model(locmoe, tc)

    @property
    def capacity_multiplier(self) -> float:
        return self.locmoe.plus_capacity_multiplier

    # ---- the hooks of LocMoE's capacity paths ----------------------------------------------
    def fused_route(self, x_TH: torch.Tensor, gate: tuple):
        weight, log_temperature, bias = gate
        threshold = self.locmoe.plus_affinity_threshold
        return fused.run(
            affinity_route, x_TH.device, x_TH, weight, log_temperature, bias, self.topk, threshold
        )

    def reference_gate(self, input: torch.Tensor):
        affinity_TE = grap_affinity(
            input.reshape(-1, self.config.hidden_size), self.gate_tensors()[0]
        )
        return affinity_TE, self.logits_from_raw(affinity_TE)

    def token_choice(self, logits_TE: torch.Tensor, selection_TE: torch.Tensor | None = None):
        probs_TE, routing_map_TE = super().token_choice(logits_TE, selection_TE)
        return threshold_choice(probs_TE, routing_map_TE, self.locmoe.plus_affinity_threshold)

    def aux_routing(self, logits_TE: torch.Tensor, padding_mask):
        """The balance loss counts the token-choice assignments (threshold applied)."""
        map_TE, scores_TE = compute_routing_scores_for_aux_loss(
            logits_TE, self.topk, "softmax", padding_mask=padding_mask
        )
        threshold = self.locmoe.plus_affinity_threshold
        if threshold > 0:
            _, map_TE = threshold_choice(scores_TE * map_TE, map_TE, threshold)
        return map_TE, scores_TE

    def drop_priority(self, probs_TE: torch.Tensor, gate_TE: torch.Tensor) -> torch.Tensor:
        """Expert choice: an expert keeps the tokens of highest affinity."""
        return gate_TE

    def routed_cosines(self, input_TH, gate_TE, routing_map_TE) -> torch.Tensor:
        """Each token's largest routed affinity (already a cosine)."""
        return gate_TE.masked_fill(~routing_map_TE, -torch.inf).amax(-1)
