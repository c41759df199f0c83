"""The node-aware options of the locmoe router against hand-written references, on a real
2-rank cluster (2 nodes of 1 GPU, EP 2: node 0 hosts experts 0-3):

- ``--locmoe-node-margin m``: the experts are the top-k of the logits with m added on the node's
  own experts, the gate values the unbiased softmax's, the losses unchanged;
- ``--locmoe-node-bias-mode selection``: the node bias acts as that margin (the same routing
  for the same value), steps towards the target share, and leaves the gate values and the
  balance loss as without a node target; the logits mode changes both; the learned mode is the
  logits mode's function with the bias a parameter (TA-MoE's per-node offset);
- ``--locmoe-node-fill-mass q``: each token's k experts from the fewest nodes that keep q of its
  top-k probability mass (a per-token Python reference);
- ``--locmoe-rank-balance-loss-coeff``: adds exactly the gradient of alpha * sum_r f_r P_r
  (DeepSeek-V2's communication balance over the EP ranks), padding left out, routing unchanged;
- ``--moe-router-topk-scaling-factor`` scales the locmoe router's gate values (it was ignored).

Every reference forms the chosen experts' gate values as Megatron does: the softmax over the
chosen k logits (its default at top-k > 1) or, with ``--moe-router-pre-softmax``, the softmax
over all experts.
"""

from __future__ import annotations

import pytest
import torch

from megatron_locmoe.sim.cluster import ParallelLayout

TWO_NODES = ParallelLayout(devices_per_node=1, ep=2)
S, B, H, E, K = 12, 2, 16, 8, 2
MARGIN = 0.3


def _setup(ctx, ep: int = 2, tokens: int = S, **tc_overrides):
    """A builder of locmoe routers on this rank (EP ``ep``, one rank a node), and the input
    [tokens, B, H] (the same on every rank)."""
    from megatron.core.transformer.moe.moe_utils import (
        MoEAuxLossAutoScaler,
        get_default_pg_collection,
    )

    from megatron_locmoe.config import LocMoEConfig
    from megatron_locmoe.routers import router_builder
    from megatron_locmoe.sim.testing import moe_config

    ctx.topology()
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    tc = moe_config(ep=ep, num_moe_experts=E, moe_router_topk=K, hidden_size=H, **tc_overrides)

    def build(router_type: str = "locmoe", **settings):
        router = router_builder(LocMoEConfig(router_type=router_type, **settings))(
            config=tc, pg_collection=get_default_pg_collection()
        )
        router.set_layer_number(1)
        router.train()
        return router

    torch.manual_seed(0)
    return build, torch.randn(tokens, B, H) * 4


def _route(router, x_SBH, padding_SB=None):
    """(probs, routing map, the gradient the router's attached losses alone give the input)."""
    x = x_SBH.clone().requires_grad_(True)
    probs_TE, map_TE = router(x, padding_SB)
    (probs_TE * 0).sum().backward()  # the output's gradient is zero: only the losses reach x
    return probs_TE.detach(), map_TE, x.grad


def gate_values(logits_TE, map_TE, pre_softmax: bool):
    """[T, E] the unbiased logits' gate values on ``map_TE``: the softmax over all experts
    (pre) or over each token's chosen ones."""
    if not pre_softmax:
        logits_TE = logits_TE.masked_fill(~map_TE, -torch.inf)
    return torch.where(map_TE, torch.softmax(logits_TE, -1), torch.zeros_like(logits_TE))


def _selection_reference(router, x_SBH, bias: float):
    """Top-k of the logits with ``bias`` on the node's experts; the unbiased logits' values."""
    logits_TE = router.reference_gate(x_SBH)[1].detach()
    chosen_TK = torch.topk(logits_TE + bias * router.expert_is_local.float(), K, dim=1).indices
    map_TE = torch.zeros_like(logits_TE, dtype=torch.bool).scatter(1, chosen_TK, True)
    return gate_values(logits_TE, map_TE, router.config.moe_router_pre_softmax), map_TE


