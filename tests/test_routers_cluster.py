"""Routers inside Megatron's MoELayer on 8 gloo ranks (2 simulated nodes x 4, EP=8): forward +
backward for every router, GrAP against an explicit block-weight matmul, metrics through
Megatron's tracker, hash determinism, switch drops exactly the overflow, and the locality loss
raising the node-local share in a short training."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_locmoe.config import LocMoEConfig
from megatron_locmoe.sim.cluster import ParallelLayout
from megatron_locmoe.sim.testing import build_moe_layer, moe_config

LAYOUT = ParallelLayout(devices_per_node=4, ep=8)
E, H, VOCAB = 16, 32, 1000


def _layer(ctx, router_type, topk=1, **cfg_overrides):
    from megatron_locmoe.routers import router_builder

    ctx.topology()
    lm = LocMoEConfig(router_type=router_type, devices_per_node=ctx.devices_per_node)
    for k, v in cfg_overrides.pop("locmoe", {}).items():
        setattr(lm, k, v)
    config = moe_config(
        ep=8,
        num_moe_experts=E,
        hidden_size=H,
        moe_router_topk=topk,
        **cfg_overrides,
    )
    layer = build_moe_layer(config, router=router_builder(lm, vocab_size=VOCAB))
    return layer, config


def every_router_job(ctx):
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    from megatron_locmoe import metrics

    out = {}
    gen = torch.Generator().manual_seed(ctx.rank)
    cases = {
        "megatron": dict(
            topk=2, moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.01
        ),
        "locmoe": dict(topk=1),
        "locmoe_top4_learnable": dict(
            topk=4,
            locmoe=dict(grap_mode="learnable", grap_bias=True, grap_learnable_temperature=True),
        ),
        "locmoe_bound": dict(
            topk=1, moe_expert_capacity_factor=1.0, locmoe=dict(capacity_mode="bound")
        ),
        "locmoe+plus_top2": dict(topk=2, moe_expert_capacity_factor=1.1),
        "hash": dict(topk=1),
        "switch": dict(topk=1, moe_expert_capacity_factor=1.0),
    }
    for name, kw in cases.items():
        get_moe_metrics_tracker().clear()
        router_type = name.split("_")[0].replace("+", "_")
        layer, config = _layer(ctx, router_type, **kw)
        x = torch.randn(8, 2, H, generator=gen, requires_grad=True)
        ids = torch.randint(0, VOCAB, (2, 8), generator=gen)
        if router_type == "hash":
            layer.router.set_token_ids(ids)
        y, _ = layer(x)
        y.square().sum().backward()
        recorded = {
            n: float(get_moe_metrics_tracker().metrics[n].values[0]) for n in metrics.ROUTER_METRICS
        }
        params = [n for n, p in layer.router.named_parameters()]
        out[name] = dict(
            out_finite=bool(torch.isfinite(y).all()),
            x_grad=float(x.grad.norm()),
            recorded=recorded,
            router_params=params,
            aux=float(get_moe_metrics_tracker().metrics["load_balancing_loss"].values[0])
            if "load_balancing_loss" in get_moe_metrics_tracker().metrics
            else None,
        )
    return out


def test_every_router_runs_in_megatron_moe_layer(cluster8):
    results = cluster8.run(every_router_job, layout=LAYOUT)
    from megatron_locmoe import metrics

    for rank, r in enumerate(results):
        for name, c in r.items():
            assert c["out_finite"], (rank, name)
            assert set(c["recorded"]) == set(metrics.ROUTER_METRICS)
            assert 0 <= c["recorded"]["node_local_fraction"] <= 1
        # gradients reach the router input through the experts (all) and the gate (not hash)
        assert all(c["x_grad"] > 0 for c in r.values())
        assert r["locmoe"]["router_params"] == []  # fixed GrAP: nothing learnt in the gate
        assert sorted(r["locmoe_top4_learnable"]["router_params"]) == [
            "grap_bias",
            "grap_log_temperature",
            "weight",
        ]
        assert r["hash"]["router_params"] == [] and not r["hash"]["aux"]
        assert r["locmoe"]["recorded"]["locality_loss"] > 0
        assert r["locmoe"]["aux"] > 0 and r["switch"]["aux"] > 0 and r["megatron"]["aux"] > 0
        bound = r["locmoe_bound"]["recorded"]
        assert 0 < bound["capacity_delta"] < 1 and bound["capacity_ec_min"] > 0
        assert bound["expert_capacity"] > 0
        assert r["switch"]["recorded"]["expert_capacity"] == 1  # ceil(16 tokens / 16 experts)
        plus = r["locmoe+plus_top2"]
        assert plus["aux"] > 0 and plus["recorded"]["locality_loss"] > 0
        assert 0 < plus["recorded"]["capacity_delta"] < 1
        assert plus["recorded"]["expert_capacity"] <= 3  # ceil(1.1 * 16 * 2 / 16), the ceiling


def grap_job(ctx):
    layer, config = _layer(ctx, "locmoe", topk=1, locmoe=dict(grap_temperature=3.0))
    router = layer.router
    x = torch.randn(5, 3, H, dtype=torch.float32, requires_grad=True)
    W = torch.zeros(E, H)
    for i in range(E):
        W[i, i * (H // E) : (i + 1) * (H // E)] = E / H
    logits = router.gating(x)
    explicit = 3.0 * (x @ W.t())
    gram = W @ W.t()
    logits.sum().backward()
    return dict(
        max_diff=float((logits - explicit).abs().max()),
        offdiag=float((gram - torch.diag(torch.diag(gram))).abs().max()),
        x_grad_nonzero=bool((x.grad != 0).all()),
    )


def test_grap_logits_equal_block_matmul_and_orthogonal(cluster8):
    for r in cluster8.run(grap_job, layout=LAYOUT):
        assert r["max_diff"] < 1e-5
        assert r["offdiag"] == 0.0
        assert r["x_grad_nonzero"]


def hash_job(ctx):
    layer, _ = _layer(ctx, "hash")
    ids = torch.arange(40).reshape(2, 20) * 7 % VOCAB  # same ids on every rank
    layer.router.set_token_ids(ids)
    _, routing_map = layer.router(torch.randn(20, 2, H))
    table = layer.router.hash_table.clone()
    gathered = [torch.empty_like(table) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, table)
    layer.router.set_token_ids(None)
    try:
        layer.router(torch.randn(20, 2, H))
        missing = None
    except RuntimeError as e:
        missing = str(e)
    return dict(
        experts=routing_map.int().argmax(-1).tolist(),
        expected=table[ids.t().reshape(-1)].tolist(),
        same_table=all(torch.equal(g, table) for g in gathered),
        missing=missing,
    )


def test_hash_router_deterministic_across_ranks(cluster8):
    results = cluster8.run(hash_job, layout=LAYOUT)
    for r in results:
        assert r["experts"] == r["expected"] == results[0]["experts"]
        assert r["same_table"]
        assert r["missing"] and "attach_token_ids" in r["missing"]


def switch_drop_job(ctx):
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    layer, config = _layer(ctx, "switch", moe_expert_capacity_factor=1.0)
    torch.manual_seed(ctx.rank)
    layer.router.weight.data.normal_(0, 1.0)
    x = torch.randn(32, 1, H)
    get_moe_metrics_tracker().clear()
    probs, routing_map = layer.router(x)
    # Independent: top-1 of softmax(x W^T); capacity ceil(32/16 * 1.0) = 2 per expert.
    scores = torch.softmax((x.view(-1, H) @ layer.router.weight.t()).float(), -1)
    top = scores.argmax(-1)
    load = torch.bincount(top, minlength=E)
    expected_dropped = int((load - 2).clamp_min(0).sum())
    kept_ok = all(
        set(torch.nonzero(routing_map[:, e]).flatten().tolist())
        == set(
            torch.nonzero(top == e)
            .flatten()[scores[top == e, e].argsort(descending=True)[:2]]
            .tolist()
        )
        for e in range(E)
    )
    recorded = float(get_moe_metrics_tracker().metrics["tokens_dropped"].values[0])
    return dict(expected=expected_dropped, recorded=recorded, kept_ok=kept_ok)


def test_switch_drops_exactly_the_overflow(cluster8):
    results = cluster8.run(switch_drop_job, layout=LAYOUT)
    assert sum(r["expected"] for r in results) > 0
    for r in results:
        assert r["recorded"] == r["expected"]
        assert r["kept_ok"]


def locality_training_job(ctx, mu: float, steps: int = 40):
    """A shared pre-layer (data-parallel: grads averaged) feeds an EP=8 LocMoE layer. Each
    simulated node reads its own data domain (a different input cluster), as in a
    domain-sharded loader: with iid data across ranks no rank-independent router can beat
    1/nodes in expectation."""
    from megatron_locmoe.metrics import load_cv

    layer, config = _layer(ctx, "locmoe", locmoe=dict(locality_loss_coeff=mu, grap_temperature=4.0))
    topo = ctx.topology()
    torch.manual_seed(0)
    pre = torch.nn.Linear(H, H)
    domains = torch.randn(2, H) * 2.0  # one input cluster per node
    target_map = torch.randn(H, H) / H**0.5
    opt = torch.optim.Adam(list(pre.parameters()) + list(layer.parameters()), lr=1e-2)
    gen = torch.Generator().manual_seed(1000 + ctx.rank)
    expert_node = torch.tensor(topo.expert_nodes(E))
    history = []
    for _ in range(steps):
        inp = domains[topo.node] + torch.randn(64, 1, H, generator=gen)
        h = pre(inp)
        y, _ = layer(h)
        loss = (y - torch.tanh(inp @ target_map)).square().mean()
        opt.zero_grad()
        loss.backward()
        for p in pre.parameters():
            dist.all_reduce(p.grad)
            p.grad /= ctx.world_size
        opt.step()
        with torch.no_grad():
            _, rmap = layer.router(pre(inp))
        local = float((expert_node[rmap.int().argmax(-1)] == topo.node).float().mean())
        history.append(local)
    load = rmap.sum(0).long()
    dist.all_reduce(load)
    return dict(
        local_fraction=sum(history[-5:]) / 5, load_cv=float(load_cv(load)), first=history[0]
    )


@pytest.mark.slow
def test_locality_loss_raises_node_local_share(cluster8):
    base = cluster8.run(locality_training_job, mu=0.0, layout=LAYOUT)
    loc = cluster8.run(locality_training_job, mu=0.3, layout=LAYOUT)
    f0 = sum(r["local_fraction"] for r in base) / 8
    f1 = sum(r["local_fraction"] for r in loc) / 8
    cv0, cv1 = base[0]["load_cv"], loc[0]["load_cv"]
    print(f"node-local fraction mu=0: {f0:.3f} (cv {cv0:.3f}); mu=0.3: {f1:.3f} (cv {cv1:.3f})")
    assert f1 > 0.8 and f1 > f0 + 0.2
    assert cv1 < 1.0


def capacity_modes_job(ctx):
    import math

    from megatron_locmoe import capacity as bound

    out = {}
    for K in (0, 2):
        layer, _ = _layer(
            ctx,
            "locmoe",
            moe_expert_capacity_factor=1.0,
            locmoe=dict(
                capacity_mode="bound", capacity_reestimate_interval=K, capacity_floor_factor=0.25
            ),
        )
        router = layer.router
        gen = torch.Generator().manual_seed(ctx.rank)
        estimated, deltas = [], []
        for _ in range(5):
            x = torch.randn(16, 2, H, generator=gen) * (1 + ctx.rank)
            y, _ = layer(x.requires_grad_(True))
            y.sum().backward()
            estimated.append(int(router.capacity_estimated_step))
            deltas.append(float(router.capacity_delta))
        T = 32
        expected_c = bound.clamp_capacity(
            bound.ec_min(H, E, deltas[-1]), math.ceil(0.25 * T / E), math.ceil(T / E)
        )
        out[K] = dict(
            estimated=estimated,
            delta=deltas[-1],
            capacity=router.capacity_for(T),
            expected_capacity=expected_c,
            saved=sorted(k for k in router.state_dict() if "capacity" in k),
        )
    return out


def test_capacity_bound_modes(cluster8):
    results = cluster8.run(capacity_modes_job, layout=LAYOUT)
    for r in results:
        assert r[0]["estimated"] == [0, 0, 0, 0, 0]  # LocMoE: first batch, then fixed
        assert r[2]["estimated"] == [0, 0, 2, 2, 4]  # LocMoE+: every K=2 steps
        for K in (0, 2):
            # every rank uses the same delta (averaged), hence the same capacity
            assert r[K]["delta"] == results[0][K]["delta"] and 0 < r[K]["delta"] < 1
            assert r[K]["capacity"] == r[K]["expected_capacity"]
            assert r[K]["saved"] == ["capacity_delta", "capacity_ec_min", "capacity_estimated_step"]
