"""Node-aware choice of experts: the margin, the fewest-nodes fill and the stepped node bias
(``--locmoe-node-margin``, ``--locmoe-node-fill-mass``, ``--locmoe-node-target-share`` with
``--locmoe-node-bias-mode selection``), one rule for the locmoe router and Megatron's.

Both change which experts a token picks, never the gate values of the experts it picks (those
stay the router's own scores) nor the balance losses:

- the margin: another node's expert replaces one of the token's own node only when it scores
  higher by more than ``m`` in logit units (on probabilities: e^m times higher);
- the fill (top-k > 1): the token's M best nodes, ranked by the probability mass of each node's
  own best k, M the smallest whose best k experts keep ``q`` of the token's unconstrained top-k
  mass (and hold at least k experts): node-limited routing with M chosen per token;
- the node target on the choice (DeepSeek-V3's aux-loss-free bias, per node): a bias b on the
  node's experts, added to the margin, stepped after every training routing by
  ``b += rate * (p* - node-local share)`` (``step_node_bias``), one per rank.

Megatron's router takes them through its top-k hook (``TopKRouter.router_replay``, the seam
FasterMoE's cap uses, routers/outgoing_cap.py): ``NodeSelection.get_replay_topk`` gets
Megatron's selection scores and its own top-k function (plain or group-limited), so everything
else (scaling, dropping, the aux losses on the unmasked scores) stays Megatron's. Shapes: T tokens,
E experts, N nodes of the EP group, k experts per token.
"""

from __future__ import annotations

import math
import weakref

import torch

from megatron_locmoe import metrics
from megatron_locmoe.config import ConfigError, LocMoEConfig
from megatron_locmoe.routers.outgoing_cap import check_topk_hook


