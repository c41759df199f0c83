"""FasterMoE's topology gate as an option: a hard cap on the tokens that leave the node.

FasterMoE (He et al., PPoPP'22; FastMoE's ``faster_gate.py``) limits, per batch and rank, how
many tokens may go to an expert on another node. Its rule is top-2 only. This module's rule, for
any top-k (``--locmoe-max-outgoing-fraction F``, read by the megatron router):

1. the unconstrained top-k of every token (Megatron's own top-k on its selection scores,
   group-limited routing included);
2. the candidates: tokens whose unconstrained top-k holds an expert on another node;
3. of those, the ``floor(F x T)`` with the highest score of their best remote chosen expert keep
   their top-k unchanged (ties: the earlier token), T the tokens of this rank's micro-batch
   (all the router sees, padding included);
4. every other candidate takes its top-k among the experts of the rank's node: the selection
   scores of the remote experts are masked to -inf, as Megatron's group-limited top-k masks the
   groups it did not pick.

So at most floor(F x T) tokens per micro-batch and rank have any remote expert; tokens that
wanted none are untouched, and with fewer candidates than the budget nothing changes (bitwise).
The ranking, the budget and the mask are tensor ops on the device: no host sync.

The seam: Megatron-Core 0.19.2's ``topk_routing_with_score_function`` hands its selection scores
(softmax, logits, or sigmoid + expert bias, by the router's settings) and its own top-k function
(plain or group-limited) to the router's ``router_replay`` object; ``OutgoingCap`` is installed
there, so everything else (gate values from the chosen scores, scaling, token dropping, the aux
losses on the *unmasked* scores through ``compute_routing_scores_for_aux_loss``, the expert bias
update) stays Megatron's. Routing paths that bypass that hook (TE's fused top-k, sinkhorn,
quantile balancing) and Megatron's own routing replay are refused at parse time
(``check_outgoing_cap``). Shapes: T tokens, E experts, k experts per token.
"""

from __future__ import annotations

import math
import os
import weakref
from fractions import Fraction

import torch

from megatron_locmoe.config import ConfigError, LocMoEConfig


def outgoing_budget(fraction: float, num_tokens: int) -> int:
    """floor(F x T) with F as written (0.29 x 100 = 29, not float's 28.999...)."""
    return math.floor(Fraction(repr(float(fraction))) * num_tokens)


