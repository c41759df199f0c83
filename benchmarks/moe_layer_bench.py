"""The whole MoE layer forward+backward, the plugin against Megatron-Core's layers, and the
expert GEMMs' TFLOP/s against the card's bf16 peak; all in one run on one card.

    python benchmarks/moe_layer_bench.py --out benchmarks/results/moe_layer_h200_te.json \
        --shape "8192,2048,64,6,1408;8192,4096,16,1,16384"

Layers (same weights, same tokens, EP = 1, alltoall dispatcher, bf16, SwiGLU experts with
Megatron's fused weighted SwiGLU, pretrain_gpt's default with --swiglu; --no-activation-fusion
for the eager one):
- ``megatron_te`` (where transformer-engine is installed, the baseline): Megatron's strongest
  layer, TE's spec with TEGroupedMLP, fused permutation and TE's fused router;
- ``plugin_megatron_te``: the plugin's layer with Megatron's router under the same settings
  (must equal ``megatron_te``);
- ``plugin_locmoe_te`` / ``plugin_locmoe_grouped_te``: the fused LocMoE router on TEGroupedMLP /
  on the plugin's grouped experts, under the same settings;
- ``megatron_local`` (the baseline without TE): Megatron's layer from its local spec, TopKRouter
  (aux loss) and the per-expert loop (SequentialMLP);
- ``plugin_megatron_grouped``: the plugin's layer with Megatron's router and grouped experts
  (isolates the expert path: its output must equal ``megatron_local``'s bit for bit);
- ``plugin_locmoe_grouped``: the plugin's layer with the fused LocMoE router and grouped experts.
With ``--graphed``, each layer again with its router in CUDA graphs (``NAME_graphed``).
Experts alone: the loop and the grouped module on the local layer's routing, forward and
forward+backward, FLOPs = 6 * assignments * H * F forward (SwiGLU: 2F up, F down), 3x that
with the backward.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil  # noqa: E402

HAVE_TE = importlib.util.find_spec("transformer_engine") is not None
TE_FUSIONS = dict(
    transformer_impl="transformer_engine",
    moe_grouped_gemm=True,
    moe_permute_fusion=True,
    moe_router_fusion=True,
)
"""Megatron's fastest MoE path: TE's spec (TEGroupedMLP), fused permutation, fused router."""


def _config(H, E, k, F_, activation_fusion: bool, te: bool = False):
    return benchutil.moe_config(
        H,
        E,
        k,
        num_attention_heads=16,
        moe_ffn_hidden_size=F_,
        gated_linear_unit=True,
        activation_func=F.silu,
        bias_activation_fusion=activation_fusion,
        **(TE_FUSIONS if te else {}),
    )


LAYERS = {
    # name: (under TE's spec and fusions, plugin settings or None for Megatron's own layer)
    "megatron_local": (False, None),  # Megatron's local layer: TopKRouter, per-expert loop
    "plugin_megatron_grouped": (False, dict(router_type="megatron", experts="grouped")),
    "plugin_locmoe_grouped": (
        False,
        dict(router_type="locmoe", experts="grouped", fused_router=True),
    ),
    # Megatron's strongest layer, the baseline where TE is installed
    "megatron_te": (True, None),
    # the plugin's layer with Megatron's router under TE: must equal megatron_te
    "plugin_megatron_te": (True, dict(router_type="megatron")),
    # the fused LocMoE router (--moe-router-fusion) on TEGroupedMLP, and on the plugin's
    # grouped experts under TE's spec
    "plugin_locmoe_te": (True, dict(router_type="locmoe")),
    "plugin_locmoe_grouped_te": (True, dict(router_type="locmoe", experts="grouped")),
}
BASELINE = "megatron_te" if HAVE_TE else "megatron_local"
EQUAL_PAIRS = [("megatron_local", "plugin_megatron_grouped"), ("megatron_te", "plugin_megatron_te")]
"""Layers that compute the same function (same weights, same router): compared on output and
input gradient."""


def build_layer(name: str, configs: dict, device):
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_locmoe.config import LocMoEConfig
    from megatron_locmoe.sim.testing import build_moe_layer

    te, locmoe = LAYERS[name]
    torch.manual_seed(7)  # same weights in every layer: reset the host RNG and Megatron's
    model_parallel_cuda_manual_seed(7)  # device RNG tracker (experts initialise under a fork)
    layer = build_moe_layer(configs[te], locmoe=LocMoEConfig(**locmoe) if locmoe else None)
    return layer.to(device)


def _compare(a, b) -> dict:
    (y0, g0), (y1, g1) = a, b
    return {
        "output_bitwise": bool(torch.equal(y0, y1)),
        "x_grad_bitwise": bool(torch.equal(g0, g1)),
        "output_max_rel_diff": float(
            (y0.float() - y1.float()).abs().max() / y0.float().abs().max().clamp_min(1e-30)
        ),
        "x_grad_max_rel_diff": float(
            (g0.float() - g1.float()).abs().max() / g0.float().abs().max().clamp_min(1e-30)
        ),
    }


def graph_the_router(layer, x: torch.Tensor) -> None:
    """Capture ``layer.router``'s forward and backward in CUDA graphs (torch's
    make_graphed_callables), as Megatron's CUDA graphs with ``--cuda-graph-modules
    moe_router`` do: the dispatch and the experts stay eager. The sample is a copy of the
    benchmark's tokens (the same shapes). MoELayer.route calls ``router(hidden_states,
    padding_mask)``; torch's graphed forward takes tensors only, so the captured forward is
    wrapped to take the None mask (a real mask would need a second capture: refused)."""
    router = layer.router
    # Megatron's dispatchers keep the last probs (token_dispatcher.probs), and with them the
    # eager steps' autograd graph, whose gradient accumulators were made on the default
    # stream: capturing the backward would then make that stream wait on the capture. A
    # forward without grad replaces them.
    with torch.no_grad():
        layer(x)
    torch.cuda.make_graphed_callables(
        router, (x.detach().clone().requires_grad_(True),), allow_unused_input=True
    )
    graphed = router.forward

    def forward(hidden_states, padding_mask=None):
        if padding_mask is not None:
            raise ValueError("the router was captured without a padding mask; pass none")
        return graphed(hidden_states)

    router.forward = forward


def bench_layers(configs: dict, T, device, args) -> dict:
    config = configs[False]
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(T, 1, config.hidden_size, device=device, dtype=torch.bfloat16, generator=gen)
    dy = torch.randn_like(x)
    rows, outs = {}, {}
    for name in args.layers:
        layer = build_layer(name, configs, device)
        xr = x.clone().requires_grad_(True)

        def step(layer=layer, xr=xr):
            y, _ = layer(xr)
            y.backward(dy)
            xr.grad = None
            for p in layer.parameters():
                p.grad = None

        def measure(layer=layer, xr=xr, step=step) -> tuple[dict, tuple]:
            ms = benchutil.timed(step, device, args.warmup, args.repeats, args.inner)
            mem = benchutil.peak_memory_mb(step, device)
            y, _ = layer(xr)
            y.backward(dy)
            out = (y.detach().clone(), xr.grad.clone())
            xr.grad = None
            return {"ms": ms, "peak_mb": mem, "experts": type(layer.experts).__name__}, out

        rows[name], outs[name] = measure()
        if name in args.profile:
            sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
            benchutil.profile(step, device, f"{name} T={T} H={config.hidden_size}", sort_by=sort)
        if args.graphed:  # the same layer, its router replayed from CUDA graphs
            graph_the_router(layer, x)
            row, out = measure()
            row["graph_check"] = _compare(outs[name], out)
            rows[f"{name}_graphed"] = row
        del layer
    base = rows[BASELINE]["ms"] if BASELINE in rows else rows["megatron_local"]["ms"]
    local = rows.get("megatron_local", {}).get("ms")
    for row in rows.values():
        row["vs_baseline"] = row["ms"] / base
        row["vs_megatron_local"] = row["ms"] / local if local else None
    checks = {
        f"{a} vs {b}": _compare(outs[a], outs[b]) for a, b in EQUAL_PAIRS if a in outs and b in outs
    }
    return {"baseline": BASELINE, "layers": rows, "equal_layers": checks}


def bench_experts(configs: dict, T, device, args) -> dict:
    """Loop vs grouped experts on the same routed tokens (the baseline router's routing)."""
    config = configs[False]
    from megatron_locmoe.experts import GroupedSequentialMLP

    layer = build_layer("megatron_local", configs, device)
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(T, 1, config.hidden_size, device=device, dtype=torch.bfloat16, generator=gen)
    with torch.no_grad():
        _, routing_map = layer.router(x)
    counts = routing_map.sum(0).cpu()
    n = int(counts.sum())
    tokens = torch.randn(n, config.hidden_size, device=device, dtype=torch.bfloat16, generator=gen)
    probs = torch.rand(n, device=device, dtype=torch.float32, generator=gen)
    dy = torch.randn_like(tokens)
    loop = layer.experts
    plugin = build_layer("plugin_megatron_grouped", configs, device)  # same seed: same weights
    assert isinstance(plugin.experts, GroupedSequentialMLP)
    grouped = plugin.experts
    H, F_ = config.hidden_size, config.moe_ffn_hidden_size
    fwd_flops = 6 * n * H * F_
    _, _, peak = benchutil.card_peaks(device)
    rows, outs = {}, {}
    for name, module in (("loop", loop), ("grouped", grouped)):
        fn = module.forward

        def fwd(fn=fn):
            with torch.no_grad():
                fn(tokens, counts, probs)

        t_in = tokens.clone().requires_grad_(True)

        def fwd_bwd(fn=fn, t_in=t_in, module=module):
            out, _ = fn(t_in, counts, probs)
            out.backward(dy)
            t_in.grad = None
            for p in module.parameters():
                p.grad = None

        ms_f = benchutil.timed(fwd, device, args.warmup, args.repeats, args.inner)
        ms_fb = benchutil.timed(fwd_bwd, device, args.warmup, args.repeats, args.inner)
        with torch.no_grad():
            outs[name] = fn(tokens, counts, probs)[0]
        tf_f = fwd_flops / (ms_f / 1e3) / 1e12
        tf_fb = 3 * fwd_flops / (ms_fb / 1e3) / 1e12
        rows[name] = {
            "fwd_ms": ms_f,
            "fwd_bwd_ms": ms_fb,
            "fwd_tflops": tf_f,
            "fwd_bwd_tflops": tf_fb,
            "fwd_of_peak": tf_f * 1e12 / peak if peak else None,
        }
    # the two grouped GEMMs alone, weights already stacked (what the kernel itself reaches)
    from megatron_locmoe.experts import grouped_linear, grouped_mm_available

    w1, w2 = grouped._weights("linear_fc1").detach(), grouped._weights("linear_fc2").detach()
    offsets = counts.to(device=device, dtype=torch.int32).cumsum(0).to(torch.int32)
    h = torch.randn(n, F_, device=device, dtype=torch.bfloat16, generator=gen)

    def gemms():
        with torch.no_grad():
            grouped_linear(tokens, w1, offsets)
            grouped_linear(h, w2, offsets)

    if grouped_mm_available(device, tokens.dtype):
        ms_g = benchutil.timed(gemms, device, args.warmup, args.repeats, args.inner)
        rows["grouped_gemms_only"] = {
            "fwd_ms": ms_g,
            "fwd_tflops": fwd_flops / (ms_g / 1e3) / 1e12,
            "fwd_of_peak": fwd_flops / (ms_g / 1e3) / peak if peak else None,
        }
    ideal_ms = 3 * fwd_flops / peak * 1e3 if peak else None
    return {
        "assignments": n,
        "experts": rows,
        "bitwise": bool(torch.equal(outs["loop"], outs["grouped"])),
        "ideal_fwd_bwd_ms_at_peak": ideal_ms,
    }


def bench_shape(T, H, E, k, F_, device, args) -> dict:
    configs = {False: _config(H, E, k, F_, args.activation_fusion)}
    if HAVE_TE:
        configs[True] = _config(H, E, k, F_, args.activation_fusion, te=True)
    result = {"shape": {"T": T, "H": H, "E": E, "k": k, "F": F_}}
    fusion = "Megatron's fused weighted SwiGLU" if args.activation_fusion else "eager SwiGLU"
    print(f"\nT={T} H={H} E={E} top-{k} F={F_} ({fusion}, bf16, EP=1)")
    result["experts"] = bench_experts(configs, T, device, args)
    ex = result["experts"]
    print(f"expert MLPs alone ({ex['assignments']} assignments; bitwise equal: {ex['bitwise']}):")
    print(
        f"  {'impl':<20}{'fwd ms':>9}{'fwd TFLOP/s':>13}{'fwd+bwd ms':>12}{'fwd+bwd TFLOP/s':>17}"
    )
    for name, row in ex["experts"].items():
        fb = (
            f"{row['fwd_bwd_ms']:>12.3f}{row['fwd_bwd_tflops']:>17.0f}"
            if "fwd_bwd_ms" in row
            else ""
        )
        print(f"  {name:<20}{row['fwd_ms']:>9.3f}{row['fwd_tflops']:>13.0f}{fb}")
    result.update(bench_layers(configs, T, device, args))
    print(f"whole MoE layer, forward+backward (baseline {result['baseline']}):")
    print(
        f"  {'layer':<26}{'experts':<22}{'ms':>9}{'vs baseline':>13}{'vs local':>10}{'peak MB':>9}"
    )
    for name, row in result["layers"].items():
        mem = benchutil.cell(row["peak_mb"], ".0f")
        local = benchutil.cell(row["vs_megatron_local"], ".3f")
        print(
            f"  {name:<26}{row['experts']:<22}{row['ms']:>9.3f}{row['vs_baseline']:>13.3f}"
            f"{local:>10}{mem:>9}"
        )
    benchutil.print_checks(result["equal_layers"])
    benchutil.print_graph_checks(result["layers"])
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--shape",
        default="8192,2048,64,6,1408",
        help="T,H,E,k,F; several separated by ';' (the paper's: 8192,4096,16,1,16384)",
    )
    p.add_argument(
        "--layers",
        nargs="+",
        default=[name for name, (te, _) in LAYERS.items() if HAVE_TE or not te],
        choices=list(LAYERS),
        help="default: every layer this install can build (the TE ones need transformer-engine)",
    )
    benchutil.add_timing_args(p, warmup=5, repeats=10, inner=3)
    p.add_argument(
        "--no-activation-fusion",
        dest="activation_fusion",
        action="store_false",
        help="eager SwiGLU and probability scaling in every layer (pretrain_gpt's "
        "--no-bias-swiglu-fusion); by default all layers use Megatron's fused weighted SwiGLU, "
        "as pretrain_gpt does with --swiglu",
    )
    p.add_argument(
        "--graphed",
        action="store_true",
        help="also time each layer with its router's forward and backward replayed from CUDA "
        "graphs (Megatron's --cuda-graph-modules moe_router: dispatch and experts eager); "
        "rows NAME_graphed, checked against the eager rows",
    )
    p.add_argument(
        "--profile",
        nargs="*",
        default=[],
        help="layers to profile, eagerly (op table by the card's self time on CUDA)",
    )
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if unknown := set(args.profile) - set(args.layers):
        p.error(f"--profile {' '.join(sorted(unknown))}: not among --layers")
    if args.graphed and not args.device.startswith("cuda"):
        raise SystemExit("--graphed needs a CUDA device (CUDA graphs)")
    if not HAVE_TE and any(LAYERS[name][0] for name in args.layers):
        raise SystemExit("the *_te layers need transformer-engine, which is not installed here")
    device = benchutil.init_single_process(args.device)
    result = benchutil.record(device, activation_fusion=args.activation_fusion, shapes=[])
    print(
        f"card: {result['card']}  torch {result['torch']}  megatron-core {result['megatron_core']}"
    )
    for shape in args.shape.split(";"):
        T, H, E, k, F_ = (int(v) for v in shape.split(","))
        result["shapes"].append(bench_shape(T, H, E, k, F_, device, args))
        benchutil.save(args.out, result)  # after each shape: a cut-off call keeps what finished


if __name__ == "__main__":
    main()
