"""Ranks without tokens, among the most reported MoE failures upstream: a rank with no tokens
of its own (an empty micro-batch or data shard), and a rank whose experts receive none. On
2 simulated nodes x 2 ranks (EP 4), every router and both dispatch schemes run forward and
backward on every rank; the two-hop dispatcher equals the flat one bit for bit there too; no
loss or metric turns NaN; and the capacity bound's estimate stays the same on every rank.
(Before: four of the five routers, Megatron's own among them, failed on the empty rank and its
peers waited out the collective timeout.)"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_locmoe.config import LocMoEConfig
from megatron_locmoe.sim.cluster import ParallelLayout
from megatron_locmoe.sim.testing import build_moe_layer, moe_config

LAYOUT = ParallelLayout(devices_per_node=2, ep=4)
E, H, T, VOCAB = 8, 16, 6, 100
ROUTERS = {
    "megatron": dict(
        locmoe=dict(router_type="megatron"),
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=0.01,
    ),
    "megatron_global_aux": dict(
        locmoe=dict(router_type="megatron"),
        moe_router_load_balancing_type="global_aux_loss",
        moe_aux_loss_coeff=0.01,
    ),
    "locmoe": dict(locmoe=dict(router_type="locmoe", fused_router="off")),
    "locmoe_fused": dict(locmoe=dict(router_type="locmoe", fused_router="on")),
    "locmoe_bound": dict(
        locmoe=dict(router_type="locmoe", capacity_mode="bound"), moe_expert_capacity_factor=1.0
    ),
    "locmoe_plus": dict(
        locmoe=dict(router_type="locmoe_plus", fused_router="off", capacity_reestimate_interval=1),
        moe_expert_capacity_factor=1.1,
    ),
    "locmoe_plus_fused": dict(
        locmoe=dict(router_type="locmoe_plus", fused_router="on"), moe_expert_capacity_factor=1.1
    ),
    "hash": dict(locmoe=dict(router_type="hash")),
    "switch": dict(locmoe=dict(router_type="switch"), moe_expert_capacity_factor=1.0),
}


def _tokens(ctx, layer, case: str, empty_rank: int, starved_rank: int):
    """This rank's [T, 1, H] tokens (none on ``empty_rank``); hash token ids chosen so that no
    token goes to ``starved_rank``'s experts."""
    n = 0 if ctx.rank == empty_rank else T
    x = torch.randn(n, 1, H, generator=torch.Generator().manual_seed(10 + ctx.rank))
    if case == "hash":
        table = layer.router.hash_table
        per_rank = E // LAYOUT.ep
        starved = set(range(starved_rank * per_rank, (starved_rank + 1) * per_rank))
        allowed = torch.tensor([i for i in range(VOCAB) if int(table[i]) not in starved])
        pick = torch.randint(
            0, len(allowed), (1, n), generator=torch.Generator().manual_seed(ctx.rank)
        )
        layer.router.set_token_ids(allowed[pick])
    return x.requires_grad_(True)


def zero_token_job(ctx, case: str, empty_rank: int, starved_rank: int):
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    ctx.topology()
    spec = dict(ROUTERS[case])
    locmoe_kw = spec.pop("locmoe")
    config = moe_config(ep=LAYOUT.ep, num_moe_experts=E, hidden_size=H, moe_router_topk=1, **spec)
    runs = {}
    for dispatcher in ("alltoall", "hierarchical"):
        get_moe_metrics_tracker().clear()
        torch.manual_seed(3)  # the same weights for both dispatchers
        lm = LocMoEConfig(dispatcher=dispatcher, devices_per_node=ctx.devices_per_node, **locmoe_kw)
        layer = build_moe_layer(config, locmoe=lm, vocab_size=VOCAB)
        layer.set_layer_number(1)
        x = _tokens(ctx, layer, case, empty_rank, starved_rank)
        y, _ = layer(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        tracked = [
            v.values for v in get_moe_metrics_tracker().metrics.values() if v.values is not None
        ]
        runs[dispatcher] = dict(
            y=y.detach(),
            x_grad=x.grad,
            w_grads={n: p.grad for n, p in layer.named_parameters() if p.grad is not None},
            finite=all(bool(torch.isfinite(v).all()) for v in tracked),
            delta=float(getattr(layer.router, "capacity_delta", torch.tensor(math.nan))),
        )
    flat, hier = runs["alltoall"], runs["hierarchical"]
    return dict(
        shapes=(tuple(flat["y"].shape), tuple(flat["x_grad"].shape)),
        equal=torch.equal(flat["y"], hier["y"])
        and torch.equal(flat["x_grad"], hier["x_grad"])
        and flat["w_grads"].keys() == hier["w_grads"].keys()
        and all(torch.equal(flat["w_grads"][n], g) for n, g in hier["w_grads"].items()),
        finite=flat["finite"] and hier["finite"],
        delta=(flat["delta"], hier["delta"]),
    )


@pytest.mark.parametrize("case", list(ROUTERS))
def test_rank_without_tokens(cluster_factory, case):
    results = cluster_factory(4).run(zero_token_job, case, 1, 3, layout=LAYOUT)
    for rank, r in enumerate(results):
        tokens = 0 if rank == 1 else T
        assert r["shapes"] == ((tokens, 1, H), (tokens, 1, H)), (rank, r)
        assert r["equal"], (case, rank)
        assert r["finite"], (case, rank)
    if case in (
        "locmoe_bound",
        "locmoe_plus",
        "locmoe_plus_fused",
    ):  # estimated from the ranks with tokens, the same everywhere
        deltas = {r["delta"] for r in results}
        assert len(deltas) == 1 and all(0 < d < 1 for d in next(iter(deltas))), deltas


def test_every_rank_without_tokens(cluster_factory):
    """All four ranks empty at once (a fully padded step): nothing to route, nothing fails, and
    the capacity bound waits for a batch with tokens to estimate from."""
    results = cluster_factory(4).run(zero_token_job_all_empty, layout=LAYOUT)
    assert all(r == ((0, 1, H), True) for r in results), results


def zero_token_job_all_empty(ctx):
    ctx.topology()
    config = moe_config(
        ep=LAYOUT.ep,
        num_moe_experts=E,
        hidden_size=H,
        moe_router_topk=1,
        moe_expert_capacity_factor=1.0,
    )
    lm = LocMoEConfig(
        router_type="locmoe", capacity_mode="bound", devices_per_node=ctx.devices_per_node
    )
    layer = build_moe_layer(config, locmoe=lm)
    x = torch.zeros(0, 1, H, requires_grad=True)
    y, _ = layer(x)
    y.sum().backward()
    return tuple(y.shape), bool(float(layer.router.capacity_delta) == -1.0)  # nothing estimated
