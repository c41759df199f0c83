"""`make demo`: the routers compared on a simulated 2-node x 4-rank cluster (CPU, gloo).

A tiny GPT-MoE (Megatron-Core's GPTModel with the plugin's MoE layers, 16 experts, expert
parallelism EP = 8 across both nodes) trains on Python's documentation with every router, on
the same tokens in the same order:

    megatron               Megatron's TopKRouter, top-2, aux loss 0.01
    megatron-node-limited  the same with group-limited routing, one group per node and one
                           group per token (DeepSeek-V3's node-limited routing, Megatron's
                           moe_router_num_groups / moe_router_group_topk): the strongest
                           locality baseline Megatron has today
    locmoe-top2            LocMoE at the same fan-out (top-2): GrAP gate, balance + locality loss
    hash                   Hash Layers, top-1, frequency-balanced map of the corpus
    switch                 Switch Transformer, top-1, capacity factor 1.0, overflow dropped
    locmoe-top1            LocMoE, top-1: the paper's setting, against hash and switch

Decisions (why):

* Node-correlated data. Each simulated node reads its own domain of the corpus (node 0 the
  language reference, node 1 the standard library's docstrings; ``data.domain_shards``), as a
  domain-sharded loader does (PanGu-Sigma). With the same distribution on every rank no
  router can keep more than 1/nodes of the assignments on the sender's node on average.
* Every router uses the hierarchical dispatcher, so every run's intra-/inter-node bytes are
  counted the same way (its flat-All-to-All count is logged next to it). The dispatcher sends
  exactly what the flat one sends for top-1 and per-node deduplicated copies for top-2 (a
  token crosses to each remote node once), which is what node-limited routing is compared on.
* Locality loss mu = 0.1 for LocMoE (the paper gives no value; the plugin's default 0.01
  barely moves the node-local share in 100 steps of this model), learning rate 1e-3 (at 3e-3
  the learned gates of megatron and switch collapse onto one or two experts).

Every run logs Megatron's MoE metrics and the plugin's to TensorBoard (``OUT/<run>/
tensorboard``) and to W&B in offline mode (``OUT/wandb``), writes ``OUT/<run>/run.json``
(settings, loss curve, step times) and the demo ends with a table and an HTML report
(``python -m megatron_locmoe.analysis.report``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from megatron_locmoe.analysis.runlog import read_progress, steady_step_seconds, tail_length

DEFAULT_OUT = "runs/demo"
DEFAULT_REPORT = "reports/router_comparison.html"
DEFAULT_DATA = "data/domains"
OUT_MARKER = ".megatron-locmoe-demo"
"""Written into --out: the demo replaces a directory only if it finds this in it."""


@dataclass(frozen=True)
class DemoRun:
    """One router configuration of the comparison."""

    name: str
    label: str
    router_type: str
    topk: int
    locmoe: dict = field(default_factory=dict)
    """LocMoEConfig fields besides router_type and dispatcher."""
    node_limited: bool = False
    """Megatron's group-limited routing with one group per node, one group per token."""


