"""The fused LocMoE routing path equals the reference path through Megatron's helpers: probs,
routing map, aux and locality losses, capacity drops, the input gradient and the learnable
gate's gradients, on 2 ranks (2 simulated nodes, EP=2; one case with TP=2 and sequence
parallelism) for top-1 to top-4, fixed and learnable GrAP, fp32 and bf16 tokens, LocMoE's
capacity bound and LocMoE+. Fixed-gate cases take the Triton kernels (in Triton's interpreter
here; with a capacity on the call that does not re-estimate it), the others the eager form of
the compiled graphs; benchmarks/router_bench.py compares both on the GPU. With
LOCMOE_TEST_DEVICE=cuda the same cases run on two GPUs over NCCL (kernels and compiled graphs
for real)."""

from __future__ import annotations

import pytest
import torch

from megatron_locmoe.config import LocMoEConfig
from megatron_locmoe.routers import kernels
from megatron_locmoe.sim.cluster import ParallelLayout
from megatron_locmoe.sim.testing import moe_config

E, H = 8, 64
CASES = {
    "top1_fixed": dict(topk=1, locmoe=dict()),
    "top4_learnable": dict(
        topk=4, locmoe=dict(grap_mode="learnable", grap_bias=True, grap_learnable_temperature=True)
    ),
    "top1_bound": dict(
        topk=1,
        locmoe=dict(capacity_mode="bound", capacity_floor_factor=0.5),
        moe_expert_capacity_factor=1.0,
    ),
    "top2_bf16": dict(topk=2, locmoe=dict(locality_loss_coeff=0.3), dtype=torch.bfloat16),
    # tensor + sequence parallel: the aux loss's token counts are summed over the TP group
    # (a functional all-reduce in the fused graph); per-token loss scaling on top
    "top2_tp2_per_token": dict(topk=2, locmoe=dict(), tp=2, calculate_per_token_loss=True),
    # LocMoE+: affinity routing, drops by affinity at the adaptive capacity (the floor binds)
    "plus_top1": dict(
        topk=1,
        router="locmoe_plus",
        locmoe=dict(capacity_floor_factor=0.25),
        moe_expert_capacity_factor=1.1,
    ),
    "plus_top2_learnable_threshold": dict(
        topk=2,
        router="locmoe_plus",
        locmoe=dict(
            grap_mode="learnable",
            grap_bias=True,
            grap_temperature=8.0,
            plus_affinity_threshold=0.35,
            locality_loss_coeff=0.3,
        ),
        moe_expert_capacity_factor=1.5,
        moe_router_pre_softmax=True,  # the threshold reads the softmax over all experts
    ),
    # top-2 with the gate values over all experts (without the flag: over the chosen two,
    # which the fused path renormalises to; top2_bf16 and top2_tp2_per_token)
    "top2_pre_softmax": dict(
        topk=2, locmoe=dict(locality_loss_coeff=0.3), moe_router_pre_softmax=True
    ),
    # the drop after the token counts' all-reduce over TP (the kernels' second finalize)
    "plus_top1_tp2": dict(
        topk=1,
        router="locmoe_plus",
        locmoe=dict(capacity_floor_factor=0.25),
        moe_expert_capacity_factor=1.1,
        tp=2,
    ),
}
TP2 = ParallelLayout(devices_per_node=1, ep=2, tp=2, etp=1)
LAYOUTS = {"top2_tp2_per_token": TP2, "plus_top1_tp2": TP2}