def capped_topk(
    scores_TE: torch.Tensor,
    topk: int,
    expert_is_local_E: torch.Tensor,
    fraction: float,
    compute_topk,
    num_groups: int | None = None,
    group_topk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of ``scores_TE`` (the selection scores) with at most floor(F x T) tokens keeping an
    expert off this node (``expert_is_local_E``: [E] bool, the rank's node's experts).

    ``compute_topk(scores, k, num_groups=, group_topk=)`` is Megatron's top-k (plain or
    group-limited); returns its (values_TK, indices_TK) on the masked scores."""
    T = scores_TE.shape[0]
    budget = outgoing_budget(fraction, T)
    if budget >= T:  # every token may keep its experts: Megatron's top-k as it is
        return compute_topk(scores_TE, topk, num_groups=num_groups, group_topk=group_topk)
    remote_E = ~expert_is_local_E.to(device=scores_TE.device, dtype=torch.bool)
    with torch.no_grad():
        detached_TE = scores_TE.detach()
        _, free_TK = compute_topk(detached_TE, topk, num_groups=num_groups, group_topk=group_topk)
        remote_TK = remote_E[free_TK]
        wants_T = remote_TK.any(dim=-1)
        chosen_TK = detached_TE.gather(1, free_TK)
        best_remote_T = chosen_TK.masked_fill(~remote_TK, -math.inf).amax(dim=-1)
        key_T = best_remote_T.masked_fill(~wants_T, -math.inf)
        order_T = torch.sort(key_T, descending=True, stable=True)[1]
        rank_T = torch.empty_like(order_T).scatter_(
            0, order_T, torch.arange(T, device=order_T.device)
        )
        capped_T = wants_T & (rank_T >= budget)
    masked_TE = scores_TE.masked_fill(capped_T[:, None] & remote_E[None, :], -math.inf)
    return compute_topk(masked_TE, topk, num_groups=num_groups, group_topk=group_topk)


class OutgoingCap:
    """The cap in Megatron's top-k hook (``TopKRouter.router_replay``): Megatron calls
    ``get_replay_topk`` with its selection scores and its top-k function in every routing."""

    def __init__(self, router: torch.nn.Module, fraction: float):
        self._router = weakref.ref(router)  # no cycle: the router holds this object
        self.fraction = fraction
        self.layer_number = None  # TopKRouter.set_layer_number sets it on its router_replay

    def get_replay_topk(
        self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None
    ):
        """(values, indices) of the capped top-k, read against the router's current node map
        (``expert_is_local``: the virtual cluster switches it per rank, in place)."""
        return capped_topk(
            scores,
            topk,
            self._router().expert_is_local,
            self.fraction,
            default_compute_topk,
            num_groups=num_groups,
            group_topk=group_topk,
        )


def node_shape(locmoe: LocMoEConfig, tc) -> tuple[int, int] | None:
    """(nodes of an EP group, experts per node) for the model ``tc`` (a TransformerConfig or
    Megatron's parsed arguments) on the virtual cluster or the real one (devices per node from
    ``--locmoe-devices-per-node`` or torchrun's LOCAL_WORLD_SIZE); None where it is not known
    before the ranks start (the router checks its node map again when it is built)."""
    E = tc.num_moe_experts
    shape = locmoe.virtual_shape
    if shape is not None:
        nodes, gpus = shape
        ep, etp, dpn = locmoe.virtual_ep, 1, gpus
    else:
        dpn = locmoe.devices_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
        if not dpn:
            return None
        ep = tc.expert_model_parallel_size
        etp = getattr(tc, "expert_tensor_parallel_size", None) or tc.tensor_model_parallel_size
    if not E or E % ep:
        return None  # Megatron's own checks refuse it
    ranks_per_node = ep if ep * etp <= dpn else max(dpn // etp, 1)
    return max(ep // ranks_per_node, 1), E // ep * ranks_per_node


def check_topk_hook(flag: str, tc) -> None:
    """Raise ConfigError for the routing paths that bypass Megatron's top-k hook (``flag``: the
    setting that needs the hook, named in the message)."""
    lb_types = tc.moe_router_load_balancing_type
    lb_types = [lb_types] if isinstance(lb_types, str) else list(lb_types or [])
    bypass = [
        why
        for why, bad in (
            ("--moe-router-fusion (TE's fused top-k)", getattr(tc, "moe_router_fusion", False)),
            (
                "--moe-router-load-balancing-type sinkhorn",
                "sinkhorn" in lb_types,
            ),
            (
                "--moe-router-load-balancing-type quantile_balancing",
                "quantile_balancing" in lb_types,
            ),
            (
                "--moe-enable-routing-replay (the replay would bypass the cap)",
                getattr(tc, "moe_enable_routing_replay", False),
            ),
        )
        if bad
    ]
    if bypass:
        raise ConfigError(
            f"{flag} works in Megatron's top-k, which {', '.join(bypass)} does not run: drop "
            f"{'it' if len(bypass) == 1 else 'them'} or drop {flag.split()[0]}"
        )


def check_outgoing_cap(locmoe: LocMoEConfig, tc) -> None:
    """Raise ConfigError, with the fix, for a model the cap cannot run with."""
    flag = f"--locmoe-max-outgoing-fraction {locmoe.max_outgoing_fraction}"
    check_topk_hook(flag, tc)
    shape = node_shape(locmoe, tc)
    if shape is None:
        return
    nodes, per_node = shape
    k = tc.moe_router_topk
    if per_node < k:
        raise ConfigError(
            f"{flag}: a capped token takes its top-{k} among its node's experts, but a node "
            f"hosts {per_node} ({tc.num_moe_experts} experts over {nodes} nodes): lower "
            f"--moe-router-topk to {per_node} or fewer, or place more experts per node "
            "(fewer nodes per expert-parallel group)"
        )
    groups = getattr(tc, "moe_router_num_groups", None)
    if groups and groups % nodes:
        raise ConfigError(
            f"{flag} with --moe-router-num-groups {groups}: a group must lie inside one node "
            f"(the masked groups of a capped token are then whole), but {groups} groups do not "
            f"split over {nodes} nodes; use a multiple of {nodes} groups (groups = nodes: "
            f"--moe-router-num-groups {nodes})"
        )


def check_node_map(expert_is_local_VE: torch.Tensor, topk: int) -> None:
    """At build: every rank's node (``[V, E]``: one row per rank, the virtual cluster's every
    virtual rank) hosts at least ``topk`` experts."""
    fewest = int(expert_is_local_VE.sum(dim=-1).min())
    if fewest < topk:
        raise ConfigError(
            f"--locmoe-max-outgoing-fraction: a capped token takes its top-{topk} among its "
            f"node's experts, but a node hosts {fewest}: lower --moe-router-topk to {fewest} or "
            "fewer, or place more experts per node"
        )
