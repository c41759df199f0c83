"""The locality sweep: every router at 2, 4, 8 and 16 simulated nodes, measured, not modeled.

LocMoE's paper runs 16 experts, top-1, on 8 / 16 / 32 nodes, where a locality-blind router
keeps only 1/8 .. 1/32 of the assignments on the token's node. This sweep trains the demo's
tiny GPT-MoE (``configs/demo.yaml``; the runs here are built on the CPU loop's own config,
which trains bitwise what the preset's flags give: tests/test_demo.py) with 16 experts
and EP over every rank on layouts 2x4, 4x2, 8x1 and 16x1 (nodes x ranks per node), in two
data settings:

    domains   node k reads domain k of the corpus (``data.domain_shards``: a domain-sharded
              loader, as in PanGu-Sigma), evaluated on domain k's held-out documents
    control   every node reads the same mixture (the usual data-parallel loader), evaluated
              on the mixture's held-out documents

Every run of a layout and setting sees the same tokens (same seed and data). Per run the
results file keeps the training and held-out loss, node-local share (and its curve), intra-
and inter-node bytes per token (hierarchical, exact; flat from the routing counts), load CV,
drops, tokens per expert and capacity. Runs are kept in ``OUT/<layout>/<run>/`` (the demo's
run.json + TensorBoard); a finished run with the same settings is skipped, so the command
resumes where it stopped. ``benchmarks/locality_sweep.py`` is the command.

Decided: node-limited routing (groups = nodes, one group per token) only runs at top-2: at
top-1 a token's one expert is on one node anyway, so it is Megatron's aux-loss router exactly;
and only where one node holds two experts (not at 16 nodes x 16 experts).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

LAYOUTS = {"2x4": (2, 4), "4x2": (4, 2), "8x1": (8, 1), "16x1": (16, 1), "4x1": (4, 1)}
"""Layout name -> (nodes, ranks per node); EP over every rank. 4x1 is the test's small one."""
SWEEP_LAYOUTS = ("2x4", "4x2", "8x1", "16x1")
MUS = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)
"""LocMoE's locality-loss coefficients swept (the paper gives none)."""
NODE_TARGET = 0.5
"""Target node-local share of the node-aware runs (``LocMoEConfig.node_target_share``)."""
CF_REFERENCE = 1.1
"""The capacity factor the capacity bound is compared with (LocMoE+'s baseline)."""

DEFAULT_OUT = "runs/locality_sweep"
DEFAULT_RESULTS = "benchmarks/results/locality_sweep.json"
DEFAULT_DATA = "data/sweep"


@dataclass(frozen=True)
class SweepRun:
    """One router configuration at one layout and data setting."""

    name: str
    label: str
    router_type: str
    topk: int
    setting: str = "domains"
    """domains: one corpus domain per node; control: the same mixture on every node."""
    locmoe: dict = field(default_factory=dict)
    node_limited: bool = False
    overrides: dict = field(default_factory=dict)
    """TransformerConfig fields (capacity factor)."""
    priority: int = 1


def _mu(mu: float) -> str:
    return f"{mu:g}"


