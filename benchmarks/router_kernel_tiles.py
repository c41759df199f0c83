"""Sweep the router kernels' tile shapes on this card: the card time of the forward (route +
finalize) and of the backward kernel per (chunk, tokens per tile, warps, strips per SM), next to
the built-in choice (kernels.forward_tiles / backward_tiles), so the heuristic can be checked
or re-tuned on another GPU.

    python benchmarks/router_kernel_tiles.py [--shapes "T,H,E,k;..."] [--out FILE.json]

Times are device times with the host's launch overhead hidden (benchutil.device_time).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil  # noqa: E402
import router_bench  # noqa: E402


def _candidates(E: int, C: int, warps: tuple[int, ...], strips: tuple[int, ...]):
    from megatron_locmoe.routers.kernels import Tiles, _next_pow2

    BE = _next_pow2(E)
    for BC, BT, w, s in itertools.product((8, 16, 32, 64), (1, 2, 4, 8, 16, 32), warps, strips):
        if BC <= _next_pow2(C) and 1024 <= BT * BE * BC <= 16384:
            yield Tiles(BT, BE, BC, w, s)


def sweep_shape(T, H, E, k, device, warps=(1, 2, 4, 8), strips=(2, 4, 8)) -> dict:
    from megatron_locmoe.routers import kernels

    C = H // E
    x = torch.randn(T, H, device=device, dtype=torch.bfloat16)
    g = torch.randn(T, E, device=device)
    router, _ = router_bench.build_router("locmoe_fused", H, E, k, device)
    args = (x, router.weight, router.grap_log_temperature, router.expert_is_local)
    args += (router.capacity_delta, router.capacity_ec_min, router.loss_spec(), None, True)
    builtin_fwd, builtin_bwd = kernels.forward_tiles, kernels.backward_tiles
    result = {"shape": [T, H, E, k], "forward": [], "backward": []}
    try:
        for tiles in _candidates(E, C, warps, strips):
            kernels.forward_tiles = lambda E_, C_, t=tiles: t
            kernels.forward_plan.cache_clear()  # the plan caches the tiles
            ms = benchutil.device_time(lambda: kernels.route(*args), device)
            result["forward"].append((ms, tiles._asdict()))
        kernels.forward_tiles = builtin_fwd
        kernels.forward_plan.cache_clear()
        builtin_ms = benchutil.device_time(lambda: kernels.route(*args), device)
        result["forward_builtin"] = (builtin_ms, builtin_fwd(E, C)._asdict())
        xg = x.clone().requires_grad_(True)
        probs = kernels.route(xg, *args[1:])[0]

        def backward():  # the real backward (LocMoERouteFunction) with the tiles in force
            probs.backward(g, retain_graph=True)
            xg.grad = None

        for tiles in _candidates(E, C, warps, (4,)):
            kernels.backward_tiles = lambda E_, C_, t=tiles: t
            result["backward"].append((benchutil.device_time(backward, device), tiles._asdict()))
        kernels.backward_tiles = builtin_bwd
        result["backward_builtin"] = (
            benchutil.device_time(backward, device),
            builtin_bwd(E, C)._asdict(),
        )
    finally:
        kernels.forward_tiles, kernels.backward_tiles = builtin_fwd, builtin_bwd
        kernels.forward_plan.cache_clear()
    for key in ("forward", "backward"):
        result[key].sort(key=lambda row: row[0])
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=None, help="T,H,E,k;T,H,E,k (default: router_bench's)")
    p.add_argument("--warps", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--strips", type=int, nargs="+", default=[2, 4, 8], help="per SM (forward)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    shapes = router_bench.SHAPES
    if a.shapes:
        shapes = [tuple(int(v) for v in s.split(",")) for s in a.shapes.split(";")]
    device = benchutil.init_single_process("cuda")
    record = benchutil.record(device, shapes=[])
    print(f"card: {record['card']}  torch {record['torch']}")
    for T, H, E, k in shapes:
        res = sweep_shape(T, H, E, k, device, tuple(a.warps), tuple(a.strips))
        record["shapes"].append(res)
        print(f"\nT={T} H={H} E={E} top-{k}")
        for key in ("forward", "backward"):
            ms, tiles = res[f"{key}_builtin"]
            best = ", ".join(
                f"{m * 1e3:.0f} us {t['BC']}/{t['BT']}/w{t['num_warps']}/s{t['strips_per_sm']}"
                for m, t in res[key][:3]
            )
            print(
                f"  {key:<9} built-in {ms * 1e3:.0f} us (BC/BT {tiles['BC']}/{tiles['BT']}); best: {best}"
            )
    benchutil.save(a.out, record)


if __name__ == "__main__":
    main()
