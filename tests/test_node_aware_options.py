"""The node-aware options of the locmoe router against hand-written references, on a real
2-rank cluster (2 nodes of 1 GPU, EP 2: node 0 hosts experts 0-3):

- ``--locmoe-node-margin m``: the experts are the top-k of the logits with m added on the node's
  own experts, the gate values the unbiased softmax's, the losses unchanged;
- ``--locmoe-node-bias-mode selection``: the node bias acts as that margin (the same routing
  for the same value), steps towards the target share, and leaves the gate values and the
  balance loss as without a node target; the logits mode changes both;
- ``--locmoe-rank-balance-loss-coeff``: adds exactly the gradient of alpha * sum_r f_r P_r
  (DeepSeek-V2's communication balance over the EP ranks), padding left out, routing unchanged;
- ``--moe-router-topk-scaling-factor`` scales the locmoe router's gate values (it was ignored).
"""

from __future__ import annotations

import torch

from megatron_locmoe.sim.cluster import ParallelLayout

TWO_NODES = ParallelLayout(devices_per_node=1, ep=2)
S, B, H, E, K = 12, 2, 16, 8, 2
MARGIN = 0.3


def _setup(ctx, **tc_overrides):
    """A builder of locmoe routers on this rank, and the input [S, B, H] (same on every rank)."""
    from megatron.core.transformer.moe.moe_utils import (
        MoEAuxLossAutoScaler,
        get_default_pg_collection,
    )

    from megatron_locmoe.config import LocMoEConfig
    from megatron_locmoe.routers import router_builder
    from megatron_locmoe.sim.testing import moe_config

    ctx.topology()
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    tc = moe_config(ep=2, num_moe_experts=E, moe_router_topk=K, hidden_size=H, **tc_overrides)

    def build(**settings):
        router = router_builder(LocMoEConfig(router_type="locmoe", **settings))(
            config=tc, pg_collection=get_default_pg_collection()
        )
        router.set_layer_number(1)
        router.train()
        return router

    torch.manual_seed(0)
    return build, torch.randn(S, B, H) * 4


def _route(router, x_SBH, padding_SB=None):
    """(probs, routing map, the gradient the router's attached losses alone give the input)."""
    x = x_SBH.clone().requires_grad_(True)
    probs_TE, map_TE = router(x, padding_SB)
    (probs_TE * 0).sum().backward()  # the output's gradient is zero: only the losses reach x
    return probs_TE.detach(), map_TE, x.grad


def _selection_reference(router, x_SBH, bias: float):
    """Top-k of the logits with ``bias`` on the node's experts; the unbiased softmax's values."""
    logits_TE = router.reference_gate(x_SBH)[1].detach()
    chosen_TK = torch.topk(logits_TE + bias * router.expert_is_local.float(), K, dim=1).indices
    probs_TE = torch.softmax(logits_TE, -1)
    expected_TE = torch.zeros_like(probs_TE).scatter(1, chosen_TK, probs_TE.gather(1, chosen_TK))
    return expected_TE, expected_TE > 0


def selection_job(ctx) -> dict:
    build, x = _setup(ctx)
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
        "margin_probs": torch.equal(margin[0], expected_probs),
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


def test_the_margin_and_the_selection_bias_change_the_choice_of_experts_only(cluster2):
    for r in cluster2.run(selection_job, layout=TWO_NODES):
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


def scaling_job(ctx) -> bool:
    build, x = _setup(ctx)
    plain = _route(build(), x)
    scaled_build, _ = _setup(ctx, moe_router_topk_scaling_factor=2.0)
    scaled = _route(scaled_build(), x)
    return torch.equal(scaled[1], plain[1]) and torch.allclose(scaled[0], 2 * plain[0])


def test_the_topk_scaling_factor_scales_locmoe_gate_values(cluster2):
    assert cluster2.run(scaling_job, layout=TWO_NODES) == [True, True]