def sweep_runs(layout: str) -> list[SweepRun]:
    """The runs of one layout with their priorities (1 first: the main question)."""
    main = layout in ("8x1", "16x1")  # the paper's regime answers the main question first
    p1 = 1 if main else 2
    rest = 1 if main else 3  # at 2 and 4 nodes: megatron, hash and locmoe first
    cheap = 2 if layout != "16x1" else 3  # 16 ranks on 2 cores: ~3.5x an 8-rank step
    runs = [
        SweepRun("megatron", "Megatron top-1 (aux loss)", "megatron", 1, priority=p1),
        SweepRun("hash", "Hash top-1", "hash", 1, priority=p1),
        SweepRun("switch", "Switch top-1 (cf 1.0)", "switch", 1, priority=1 if main else 4),
        SweepRun(
            "locmoe-mu0.1",
            "LocMoE top-1 (mu 0.1)",
            "locmoe",
            1,
            locmoe={"locality_loss_coeff": 0.1},
            priority=p1,
        ),
        SweepRun(
            f"locmoe-node{NODE_TARGET:g}",
            f"LocMoE top-1 (mu 0.1) + node target {NODE_TARGET:g} (ours)",
            "locmoe",
            1,
            locmoe={"locality_loss_coeff": 0.1, "node_target_share": NODE_TARGET},
            priority={"16x1": 1, "8x1": 2}.get(layout, 3),  # where the paper form loses most
        ),
        SweepRun(
            "ctl-megatron", "control: Megatron top-1", "megatron", 1, "control", priority=rest
        ),
        SweepRun(
            "ctl-locmoe-mu0.1",
            "control: LocMoE top-1 (mu 0.1)",
            "locmoe",
            1,
            "control",
            locmoe={"locality_loss_coeff": 0.1},
            priority=1 if layout == "8x1" else 4,
        ),
        SweepRun(
            f"ctl-locmoe-node{NODE_TARGET:g}",
            f"control: LocMoE top-1 + node target {NODE_TARGET:g} (ours)",
            "locmoe",
            1,
            "control",
            locmoe={"locality_loss_coeff": 0.1, "node_target_share": NODE_TARGET},
            priority=rest,
        ),
        SweepRun(
            "ctl-locmoe-node0.3",
            "control: LocMoE top-1 + node target 0.3 (ours)",
            "locmoe",
            1,
            "control",
            locmoe={"locality_loss_coeff": 0.1, "node_target_share": 0.3},
            priority=cheap if layout == "8x1" else 4,
        ),
        SweepRun(
            "ctl-hash",
            "control: Hash top-1",
            "hash",
            1,
            "control",
            priority=3 if layout == "8x1" else 4,
        ),
    ]
    runs += [
        SweepRun(
            f"locmoe-mu{_mu(mu)}",
            f"LocMoE top-1 (mu {_mu(mu)})",
            "locmoe",
            1,
            locmoe={"locality_loss_coeff": mu},
            priority=cheap if layout == "8x1" else 4,
        )
        for mu in MUS
        if mu != 0.1
    ]
    capacity = {"moe_expert_capacity_factor": CF_REFERENCE}
    runs += [
        SweepRun(
            "locmoe-bound",
            f"LocMoE top-1 (mu 0.1), capacity bound (ceiling cf {CF_REFERENCE:g})",
            "locmoe",
            1,
            locmoe={"locality_loss_coeff": 0.1, "capacity_mode": "bound"},
            overrides=capacity,
            priority=cheap if layout == "8x1" else 4,
        ),
        SweepRun(
            f"locmoe-cf{CF_REFERENCE:g}",
            f"LocMoE top-1 (mu 0.1), capacity factor {CF_REFERENCE:g}",
            "locmoe",
            1,
            locmoe={
                "locality_loss_coeff": 0.1,
                "capacity_mode": "bound",
                "capacity_floor_factor": CF_REFERENCE,  # floor = ceiling: a fixed capacity
            },
            overrides=capacity,
            priority=cheap if layout == "8x1" else 4,
        ),
    ]
    if layout == "8x1":  # LocMoE+ at the paper's node count, against cf 1.1 and LocMoE
        plus = {"locality_loss_coeff": 0.1}
        runs += [
            SweepRun(
                "locmoe_plus",
                f"LocMoE+ top-1 (mu 0.1), adaptive capacity (ceiling cf {CF_REFERENCE:g}, K 100)",
                "locmoe_plus",
                1,
                locmoe=plus,
                overrides=capacity,
                priority=1,
            ),
            SweepRun(
                "locmoe_plus-k20",
                f"LocMoE+ top-1 (mu 0.1), adaptive capacity (ceiling cf {CF_REFERENCE:g}, K 20)",
                "locmoe_plus",
                1,
                locmoe={**plus, "capacity_reestimate_interval": 20},
                overrides=capacity,
                priority=1,
            ),
            SweepRun(  # where 2 C* itself decides (the default floor holds it at 0.5 here)
                "locmoe_plus-floor0.25",
                f"LocMoE+ top-1 (mu 0.1), adaptive capacity (floor 0.25, ceiling cf {CF_REFERENCE:g})",
                "locmoe_plus",
                1,
                locmoe={**plus, "capacity_reestimate_interval": 20, "capacity_floor_factor": 0.25},
                overrides=capacity,
                priority=2,
            ),
        ]
    if layout in ("2x4", "16x1"):  # top-2 at 2 and 16 nodes
        top2 = 3 if layout == "2x4" else 4
        runs += [
            SweepRun("megatron-top2", "Megatron top-2 (aux loss)", "megatron", 2, priority=top2),
            SweepRun(
                "node-limited-top2",
                "Megatron top-2, node-limited (1 node/token)",
                "megatron",
                2,
                node_limited=True,
                priority=top2,
            ),
            SweepRun(
                "locmoe-top2-mu0.1",
                "LocMoE top-2 (mu 0.1)",
                "locmoe",
                2,
                locmoe={"locality_loss_coeff": 0.1},
                priority=top2,
            ),
        ]
    return runs


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def run_key(run: SweepRun, args, layout: str) -> dict:
    """What makes a finished run reusable: the same run, layout, sizes and data."""
    return {
        "run": dataclasses.asdict(run) | {"priority": None, "label": None},  # cosmetic
        "layout": layout,
        **{
            k: getattr(args, k)
            for k in (
                "steps",
                "seed",
                "experts",
                "layers",
                "hidden_size",
                "ffn_hidden_size",
                "heads",
                "seq_length",
                "micro_batch_size",
                "lr",
                "eval_batches",
                "max_stdlib_files",
                "held_out_every",
            )
        },
    }