def demo_runs(mu: float) -> list[DemoRun]:
    return [
        DemoRun("megatron", "Megatron top-2 (aux loss)", "megatron", 2),
        DemoRun(
            "megatron-node-limited",
            "Megatron top-2, node-limited (1 node/token)",
            "megatron",
            2,
            node_limited=True,
        ),
        DemoRun(
            "locmoe-top2", f"LocMoE top-2 (mu {mu:g})", "locmoe", 2, {"locality_loss_coeff": mu}
        ),
        DemoRun("hash", "Hash top-1", "hash", 1),
        DemoRun("switch", "Switch top-1 (capacity 1.0)", "switch", 1),
        DemoRun(
            "locmoe-top1", f"LocMoE top-1 (mu {mu:g})", "locmoe", 1, {"locality_loss_coeff": mu}
        ),
    ]


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def prepare_domains(
    data_dir: Path, nodes: int, max_stdlib_files: int | None, held_out_every: int = 0
) -> dict:
    """Per-node domain datasets, built once and reused (``data_dir/manifest.json``)."""
    from megatron_locmoe.sim import data

    manifest = data_dir / "manifest.json"
    key = {"nodes": nodes, "max_stdlib_files": max_stdlib_files}
    if held_out_every:  # (the demo's key stays as it was: its caches stay valid)
        key["held_out_every"] = held_out_every
    if manifest.exists():
        built = json.loads(manifest.read_text())
        files_ok = all(Path(f"{p}.bin").exists() for p in built["prefixes"])
        if built.get("key") == key and files_ok and Path(built["counts"]).exists():
            return built
    built = data.build_domain_datasets(data_dir, nodes, max_stdlib_files, held_out_every)
    built["key"] = key
    manifest.write_text(json.dumps(built, indent=1))
    return built


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def train_settings(run: DemoRun, args, domains: dict, run_dir: Path):
    """The TrainSettings of one demo run (the sweep reuses them)."""
    from megatron_locmoe.config import LocMoEConfig
    from megatron_locmoe.sim.trainer import TrainSettings

    extra = dict(run.locmoe)
    if run.router_type == "hash":
        extra["hash_token_counts"] = domains["counts"]
    overrides = {"moe_ffn_hidden_size": args.ffn_hidden_size}
    if run.node_limited:
        overrides.update(moe_router_num_groups=args.nodes, moe_router_group_topk=1)
    return TrainSettings(
        data_prefix=domains["prefixes"][0],
        data_prefix_per_node=list(domains["prefixes"]),
        locmoe=LocMoEConfig(router_type=run.router_type, dispatcher="hierarchical", **extra),
        steps=args.steps,
        seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size,
        num_layers=args.layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.heads,
        num_experts=args.experts,
        topk=run.topk,
        lr=args.lr,
        seed=args.seed,
        tensorboard_dir=str(run_dir / "tensorboard"),
        wandb_dir=None if args.no_wandb else str(run_dir.parent / "wandb"),
        run_name=run.name,
        transformer_overrides=overrides,
        per_layer_logging=True,
        progress_path=str(run_dir / "progress.jsonl"),
    )


def run_with_progress(cluster, settings, layout, desc: str, show_bar: bool | None = None):
    """``cluster.run(train_job)`` with a progress bar fed by the job's progress file."""
    from tqdm import tqdm

    from megatron_locmoe.sim.trainer import train_job

    path = Path(settings.progress_path)
    path.unlink(missing_ok=True)
    bar = tqdm(
        total=settings.steps,
        desc=desc,
        unit="step",
        file=sys.stderr,
        disable=not show_bar if show_bar is not None else None,  # None: only on a terminal
        dynamic_ncols=True,
    )
    stop = threading.Event()

    def poll():
        while True:
            lines = read_progress(path)
            if len(lines) > bar.n:
                bar.update(len(lines) - bar.n)
                bar.set_postfix(loss=f"{lines[-1]['loss']:.3f}", refresh=False)
            if stop.wait(0.5):
                return

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        results = cluster.run(train_job, settings, layout=layout)
    finally:
        stop.set()
        poller.join()
        bar.close()
    return results, read_progress(path)


