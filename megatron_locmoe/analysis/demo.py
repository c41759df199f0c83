"""`make demo`: the routers compared on a simulated 2-node x 4-rank cluster (CPU, gloo).

The runs are the CPU preset ``configs/demo.yaml`` (the launcher trains the same ones with
``python -m megatron_locmoe.launch --config demo``): a tiny GPT-MoE (Megatron-Core's GPTModel
with the plugin's MoE layers, 16 experts, expert parallelism EP = 8 across both nodes) trained
on Python's documentation with every router, on the same tokens in the same order:

    megatron               Megatron's TopKRouter, top-2, aux loss 0.01
    megatron-node-limited  the same with group-limited routing, one group per node and one
                           group per token (DeepSeek-V3's node-limited routing, Megatron's
                           moe_router_num_groups / moe_router_group_topk): the strongest
                           locality baseline Megatron has today
    locmoe-top2            LocMoE at the same fan-out (top-2): GrAP gate, balance + locality loss
    hash                   Hash Layers, top-1, frequency-balanced map of the corpus
    switch                 Switch Transformer, top-1, capacity factor 1.0, overflow dropped
    locmoe-top1            LocMoE, top-1: the paper's setting, against hash and switch
    locmoe-plus-top1       LocMoE+, top-1: affinity routing, adaptive capacity below cf 1.1

The preset says why each setting is what it is (per-node data domains, the hierarchical
dispatcher for every run, mu 0.1, lr 1e-3). This module adds what a comparison needs around
the trainings: the domains built once under ``--data-dir`` (with their names), progress bars,
a run record per run, the table and the HTML report.

Every run logs Megatron's MoE metrics and the plugin's to TensorBoard (``OUT/<run>/
tensorboard``) and to W&B in offline mode (``OUT/wandb``), writes ``OUT/<run>/run.json``
(settings, loss curve, step times) and the demo ends with a table and an HTML report
(``python -m megatron_locmoe.analysis.report``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from megatron_locmoe.analysis.runlog import tail_length
from megatron_locmoe.launch.presets import (
    PresetError,
    add_set_option,
    apply_override,
    load_preset,
)
from megatron_locmoe.sim.progress import read_progress, steady_step_seconds

DEFAULT_OUT = "runs/demo"
DEFAULT_REPORT = "reports/router_comparison.html"
DEFAULT_DATA = "data/domains"
OUT_MARKER = ".megatron-locmoe-demo"
"""Written into --out: the demo replaces a directory only if it finds this in it."""


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


def run_record(meta: dict, settings, results, progress, domain_names, seconds) -> dict:
    """run.json: what the report and the cost model need besides the TensorBoard scalars.
    ``meta``: the run's name, label, router, node-limited flag and layout; the model's sizes
    and top-k are those of the model that trained (``settings.model``)."""
    from megatron_locmoe.dispatch.dispatcher import resolve_dedup

    step_seconds = [p["seconds"] for p in progress]
    steady = steady_step_seconds(step_seconds)
    model = settings.model
    m = dict(
        meta,
        topk=model.moe_router_topk,
        num_experts=model.num_moe_experts,
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.moe_ffn_hidden_size,
    )
    tokens_per_step = m["nodes"] * m["ranks_per_node"] * m["micro_batch_size"] * m["seq_length"]
    return {
        **{k: m[k] for k in ("name", "label", "router_type", "topk", "node_limited")},
        "locmoe": vars(settings.locmoe),
        "dispatcher": "hierarchical",
        "dedup": resolve_dedup(settings.locmoe.dedup_setting, model),
        **{k: m[k] for k in ("nodes", "ranks_per_node", "num_experts", "num_layers")},
        **{k: m[k] for k in ("hidden_size", "ffn_hidden_size")},
        "hidden_element_bytes": 4,  # fp32 activations on the CPU
        "prob_element_bytes": 4,
        "seq_length": m["seq_length"],
        "micro_batch_size": m["micro_batch_size"],
        "tokens_per_rank_step": m["micro_batch_size"] * m["seq_length"],
        "tokens_per_step": tokens_per_step,
        **{k: m[k] for k in ("steps", "lr", "seed")},
        "domains": list(domain_names),
        "losses": results[0]["losses"],
        "step_seconds": step_seconds,
        "tokens_per_second": tokens_per_step / steady if steady else None,
        "wall_seconds": seconds,
        "tensorboard_dir": "tensorboard",
    }


def run_meta(rp, plan) -> dict:
    """``run_record``'s ``meta`` of a preset run, from Megatron's parsed arguments."""
    a = rp.args
    return dict(
        name=rp.name,
        label=run_label(a),
        router_type=a.moe_router_type,
        node_limited=bool(a.moe_router_num_groups),
        nodes=plan.nodes,
        ranks_per_node=plan.devices_per_node,
        seq_length=a.seq_length,
        micro_batch_size=a.micro_batch_size,
        steps=a.train_iters,
        lr=a.lr,
        seed=a.seed,
    )


def run_label(a) -> str:
    """The table's name of a run, from its flags: router, top-k and what sets it apart (what
    the router class reads: Megatron's aux loss, mu, an adaptive or a fixed capacity)."""
    from megatron_locmoe.routers import router_class  # cheap: a comes from Megatron's parser

    router = router_class(a.moe_router_type)
    label = f"{router.label} top-{a.moe_router_topk}"
    if a.moe_router_num_groups:
        return f"{label}, node-limited ({a.moe_router_group_topk} node/token)"
    if not router.uses_locmoe_alpha and a.moe_aux_loss_coeff:
        return f"{label} (aux loss)"
    if router.has_affinity_routing:
        return (
            f"{label} (mu {a.locmoe_locality_loss_coeff:g}, capacity <= "
            f"{a.moe_expert_capacity_factor})"
        )
    if router.has_locality_loss:
        return f"{label} (mu {a.locmoe_locality_loss_coeff:g})"
    # a router that needs a capacity factor (it has a default for runs that name none)
    if router.default_capacity_factor is not None and a.moe_expert_capacity_factor is not None:
        return f"{label} (capacity {a.moe_expert_capacity_factor})"
    return label


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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="demo", help="the CPU preset that describes the runs")
    add_set_option(
        p, "change the preset (as the launcher's --set: a Megatron flag, sweep.RUN.FLAG, ...)"
    )
    p.add_argument("--steps", type=int, default=None, help="training steps (the preset's: 100)")
    p.add_argument("--routers", default=None, help="comma-separated subset of the runs")
    p.add_argument(
        "--mu", type=float, default=None, help="LocMoE's locality coefficient (the preset's: 0.1)"
    )
    p.add_argument(
        "--out", default=DEFAULT_OUT, help="run directories (replaced if the demo wrote them)"
    )
    p.add_argument("--report", default=DEFAULT_REPORT, help="HTML report path ('' for none)")
    p.add_argument("--data-dir", default=DEFAULT_DATA, help="per-node corpus domains (cached)")
    p.add_argument("--max-stdlib-files", type=int, default=None, help="smaller corpus (tests)")
    p.add_argument("--no-wandb", action="store_true", help="TensorBoard only")
    p.add_argument("--progress", choices=("auto", "on", "off"), default="auto")
    args = p.parse_args(argv)
    if args.steps is not None and args.steps < 1:  # before, an AssertionError once the ranks ran
        p.error(f"--steps {args.steps}: the demo trains at least 1 step; give --steps N >= 1")
    out = Path(args.out)
    if out.exists() and (
        not out.is_dir() or (any(out.iterdir()) and not (out / OUT_MARKER).exists())
    ):
        p.error(
            f"--out {out} exists and was not written by the demo (no {OUT_MARKER} in it); "
            "the demo replaces its --out directory: choose a new or empty one"
        )
    try:
        args.preset = preset_with(args)
    except PresetError as e:
        p.error(str(e))
    if args.preset.device != "cpu" or args.preset.nodes < 2:
        p.error(
            f"--config {args.config}: the demo compares routers across simulated nodes: a cpu "
            f"preset with 2 or more nodes (this one: {args.preset.device}, "
            f"{args.preset.nodes} node(s))"
        )
    known = list(args.preset.sweep)
    args.runs = args.routers.split(",") if args.routers else None
    unknown = [n for n in args.runs or [] if n not in known]
    if unknown:
        p.error(f"unknown runs {unknown}; choose from {', '.join(known)}")
    return args