def settings_for(run: SweepRun, args, layout: str, domains: dict, run_dir: Path):
    """The CPU loop's TrainSettings for ``run`` (the loop's own config and optimizer, as every
    committed run of the sweep was trained; the demo's model sizes), with this setting's data,
    held-out data and the routing counts of the tail steps."""
    from megatron_locmoe.analysis.runlog import tail_length
    from megatron_locmoe.config import LocMoEConfig
    from megatron_locmoe.routers import router_class
    from megatron_locmoe.sim.trainer import TrainSettings

    extra = dict(run.locmoe)
    if router_class(run.router_type).reads_setting("hash_token_counts"):
        extra["hash_token_counts"] = domains["counts"]
    overrides = {"moe_ffn_hidden_size": args.ffn_hidden_size}
    if run.node_limited:
        overrides.update(moe_router_num_groups=LAYOUTS[layout][0], moe_router_group_topk=1)
    s = TrainSettings(
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
        run_name=run.name,
        transformer_overrides=overrides,
        per_layer_logging=True,
        progress_path=str(run_dir / "progress.jsonl"),
    )
    if run.setting == "control":
        data = dict(
            data_prefix=domains["mixture"],
            data_prefix_per_node=None,
            eval_prefix=domains["mixture_valid"],
        )
    else:
        data = dict(eval_prefix_per_node=list(domains["valid_prefixes"]))
    return dataclasses.replace(
        s,
        **data,
        eval_batches=args.eval_batches,
        routing_stats_steps=tail_length(args.steps),
        transformer_overrides={**s.transformer_overrides, **run.overrides},
    )


