"""End-to-end router comparison on one machine: the same small GPT-MoE trained with each router
through ``python -m megatron_locmoe.pretrain_gpt`` (Megatron's pretrain()), same steps and data.

Prints and saves (JSON) the lm loss at fixed steps and tokens/s per router, with each router's
throughput as a ratio to Megatron's own router measured in the same run.

    python -m megatron_locmoe.sim.data --out data/pydoc
    python benchmarks/e2e_routers.py --steps 300 --out benchmarks/results/e2e_h100.json \
        --data "--data-path data/pydoc --tokenizer-type NullTokenizer --vocab-size 257" \
        --hash-counts data/pydoc_counts.npy
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

MODEL_SIZE = (
    "--num-layers 8 --hidden-size 512 --num-attention-heads 8 --seq-length 512 "
    "--max-position-embeddings 512 --micro-batch-size 8 --global-batch-size 32 --num-experts 16 "
    "--moe-router-topk 1 --moe-router-pre-softmax --moe-token-dispatcher-type alltoall "
    "--swiglu --disable-bias-linear --bf16 --lr 3e-4 "
    "--min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 20 --eval-iters 0 "
    "--eval-interval 100000 --seed 1234"
)
HAVE_TE = importlib.util.find_spec("transformer_engine") is not None
HAVE_APEX_WGRAD = importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None
TE_IMPL = "--transformer-impl transformer_engine" + (
    # the output layer is Megatron's own linear, whose fused weight-gradient accumulation needs
    # apex (NGC containers have it; a bare TE install does not)
    "" if HAVE_APEX_WGRAD else " --no-gradient-accumulation-fusion"
)
LOCAL_IMPL = (  # without TE and apex: the local spec and no apex fusions
    "--transformer-impl local --no-persist-layer-norm --no-masked-softmax-fusion "
    "--no-gradient-accumulation-fusion"
)
MODEL = f"{MODEL_SIZE} {TE_IMPL if HAVE_TE else LOCAL_IMPL}"
"""TE specs when transformer-engine is importable (NGC containers), the local spec otherwise.
(Experts: --locmoe-experts picks the plugin's grouped MLP or Megatron's loop either way.)"""
MEGATRON_AUX = "--moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 0.01"
TE_FUSIONS = "--moe-grouped-gemm --moe-permute-fusion"
"""TE's grouped expert GEMMs (TEGroupedMLP) and fused permutation: Megatron's fastest MoE path."""
ROUTERS = {
    # Megatron's stock layer: its router and its per-expert loop (no TE, no grouped_gemm)
    "megatron_loop": f"--moe-router-type megatron {MEGATRON_AUX} --locmoe-experts loop",
    # the four routers on the plugin's layer with grouped experts (same expert code for all)
    "megatron": f"--moe-router-type megatron {MEGATRON_AUX} --locmoe-experts grouped",
    "hash": "--moe-router-type hash --locmoe-experts grouped",
    "switch": "--moe-router-type switch --moe-expert-capacity-factor 1.0 --locmoe-experts grouped",
    "locmoe": "--moe-router-type locmoe --locmoe-fused-router --locmoe-experts grouped",
    # under TE: Megatron's router with every TE fusion (router fusion: TE's fused top-k, score
    # function and aux loss) -- the baseline production users run; the plugin's routers on
    # TEGroupedMLP with the same fusions (locmoe: --moe-router-fusion gives its own fused path;
    # hash has no gate to fuse), and locmoe on the plugin's grouped experts under TE
    "megatron_te": f"--moe-router-type megatron {MEGATRON_AUX} {TE_FUSIONS} --moe-router-fusion",
    "locmoe_te": f"--moe-router-type locmoe {TE_FUSIONS} --moe-router-fusion",
    "locmoe_te_grouped": "--moe-router-type locmoe --moe-router-fusion --moe-permute-fusion "
    "--locmoe-experts grouped",
    "hash_te": f"--moe-router-type hash {TE_FUSIONS}",
    "switch_te": "--moe-router-type switch --moe-expert-capacity-factor 1.0 "
    f"{TE_FUSIONS} --moe-router-fusion",
}
ROUTERS["locmoe_compiled"] = ROUTERS["locmoe"]  # the fused path as the compiled graph (env)
ROUTER_ENV = {"locmoe_compiled": {"LOCMOE_TRITON_ROUTER": "0"}}
TE_ROUTERS = [r for r in ROUTERS if r.endswith(("_te", "_te_grouped"))]
DEFAULT_ROUTERS = (
    ["megatron_te", "locmoe_te", "locmoe_te_grouped", "hash_te", "switch_te"]
    if HAVE_TE
    else ["megatron_loop", "megatron", "hash", "switch", "locmoe"]
)
TOKENS_PER_STEP = 32 * 512  # global batch x sequence length of MODEL_SIZE
BASELINE = "megatron_te" if HAVE_TE else "megatron"
"""Ratios are against Megatron's fastest path where TE is there (its router with every TE
fusion on TEGroupedMLP), else against its router on the same (grouped) experts."""
LINE = re.compile(
    r"iteration\s+(\d+)/\s*\d+ .*?elapsed time per iteration \(ms\): ([\d.]+).*?lm loss: ([\d.E+-]+)"
)


def run(
    router: str, steps: int, log_interval: int, data: str, nproc: int, extra="", model=MODEL
) -> dict:
    if router in TE_ROUTERS and not HAVE_TE:
        raise SystemExit(f"{router} runs under transformer-engine, which is not installed here")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free rendezvous port: runs may share a machine
        f"--nproc-per-node={nproc}",
        "-m",
        "megatron_locmoe.pretrain_gpt",
        *model.split(),
        *ROUTERS[router].split(),
        "--train-iters",
        str(steps),
        "--log-interval",
        str(log_interval),
        *data.split(),
        *extra.split(),
    ]
    env = dict(os.environ, CUDA_DEVICE_MAX_CONNECTIONS="1", PYTHONUNBUFFERED="1")
    env.update(ROUTER_ENV.get(router, {}))
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{router} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    points = [(int(i), float(ms), float(loss)) for i, ms, loss in LINE.findall(proc.stdout)]
    steady = [ms for i, ms, _ in points if i > 2 * log_interval]  # skip warm-up windows
    return {
        "loss": {i: loss for i, _, loss in points},
        "ms_per_iter": statistics.median(steady) if steady else points[-1][1],
        "wall_s": time.time() - t0,
        "stdout_tail": proc.stdout[-4000:],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--log-interval", type=int, default=50)
    p.add_argument("--routers", nargs="+", default=DEFAULT_ROUTERS, choices=list(ROUTERS))
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the routers this many times in turn (A B A B ...) and report each one's "
        "median, so a host whose speed drifts between runs does not bias the ratios",
    )
    p.add_argument(
        "--data", default="--mock-data --tokenizer-type NullTokenizer --vocab-size 32000"
    )
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--out", default=None)
    p.add_argument("--hash-counts", default="", help="PREFIX_counts.npy for the hash router")
    p.add_argument(
        "--append",
        action="store_true",
        help="keep the routers already in --out (runs split "
        "over several calls of a time-limited machine; same card, model and data required)",
    )
    a = p.parse_args()
    import megatron.core
    import torch

    record = {
        "card": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
        "torch": torch.__version__,
        "megatron_core": megatron.core.__version__,
        "command": " ".join(sys.argv),
        "model": MODEL,
        "data": a.data,
        "results": {},
    }
    if a.append and a.out and os.path.exists(a.out):
        with open(a.out) as f:
            previous = json.load(f)
        same = all(previous[key] == record[key] for key in ("card", "model", "data"))
        if not same:
            raise SystemExit(f"--append: {a.out} was measured on another card/model/data")
        previous["command"] = (
            [previous["command"]] if isinstance(previous["command"], str) else previous["command"]
        )
        previous["command"].append(record["command"])
        record = previous
    results = record["results"]
    rounds: dict[str, list[float]] = {}
    for _ in range(a.rounds):
        for r in a.routers:  # saved after each run, so a cut-off call keeps what finished
            extra = (
                f"--locmoe-hash-token-counts {a.hash_counts}"
                if r.startswith("hash") and a.hash_counts
                else ""
            )
            res = run(r, a.steps, a.log_interval, a.data, a.nproc, extra)
            res.pop("stdout_tail")
            rounds.setdefault(r, []).append(res["ms_per_iter"])
            res["ms_per_iter_rounds"] = rounds[r]
            res["ms_per_iter"] = statistics.median(rounds[r])
            res["tokens_per_s"] = TOKENS_PER_STEP / (res["ms_per_iter"] / 1000)
            results[r] = res
            if a.out:
                os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
                with open(a.out, "w") as f:
                    json.dump(record, f, indent=1)
            print(f"{r}: {res['tokens_per_s']:.0f} tokens/s", flush=True)
    base = results.get(BASELINE, {}).get("tokens_per_s")
    print(f"{'router':>13} {'tokens/s':>10} {'vs ' + BASELINE:>11}  lm loss at steps")
    for r, res in results.items():
        ratio = f"{res['tokens_per_s'] / base:.3f}" if base else "-"
        losses = ", ".join(f"{i}: {v:.3f}" for i, v in res["loss"].items())
        print(f"{r:>13} {res['tokens_per_s']:>10.0f} {ratio:>11}  {losses}")


if __name__ == "__main__":
    main()