def selection_job(ctx, pre_softmax: bool) -> dict:
    build, x = _setup(ctx, moe_router_pre_softmax=pre_softmax)
    base = _route(build(), x)
    margin = _route(build(node_margin=MARGIN), x)
    expected_probs, expected_map = _selection_reference(build(), x, MARGIN)
    local = build().expert_is_local

    selection = build(node_target_share=0.5, node_bias_mode="selection", node_bias_rate=0.1)
    selection.node_bias.fill_(MARGIN)
    chosen = _route(selection, x)
    share = float((chosen[1] & local).sum() / chosen[1].sum())

    logits_mode = build(node_target_share=0.5)
    logits_mode.node_bias.fill_(MARGIN)
    biased = _route(logits_mode, x)
    return {
        "margin_map": torch.equal(margin[1], expected_map),
        "margin_probs": torch.allclose(margin[0], expected_probs, rtol=1e-6, atol=1e-7),
        "margin_moves_tokens": bool((margin[1] != base[1]).any()),
        "local_picks": (int((base[1] & local).sum()), int((margin[1] & local).sum())),
        "margin_losses_unchanged": torch.equal(margin[2], base[2]),
        "selection_is_the_margin": torch.equal(chosen[0], margin[0])
        and torch.equal(chosen[1], margin[1]),
        "selection_losses_unchanged": torch.equal(chosen[2], base[2]),
        "bias_step": (float(selection.node_bias), MARGIN + 0.1 * (0.5 - share)),
        "logits_mode_same_map": torch.equal(biased[1], margin[1]),
        "logits_mode_other_gate": not torch.allclose(biased[0], margin[0]),
        "logits_mode_other_losses": not torch.allclose(biased[2], base[2]),
    }


@pytest.mark.parametrize("pre_softmax", [False, True])
def test_the_margin_and_the_selection_bias_change_the_choice_of_experts_only(cluster2, pre_softmax):
    for r in cluster2.run(selection_job, pre_softmax, layout=TWO_NODES):
        assert r["margin_map"] and r["margin_probs"], r
        assert r["margin_moves_tokens"] and r["local_picks"][1] > r["local_picks"][0], r
        assert r["margin_losses_unchanged"] and r["selection_losses_unchanged"], r
        assert r["selection_is_the_margin"], r
        got, want = r["bias_step"]
        assert abs(got - want) < 1e-6, r
        # the same bias on the logits picks the same experts (softmax keeps the order) but
        # changes the gate values and the balance target
        assert r["logits_mode_same_map"], r
        assert r["logits_mode_other_gate"] and r["logits_mode_other_losses"], r


def learned_job(ctx) -> dict:
    build, x = _setup(ctx)
    stepped = build(node_target_share=0.5)
    learned = build(node_target_share=0.5, node_bias_mode="learned")
    with torch.no_grad():
        stepped.node_bias.fill_(MARGIN)
        learned.node_bias.fill_(MARGIN)
    a, b = _route(stepped, x), _route(learned, x)
    return {
        "same_function": all(torch.equal(u, v) for u, v in zip(a, b, strict=True)),
        "a_parameter": any(p is learned.node_bias for p in learned.parameters()),
        "not_stepped": float(learned.node_bias) == float(torch.tensor(MARGIN))
        and float(stepped.node_bias) != float(torch.tensor(MARGIN)),
        "gradient": float(learned.node_bias.grad),
        "not_per_rank": "node_bias" not in learned.per_rank_buffers(),
    }


def test_the_learned_offset_is_the_node_bias_trained_by_the_optimizer(cluster2):
    """TA-MoE's offset: the same routing and losses as the stepped bias at the same value, but
    a parameter (one for every rank, as data parallelism keeps it) with a gradient from the
    node-aware balance loss, and no step of its own."""
    for r in cluster2.run(learned_job, layout=TWO_NODES):
        assert r["same_function"] and r["a_parameter"] and r["not_stepped"], r
        assert r["gradient"] != 0 and r["not_per_rank"], r