def run_one(cluster, run: SweepRun, args, layout: str, domains: dict, run_dir: Path, bar: bool):
    """Train one run and write its run.json (the demo's record plus the sweep's fields)."""
    from megatron_locmoe.analysis.demo import run_record, run_with_progress
    from megatron_locmoe.analysis.runlog import write_run_record
    from megatron_locmoe.sim.cluster import ParallelLayout

    nodes, rpn = LAYOUTS[layout]
    run_dir.mkdir(parents=True, exist_ok=True)
    for old in run_dir.glob("tensorboard/events.*"):  # a run that did not finish
        old.unlink()
    settings = settings_for(run, args, layout, domains, run_dir)
    par = ParallelLayout(devices_per_node=rpn, ep=nodes * rpn)
    t0 = time.perf_counter()
    results, progress = run_with_progress(cluster, settings, par, f"{layout} {run.name}", bar)
    seconds = time.perf_counter() - t0
    meta = dict(
        name=run.name,
        label=run.label,
        router_type=run.router_type,
        topk=run.topk,
        node_limited=run.node_limited,
        nodes=nodes,
        ranks_per_node=rpn,
        num_experts=args.experts,
        num_layers=args.layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size,
        steps=args.steps,
        lr=args.lr,
        seed=args.seed,
    )
    names = [d["name"] for d in domains["domains"]]
    record = run_record(meta, settings, results, progress, names, seconds)
    first = results[0]
    record.update(
        setting=run.setting,
        layout=layout,
        sweep_key=run_key(run, args, layout),
        transformer_overrides=settings.transformer_overrides,
        eval_loss=first["eval_loss"],
        eval_loss_per_rank=first["eval_loss_per_rank"],
        tokens_per_expert=first["tokens_per_expert"],
        routing_stats_steps=settings.routing_stats_steps,
        domains=(
            ["mixture of " + ", ".join(d["name"] for d in domains["domains"])]
            if run.setting == "control"
            else record["domains"]
        ),
    )
    write_run_record(run_dir, record)
    return record


def _key_text(key: dict) -> str:
    return json.dumps(key, sort_keys=True)


def committed_rows(results_path: Path) -> dict[str, dict]:
    """The rows of an existing results file by run key: runs finished elsewhere (a committed
    results file in a fresh checkout, whose run directories are not committed) count as
    done and stay in the file."""
    if not results_path.exists():
        return {}
    rows = json.loads(results_path.read_text()).get("runs", [])
    return {_key_text(r["sweep_key"]): r for r in rows if "sweep_key" in r}


def is_done(run_dir: Path, key: dict) -> bool:
    path = run_dir / "run.json"
    if not path.exists():
        return False
    return json.loads(path.read_text()).get("sweep_key") == json.loads(json.dumps(key))


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


