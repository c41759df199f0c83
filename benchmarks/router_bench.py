"""Router forward+backward time and peak memory against Megatron-Core's TopKRouter, same run.

    python benchmarks/router_bench.py --out benchmarks/results/router_h100.json

Routers: Megatron's TopKRouter with its aux loss (the baseline), with transformer-engine's fused
top-k, score function and aux loss (``--moe-router-fusion``; where TE is installed) and with
group-limited routing,
the plugin's locmoe (reference path; fused path as one torch.compile'd graph; fused path on
the Triton kernels, the default on CUDA), switch (top-1 only, by definition), hash, and
``autograd_floor``: no routing at all, only what every router pays in this harness (a module
call, an autograd Function's forward and backward, the probs and dx allocations). Tokens
are bf16 [T, 1, H]; routing math is fp32. The backward is driven by a random gradient on the
routing probabilities (plus each router's losses). Times are medians over repeats of
CUDA-event-timed loops after warm-up, two ways: "ms" with the routers' samples interleaved (a
host whose speed drifts slows all alike) and "alone ms" with each router's samples back to
back. Host-bound routers read slower interleaved: while the partner router's host-bound calls
run, the card idles, and the next calls pay for it (a pure-Python host spin as the partner
costs the fused router as much as Megatron's router does; a device-side sleep far less). The
floor is the bytes a router must move at the card's bandwidth: read x and write dx
once ([T, H] bf16 each), plus the [T, E] outputs. "device ms" is the card's own time per call
with the host's launch overhead hidden (calls queued behind a device-side sleep): where it is
far below "ms", the router is host-bound. "<router>_graphed" rows (CUDA; ``--graphed``) are the
same forward+backward captured once in a CUDA graph and replayed, as Megatron's CUDA graphs
(``--cuda-graph-modules moe_router``) would run it: the host's launch cost gone.

The locmoe routers run with half of the experts marked as remote (two simulated nodes), so the
locality loss is computed as in a multi-node run; one process cannot host a real second node.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil  # noqa: E402

SHAPES = [(8192, 4096, 16, 1), (8192, 2048, 64, 6), (16384, 7168, 256, 8)]
"""(tokens, hidden, experts, top-k): the paper's setting, then two fine-grained MoEs."""

GROUPS = {16: (4, 1), 64: (8, 3), 256: (8, 4)}
"""Group-limited routing per expert count: (groups, groups chosen per token)."""


def _config(H, E, k, **overrides):
    return benchutil.moe_config(H, E, k, **{"moe_ffn_hidden_size": 128, **overrides})


class AutogradFloor(torch.nn.Module):
    """What any router pays in this harness: a module call, one autograd Function forward and
    backward (the engine's round trip per ``backward()``), the probs and dx allocations."""

    def __init__(self, num_experts: int):
        super().__init__()
        self.num_experts = num_experts

    def forward(self, x):
        return _Floor.apply(x, self.num_experts), None


class _Floor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, num_experts):
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return x.new_empty(x.shape[0] * x.shape[1], num_experts, dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad):
        return grad.new_empty(ctx.x_shape, dtype=ctx.x_dtype), None


def build_router(name: str, H: int, E: int, k: int, device):
    """(router, config) for one benchmark entry, or None where the router cannot take the shape."""
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_locmoe.config import LocMoEConfig
    from megatron_locmoe.routers import router_builder

    pg = get_default_pg_collection()
    if name == "megatron_aux":
        config = _config(H, E, k)
        router = TopKRouter(config=config, pg_collection=pg)
    elif name == "megatron_te_fused":
        if importlib.util.find_spec("transformer_engine") is None:
            return None
        config = _config(H, E, k, moe_router_fusion=True)
        router = TopKRouter(config=config, pg_collection=pg)
    elif name == "megatron_group_limited":
        groups, group_topk = GROUPS[E]
        config = _config(H, E, k, moe_router_num_groups=groups, moe_router_group_topk=group_topk)
        router = TopKRouter(config=config, pg_collection=pg)
    elif name in CAPACITY_ROUTERS:
        config = _config(H, E, k, moe_expert_capacity_factor=1.1)
        router_type = "locmoe_plus" if name.startswith("locmoe_plus") else "locmoe"
        lm = LocMoEConfig(
            router_type=router_type,
            fused_router="off" if name.endswith("reference") else "on",
            capacity_mode="bound",
            capacity_reestimate_interval=100,  # both re-estimate, as LocMoE+ does by default
        )
        router = router_builder(lm)(config=config, pg_collection=pg)
        router.use_kernels = not name.endswith("compiled")
        remote = torch.arange(E) >= E // 2  # two simulated nodes: see the module docstring
        router.expert_is_local.copy_(~remote)
        router.locality_on = True
    elif name in ("locmoe", "locmoe_fused", "locmoe_compiled"):
        config = _config(H, E, k)
        lm = LocMoEConfig(router_type="locmoe", fused_router=name != "locmoe")
        router = router_builder(lm)(config=config, pg_collection=pg)
        router.use_kernels = name == "locmoe_fused"  # compiled: the torch.compile'd graph
        remote = torch.arange(E) >= E // 2  # two simulated nodes: see the module docstring
        router.expert_is_local.copy_(~remote)
        router.locality_on = True
    elif name == "switch":
        if k != 1:
            return None
        config = _config(H, E, k, moe_expert_capacity_factor=1.0)
        router = router_builder(LocMoEConfig(router_type="switch"))(config=config, pg_collection=pg)
    elif name == "autograd_floor":
        return AutogradFloor(E).to(device), None
    elif name == "hash":
        config = _config(H, E, k, moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0)
        router = router_builder(LocMoEConfig(router_type="hash"), vocab_size=50304)(
            config=config, pg_collection=pg
        )
    else:
        raise ValueError(f"unknown router {name!r}")
    router.set_layer_number(1)
    return router.to(device), config