def rank_balance_job(ctx, padded: bool) -> dict:
    build, x = _setup(ctx)
    padding_SB = None
    valid_T = torch.ones(S * B, dtype=torch.bool)
    if padded:
        padding_SB = torch.zeros(S, B, dtype=torch.bool)
        padding_SB[S - 3 :] = True
        valid_T = ~padding_SB.reshape(-1)
    alpha = 0.5
    base = _route(build(), x, padding_SB)
    router = build(rank_balance_loss_coeff=alpha)
    balanced = _route(router, x, padding_SB)

    # the reference: alpha * sum_r f_r P_r over the 2 ranks of 4 experts, valid tokens only
    xr = x.clone().requires_grad_(True)
    scores_TE = torch.softmax(router.reference_gate(xr)[1], -1)[valid_T]
    sent_TR = balanced[1][valid_T].view(-1, 2, E // 2).any(-1)
    f_R = 2 * sent_TR.sum(0).float() / sent_TR.sum()
    P_R = scores_TE.view(-1, 2, E // 2).sum(-1).mean(0)
    (grad,) = torch.autograd.grad(alpha * (f_R * P_R).sum(), xr)
    added = balanced[2] - base[2]
    return {
        "routing_unchanged": torch.equal(balanced[0], base[0])
        and torch.equal(balanced[1], base[1]),
        "gradient": (added - grad).abs().max().item(),
        "scale": grad.abs().max().item(),
        "padding_gets_none": (not padded) or float(added[S - 3 :].abs().max()) == 0.0,
    }


def test_the_rank_balance_loss_adds_deepseek_v2s_communication_balance_gradient(cluster2):
    for padded in (False, True):
        for r in cluster2.run(rank_balance_job, padded, layout=TWO_NODES):
            assert r["routing_unchanged"], r
            assert r["scale"] > 1e-4, r  # the term is there to be compared
            assert r["gradient"] <= 2e-5 * r["scale"], r  # float32: a difference of gradients
            assert r["padding_gets_none"], r


def _fewest_nodes_reference(p_E: list[float], nodes: int, k: int, q: float) -> set[int]:
    """One token, in plain Python: nodes ranked by the mass of their own best k; the smallest M
    (with at least k experts) whose best k keep q of the unconstrained top-k mass; its top k."""
    per = len(p_E) // nodes
    on = [sorted(range(n * per, (n + 1) * per), key=lambda e: -p_E[e]) for n in range(nodes)]
    mass = [sum(p_E[e] for e in on[n][:k]) for n in range(nodes)]
    ranked = sorted(range(nodes), key=lambda n: -mass[n])  # stable, as the router's argsort
    best = sorted(range(len(p_E)), key=lambda e: -p_E[e])[:k]
    for M in range(-(-k // per), nodes + 1):
        allowed = sorted((e for n in ranked[:M] for e in on[n]), key=lambda e: -p_E[e])[:k]
        if sum(p_E[e] for e in allowed) >= q * sum(p_E[e] for e in best):
            return set(allowed)
    raise AssertionError("M = nodes always keeps the whole mass")


def fill_job(ctx, q: float, nodes: int, pre_softmax: bool = False) -> dict:
    build, x = _setup(ctx, ep=nodes, tokens=256, moe_router_pre_softmax=pre_softmax)
    router = build(node_fill_mass=q)
    probs_TE, map_TE, grad = _route(router, x)
    base = _route(build(), x)
    logits_TE = router.reference_gate(x)[1].detach()
    p_TE = torch.softmax(logits_TE, -1)  # the fill ranks by the mass of the full softmax
    want = [_fewest_nodes_reference(row.tolist(), nodes, K, q) for row in p_TE]
    got = [set(torch.nonzero(row).flatten().tolist()) for row in map_TE]
    nodes_T = [len({e // (E // nodes) for e in experts}) for experts in got]
    expected_TE = gate_values(logits_TE, map_TE, pre_softmax)
    return {
        "map": got == want,
        "probs": torch.allclose(probs_TE, expected_TE, rtol=1e-6, atol=1e-7),
        "losses_unchanged": torch.equal(grad, base[2]),
        "one_node_tokens": (sum(n == 1 for n in nodes_T), len(nodes_T)),
        "base_one_node_tokens": sum(
            len({int(e) // (E // nodes) for e in torch.nonzero(row).flatten()}) == 1
            for row in base[1]
        ),
    }


@pytest.mark.parametrize("q", [0.6, 0.8, 0.9])
@pytest.mark.parametrize("nodes", [2, 4])
def test_the_fill_takes_each_tokens_experts_from_the_fewest_nodes(cluster_factory, nodes, q):
    """256 tokens on 2 nodes of 4 experts or 4 of 2: a token keeps one node when that node's
    best two hold q of its top-2 mass, else the fewest nodes that do."""
    layout = ParallelLayout(devices_per_node=1, ep=nodes)
    for r in cluster_factory(nodes).run(fill_job, q, nodes, layout=layout):
        assert r["map"] and r["probs"] and r["losses_unchanged"], r
        one_node, tokens = r["one_node_tokens"]
        assert r["base_one_node_tokens"] < one_node < tokens, r  # the fill bites, not always


def test_the_fill_keeps_the_gate_values_over_all_experts_with_pre_softmax(cluster2):
    for r in cluster2.run(fill_job, 0.8, 2, True, layout=TWO_NODES):
        assert r["map"] and r["probs"] and r["losses_unchanged"], r


def test_the_fill_off_is_the_unconstrained_top_k(cluster2):
    for r in cluster2.run(fill_job, 1.0, 2, layout=TWO_NODES):
        assert r["map"] and r["one_node_tokens"][0] == r["base_one_node_tokens"], r


def megatron_job(ctx, settings: dict, nodes: int) -> dict:
    """Megatron's router (its learned gate, top-2 of the logits, softmax over the two) with a
    node option, against the reference on the same gate."""
    builder, x = _setup(ctx, ep=nodes, tokens=256)

    def build(**fields):
        torch.manual_seed(1)  # the same gate weights for both
        return builder("megatron", **fields)

    plain, router = build(), build(**settings)
    bias = settings.get("node_margin", 0.0)
    if settings.get("node_target_share"):  # the stepped bias, as a few steps have left it
        router.node_bias.fill_(MARGIN)
        bias += MARGIN
    base, got = _route(plain, x), _route(router, x)
    logits_TE = router.gating(x).detach().view(-1, E)
    local_E = router.expert_is_local.float()
    selection_TE = logits_TE + bias * local_E
    if settings.get("node_fill_mass", 1.0) < 1:
        p_TE = torch.softmax(logits_TE, -1)
        keep = [
            _fewest_nodes_reference(r.tolist(), nodes, K, settings["node_fill_mass"]) for r in p_TE
        ]
        keep_TE = torch.zeros_like(logits_TE, dtype=torch.bool)
        for t, experts in enumerate(keep):
            keep_TE[t, sorted(experts)] = True
        selection_TE = selection_TE.masked_fill(~keep_TE, -torch.inf)
    top_TK = selection_TE.topk(K, dim=1).indices
    probs_TK = torch.softmax(logits_TE.gather(1, top_TK), -1)
    expected_TE = torch.zeros_like(logits_TE).scatter(1, top_TK, probs_TK)
    out = {
        "map": torch.equal(got[1], expected_TE > 0),
        "probs": torch.allclose(got[0], expected_TE, rtol=1e-6, atol=1e-7),
        "moved": int((got[1] != base[1]).any(-1).sum()),
        "losses_unchanged": torch.allclose(got[2], base[2], rtol=1e-5, atol=1e-8),
    }
    if settings.get("node_target_share"):
        share = float((got[1] & router.expert_is_local).sum() / got[1].sum())
        want = MARGIN + 0.1 * (settings["node_target_share"] - share)
        out["bias_step"] = abs(float(router.node_bias) - want) < 1e-6
        router.eval()  # evaluation routes with the bias and leaves it
        with torch.no_grad():
            router(x)
        out["eval_keeps_bias"] = abs(float(router.node_bias) - want) < 1e-6
    return out


NODE_TARGET = dict(node_target_share=0.5, node_bias_mode="selection")


@pytest.mark.parametrize(
    "settings",
    [dict(node_margin=MARGIN), dict(node_fill_mass=0.8), NODE_TARGET],
    ids=["margin", "fill", "target"],
)
def test_megatrons_router_takes_the_margin_and_the_fill_in_its_topk_hook(cluster_factory, settings):
    """The options on Megatron's learned gate (its top-k hook, as FasterMoE's cap): the same
    experts as the reference, the gate values Megatron's softmax over the chosen logits; the
    node target's bias acts as a margin and steps towards its share in training only."""
    nodes = 4
    layout = ParallelLayout(devices_per_node=1, ep=nodes)
    for r in cluster_factory(nodes).run(megatron_job, settings, nodes, layout=layout):
        assert r["map"] and r["probs"] and r["moved"] > 0, r
        assert r["losses_unchanged"], r  # Megatron's aux loss reads its unmasked scores
        if "node_target_share" in settings:
            assert r["bias_step"] and r["eval_keeps_bias"], r


def scaling_job(ctx) -> bool:
    build, x = _setup(ctx)
    plain = _route(build(), x)
    scaled_build, _ = _setup(ctx, moe_router_topk_scaling_factor=2.0)
    scaled = _route(scaled_build(), x)
    return torch.equal(scaled[1], plain[1]) and torch.allclose(scaled[0], 2 * plain[0])


def test_the_topk_scaling_factor_scales_locmoe_gate_values(cluster2):
    assert cluster2.run(scaling_job, layout=TWO_NODES) == [True, True]