def fused_vs_reference_job(ctx, case: str):
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megatron_locmoe.routers import router_builder

    ctx.topology()
    kw = dict(CASES[case])
    topk, dtype = kw.pop("topk"), kw.pop("dtype", torch.float32)
    router_type = kw.pop("router", "locmoe")
    lm_overrides = kw.pop("locmoe")
    config = moe_config(
        ep=2,
        tp=kw.pop("tp", 1),
        num_moe_experts=E,
        hidden_size=H,
        moe_router_topk=topk,
        **kw,
    )
    out = {}
    for fused in (False, True):
        lm = LocMoEConfig(router_type=router_type, fused_router=fused, **lm_overrides)
        torch.manual_seed(3)
        router = router_builder(lm)(config=config, pg_collection=get_default_pg_collection())
        router = router.to(ctx.device)  # LOCMOE_TEST_DEVICE=cuda: one GPU per rank, NCCL
        router.set_layer_number(1)
        with torch.no_grad():  # make learnable gates non-trivial, identically for both
            for p in router.parameters():
                noise = torch.randn(p.shape, generator=torch.Generator().manual_seed(9))
                p.add_(noise.to(p.device) * 0.1)
        gen = torch.Generator().manual_seed(50 + ctx.rank)
        out[fused] = []
        # two calls: with a capacity the first estimates it, the second runs without estimate
        for _ in range(2):
            x = torch.randn(12, 3, H, generator=gen) * 2
            x = x.to(ctx.device, dtype).requires_grad_(True)
            get_moe_metrics_tracker().clear()
            router.zero_grad()
            reestimate = router.locmoe.capacity_mode == "bound" and router._capacity_due()
            probs, routing_map = router(x)
            weights = torch.linspace(0, 1, probs.numel(), device=probs.device).view_as(probs)
            (probs * weights).sum().backward()
            tracked = get_moe_metrics_tracker().metrics
            out[fused].append(
                dict(
                    probs=probs.detach(),
                    map=routing_map,
                    x_grad=x.grad.float(),
                    grads={n: p.grad.clone() for n, p in router.named_parameters()},
                    metrics={n: float(m.values[0]) for n, m in tracked.items()},
                    took_kernels=fused and router._kernels_apply(x.device) and not reestimate,
                    dropped=router.locmoe.capacity_mode == "bound"
                    and bool(tracked["tokens_dropped"].values[0] > 0),
                )
            )
    return [
        dict(
            took_kernels=fus["took_kernels"],
            dropped=(ref["dropped"], fus["dropped"]),
            map_equal=torch.equal(ref["map"], fus["map"]),
            probs_diff=float((ref["probs"] - fus["probs"]).abs().max()),
            x_grad_diff=float((ref["x_grad"] - fus["x_grad"]).abs().max()),
            x_grad_scale=float(ref["x_grad"].abs().max()),
            grad_diffs={
                n: float((g - fus["grads"][n]).abs().max()) for n, g in ref["grads"].items()
            },
            metrics=(ref["metrics"], fus["metrics"]),
        )
        for ref, fus in zip(out[False], out[True], strict=True)
    ]


@pytest.mark.parametrize("case", list(CASES))
def test_fused_router_equals_reference(cluster2, case):
    results = cluster2.run(
        fused_vs_reference_job,
        case,
        layout=LAYOUTS.get(case, ParallelLayout(devices_per_node=1, ep=2)),
    )
    # the paper's fixed gate must take the Triton kernels (the interpreter on the CPU), not fall
    # back silently to the graph; only LOCMOE_TRITON_ROUTER=0 turns them off
    lm = CASES[case]["locmoe"]
    fixed_gate = lm.get("grap_mode", "fixed") == "fixed" and not lm.get("plus_affinity_threshold")
    # with a capacity, the first call re-estimates it (compiled graphs), the second drops in
    # the kernels
    bounded = lm.get("capacity_mode") == "bound" or CASES[case].get("router") == "locmoe_plus"
    for rank in results:
        for call, r in enumerate(rank):
            kernel_call = fixed_gate and not kernels.DISABLED and (call == 1 or not bounded)
            assert r["took_kernels"] == kernel_call, (call, r["took_kernels"])
            assert r["dropped"][0] == r["dropped"][1] == bounded, "a capacity case must drop"
    for r in (call for rank in results for call in rank):
        assert r["map_equal"]
        assert r["probs_diff"] < 1e-6
        # bf16 tokens: the fused paths compute dx in fp32 in another order, then round it to
        # bf16, so an element may land one bf16 ulp (2^-8 relative) away
        rel = 2**-7 if CASES[case].get("dtype") == torch.bfloat16 else 1e-5
        assert r["x_grad_diff"] <= rel * max(1.0, r["x_grad_scale"])
        assert all(d < 1e-5 for d in r["grad_diffs"].values()), r["grad_diffs"]
        ref, fus = r["metrics"]
        assert ref.keys() == fus.keys() and "load_balancing_loss" in ref
        for name in ref:
            assert fus[name] == pytest.approx(ref[name], rel=1e-5, abs=1e-7), name