CAPACITY_ROUTERS = (
    "locmoe_bound",
    "locmoe_bound_compiled",
    "locmoe_plus",
    "locmoe_plus_compiled",
    "locmoe_plus_reference",
)
"""Capacity factor 1.1 (LocMoE+'s baseline) as the ceiling, re-estimated every 100 calls: LocMoE's
bound and LocMoE+ on their fused paths (the Triton kernels with the drop; ``_compiled``: the
compiled graphs instead), LocMoE+ on its reference path (the agreement check's baseline)."""

ROUTERS = [
    "megatron_aux",
    "megatron_te_fused",
    "megatron_group_limited",
    "locmoe",
    "locmoe_compiled",
    "locmoe_fused",
    "locmoe_bound",
    "locmoe_bound_compiled",
    "locmoe_plus",
    "locmoe_plus_compiled",
    "locmoe_plus_reference",
    "switch",
    "hash",
    "autograd_floor",
]

GRAPHED = ["megatron_aux", "megatron_te_fused", "locmoe_fused"]
"""Routers also timed as one replayed CUDA graph (forward and backward)."""


def _agreement(reference, fused, T: int) -> dict:
    """How far a fused path's (probs, map, dx) are from the reference path's."""
    (p0, m0, g0), (p1, m1, g1) = reference, fused
    same_T = (m0 == m1).all(-1)  # tokens routed to the same experts by both paths
    g0_same, g1_same = g0.view(T, -1)[same_T], g1.view(T, -1)[same_T]
    if not same_T.any():
        return {"map_equal": False, "tokens_rerouted": T}
    return {
        "map_equal": bool(torch.equal(m0, m1)),
        "tokens_rerouted": int((~same_T).sum()),
        "probs_max_diff_same_routing": float((p0 - p1)[same_T].abs().max()),
        "x_grad_max_rel_diff_same_routing": float(
            (g0_same - g1_same).abs().max() / g0_same.abs().max().clamp_min(1e-30)
        ),
    }


def graphed_row(name, eager_router, H, E, k, x, grad_TE, outputs, device, args) -> dict:
    """``name``'s forward+backward captured in one CUDA graph and replayed: what the router
    costs when Megatron's CUDA graphs (``--cuda-graph-modules moe_router``) take the host out.
    A fresh router (its tracker writes and buffers inside the graph); its replayed outputs are
    compared with the eager call's."""
    router, _ = build_router(name, H, E, k, device)
    router.load_state_dict(eager_router.state_dict())  # the same gate as the eager row's
    xr = x.clone().requires_grad_(True)
    out: list[torch.Tensor] = []

    def step():
        probs, routing_map = router(xr)
        probs.backward(grad_TE)
        out[:] = [probs.detach(), routing_map, xr.grad]
        xr.grad = None

    try:
        replay = benchutil.cuda_graphed(step, device)
    except RuntimeError as e:  # a router that cannot be captured: say why, keep the others
        print(f"  {name}: CUDA-graph capture failed: {str(e).splitlines()[0]}")
        return {"graph_error": str(e).splitlines()[0]}
    ms = benchutil.timed(replay, device, args.warmup, args.repeats, args.inner)
    replay()
    torch.cuda.synchronize(device)
    row = {"ms": ms, "alone_ms": ms, "device_ms": benchutil.device_time(replay, device)}
    row.update(peak_mb=None, x_floor=None, device_x_floor=None)
    if name in outputs:
        T = x.shape[0]
        row["graph_check"] = _agreement(outputs[name], (out[0], out[1], out[2].float()), T)
    return row


