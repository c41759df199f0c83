"""The whole MoE layer forward+backward, the plugin against Megatron-Core's local-spec layer, and
the expert GEMMs' TFLOP/s against the card's bf16 peak; all in one run on one card.

    python benchmarks/moe_layer_bench.py --out benchmarks/results/moe_layer_h100.json

Layers (same weights, same tokens, EP = 1, alltoall dispatcher, bf16, SwiGLU experts with
Megatron's fused weighted SwiGLU, pretrain_gpt's default with --swiglu; --no-activation-fusion
for the eager one):
- ``megatron_local``: Megatron's MoELayer from its local spec: TopKRouter (aux loss) and the
  per-expert loop (SequentialMLP) that Megatron uses without transformer-engine — the baseline;
- ``plugin_megatron_grouped``: the plugin's layer with Megatron's router and grouped experts
  (isolates the expert path: its output must equal the baseline's bit for bit);
- ``plugin_locmoe_grouped``: the plugin's layer with the fused LocMoE router and grouped experts.
Experts alone: the loop and the grouped module on the baseline's routing, forward and
forward+backward, FLOPs = 6 * assignments * H * F forward (SwiGLU: 2F up, F down), 3x that
with the backward.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil  # noqa: E402


def _config(H, E, k, F_, activation_fusion: bool):
    return benchutil.moe_config(
        H,
        E,
        k,
        num_attention_heads=16,
        moe_ffn_hidden_size=F_,
        gated_linear_unit=True,
        activation_func=F.silu,
        bias_activation_fusion=activation_fusion,
    )


LOCMOE = {
    "megatron_local": None,  # Megatron's own layer: TopKRouter, per-expert loop
    "plugin_megatron_grouped": dict(router_type="megatron", experts="grouped"),
    "plugin_locmoe_grouped": dict(router_type="locmoe", experts="grouped", fused_router=True),
}


def build_layer(name: str, config, device):
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_locmoe.config import LocMoEConfig
    from megatron_locmoe.testing import build_moe_layer

    locmoe = LOCMOE[name]
    torch.manual_seed(7)  # same weights in every layer: reset the host RNG and Megatron's
    model_parallel_cuda_manual_seed(7)  # device RNG tracker (experts initialise under a fork)
    layer = build_moe_layer(config, locmoe=LocMoEConfig(**locmoe) if locmoe else None)
    return layer.to(device)


LAYERS = list(LOCMOE)


def bench_layers(config, T, device, args) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(T, 1, config.hidden_size, device=device, dtype=torch.bfloat16, generator=gen)
    dy = torch.randn_like(x)
    rows, outs = {}, {}
    for name in LAYERS:
        layer = build_layer(name, config, device)
        xr = x.clone().requires_grad_(True)

        def step(layer=layer, xr=xr):
            y, _ = layer(xr)
            y.backward(dy)
            xr.grad = None
            for p in layer.parameters():
                p.grad = None

        ms = benchutil.timed(step, device, args.warmup, args.repeats, args.inner)
        mem = benchutil.peak_memory_mb(step, device)
        y, _ = layer(xr)
        y.backward(dy)
        outs[name] = (y.detach(), xr.grad.clone())
        rows[name] = {"ms": ms, "peak_mb": mem}
        del layer
    base = rows["megatron_local"]["ms"]
    for row in rows.values():
        row["vs_megatron"] = row["ms"] / base
    (y0, g0), (y1, g1) = outs["megatron_local"], outs["plugin_megatron_grouped"]
    check = {
        "output_bitwise": bool(torch.equal(y0, y1)),
        "x_grad_bitwise": bool(torch.equal(g0, g1)),
        "x_grad_max_rel_diff": float(
            (g0.float() - g1.float()).abs().max() / g0.float().abs().max().clamp_min(1e-30)
        ),
    }
    return {"layers": rows, "grouped_vs_loop_layer": check}


def bench_experts(config, T, device, args) -> dict:
    """Loop vs grouped experts on the same routed tokens (the baseline router's routing)."""
    from megatron_locmoe.experts import GroupedSequentialMLP

    layer = build_layer("megatron_local", config, device)
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
    plugin = build_layer("plugin_megatron_grouped", config, device)  # same seed: same weights
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", default="8192,2048,64,6,1408", help="T,H,E,k,F")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--inner", type=int, default=3)
    p.add_argument(
        "--no-activation-fusion",
        dest="activation_fusion",
        action="store_false",
        help="eager SwiGLU and probability scaling in every layer (pretrain_gpt's "
        "--no-bias-swiglu-fusion); by default all layers use Megatron's fused weighted SwiGLU, "
        "as pretrain_gpt does with --swiglu",
    )
    p.add_argument("--out", default=None)
    args = p.parse_args()
    T, H, E, k, F_ = (int(v) for v in args.shape.split(","))
    device = benchutil.init_single_process(args.device)
    config = _config(H, E, k, F_, args.activation_fusion)
    result = benchutil.record(
        device,
        shape={"T": T, "H": H, "E": E, "k": k, "F": F_},
        activation_fusion=args.activation_fusion,
    )
    print(
        f"card: {result['card']}  torch {result['torch']}  megatron-core {result['megatron_core']}"
    )
    fusion = "Megatron's fused weighted SwiGLU" if args.activation_fusion else "eager SwiGLU"
    print(f"T={T} H={H} E={E} top-{k} F={F_} ({fusion}, bf16, EP=1)")
    result["experts"] = bench_experts(config, T, device, args)
    ex = result["experts"]
    print(f"\nexpert MLPs alone ({ex['assignments']} assignments; bitwise equal: {ex['bitwise']}):")
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
    result.update(bench_layers(config, T, device, args))
    print("\nwhole MoE layer, forward+backward:")
    print(f"  {'layer':<26}{'ms':>9}{'vs megatron':>13}{'peak MB':>9}")
    for name, row in result["layers"].items():
        mem = f"{row['peak_mb']:.0f}" if row["peak_mb"] is not None else "-"
        print(f"  {name:<26}{row['ms']:>9.3f}{row['vs_megatron']:>13.3f}{mem:>9}")
    print(f"  grouped vs loop layer: {result['grouped_vs_loop_layer']}")
    benchutil.save(args.out, result)


if __name__ == "__main__":
    main()