@torch.no_grad()
def fewest_nodes_mask(
    probs_TE: torch.Tensor, expert_node_E: torch.Tensor, nodes: int, topk: int, mass: float
) -> torch.Tensor:
    """[T, E] bool: the experts on each token's fewest best nodes that keep ``mass`` of its
    top-k probability mass (``expert_node_E``: each expert's node, in blocks of E / N)."""
    T, E = probs_TE.shape
    per = E // nodes
    p_TE = probs_TE.float()
    wanted_T = mass * p_TE.topk(topk, dim=1).values.sum(1)
    node_mass_TN = p_TE.view(T, nodes, per).topk(min(topk, per), dim=2).values.sum(2)
    order_TN = node_mass_TN.argsort(dim=1, descending=True, stable=True)
    place_TN = torch.empty_like(order_TN).scatter_(
        1, order_TN, torch.arange(nodes, device=order_TN.device).expand(T, nodes)
    )
    place_TE = place_TN.gather(1, expert_node_E.to(place_TN.device).expand(T, E))
    nodes_T = torch.full((T,), nodes, dtype=torch.long, device=p_TE.device)
    for M in range(nodes - 1, -(-topk // per) - 1, -1):  # from many nodes down: the fewest wins
        mass_T = p_TE.masked_fill(place_TE >= M, 0).topk(topk, dim=1).values.sum(1)
        nodes_T = torch.where(mass_T >= wanted_T, M, nodes_T)
    return place_TE < nodes_T[:, None]


@torch.no_grad()
def selection_scores(
    scores_TE: torch.Tensor,
    router: torch.nn.Module,
    bias,
    mass: float,
    scores_are_logits: bool,
) -> torch.Tensor:
    """[T, E] what the choice of experts ranks: the router's ``scores_TE`` (logits, or
    probabilities) with ``bias`` (logit units: the margin, plus the locmoe router's node bias
    under node_bias_mode selection) on the node's experts, and the experts off each token's
    fewest nodes masked to -inf where ``mass`` < 1. Read against the router's current node map
    (``expert_is_local``, ``expert_node``: the virtual cluster switches them per rank)."""
    selection_TE = scores_TE.detach().float()
    local_E = router.expert_is_local.float()
    if scores_are_logits:
        selection_TE = selection_TE + bias * local_E
    else:
        selection_TE = selection_TE * torch.exp(bias * local_E)
    if mass < 1:
        probs_TE = scores_TE.detach().float()
        probs_TE = (
            torch.softmax(probs_TE, dim=-1)
            if scores_are_logits
            else probs_TE / probs_TE.sum(-1, keepdim=True).clamp_min(1e-20)
        )
        keep_TE = fewest_nodes_mask(
            probs_TE, router.expert_node, router.num_nodes, router.topk, mass
        )
        selection_TE = selection_TE.masked_fill(~keep_TE, -math.inf)
    return selection_TE


def node_bias_applies(locmoe: LocMoEConfig, expert_is_local_E: torch.Tensor) -> bool:
    """Whether a router steers a node bias: a target share is set and its node hosts some but
    not all of the experts (the bias moves nothing otherwise)."""
    L, E = int(expert_is_local_E.sum()), expert_is_local_E.numel()
    return locmoe.node_target_share > 0 and 0 < L < E


@torch.no_grad()
def step_node_bias(
    router: torch.nn.Module, routing_map_TE: torch.Tensor, padding_mask=None
) -> None:
    """The router's node bias += rate * (p* - node-local share of this batch's picks), the
    tokens Megatron's ``padding_mask`` marks (True on padding) left out: on the device, no host
    sync (``router.node_bias``, its ``locmoe`` settings, ``expert_is_local``)."""
    if padding_mask is not None:
        routing_map_TE = routing_map_TE & ~padding_mask.reshape(-1, 1).bool()
    share = metrics.node_local_fraction(routing_map_TE, router.expert_is_local)
    cfg = router.locmoe
    router.node_bias.add_(cfg.node_bias_rate * (cfg.node_target_share - share.float()))


def check_blocks(expert_node_E: torch.Tensor, nodes: int) -> None:
    """The fill reads each node's experts as one block of E / N (Megatron's contiguous
    assignment); refuse a node map that is not."""
    E = expert_node_E.numel()
    if not torch.equal(expert_node_E.cpu(), torch.arange(E) // (E // nodes)):
        raise ConfigError("--locmoe-node-fill-mass needs each node's experts in one block")


class NodeSelection:
    """The margin, the fill and the stepped node bias in Megatron's top-k hook
    (``TopKRouter.router_replay``); the router steps its ``node_bias`` itself, after routing."""

    def __init__(self, router: torch.nn.Module, locmoe: LocMoEConfig, scores_are_logits: bool):
        self._router = weakref.ref(router)  # no cycle: the router holds this object
        self.margin, self.mass = locmoe.node_margin, locmoe.node_fill_mass
        self.scores_are_logits = scores_are_logits
        self.layer_number = None  # TopKRouter.set_layer_number sets it on its router_replay
        if self.mass < 1:
            check_blocks(router.expert_node, router.num_nodes)

    def get_replay_topk(
        self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None
    ):
        """(the scores of the chosen experts, their indices): Megatron's top-k on the selection
        scores with the margin added and the experts off the fewest nodes masked."""
        router = self._router()
        bias = self.margin + router.node_bias if router.node_bias_on else self.margin
        selection_TE = selection_scores(scores, router, bias, self.mass, self.scores_are_logits)
        with torch.no_grad():
            _, top_TK = default_compute_topk(
                selection_TE, topk, num_groups=num_groups, group_topk=group_topk
            )
        return scores.gather(1, top_TK), top_TK


def scores_are_logits(tc) -> bool:
    """Whether Megatron's top-k ranks logits (softmax after the top-k) rather than
    probabilities (softmax before it, or sigmoid scores)."""
    return tc.moe_router_score_function == "softmax" and not tc.moe_router_pre_softmax


def check_node_selection(locmoe: LocMoEConfig, tc) -> None:
    """Raise ConfigError, with the fix, for a Megatron model the margin, the fill or the node
    target cannot run with (the locmoe router applies them in its own routing)."""
    target = locmoe.node_target_share
    if target > 0 and locmoe.node_bias_mode != "selection":
        raise ConfigError(
            f"--locmoe-node-target-share {target} on Megatron's router steers the choice of "
            "experts only (its gate values and aux loss stay Megatron's): add "
            f"--locmoe-node-bias-mode selection (not {locmoe.node_bias_mode}, which changes "
            "the locmoe router's logits)"
        )
    if target == 0 and (
        locmoe.node_bias_mode != LocMoEConfig.node_bias_mode
        or locmoe.node_bias_rate != LocMoEConfig.node_bias_rate
    ):
        raise ConfigError(
            f"--locmoe-node-bias-mode {locmoe.node_bias_mode} / --locmoe-node-bias-rate "
            f"{locmoe.node_bias_rate} steer the node-target bias, but --locmoe-node-target-share "
            "is 0 (no bias): set a target share or drop them"
        )
    flags = [
        f"--locmoe-node-margin {locmoe.node_margin}" if locmoe.node_margin else "",
        f"--locmoe-node-fill-mass {locmoe.node_fill_mass}" if locmoe.node_fill_mass < 1 else "",
        f"--locmoe-node-target-share {target}" if target > 0 else "",
    ]
    flag = " and ".join(f for f in flags if f)
    if not flag:
        return
    if locmoe.max_outgoing_fraction is not None:
        raise ConfigError(
            f"{flag} and --locmoe-max-outgoing-fraction both choose the experts in Megatron's "
            "top-k hook: use one of them"
        )
    if locmoe.node_fill_mass < 1 and getattr(tc, "moe_router_num_groups", None):
        raise ConfigError(
            f"--locmoe-node-fill-mass {locmoe.node_fill_mass} chooses each token's nodes itself; "
            f"--moe-router-num-groups {tc.moe_router_num_groups} limits them too: use one of them"
        )
    check_topk_hook(flag, tc)