def run_record(run: DemoRun, args, settings, results, progress, domains, seconds) -> dict:
    """run.json: what the report and the cost model need besides the TensorBoard scalars."""
    from types import SimpleNamespace

    from megatron_locmoe.dispatch.dispatcher import resolve_dedup

    step_seconds = [p["seconds"] for p in progress]
    steady = steady_step_seconds(step_seconds)
    tokens_per_step = args.nodes * args.ranks_per_node * args.micro_batch_size * args.seq_length
    return {
        "name": run.name,
        "label": run.label,
        "router_type": run.router_type,
        "topk": run.topk,
        "node_limited": run.node_limited,
        "locmoe": vars(settings.locmoe),
        "transformer_overrides": settings.transformer_overrides,
        "dispatcher": "hierarchical",
        "dedup": resolve_dedup(
            settings.locmoe.dedup_setting, SimpleNamespace(moe_router_topk=run.topk)
        ),
        "nodes": args.nodes,
        "ranks_per_node": args.ranks_per_node,
        "num_experts": args.experts,
        "num_layers": args.layers,
        "hidden_size": args.hidden_size,
        "ffn_hidden_size": args.ffn_hidden_size,
        "hidden_element_bytes": 4,  # fp32 activations on the CPU
        "prob_element_bytes": 4,
        "seq_length": args.seq_length,
        "micro_batch_size": args.micro_batch_size,
        "tokens_per_rank_step": args.micro_batch_size * args.seq_length,
        "tokens_per_step": tokens_per_step,
        "steps": args.steps,
        "lr": args.lr,
        "seed": args.seed,
        "domains": [d["name"] for d in domains["domains"]],
        "losses": results[0]["losses"],
        "step_seconds": step_seconds,
        "tokens_per_second": tokens_per_step / steady if steady else None,
        "wall_seconds": seconds,
        "tensorboard_dir": "tensorboard",
    }


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


def format_summary(rows: list[dict]) -> str:
    from megatron_locmoe.analysis.costmodel import format_table

    headers = [
        "router",
        "k",
        "loss",
        "node-local",
        "inter-node B/token",
        "load CV",
        "dropped",
        "tokens/s",
    ]
    cells = [
        [
            r["label"],
            str(r["k"]),
            f"{r['loss']:.3f}",
            f"{r['node_local']:.3f}",
            f"{r['inter_bytes_per_token']:.0f}",
            f"{r['load_cv']:.2f}",
            f"{r['dropped']:.1%}",
            f"{r['tokens_per_second']:,.0f}" if r["tokens_per_second"] else "-",
        ]
        for r in rows
    ]
    return format_table(headers, cells)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The tiny model's sizes, learning rate and seed (the demo's and the sweep's)."""
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--ffn-hidden-size", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=64)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=1234)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--ranks-per-node", type=int, default=4)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument(
        "--routers",
        default=None,
        help="comma-separated subset of the runs (default all): "
        + ", ".join(r.name for r in demo_runs(0.1)),
    )
    add_model_arguments(p)
    p.add_argument("--mu", type=float, default=0.1, help="LocMoE's locality-loss coefficient")
    p.add_argument(
        "--out", default=DEFAULT_OUT, help="run directories (replaced if the demo wrote them)"
    )
    p.add_argument("--report", default=DEFAULT_REPORT, help="HTML report path ('' for none)")
    p.add_argument("--data-dir", default=DEFAULT_DATA, help="per-node corpus domains (cached)")
    p.add_argument("--max-stdlib-files", type=int, default=None, help="smaller corpus (tests)")
    p.add_argument("--no-wandb", action="store_true", help="TensorBoard only")
    p.add_argument("--progress", choices=("auto", "on", "off"), default="auto")
    args = p.parse_args(argv)
    if args.nodes < 2:
        p.error(f"--nodes {args.nodes}: the comparison is about crossing nodes; use 2 or more")
    if args.experts % (args.nodes * args.ranks_per_node):
        p.error(
            f"--experts {args.experts} must be a multiple of the EP size "
            f"{args.nodes} x {args.ranks_per_node} = {args.nodes * args.ranks_per_node}"
        )
    if args.hidden_size % args.experts:
        p.error(
            f"--hidden-size {args.hidden_size}: LocMoE's GrAP gate needs a multiple of --experts"
        )
    out = Path(args.out)
    if out.exists() and (
        not out.is_dir() or (any(out.iterdir()) and not (out / OUT_MARKER).exists())
    ):
        p.error(
            f"--out {out} exists and was not written by the demo (no {OUT_MARKER} in it); "
            "the demo replaces its --out directory: choose a new or empty one"
        )
    known = {r.name: r for r in demo_runs(args.mu)}
    if args.routers:
        unknown = [n for n in args.routers.split(",") if n not in known]
        if unknown:
            p.error(f"unknown runs {unknown}; choose from {', '.join(known)}")
    return args


