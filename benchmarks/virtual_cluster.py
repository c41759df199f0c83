"""What the virtual cluster costs, and the model FLOP utilisation of the study's model on one GPU.

The same GPT-MoE (12 layers, hidden 768, 64 experts top-4, expert FFN 768: about 1.1e8 active
parameters without embeddings) trains through ``python -m megatron_locmoe.pretrain_gpt``
(Megatron's pretrain()) with ``--moe-router-type locmoe`` and its fast paths (fused router,
grouped experts or TE's TEGroupedMLP, TE attention where TE is installed), once as plain
training and once as the virtual cluster ``--locmoe-virtual-cluster NODESxGPUS`` (same global
batch, same micro-batches, same data), in turn (A B A B ...) so a drifting host does not bias
the ratio. Prints tokens/s of each, the virtual cluster's cost (1 - its tokens/s over the
plain run's) and MFU = Megatron's own model FLOPs (--log-throughput) over the card's measured
bf16 dense GEMM rate (--peak-tflops, 790 on the H200: docs/performance.md).

    python benchmarks/virtual_cluster.py --data "--data-path /tmp/realtext/mixture \\
        --tokenizer-type NullTokenizer --vocab-size 32767" --out $OUT/virtual_h200.json
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import re
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchutil  # noqa: E402
import trace_summary  # noqa: E402

HAVE_TE = importlib.util.find_spec("transformer_engine") is not None

MODEL = (
    "--num-layers 12 --hidden-size 768 --num-attention-heads 12 --position-embedding-type rope "
    "--num-experts 64 --moe-router-topk 4 --moe-ffn-hidden-size 768 "
    "--moe-token-dispatcher-type alltoall --moe-router-type locmoe "
    "--swiglu --disable-bias-linear --bf16 --untie-embeddings-and-output-weights "
    "--lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 2 "
    "--eval-iters 0 --eval-interval 1000000 --seed 1234 --log-throughput"
)
"""The model of the study's fine-grained regime (docs/virtual_cluster.md)."""
TE_FLAGS = (
    "--transformer-impl transformer_engine --moe-permute-fusion --moe-router-fusion "
    "--no-gradient-accumulation-fusion --locmoe-experts grouped"
)
"""TE's attention, norms and fused Adam with the plugin's grouped experts (torch._grouped_mm):
TE's own TEGroupedMLP at 64 experts trained this model at 24 TFLOP/s on an H100 (41 s per
1M-token step; benchmarks/results/virtual_h100_te_tegrouped_mu0.json), host-bound as
docs/transformer_engine.md measured its layer (400+ kernels per call)."""
LOCAL_FLAGS = (
    "--transformer-impl local --no-persist-layer-norm --no-masked-softmax-fusion "
    "--no-gradient-accumulation-fusion --no-rope-fusion --locmoe-attention sdpa"
)
"""Without TE: the plugin's SDPA attention (flash / cuDNN kernels through torch) and grouped
experts (the default for the plugin's routers), torch's Adam."""
LINE = re.compile(
    r"iteration\s+(\d+)/\s*\d+ .*?elapsed time per iteration \(ms\): ([\d.]+)"
    r".*?throughput per GPU \(TFLOP/s/GPU\): ([\d.]+).*?lm loss: ([\d.E+-]+)"
)