def _reads_mu(router_type: str | None) -> bool:
    """Whether the router a preset's run names reads LocMoE's locality loss, whose coefficient
    --mu sets (a run that names no router, or an unknown one: no)."""
    from megatron_locmoe.routers import ROUTERS  # imports Megatron-Core: only with --mu

    router = ROUTERS.get(router_type)
    return router is not None and router.reads_setting("locality_loss_coeff")


def preset_with(args):
    """The preset with the demo's options applied: its steps, mu, and the per-node corpus
    domains under --data-dir (the data step builds them there)."""
    preset = load_preset(args.config)
    for item in args.sets:
        preset = apply_override(preset, item)
    data_dir = Path(args.data_dir)
    changes = {"data-path": [str(data_dir / f"domain{k}") for k in range(preset.nodes)]}
    if args.steps is not None:
        changes["train-iters"] = args.steps
    for key, value in changes.items():
        preset.megatron[key] = value
    for flags in preset.sweep.values():
        if "locmoe-hash-token-counts" in flags:
            flags["locmoe-hash-token-counts"] = str(data_dir / "all_counts.npy")
        if args.mu is not None and _reads_mu(flags.get("moe-router-type")):
            flags["locmoe-locality-loss-coeff"] = args.mu
    return preset


def main(argv: list[str] | None = None, cluster=None) -> dict:
    """Run the comparison; ``cluster``: an already started SimCluster of the same size to use
    (tests share one) instead of starting one."""
    args = parse_args(argv)
    from megatron_locmoe.analysis.runlog import load_runs, summary_rows, write_run_record
    from megatron_locmoe.launch.data_step import prepare_data
    from megatron_locmoe.launch.plan import Options, build_plan
    from megatron_locmoe.sim.cluster import SimCluster

    t_start = time.perf_counter()
    out = Path(args.out)
    preset = args.preset
    nodes, rpn = preset.nodes, preset.devices_per_node
    # the plan first (every refusal before any work; files its data step writes may be
    # missing), then the domains (cached, with their names), which the data step then finds
    plan = build_plan(Options(config=str(preset.path), runs=args.runs, runs_dir=str(out)), preset)
    domains = prepare_domains(Path(args.data_dir), nodes, args.max_stdlib_files)
    prepare_data(plan)
    if out.exists():  # parse_args checked: empty, or the demo's own (it has the marker)
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / OUT_MARKER).write_text(
        "written by python -m megatron_locmoe.analysis.demo; replaced by it\n"
    )
    first = plan.runs[0]
    a = first.args
    world = plan.world_size
    print(
        f"LocMoE router comparison (preset {preset.name}): {nodes} simulated nodes x {rpn} "
        f"ranks (CPU, gloo), EP={a.expert_model_parallel_size}, {a.num_experts} experts, "
        f"{a.num_layers} MoE layers, hidden {a.hidden_size}, {a.train_iters} steps x "
        f"{a.global_batch_size} sequences of {a.seq_length} byte tokens",
        flush=True,
    )
    for k, d in enumerate(domains["domains"]):
        print(f"  node {k} reads {d['name']} ({d['tokens']:,} tokens)")
    show_bar = {"auto": None, "on": True, "off": False}[args.progress]
    if cluster is not None and cluster.world_size != world:
        raise ValueError(
            f"the given cluster has {cluster.world_size} ranks, the demo needs {world}"
        )
    names = [d["name"] for d in domains["domains"]]
    t0 = time.perf_counter()
    with SimCluster(world) if cluster is None else contextlib.nullcontext(cluster) as cluster:
        print(f"  {world} ranks up in {time.perf_counter() - t0:.0f} s", flush=True)
        for rp in plan.runs:
            run_dir = out / rp.name
            run_dir.mkdir()
            settings, layout = rp.cpu_loop
            settings = dataclasses.replace(  # the run's outputs under --out
                settings,
                tensorboard_dir=str(run_dir / "tensorboard"),
                wandb_dir=None if args.no_wandb else str(out / "wandb"),
                run_name=rp.name,
                progress_path=str(run_dir / "progress.jsonl"),
            )
            t_run = time.perf_counter()
            results, progress = run_with_progress(cluster, settings, layout, rp.name, show_bar)
            seconds = time.perf_counter() - t_run
            record = run_record(run_meta(rp, plan), settings, results, progress, names, seconds)
            write_run_record(run_dir, record)
            losses = results[0]["losses"]
            print(
                f"  {rp.name:<22} {len(losses)} steps in {seconds:4.0f} s, "
                f"lm loss {losses[0]:.2f} -> {losses[-1]:.2f}",
                flush=True,
            )
    loaded = load_runs([out / rp.name for rp in plan.runs])
    rows = summary_rows(loaded)
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    print(
        f"\nmeans over the last {tail_length(a.train_iters)} steps; inter-node bytes per token "
        "and MoE layer, dispatch + combine, sent by the hierarchical dispatcher (fp32, hidden "
        f"{a.hidden_size}); tokens/s of the whole simulated cluster on this CPU\n"
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


def cli(argv: list[str] | None = None) -> int:
    """``main`` for the command line: a refused preset or setting as one ``error:`` line (exit
    status 2), Ctrl-C / SIGTERM as ``error: interrupted at step N`` (128 + the signal)."""
    prog = os.path.basename(sys.argv[0])
    try:
        main(argv)
    except KeyboardInterrupt as e:  # the cluster's Interrupted names the step
        print(f"{prog}: error: {e or 'interrupted'}", file=sys.stderr)
        return getattr(e, "exit_status", 128 + signal.SIGINT)
    except PresetError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