def _expert_ranks(E: int, world: int) -> list[int]:
    """EP rank of every expert (Megatron places E / EP consecutive experts per rank)."""
    return [e // (E // world) for e in range(E)]


def routing_summary(rec: dict) -> dict:
    """From the tail steps' routing counts: flat All-to-All copies per token (intra, inter),
    tokens per expert (received per step by the busiest and the mean expert, and the most one
    rank sends to one expert) against the capacity factor reference, and the CV of the
    experts' received loads (the load each expert computes; ``load_cv`` is per source rank,
    which a node-aware router makes uneven on purpose)."""
    counts = rec["tokens_per_expert"]  # [ranks][layers][E], summed over the tail steps
    steps, T, k = rec["routing_stats_steps"], rec["tokens_per_rank_step"], rec["topk"]
    world, G, E = len(counts), rec["ranks_per_node"], rec["num_experts"]
    owner = _expert_ranks(E, world)
    layers = len(counts[0])
    local = [0.0] * (world // G)  # per node: assignments to the node's own experts, and all
    total = [0.0] * (world // G)
    intra = inter = 0.0
    sent_max = 0.0
    received = [[0.0] * E for _ in range(layers)]
    for r, per_layer in enumerate(counts):
        for li, row in enumerate(per_layer):
            for e, c in enumerate(row):
                received[li][e] += c
                total[r // G] += c
                if owner[e] // G == r // G:
                    local[r // G] += c
                if owner[e] // G != r // G:
                    inter += c
                elif owner[e] != r:
                    intra += c
            sent_max += max(row)
    denom = world * layers * steps
    recv_max = sum(max(row) for row in received) / (layers * steps)
    recv_mean = sum(sum(row) / E for row in received) / (layers * steps)
    cv = [statistics.pstdev(row) / max(statistics.fmean(row), 1e-30) for row in received]
    return {
        "node_local_per_node": [lo / max(t, 1.0) for lo, t in zip(local, total, strict=True)],
        "global_load_cv": statistics.fmean(cv),
        "flat_intra_copies_per_token": intra / denom / T,
        "flat_inter_copies_per_token": inter / denom / T,
        "tokens_per_expert_received_max": recv_max,
        "tokens_per_expert_received_mean": recv_mean,
        "tokens_per_expert_sent_max": sent_max / denom,
        "capacity_cf_reference": math.ceil(CF_REFERENCE * T * k / E),
    }


def run_summary(run) -> dict:
    """One run's entry of the results file (``runlog.Run`` of a sweep run)."""
    from megatron_locmoe.analysis.costmodel import copy_bytes, uniform_local_share
    from megatron_locmoe.analysis.runlog import summary_rows, tail_length
    from megatron_locmoe.routers import ROUTERS

    rec = run.record
    router = ROUTERS.get(rec["router_type"])
    row = summary_rows([run])[0]
    T = rec["tokens_per_rank_step"]
    nodes, E = rec["nodes"], rec["num_experts"]
    steps_nl, share = run.series("node_local_fraction")
    n = tail_length(len(share))
    blind = uniform_local_share(E, nodes)
    tail = float(share[-n:].mean())
    before = float(share[-2 * n : -n].mean()) if len(share) >= 2 * n else float("nan")
    routing = routing_summary(rec)
    flat_copy = copy_bytes(
        rec["hidden_size"] * rec["hidden_element_bytes"], rec["prob_element_bytes"]
    )
    return {
        "run": run.name,
        "label": run.label,
        "sweep_key": rec["sweep_key"],
        "layout": rec["layout"],
        "nodes": nodes,
        "ranks_per_node": rec["ranks_per_node"],
        "setting": rec["setting"],
        "router_type": rec["router_type"],
        "topk": rec["topk"],
        "locality_loss_coeff": (
            rec["locmoe"]["locality_loss_coeff"]
            if router is not None and router.reads_setting("locality_loss_coeff")
            else None
        ),
        "node_target_share": rec["locmoe"].get("node_target_share", 0.0),
        "capacity_mode": rec["locmoe"]["capacity_mode"],
        "node_limited": rec["node_limited"],
        "steps": rec["steps"],
        "num_experts": E,
        "hidden_size": rec["hidden_size"],
        "hidden_element_bytes": rec["hidden_element_bytes"],
        "prob_element_bytes": rec["prob_element_bytes"],
        "tokens_per_rank_step": T,
        "dedup": rec["dedup"],
        "train_loss": row["loss"],
        "eval_loss": rec["eval_loss"],
        "eval_loss_per_node": [
            sum(rec["eval_loss_per_rank"][i : i + rec["ranks_per_node"]]) / rec["ranks_per_node"]
            for i in range(0, len(rec["eval_loss_per_rank"]), rec["ranks_per_node"])
        ],
        "node_local": row["node_local"],
        "node_local_blind": blind,
        "locality_gain": (tail - blind) / (1.0 - blind),
        "node_local_rise_last_window": tail - before,
        "node_local_curve": [float(x) for x in share],
        "inter_bytes_per_token": row["inter_bytes_per_token"],
        "intra_bytes_per_token": run.tail_mean("intra_node_bytes") / T,
        "flat_inter_bytes_per_token": row["flat_inter_bytes_per_token"],
        "flat_intra_bytes_per_token": routing["flat_intra_copies_per_token"] * flat_copy,
        "load_cv": row["load_cv"],
        "dropped": row["dropped"],
        "expert_capacity": run.tail_mean("expert_capacity"),
        # share of layer-steps in LocMoE+'s expert-choice phase (runs before the metric: None)
        "expert_choice": (
            run.tail_mean("expert_choice") if "expert_choice" in run.scalars else None
        ),
        **{k: v for k, v in routing.items() if not k.startswith("flat_")},
        "tokens_per_second": rec["tokens_per_second"],
        "wall_seconds": rec["wall_seconds"],
    }


def versions() -> dict:
    import importlib.metadata

    import torch

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "megatron_core": importlib.metadata.version("megatron-core"),
        "git_commit": commit,
        "git_dirty": dirty,
        "machine": f"{platform.machine()}, {platform.node()}",
    }


def domain_distinctness(manifest: Path) -> list[dict]:
    """Per domain of a built corpus: name, training tokens and KL(domain || the other domains)
    of the byte distributions (nats; +0.5 smoothing): how much a token alone tells its node."""
    import numpy as np

    built = json.loads(manifest.read_text())
    counts = [np.load(f"{p}_counts.npy").astype(np.float64) + 0.5 for p in built["prefixes"]]
    total = sum(counts)
    out = []
    for d, c in zip(built["domains"], counts, strict=True):
        p, q = c / c.sum(), (total - c) / (total - c).sum()
        kl = float((p * np.log(p / q)).sum())
        out.append({"name": d["name"], "tokens": d["tokens"], "kl_vs_rest": kl})
    return out


def collect(out: Path) -> list[dict]:
    """Summaries of every finished run under ``out`` (layout order, then sweep order)."""
    from megatron_locmoe.analysis.runlog import load_run

    rows = []
    for layout in LAYOUTS:
        for run in sweep_runs(layout):
            d = out / layout / run.name
            if (d / "run.json").exists() and "sweep_key" in json.loads(
                (d / "run.json").read_text()
            ):
                rows.append(run_summary(load_run(d)))
    return rows


def write_results(out: Path, results_path: Path, args, command: str) -> dict:
    rows = collect(out)
    have = {_key_text(r["sweep_key"]) for r in rows}
    kept = [r for k, r in committed_rows(results_path).items() if k not in have]
    order = {
        (lay, r.name): i
        for i, (lay, r) in enumerate((a, b) for a in LAYOUTS for b in sweep_runs(a))
    }
    rows = sorted(rows + kept, key=lambda r: order.get((r["layout"], r["run"]), len(order)))
    data = {
        "command": command,
        "versions": versions(),
        "settings": {
            k: getattr(args, k)
            for k in run_key(sweep_runs("2x4")[0], args, "2x4")
            if k not in ("run", "layout")
        },
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
        "domains": {
            str(n): domain_distinctness(m)
            for n in sorted({LAYOUTS[lay][0] for lay in LAYOUTS})
            if (m := Path(args.data_dir) / f"nodes{n}" / "manifest.json").exists()
        },
        "runs": rows,
    }
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(data, indent=1))
    if rows and args.plots:
        from megatron_locmoe.analysis.report import plot_sweep

        plot_sweep(rows, results_path.parent / f"{results_path.stem}_png")
    return data


TABLE_COLUMNS = (
    # (results key, header, format)
    ("run", "run", "{}"),
    ("eval_loss", "held-out loss", "{:.3f}"),
    ("train_loss", "train loss", "{:.3f}"),
    ("node_local", "node-local", "{:.3f}"),
    ("locality_gain", "g", "{:+.3f}"),
    ("node_local_rise_last_window", "rise", "{:+.3f}"),
    ("inter_bytes_per_token", "inter B/token", "{:.0f}"),
    ("flat_inter_bytes_per_token", "flat inter", "{:.0f}"),
    ("intra_bytes_per_token", "intra B/token", "{:.0f}"),
    ("flat_intra_bytes_per_token", "flat intra", "{:.0f}"),
    ("load_cv", "load CV (rank)", "{:.2f}"),
    ("global_load_cv", "load CV (experts)", "{:.2f}"),
    ("dropped", "dropped", "{:.1%}"),
    ("tokens_per_expert_sent_max", "max tokens/expert", "{:.1f}"),
    ("expert_capacity", "capacity", "{:.0f}"),
)
"""The per-node-count tables of docs/reproduction.md (``--tables``). Bytes: per token and MoE
layer, dispatch + combine, fp32 hidden 64; rise: node-local share of the last 20% of steps
minus the 20% before; max tokens/expert: the most one rank sends to one expert per step."""


DOC_COLUMNS = ("run", "eval_loss", "node_local", "locality_gain", "inter_bytes_per_token",
               "load_cv", "global_load_cv", "dropped")  # fmt: skip
"""The columns of the README's and docs' tables (``--tables --brief``)."""


def format_tables(rows: list[dict], columns: tuple[str, ...] | None = None) -> str:
    """One Markdown table per node count (domains, then control), from the results' rows;
    ``columns``: a subset of TABLE_COLUMNS' keys (default all)."""
    from megatron_locmoe.analysis.costmodel import format_table

    parts = []
    for nodes in sorted({r["nodes"] for r in rows}):
        rs = [r for r in rows if r["nodes"] == nodes]
        rs.sort(key=lambda r: (r["setting"] != "domains", r["topk"]))
        first = rs[0]
        parts.append(
            f"{nodes} nodes x {first['ranks_per_node']} ranks ({first['layout']}), "
            f"{first['steps']} steps, blind node-local share {first['node_local_blind']:.4g}:\n"
        )
        cols = [c for c in TABLE_COLUMNS if columns is None or c[0] in columns]
        cells = [
            [fmt.format(r[key]) if r.get(key) is not None else "-" for key, _, fmt in cols]
            for r in rs
        ]
        parts.append(format_table([h for _, h, _ in cols], cells) + "\n")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The tiny model's sizes, learning rate and seed (configs/demo.yaml's)."""
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
    p.add_argument(
        "--layouts",
        default=",".join(SWEEP_LAYOUTS),
        help="comma-separated, of " + ", ".join(LAYOUTS),
    )
    p.add_argument("--priority", type=int, default=4, help="run priorities up to this (1: main)")
    p.add_argument("--runs", default=None, help="comma-separated run names (default: all)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-batches", type=int, default=8, help="held-out micro-batches per rank")
    p.add_argument("--held-out-every", type=int, default=20, help="every K-th document held out")
    add_model_arguments(p)
    p.add_argument("--out", default=DEFAULT_OUT, help="run directories (finished runs kept)")
    p.add_argument("--results", default=DEFAULT_RESULTS, help="results JSON (plots beside it)")
    p.add_argument("--data-dir", default=DEFAULT_DATA, help="per-node-count corpora (cached)")
    p.add_argument("--max-stdlib-files", type=int, default=None, help="smaller corpus (tests)")
    p.add_argument("--no-plots", dest="plots", action="store_false")
    p.add_argument("--progress", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--dry-run", action="store_true", help="list the runs to do and exit")
    p.add_argument("--tables", action="store_true", help="print the results file's tables and exit")
    p.add_argument("--brief", action="store_true", help="with --tables: the docs' columns")
    p.add_argument(
        "--collect",
        action="store_true",
        help="rewrite the results file and plots from the finished runs and exit",
    )
    args = p.parse_args(argv)
    layouts = args.layouts.split(",")
    bad = [x for x in layouts if x not in LAYOUTS]
    if bad:
        p.error(f"unknown layouts {bad}; choose from {', '.join(LAYOUTS)}")
    for lay in layouts:
        world = LAYOUTS[lay][0] * LAYOUTS[lay][1]
        if args.experts % world:
            p.error(f"--experts {args.experts} must be a multiple of the EP size {world} ({lay})")
    if args.hidden_size % args.experts:
        p.error(f"--hidden-size {args.hidden_size}: GrAP needs a multiple of --experts")
    if args.eval_batches < 1:
        p.error("--eval-batches must be at least 1: the held-out loss is part of every result")
    if args.runs:
        known = {r.name for lay in layouts for r in sweep_runs(lay)}
        unknown = [n for n in args.runs.split(",") if n not in known]
        if unknown:
            p.error(f"unknown runs {unknown}; choose from {', '.join(sorted(known))}")
    args.layouts = layouts
    return args


def _feasible(run: SweepRun, experts: int, nodes: int) -> bool:
    """Node-limited top-k needs k experts on one node: at 16 nodes x 16 experts a node holds
    one, so that run does not exist there (Megatron's top-2 router is the baseline)."""
    return not run.node_limited or experts // nodes >= run.topk


def planned(args) -> list[tuple[str, SweepRun]]:
    """(layout, run) to do, by priority, then world size (one cluster per size at a time,
    the cheap 8-rank layouts first)."""
    wanted = set(args.runs.split(",")) if args.runs else None
    todo = [
        (lay, r)
        for lay in args.layouts
        for r in sweep_runs(lay)
        if r.priority <= args.priority
        and (wanted is None or r.name in wanted)
        and _feasible(r, args.experts, LAYOUTS[lay][0])
    ]
    world = lambda lay: LAYOUTS[lay][0] * LAYOUTS[lay][1]  # noqa: E731
    order = {lay: i for i, lay in enumerate(LAYOUTS)}
    return sorted(todo, key=lambda x: (x[1].priority, world(x[0]), -order[x[0]]))


def main(argv: list[str] | None = None, cluster=None) -> dict:
    """Run (or resume) the sweep; ``cluster``: an already started SimCluster to use for the
    layouts of its size (tests)."""
    from tqdm import tqdm

    from megatron_locmoe.analysis.demo import prepare_domains
    from megatron_locmoe.sim.cluster import SimCluster

    args = parse_args(argv)
    if args.tables:
        rows = json.loads(Path(args.results).read_text())["runs"]
        print(format_tables(rows, DOC_COLUMNS if args.brief else None))
        return {"rows": rows}
    command = " ".join(["python", *sys.argv]) if argv is None else "main(" + repr(argv) + ")"
    out, results_path = Path(args.out), Path(args.results)
    todo = planned(args)
    committed = committed_rows(results_path)
    pending = [
        (lay, r)
        for lay, r in todo
        if not is_done(out / lay / r.name, run_key(r, args, lay))
        and _key_text(json.loads(json.dumps(run_key(r, args, lay)))) not in committed
    ]
    print(
        f"locality sweep: {len(todo)} runs planned, {len(todo) - len(pending)} done, "
        f"{len(pending)} to run ({args.steps} steps each) -> {out}/, {results_path}",
        flush=True,
    )
    if args.collect:  # the command that ran the sweep stays the file's command
        if results_path.exists():
            command = json.loads(results_path.read_text()).get("command", command)
        return write_results(out, results_path, args, command)
    if args.dry_run:
        for lay, r in pending:
            print(f"  p{r.priority} {lay:<5} {r.name}")
        return {"pending": pending}
    show_bar = {"auto": None, "on": True, "off": False}[args.progress]
    held: SimCluster | None = None
    overall = tqdm(
        total=len(pending), desc="sweep", unit="run", file=sys.stderr, disable=show_bar is False
    )
    try:
        for lay, r in pending:
            nodes, rpn = LAYOUTS[lay]
            world = nodes * rpn
            if cluster is not None and cluster.world_size == world:
                use = cluster
            else:
                if held is None or held.world_size != world:
                    if held is not None:
                        held.close()
                    t0 = time.perf_counter()
                    held = SimCluster(  # 16 ranks on 2 loaded cores start slowly
                        world,
                        collective_timeout_s=600.0,
                        job_timeout_s=4 * 3600.0,
                        startup_timeout_s=1800.0,
                    ).start()
                    print(f"  {world} ranks up in {time.perf_counter() - t0:.0f} s", flush=True)
                use = held
            domains = prepare_domains(
                Path(args.data_dir) / f"nodes{nodes}",
                nodes,
                args.max_stdlib_files,
                args.held_out_every,
            )
            rec = run_one(use, r, args, lay, domains, out / lay / r.name, show_bar)
            print(
                f"  {lay:<5} {r.name:<22} {rec['wall_seconds']:5.0f} s, loss "
                f"{rec['losses'][-1]:.3f}, held-out {rec['eval_loss']:.3f}",
                flush=True,
            )
            write_results(out, results_path, args, command)
            overall.update(1)
    finally:
        overall.close()
        if held is not None:
            with contextlib.suppress(Exception):
                held.close()
    return write_results(out, results_path, args, command)