def run(name: str, argv: list[str], logs: str | None, profiled: int = 0) -> dict:
    """One training run; its speed is the median of the steps after the first two, less the
    last ``profiled`` (the profiler's warm-up and active steps run slower)."""
    stdout, seconds = benchutil.run_pretrain_gpt(name, argv, logs)
    points = [
        (int(i), float(ms), float(tf), float(loss)) for i, ms, tf, loss in LINE.findall(stdout)
    ]
    if not points:
        raise RuntimeError(f"{name}: no iteration lines in its log:\n{stdout[-3000:]}")
    last = points[-1][0] - profiled
    steady = [p for p in points if 2 < p[0] <= last] or points[-1:]  # the first ones warm up
    return {
        "ms_per_iter": statistics.median(p[1] for p in steady),
        "tflops": statistics.median(p[2] for p in steady),
        "loss": {p[0]: p[3] for p in points},
        "wall_s": seconds,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="Megatron's data and tokenizer flags")
    p.add_argument("--cluster", default="16x8", help="the virtual cluster, NODESxGPUS")
    p.add_argument(
        "--ep-size",
        type=int,
        default=64,
        help="its expert-parallel size (64 experts on 16x8: EP 64, 8 nodes per EP group)",
    )
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--extra", default="", help="more flags for both runs")
    p.add_argument("--peak-tflops", type=float, default=790.0)
    p.add_argument("--impl", choices=["te", "local"], default="te" if HAVE_TE else "local")
    p.add_argument(
        "--arms",
        nargs="+",
        choices=["plain", "virtual"],
        default=["plain", "virtual"],
        help="plain training, the virtual cluster, or both in turn",
    )
    p.add_argument("--out", default=None)
    p.add_argument("--logs", default=None)
    p.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="profile the last step of each arm with PyTorch's profiler (Megatron's --profile) "
        "and add where its time went (benchmarks/trace_summary.py) to the record; traces in DIR",
    )
    a = p.parse_args()
    nodes, gpus = (int(x) for x in a.cluster.lower().split("x"))
    ranks = nodes * gpus
    gbs = ranks * a.micro_batch_size
    common = [
        *MODEL.split(),
        *(TE_FLAGS if a.impl == "te" else LOCAL_FLAGS).split(),
        *a.data.split(),
        *a.extra.split(),
        "--seq-length",
        str(a.seq_length),
        "--max-position-embeddings",
        str(a.seq_length),
        "--micro-batch-size",
        str(a.micro_batch_size),
        "--global-batch-size",
        str(gbs),
        "--train-iters",
        str(a.steps),
        "--log-interval",
        "1",
    ]
    virtual = ["--locmoe-virtual-cluster", a.cluster, "--locmoe-virtual-ep-size", str(a.ep_size)]
    arms = {"plain": common, "virtual": [*common, *virtual]}
    arms = {name: arms[name] for name in a.arms}
    if a.profile:
        for name in arms:
            arms[name] = [
                *arms[name],
                *f"--profile --use-pytorch-profiler --profile-step-start {a.steps - 1}".split(),
                *f"--profile-step-end {a.steps} --tensorboard-dir {a.profile}/{name}/tb".split(),
            ]
    import megatron.core
    import torch

    record = {
        "card": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
        "torch": torch.__version__,
        "megatron_core": megatron.core.__version__,
        "transformer_engine": HAVE_TE,
        "command": " ".join(sys.argv),
        "flags": " ".join(common),
        "cluster": a.cluster,
        "tokens_per_step": gbs * a.seq_length,
        "results": {},
    }
    rounds: dict[str, list[dict]] = {}
    for _ in range(a.rounds):
        for name, argv in arms.items():
            rounds.setdefault(name, []).append(run(name, argv, a.logs, 2 if a.profile else 0))
            if a.profile:
                trace = os.path.join(a.profile, name, "torch_profile", "rank-0.json.gz")
                rounds[name][-1]["profile"] = (
                    trace_summary.summarise(trace_summary.load(trace))
                    if os.path.exists(trace)
                    else f"no trace at {trace}"
                )
            for arm, runs in rounds.items():
                ms = statistics.median(r["ms_per_iter"] for r in runs)
                tflops = statistics.median(r["tflops"] for r in runs)
                record["results"][arm] = {
                    "ms_per_iter": ms,
                    "tokens_per_s": record["tokens_per_step"] / (ms / 1000),
                    "tflops": tflops,
                    "mfu": tflops / a.peak_tflops,
                    "rounds": runs,
                }
            benchutil.write_json(a.out, record)
    res = record["results"]
    cost = None
    if len(res) == 2:
        cost = record["virtual_cost"] = (
            1 - res["virtual"]["tokens_per_s"] / res["plain"]["tokens_per_s"]
        )
    for arm, r in res.items():
        print(
            f"{arm:8s} {r['tokens_per_s']:12,.0f} tokens/s  {r['tflops']:6.1f} TFLOP/s  "
            f"MFU {r['mfu']:.3f}  loss@{a.steps} {r['rounds'][-1]['loss'].get(a.steps)}"
        )
    if cost is not None:
        print(f"virtual cluster {a.cluster} costs {cost:+.2%} tokens/s against plain training")
    benchutil.write_json(a.out, record)


if __name__ == "__main__":
    main()
