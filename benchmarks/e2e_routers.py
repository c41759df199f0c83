"""End-to-end router comparison on one machine: the same small GPT-MoE trained with each router
through ``python -m megatron_locmoe.pretrain_gpt`` (Megatron's pretrain()), same steps and data.
The model, the corpus and the routers are the router-sweep preset's (configs/router-sweep.yaml).

Prints and saves (JSON) the lm loss at fixed steps and tokens/s per router, with each router's
throughput as a ratio to Megatron's own router measured in the same run.

    python benchmarks/e2e_routers.py --steps 300 --out benchmarks/results/e2e_h100.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import statistics
import sys

from megatron_locmoe.launch.presets import load_preset, megatron_argv

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchutil  # noqa: E402

PRESET = load_preset("router-sweep")
"""The model, the data and the four routers: configs/router-sweep.yaml, which the launcher runs
too (``python -m megatron_locmoe.launch --config router-sweep``). This file adds only the
variants below and the measurement."""
RUN_CONTROL = ("train-iters", "log-interval", "tensorboard-dir")
"""Set per call by this benchmark."""
DATA_KEYS = ("data-path", "tokenizer-type", "vocab-size")
HAVE_TE = importlib.util.find_spec("transformer_engine") is not None
HAVE_APEX_WGRAD = importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None
TE_IMPL = {
    "transformer-impl": "transformer_engine",
    "no-persist-layer-norm": None,
    "no-masked-softmax-fusion": None,
    # the output layer is Megatron's own linear, whose fused weight-gradient accumulation needs
    # apex (NGC containers have it; a bare TE install does not)
    "no-gradient-accumulation-fusion": None if HAVE_APEX_WGRAD else True,
}
"""TE specs when transformer-engine is importable (NGC containers); else the preset's local
spec. (Experts: --locmoe-experts picks the plugin's grouped MLP or Megatron's loop either way.)"""
TE_FUSIONS = {"moe-grouped-gemm": True, "moe-permute-fusion": True, "locmoe-experts": None}
"""TE's grouped expert GEMMs (TEGroupedMLP; the experts' auto setting picks it) and fused
permutation: Megatron's fastest MoE path."""
ROUTER_FUSION = {"moe-router-fusion": True, "locmoe-fused-router": None}
GRAPHS = {"cuda-graph-impl": "transformer_engine", "cuda-graph-modules": ["attn", "moe_router"]}
"""Megatron's per-layer CUDA graphs through TE: attention and the router captured, dispatch
and experts eager (their split sizes change per step)."""
LOCAL_GRAPHS = {"cuda-graph-impl": "local", "cuda-graph-modules": ["moe_router"]}
"""Megatron's own per-layer CUDA graphs (no TE needed) on its MoETransformerLayer (the spec
builds MoE layers as that class here): the router with the dispatcher's preprocess (Megatron
adds moe_preprocess; the split sizes reach the host through its captured copies), and the
postprocess; dispatch, experts and attention eager."""
VARIANTS = {  # name -> (the preset's run it starts from, flags changed on top of it)
    # Megatron's stock layer: its router and its per-expert loop (no TE, no grouped_gemm)
    "megatron_loop": ("megatron", {"locmoe-experts": "loop"}),
    # the preset's four routers on the plugin's layer with grouped experts (same expert code)
    "megatron": ("megatron", {}),
    "hash": ("hash", {}),
    "switch": ("switch", {}),
    "locmoe": ("locmoe", {}),
    "locmoe_plus": ("locmoe_plus", {}),
    # `--moe-router-type locmoe` and nothing else of the plugin's: its auto defaults (issue 19)
    "locmoe_alone": ("locmoe", {"locmoe-fused-router": None, "locmoe-experts": None}),
    # under TE: Megatron's router with every TE fusion (router fusion: TE's fused top-k, score
    # function and aux loss) -- the baseline production users run; the plugin's routers on
    # TEGroupedMLP with the same fusions (locmoe: --moe-router-fusion gives its own fused path;
    # hash has no gate to fuse), and locmoe on the plugin's grouped experts under TE
    "megatron_te": ("megatron", {**TE_FUSIONS, **ROUTER_FUSION}),
    "locmoe_te": ("locmoe", {**TE_FUSIONS, **ROUTER_FUSION}),
    "locmoe_te_grouped": ("locmoe", {**ROUTER_FUSION, "moe-permute-fusion": True}),
    "hash_te": ("hash", TE_FUSIONS),
    "switch_te": ("switch", {**TE_FUSIONS, **ROUTER_FUSION}),
    "locmoe_plus_te": ("locmoe_plus", {**TE_FUSIONS, **ROUTER_FUSION}),
    # the same with attention and router in CUDA graphs (the host's launches gone there)
    "megatron_te_graphed": ("megatron", {**TE_FUSIONS, **ROUTER_FUSION, **GRAPHS}),
    "locmoe_te_graphed": ("locmoe", {**TE_FUSIONS, **ROUTER_FUSION, **GRAPHS}),
    "locmoe_te_grouped_graphed": (
        "locmoe",
        {**ROUTER_FUSION, "moe-permute-fusion": True, **GRAPHS},
    ),
    # the local spec's rows with Megatron's own CUDA graphs (--cuda-graph-impl local)
    "megatron_loop_graphed": ("megatron", {"locmoe-experts": "loop", **LOCAL_GRAPHS}),
    "megatron_graphed": ("megatron", LOCAL_GRAPHS),
    "locmoe_graphed": ("locmoe", LOCAL_GRAPHS),
    "hash_graphed": ("hash", LOCAL_GRAPHS),
    # the fused path as the compiled graph (environment below)
    "locmoe_compiled": ("locmoe", {}),
    "locmoe_compiled_graphed": ("locmoe", LOCAL_GRAPHS),
}
ROUTERS = list(VARIANTS)
ROUTER_ENV = {r: {"LOCMOE_TRITON_ROUTER": "0"} for r in ROUTERS if "_compiled" in r}
TE_ROUTERS = [r for r in ROUTERS if "_te" in r]
DEFAULT_ROUTERS = (
    ["megatron_te", "locmoe_te", "locmoe_te_grouped", "hash_te", "switch_te", "locmoe_plus_te"]
    if HAVE_TE
    else ["megatron_loop", "megatron", "hash", "switch", "locmoe", "locmoe_plus"]
)
_BASE = {k: v for k, v in PRESET.megatron.items() if k not in RUN_CONTROL + DATA_KEYS}
_BASE.update(TE_IMPL if HAVE_TE else {})
MODEL = " ".join(megatron_argv({k: v for k, v in _BASE.items() if k != "locmoe-experts"}))
"""The model's flags as one string (recorded with the results)."""
PRESET_DATA = " ".join(megatron_argv({k: PRESET.megatron[k] for k in DATA_KEYS}))
TOKENS_PER_STEP = PRESET.megatron["global-batch-size"] * PRESET.megatron["seq-length"]
BASELINE = "megatron_te" if HAVE_TE else "megatron"
"""Ratios are against Megatron's fastest path where TE is there (its router with every TE
fusion on TEGroupedMLP), else against its router on the same (grouped) experts."""


