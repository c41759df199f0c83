"""LocMoE+ (router locmoe_plus) against hand-written references, on 2 ranks (2 simulated nodes,
EP=2): the affinity (a cosine per token and GrAP row, written out as dense rows), token choice
by affinity with and without the cumulative threshold, the adaptive capacity from the formula
(delta averaged over the ranks, C = clamp(ceil(m C*), floor, ceiling)), expert choice keeping
exactly the highest-affinity tokens with the drops counted, both phases, both paths (the
reference through Megatron's helpers and the fused graph), the re-estimate schedule and its
state across a state-dict round trip."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_locmoe import capacity as bound
from megatron_locmoe.config import LocMoEConfig
from megatron_locmoe.sim.cluster import ParallelLayout
from megatron_locmoe.sim.testing import moe_config
from megatron_locmoe.validation import validate

E, H, T = 8, 64, 36
LAYOUT = ParallelLayout(devices_per_node=1, ep=2)
CF, FLOOR = 1.1, 0.25


def _router(ctx, topk=1, **lm):
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megatron_locmoe.routers import router_builder

    ctx.topology()
    config = moe_config(
        ep=2,
        num_moe_experts=E,
        hidden_size=H,
        moe_router_topk=topk,
        moe_expert_capacity_factor=CF,
        moe_router_pre_softmax=True,  # the hand reference's gate values: softmax over all
    )
    lm.setdefault("capacity_floor_factor", FLOOR)
    cfg = LocMoEConfig(router_type="locmoe_plus", **lm)
    torch.manual_seed(3)
    router = router_builder(cfg)(config=config, pg_collection=get_default_pg_collection())
    router.set_layer_number(1)
    if cfg.grap_mode == "learnable":  # rows of different norms: affinity and W x then differ
        with torch.no_grad():
            g = torch.Generator().manual_seed(9)
            router.weight.mul_(1 + 3 * torch.rand(router.weight.shape, generator=g))
            if router.grap_bias is not None:
                router.grap_bias.add_(0.05 * torch.randn(E, generator=g))
    return router


def _hand_route(x_TH, router, topk, threshold, percentile, multiplier):
    """LocMoE+ written out token by token in float64 (dense gate rows)."""
    import torch.distributed as dist

    x = x_TH.double()
    W = torch.zeros(E, H, dtype=torch.float64)
    C = H // E
    for i in range(E):
        W[i, i * C : (i + 1) * C] = router.weight[i].double()
    aff = torch.zeros(T, E, dtype=torch.float64)
    for t in range(T):
        for i in range(E):
            aff[t, i] = x[t] @ W[i] / (x[t].norm() * W[i].norm())
    logits = aff * float(router.grap_log_temperature.exp())
    if router.grap_bias is not None:
        logits = logits + router.grap_bias.double()
    scores = torch.softmax(logits, dim=-1)
    chosen = torch.zeros(T, E, dtype=torch.bool)
    for t in range(T):
        order = sorted(range(E), key=lambda i: -float(scores[t, i]))[:topk]
        total = 0.0
        for i in order:
            if threshold and total >= threshold:
                break
            chosen[t, i] = True
            total += float(scores[t, i])
    # delta: the percentile of each token's largest routed affinity, averaged over the ranks
    top_aff = torch.tensor(
        [max(float(aff[t, i]) for i in range(E) if chosen[t, i]) for t in range(T)]
    )
    mine = torch.tensor([torch.quantile(top_aff, percentile).item(), 1.0], dtype=torch.float64)
    dist.all_reduce(mine)
    delta = float(mine[0] / mine[1])
    ceiling = math.ceil(CF * T * topk / E)
    floor = math.ceil(FLOOR * T * topk / E)
    c_star = bound.ec_min(H, E, delta)
    capacity = (
        ceiling if math.isinf(c_star) else min(max(math.ceil(multiplier * c_star), floor), ceiling)
    )
    kept = torch.zeros(T, E, dtype=torch.bool)
    for i in range(E):
        mine_i = sorted((t for t in range(T) if chosen[t, i]), key=lambda t: -float(aff[t, i]))
        for t in mine_i[:capacity]:
            kept[t, i] = True
    return dict(
        affinity=aff,
        raw=x @ W.t(),
        chosen=chosen,
        kept=kept,
        probs=scores * kept,
        delta=delta,
        capacity=capacity,
        ceiling=ceiling,
        floor=floor,
        c_star=c_star,
        dropped=int(chosen.sum() - kept.sum()),
    )


def hand_reference_job(ctx, topk, lm):
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    router = _router(ctx, topk=topk, **lm)
    cfg = router.locmoe
    gen = torch.Generator().manual_seed(50 + ctx.rank)
    x = torch.randn(T, 1, H, generator=gen) * (1 + torch.rand(T, 1, 1, generator=gen))
    hand = _hand_route(
        x.view(T, H),
        router,
        topk,
        cfg.plus_affinity_threshold,
        cfg.capacity_percentile,
        cfg.plus_capacity_multiplier,
    )
    get_moe_metrics_tracker().clear()
    probs, routing_map = router(x.requires_grad_(True))
    probs.sum().backward()
    recorded = {n: float(m.values[0]) for n, m in get_moe_metrics_tracker().metrics.items()}
    affinity, _ = router.reference_gate(x.detach())
    return dict(
        affinity_diff=float((affinity.double() - hand["affinity"]).abs().max()),
        # tokens whose best expert by affinity is not the best by W x
        ranked_differently=int((hand["affinity"].argmax(-1) != hand["raw"].argmax(-1)).sum()),
        map_equal=torch.equal(routing_map, hand["kept"]),
        chosen_per_token=hand["chosen"].sum(-1).tolist(),
        probs_diff=float((probs.detach().double() - hand["probs"]).abs().max()),
        hand=dict(
            delta=hand["delta"],
            capacity=hand["capacity"],
            ceiling=hand["ceiling"],
            floor=hand["floor"],
            c_star=hand["c_star"],
            dropped=hand["dropped"],
        ),
        recorded=recorded,
        took_fused=router._fused_applies(None),
        x_grad_finite=bool(torch.isfinite(x.grad).all()),
    )


CASES = {
    # the paper's setting: top-1, fixed GrAP; delta at the median puts 2 C* between the floor
    # and the ceiling, so the experts' choice binds (ECR) at neither clamp
    "top1_ecr": (1, dict(capacity_percentile=0.5)),
    # a high percentile: C* is beyond the ceiling, C stays there (TCR)
    "top1_tcr": (1, dict(capacity_percentile=0.95)),
    # learnable rows of different norms, a bias, a sharp gate, top-2 with the threshold
    "top2_threshold_learnable": (
        2,
        dict(
            grap_mode="learnable",
            grap_bias=True,
            grap_temperature=8.0,
            plus_affinity_threshold=0.35,
            plus_capacity_multiplier=3.0,
        ),
    ),
}


@pytest.mark.parametrize("fused", ["off", "on"])
@pytest.mark.parametrize("case", list(CASES))
def test_locmoe_plus_equals_hand_reference(cluster2, case, fused):
    topk, lm = CASES[case]
    results = cluster2.run(hand_reference_job, topk, dict(lm, fused_router=fused), layout=LAYOUT)
    for r in results:
        assert r["took_fused"] == (fused == "on")
        assert r["affinity_diff"] < 1e-6
        assert r["map_equal"]
        assert r["probs_diff"] < 1e-6
        assert r["x_grad_finite"]
        hand, rec = r["hand"], r["recorded"]
        assert rec["capacity_delta"] == pytest.approx(hand["delta"], abs=1e-6)
        assert rec["expert_capacity"] == hand["capacity"]
        assert rec["tokens_dropped"] == hand["dropped"]
        assert rec["expert_choice"] == float(hand["capacity"] < hand["ceiling"])
        if case == "top1_ecr":
            assert hand["floor"] < hand["capacity"] < hand["ceiling"] and hand["dropped"] > 0
            assert hand["capacity"] == math.ceil(2 * hand["c_star"]) > math.ceil(hand["c_star"])
        if case == "top1_tcr":
            assert hand["capacity"] == hand["ceiling"]
        if case == "top2_threshold_learnable":
            assert r["ranked_differently"] > 0  # the affinity is not W x here
            assert set(r["chosen_per_token"]) == {1, 2}  # the threshold bites on some tokens
        assert rec["locality_loss"] > 0 and rec["load_balancing_loss"] > 0


def schedule_job(ctx, K: int):
    """Five training steps with re-estimates every K; a second router loads the first's state
    after step 3 and runs steps 4-5: the same estimates and capacities."""
    router = _router(ctx, capacity_reestimate_interval=K)
    gen = torch.Generator().manual_seed(ctx.rank)
    batches = [
        torch.randn(T, 1, H, generator=gen) * (1 + 0.5 * step + ctx.rank) for step in range(5)
    ]

    def step(r, x):
        probs, routing_map = r(x.clone().requires_grad_(True))
        probs.sum().backward()
        return int(r.capacity_estimated_step), r.capacity_for(T), float(r.capacity_delta)

    full = [step(router, x) for x in batches]
    first = _router(ctx, capacity_reestimate_interval=K)
    head = [step(first, x) for x in batches[:3]]
    state = {k: v.clone() for k, v in first.state_dict().items()}
    resumed = _router(ctx, capacity_reestimate_interval=K)
    resumed.load_state_dict(state)
    tail = [step(resumed, x) for x in batches[3:]]
    return dict(full=full, split=head + tail, keys=sorted(state))


def test_schedule_and_state_survive_a_checkpoint(cluster2):
    for r in cluster2.run(schedule_job, 2, layout=LAYOUT):
        assert [s[0] for s in r["full"]] == [0, 0, 2, 2, 4]  # re-estimated every K=2 steps
        assert r["split"] == r["full"]
        for key in ("capacity_delta", "capacity_ec_min", "capacity_estimated_step", "routing_step"):
            assert key in r["keys"]


def test_default_interval_is_the_routers():
    from megatron_locmoe.resolve import resolve

    tc = moe_config(
        ep=1, num_moe_experts=E, hidden_size=H, moe_router_topk=1, moe_expert_capacity_factor=CF
    )
    plus = resolve(validate(LocMoEConfig(router_type="locmoe_plus"), tc), tc)
    assert plus.config.capacity_reestimate_interval == 100
    assert plus.config.capacity_mode == "bound"
    loc = resolve(validate(LocMoEConfig(router_type="locmoe"), tc), tc)
    assert loc.config.capacity_reestimate_interval == 0
    given = resolve(LocMoEConfig(router_type="locmoe_plus", capacity_reestimate_interval=7), tc)
    assert given.config.capacity_reestimate_interval == 7