def recompute_job(ctx, fused: bool):
    """Tracker values after a plain forward+backward and after the same under reentrant
    activation checkpointing (forward without autograd, then again in the backward)."""
    import torch.utils.checkpoint as checkpoint
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megatron_locmoe.routers import router_builder

    ctx.topology()
    config = moe_config(ep=2, num_moe_experts=E, hidden_size=H, moe_router_topk=2)
    lm = LocMoEConfig(router_type="locmoe", fused_router=fused)
    router = router_builder(lm)(config=config, pg_collection=get_default_pg_collection())
    router = router.to(ctx.device)
    router.set_layer_number(1)
    x = torch.randn(12, 3, H, generator=torch.Generator().manual_seed(50 + ctx.rank))
    x = x.to(ctx.device)
    seen = []
    for recompute in (False, True):
        get_moe_metrics_tracker().clear()
        xr = x.clone().requires_grad_(True)
        if recompute:
            probs, _ = checkpoint.checkpoint(router, xr, use_reentrant=True)
        else:
            probs, _ = router(xr)
        probs.sum().backward()
        seen.append({n: float(m.values[0]) for n, m in get_moe_metrics_tracker().metrics.items()})
    return seen


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_activation_recompute_records_metrics_once(cluster2, fused):
    for plain, recomputed in cluster2.run(
        recompute_job, fused, layout=ParallelLayout(devices_per_node=1, ep=2)
    ):
        assert plain.keys() == recomputed.keys() and "node_local_fraction" in plain
        for name, value in plain.items():
            assert recomputed[name] == pytest.approx(value, rel=1e-6, abs=1e-9), name


def buffer_restore_job(ctx, router_type: str, path: str):
    """Whether the router's backward runs after every buffer of the router was copied back in
    place between its forward and backward, as Megatron's local CUDA graphs do when they
    capture a layer (same values: the gradient must not change)."""
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megatron_locmoe.routers import router_builder

    ctx.topology()
    config = moe_config(ep=2, num_moe_experts=E, hidden_size=H, moe_router_topk=2)
    lm = LocMoEConfig(router_type=router_type, fused_router=path != "reference")
    router = router_builder(lm)(config=config, pg_collection=get_default_pg_collection())
    router = router.to(ctx.device)
    router.use_kernels = path == "kernels"
    x = torch.randn(12, 2, H, generator=torch.Generator().manual_seed(ctx.rank)).to(ctx.device)
    grads = []
    for restore in (False, True):
        xr = x.clone().requires_grad_(True)
        probs, _ = router(xr)
        if restore:
            with torch.no_grad():
                for buf in router.buffers():
                    buf.copy_(buf.clone())
        probs.sum().backward()
        grads.append(xr.grad)
    return torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("path", ["reference", "compiled", "kernels"])
def test_backward_survives_megatrons_in_place_buffer_restore(cluster2, path):
    """The fixed GrAP gate lives in buffers, which Megatron's local CUDA graphs restore in
    place between a layer's forward and backward capture: no path may check their versions."""
    layout = ParallelLayout(devices_per_node=1, ep=2)
    assert all(cluster2.run(buffer_restore_job, router_type="locmoe", path=path, layout=layout))