def router_argv(router: str, data: str | None = None) -> list[str]:
    """The model and router flags of ``router``: its preset run with the variant's changes.
    ``data`` replaces the preset's corpus (the preset's hash token counts then go too: they
    count another corpus)."""
    run_name, changes = VARIANTS[router]
    flags = {**_BASE, **PRESET.sweep[run_name], **changes}
    if data is not None:
        flags.pop("locmoe-hash-token-counts", None)
    return megatron_argv(flags)


def ensure_preset_data() -> None:
    """Build the preset's offline corpus if it is missing (as the launcher's data step does)."""
    from megatron_locmoe.sim.data import build_indexed_dataset, dataset_files

    prefix = PRESET.megatron["data-path"]
    if not all(os.path.exists(f) for f in dataset_files(prefix)):
        print(f"building the offline corpus at {prefix}", flush=True)
        build_indexed_dataset(prefix)


LINE = re.compile(
    r"iteration\s+(\d+)/\s*\d+ .*?elapsed time per iteration \(ms\): ([\d.]+).*?lm loss: ([\d.E+-]+)"
)


def run(
    router: str, steps: int, log_interval: int, data: str | None, nproc: int, extra="", logs=None
) -> dict:
    """Train ``router`` for ``steps`` on ``data`` (flags; None: the preset's corpus); with
    ``logs`` (a folder) the run's whole output goes to ``logs/<router>.log``."""
    if router in TE_ROUTERS and not HAVE_TE:
        raise SystemExit(f"{router} runs under transformer-engine, which is not installed here")
    argv = [
        *router_argv(router, data),
        "--train-iters",
        str(steps),
        "--log-interval",
        str(log_interval),
        *(PRESET_DATA if data is None else data).split(),
        *extra.split(),
    ]
    if logs and os.path.exists(os.path.join(logs, f"{router}.log")):
        os.remove(os.path.join(logs, f"{router}.log"))  # one run per log here
    stdout, seconds = benchutil.run_pretrain_gpt(
        router, argv, logs, nproc, env=ROUTER_ENV.get(router, {})
    )
    points = [(int(i), float(ms), float(loss)) for i, ms, loss in LINE.findall(stdout)]
    steady = [ms for i, ms, _ in points if i > 2 * log_interval]  # skip warm-up windows
    return {
        "loss": {i: loss for i, _, loss in points},
        "ms_per_iter": statistics.median(steady) if steady else points[-1][1],
        "wall_s": seconds,
        "stdout_tail": stdout[-4000:],
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
        "--data",
        default=None,
        help="data flags instead of the preset's corpus, e.g. '--mock-data --tokenizer-type "
        "NullTokenizer --vocab-size 32000'",
    )
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--out", default=None)
    p.add_argument("--logs", default=None, help="a folder for each run's whole output")
    p.add_argument(
        "--hash-counts",
        default="",
        help="PREFIX_counts.npy for the hash router with --data (the preset's corpus has its own)",
    )
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
        "preset": str(PRESET.path),
        "data": a.data or PRESET_DATA,
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
    if a.data is None:
        ensure_preset_data()
    results = record["results"]
    rounds: dict[str, list[float]] = {}
    for _ in range(a.rounds):
        for r in a.routers:  # saved after each run, so a cut-off call keeps what finished
            extra = (
                f"--locmoe-hash-token-counts {a.hash_counts}"
                if r.startswith("hash") and a.hash_counts
                else ""
            )
            res = run(r, a.steps, a.log_interval, a.data, a.nproc, extra, a.logs)
            res.pop("stdout_tail")
            rounds.setdefault(r, []).append(res["ms_per_iter"])
            res["ms_per_iter_rounds"] = rounds[r]
            res["ms_per_iter"] = statistics.median(rounds[r])
            res["tokens_per_s"] = TOKENS_PER_STEP / (res["ms_per_iter"] / 1000)
            results[r] = res
            benchutil.write_json(a.out, record)
            print(f"{r}: {res['tokens_per_s']:.0f} tokens/s", flush=True)
    base = results.get(BASELINE, {}).get("tokens_per_s")
    print(f"{'router':>13} {'tokens/s':>10} {'vs ' + BASELINE:>11}  lm loss at steps")
    for r, res in results.items():
        ratio = f"{res['tokens_per_s'] / base:.3f}" if base else "-"
        losses = ", ".join(f"{i}: {v:.3f}" for i, v in res["loss"].items())
        print(f"{r:>13} {res['tokens_per_s']:>10.0f} {ratio:>11}  {losses}")


if __name__ == "__main__":
    main()