def main(argv: list[str] | None = None, cluster=None) -> dict:
    """Run the comparison; ``cluster``: an already started SimCluster of the same size to use
    (tests share one) instead of starting one."""
    args = parse_args(argv)
    from megatron_locmoe.analysis.runlog import load_runs, summary_rows, write_run_record
    from megatron_locmoe.sim.cluster import ParallelLayout, SimCluster

    t_start = time.perf_counter()
    runs = demo_runs(args.mu)
    if args.routers:
        wanted = args.routers.split(",")
        runs = [r for r in runs if r.name in wanted]
    out = Path(args.out)
    if out.exists():  # parse_args checked: empty, or the demo's own (it has the marker)
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / OUT_MARKER).write_text(
        "written by python -m megatron_locmoe.analysis.demo; replaced by it\n"
    )
    world = args.nodes * args.ranks_per_node
    print(
        f"LocMoE router comparison: {args.nodes} simulated nodes x {args.ranks_per_node} ranks "
        f"(CPU, gloo), EP={world}, {args.experts} experts, {args.layers} MoE layers, hidden "
        f"{args.hidden_size}, {args.steps} steps x {world * args.micro_batch_size} sequences of "
        f"{args.seq_length} byte tokens",
        flush=True,
    )
    domains = prepare_domains(Path(args.data_dir), args.nodes, args.max_stdlib_files)
    for k, d in enumerate(domains["domains"]):
        print(f"  node {k} reads {d['name']} ({d['tokens']:,} tokens)")
    show_bar = {"auto": None, "on": True, "off": False}[args.progress]
    layout = ParallelLayout(devices_per_node=args.ranks_per_node, ep=world)
    if cluster is not None and cluster.world_size != world:
        raise ValueError(
            f"the given cluster has {cluster.world_size} ranks, the demo needs {world}"
        )
    t0 = time.perf_counter()
    with SimCluster(world) if cluster is None else contextlib.nullcontext(cluster) as cluster:
        print(f"  {world} ranks up in {time.perf_counter() - t0:.0f} s", flush=True)
        for run in runs:
            run_dir = out / run.name
            run_dir.mkdir()
            settings = train_settings(run, args, domains, run_dir)
            t_run = time.perf_counter()
            results, progress = run_with_progress(cluster, settings, layout, run.name, show_bar)
            seconds = time.perf_counter() - t_run
            write_run_record(
                run_dir, run_record(run, args, settings, results, progress, domains, seconds)
            )
            losses = results[0]["losses"]
            print(
                f"  {run.name:<22} {len(losses)} steps in {seconds:4.0f} s, "
                f"lm loss {losses[0]:.2f} -> {losses[-1]:.2f}",
                flush=True,
            )
    loaded = load_runs([out / r.name for r in runs])
    rows = summary_rows(loaded)
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    print(
        f"\nmeans over the last {tail_length(args.steps)} steps; inter-node bytes per token and "
        "MoE layer, dispatch + combine, sent by the hierarchical dispatcher (fp32, hidden "
        f"{args.hidden_size}); tokens/s of the whole simulated cluster on this CPU\n"
    )
    print(format_summary(rows))
    report_path = None
    if args.report:
        from megatron_locmoe.analysis.report import build_report

        report_path = build_report(loaded, args.report)
    print(f"\nruns: {out}/ (TensorBoard: tensorboard --logdir {out})")
    if not args.no_wandb:
        print(
            f"W&B offline runs: {out}/wandb/wandb (upload: wandb sync {out}/wandb/wandb/offline-run-*)"
        )
    if report_path:
        print(f"report: {report_path}")
    print(f"done in {time.perf_counter() - t_start:.0f} s")
    return {"rows": rows, "report": report_path, "out": str(out)}


if __name__ == "__main__":
    main()