def bench_shape(T, H, E, k, device, args) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(T, 1, H, device=device, dtype=torch.bfloat16, generator=gen)
    grad_TE = torch.randn(T, E, device=device, dtype=torch.float32, generator=gen)
    ids = torch.randint(0, 50304, (1, T), device=device, generator=gen)
    _, bw, _ = benchutil.card_peaks(device)
    floor_bytes = 2 * T * H * 2 + T * E * (4 + 1 + 4)
    floor_ms = floor_bytes / bw * 1e3 if bw else None
    routers, steps = {}, {}
    for name in args.routers:
        built = build_router(name, H, E, k, device)
        if built is None:
            continue
        router = routers[name] = built[0]
        if name == "hash":
            router.set_token_ids(ids)
        xr = x.clone().requires_grad_(True)

        def step(router=router, xr=xr):
            probs, _ = router(xr)
            if probs.requires_grad:  # hash routing has no gradient path
                probs.backward(grad_TE)
            xr.grad = None

        steps[name] = step
    times = benchutil.timed_interleaved(steps, device, args.warmup, args.repeats, args.inner)
    rows, outputs = {}, {}
    for name, step in steps.items():
        ms, gpu_ms = times[name], benchutil.device_time(step, device)
        alone_ms = benchutil.timed(step, device, args.warmup, args.repeats, args.inner)
        if name in args.profile:
            benchutil.profile(step, device, f"{name} T={T} H={H} E={E} k={k}")
        mem = benchutil.peak_memory_mb(step, device)
        xr = x.clone().requires_grad_(True)
        probs, routing_map = routers[name](xr)
        if probs.requires_grad:
            probs.backward(grad_TE)
            outputs[name] = (probs.detach(), routing_map, xr.grad.float())
        rows[name] = {
            "ms": ms,
            "alone_ms": alone_ms,
            "device_ms": gpu_ms,
            "peak_mb": mem,
            "x_floor": ms / floor_ms if floor_ms else None,
            "device_x_floor": gpu_ms / floor_ms if floor_ms and gpu_ms else None,
        }
    for name in args.graphed:
        if name in steps and device.type == "cuda":
            rows[f"{name}_graphed"] = graphed_row(
                name, routers[name], H, E, k, x, grad_TE, outputs, device, args
            )
    del routers, steps
    base, base_alone = rows["megatron_aux"]["ms"], rows["megatron_aux"]["alone_ms"]
    te_alone = rows.get("megatron_te_fused", {}).get("alone_ms")
    for row in rows.values():
        if "ms" not in row:
            continue
        row["vs_megatron"] = row["ms"] / base
        row["alone_vs_megatron"] = row["alone_ms"] / base_alone
        row["alone_vs_te_fused"] = row["alone_ms"] / te_alone if te_alone else None
    check = {
        name: _agreement(outputs[reference], outputs[name], T)
        for reference, name in (
            ("locmoe", "locmoe_compiled"),
            ("locmoe", "locmoe_fused"),
            ("locmoe_plus_reference", "locmoe_plus"),
            ("locmoe_plus_reference", "locmoe_plus_compiled"),
            ("locmoe_bound_compiled", "locmoe_bound"),
        )
        if reference in outputs and name in outputs
    }

    return {"shape": [T, H, E, k], "floor_ms": floor_ms, "routers": rows, "fused_check": check}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default=None, help="T,H,E,k;T,H,E,k (default: the three above)")
    p.add_argument("--routers", nargs="+", default=ROUTERS)
    benchutil.add_timing_args(p, warmup=10, repeats=15, inner=10)
    p.add_argument(
        "--graphed",
        nargs="*",
        default=GRAPHED,
        help="routers also timed captured in a CUDA graph (CUDA only; none: --graphed)",
    )
    p.add_argument("--profile", nargs="*", default=[], help="routers to profile (op table)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    shapes = SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
    device = benchutil.init_single_process(args.device)
    result = benchutil.record(device, shapes=[])
    print(
        f"card: {result['card']}  torch {result['torch']}  megatron-core {result['megatron_core']}"
    )
    for T, H, E, k in shapes:
        res = bench_shape(T, H, E, k, device, args)
        result["shapes"].append(res)
        floor = f"{res['floor_ms'] * 1e3:.0f} us" if res["floor_ms"] else "n/a"
        print(f"\nT={T} H={H} E={E} top-{k}  (memory floor {floor})")
        print(
            f"  {'router':<24}{'ms':>8}{'vs megatron':>13}{'alone ms':>10}{'vs megatron':>13}"
            f"{'x floor':>9}{'device ms':>11}{'x floor':>9}{'peak MB':>9}{'vs TE fused':>12}"
        )
        for name, row in res["routers"].items():
            if "ms" not in row:
                print(f"  {name:<24}capture failed: {row['graph_error']}")
                continue
            xf = benchutil.cell(row["x_floor"], ".1f")
            dev_ms = benchutil.cell(row["device_ms"], ".3f")
            dxf = benchutil.cell(row["device_x_floor"], ".1f")
            mem = benchutil.cell(row["peak_mb"], ".0f")
            vs_te = benchutil.cell(row["alone_vs_te_fused"], ".3f")
            print(
                f"  {name:<24}{row['ms']:>8.3f}{row['vs_megatron']:>13.3f}{row['alone_ms']:>10.3f}"
                f"{row['alone_vs_megatron']:>13.3f}{xf:>9}{dev_ms:>11}{dxf:>9}{mem:>9}{vs_te:>12}"
            )
        benchutil.print_checks(res["fused_check"], " vs reference")
        benchutil.print_graph_checks(res["routers"])
    benchutil.save(args.out, result)


if __name__ == "__main__":
    main()
