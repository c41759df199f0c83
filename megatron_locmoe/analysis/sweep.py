"""The locality sweep: every router at 2, 4, 8 and 16 simulated nodes, measured, not modeled.

LocMoE's paper runs 16 experts, top-1, on 8 / 16 / 32 nodes, where a locality-blind router
keeps only 1/8 .. 1/32 of the assignments on the token's node. This sweep trains the demo's
tiny GPT-MoE with 16 experts and EP over every rank on layouts 2x4, 4x2, 8x1 and 16x1 (nodes
x ranks per node). The runs are the entries of ``configs/locality-sweep.yaml`` (which extends
``configs/demo.yaml``: one model); its ``schedule`` gives each entry's label, data setting,
layouts and priority. Each run's TrainSettings come from the launcher's plan and translator
(``launch.plan.build_plan`` -> ``launch.cpu_settings.train_settings``), so a sweep run is the
model and run the same flags give the launcher. Two data settings:

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
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from megatron_locmoe.launch.plan import Options, build_plan
from megatron_locmoe.launch.presets import Preset, ScheduleEntry, load_preset
from megatron_locmoe.routers import router_class

LAYOUTS = {"2x4": (2, 4), "4x2": (4, 2), "8x1": (8, 1), "16x1": (16, 1), "4x1": (4, 1)}
"""Layout name -> (nodes, ranks per node); EP over every rank. 4x1 is the test's small one."""
SWEEP_LAYOUTS = ("2x4", "4x2", "8x1", "16x1")
CF_REFERENCE = 1.1
"""The capacity factor the capacity bound is compared with (LocMoE+'s baseline)."""

DEFAULT_OUT = "runs/locality_sweep"
DEFAULT_RESULTS = "benchmarks/results/locality_sweep.json"
DEFAULT_DATA = "data/sweep"


PRESET = "locality-sweep"
"""The preset whose sweep entries are the runs (configs/locality-sweep.yaml): each entry's
flags, and in its ``schedule`` the label, data setting, layouts and priority."""


@dataclass(frozen=True)
class SweepRun:
    """One entry of the preset's sweep at one layout: its own flags and its schedule."""

    name: str
    flags: dict
    """The entry's own Megatron flags as the preset writes them (``null``: dropped)."""
    schedule: ScheduleEntry
    priority: int
    """The schedule's priority at this layout (1 first: the main question)."""

    @property
    def label(self) -> str:
        return self.schedule.label

    @property
    def setting(self) -> str:
        """domains: one corpus domain per node; control: the same mixture on every node."""
        return self.schedule.setting

    @property
    def router_type(self) -> str:
        return self.flags["moe-router-type"]

    @property
    def topk(self) -> int:
        return self.flags["moe-router-topk"]

    @property
    def node_limited(self) -> bool:
        return bool(self.flags.get("moe-router-num-groups"))


def load_sweep_preset() -> Preset:
    return load_preset(PRESET)


def sweep_runs(layout: str, preset: Preset | None = None) -> list[SweepRun]:
    """The runs of one layout in the preset's order, with their priorities there."""
    preset = preset or load_sweep_preset()
    out = []
    for name, flags in preset.sweep.items():
        scheduled = preset.schedule[name]
        if scheduled.runs_at(layout):
            own = {k: v for k, v in flags.items() if v is not None}
            out.append(SweepRun(name, own, scheduled, scheduled.priority_at(layout)))
    return out


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------

DATA_FLAGS = ("locmoe-hash-token-counts",)
"""Entry flags that name the layout's corpus (the sweep sets them): data, not the run."""
GROUPS_PER_NODE = {"moe-router-num-groups": "{nodes}", "moe-router-group-topk": 1}
"""Node-limited routing as the key's ``node_limited``: one group per node, one per token."""


def key_run(run: SweepRun) -> dict:
    """The run part of ``run_key`` from the entry's flags, in the form the committed results
    were keyed by (the former Python run table's fields), so finished runs stay done:

    router type and top-k; ``locmoe``: the entry's ``--locmoe-*`` settings (LocMoEConfig
    names) but the corpus's hash counts; ``node_limited``: one group per node and per token;
    ``overrides``: its other flags (TransformerConfig names), less what that table's loop
    config derived from the router and top-k and so never wrote: Megatron's aux loss 0.01 for
    a router without LocMoE's balance loss, pre-softmax scores at top-1 (and for the GrAP
    routers at any top-k, which ignored the flag then), and a router's default
    capacity factor where no capacity bound reads it (Switch's 1.0; LocMoE+'s ceiling was
    written). A flag with another value than these stays in ``overrides``: a changed entry
    is a new run. tests/test_sweep_presets.py checks every key against the former table's and
    every committed result's."""
    router = router_class(run.router_type)
    flags = {k: v for k, v in run.flags.items() if k not in DATA_FLAGS}
    implied = {"moe-router-type": run.router_type, "moe-router-topk": run.topk}
    if run.node_limited:
        implied.update(GROUPS_PER_NODE)
    if not router.uses_locmoe_alpha:  # (the others: the preset's none, as the loop's config)
        implied.update({"moe-router-load-balancing-type": "aux_loss", "moe-aux-loss-coeff": 0.01})
    if run.topk == 1 or router.has_grap_gate:
        # GrAP routers took the softmax over all experts whatever the flag until 2026-12-07:
        # their recorded top-k > 1 runs trained that; without the flag now, a new run
        implied["moe-router-pre-softmax"] = True
    if router.default_capacity_factor is not None and not router.has_capacity_bound:
        implied["moe-expert-capacity-factor"] = router.default_capacity_factor
    rest = {k: v for k, v in flags.items() if k not in implied or implied[k] != v}
    if router.has_grap_gate and not flags.get("moe-router-pre-softmax"):
        rest["moe-router-pre-softmax"] = False
    return {
        "name": run.name,
        "label": None,  # cosmetic
        "router_type": run.router_type,
        "topk": run.topk,
        "setting": run.setting,
        "locmoe": {
            k.removeprefix("locmoe-").replace("-", "_"): v
            for k, v in rest.items()
            if k.startswith("locmoe-")
        },
        "node_limited": run.node_limited,
        "overrides": {
            k.replace("-", "_"): v for k, v in rest.items() if not k.startswith("locmoe-")
        },
        "priority": None,  # cosmetic
    }


def run_key(run: SweepRun, args, layout: str) -> dict:
    """What makes a finished run reusable: the same run, layout, sizes and data."""
    return {
        "run": key_run(run),
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


def run_preset(run: SweepRun, args, layout: str, domains: dict, run_dir: Path) -> Preset:
    """The sweep preset with ``run`` alone, on ``layout`` and its corpus, with the sweep's
    options: what the launcher would be given as ``--nodes``, ``--devices-per-node`` and
    ``--set`` (EP over every rank, one micro-batch per rank and step; the setting's training
    and held-out data, module docstring)."""
    nodes, rpn = LAYOUTS[layout]
    preset = load_sweep_preset()
    preset.nodes, preset.devices_per_node, preset.node_counts = nodes, rpn, (nodes,)
    preset.prepare_data = None  # the sweep's corpus (prepare_domains), built already
    data = {"data-path": None}
    if run.setting == "control":
        data.update(
            {
                "train-data-path": [domains["mixture"]],
                "valid-data-path": [domains["mixture_valid"]],
                "split": None,  # per-split paths (Megatron takes one or the other)
            }
        )
    else:
        data.update(
            {
                "locmoe-domain-data-path": list(domains["prefixes"]),
                "locmoe-domain-valid-data-path": list(domains["valid_prefixes"]),
            }
        )
    preset.megatron.update(
        {
            "num-layers": args.layers,
            "hidden-size": args.hidden_size,
            "num-attention-heads": args.heads,
            "moe-ffn-hidden-size": args.ffn_hidden_size,
            "num-experts": args.experts,
            "seq-length": args.seq_length,
            "max-position-embeddings": args.seq_length,
            "micro-batch-size": args.micro_batch_size,
            "global-batch-size": args.micro_batch_size * nodes * rpn,
            "expert-model-parallel-size": nodes * rpn,
            "lr": args.lr,
            "seed": args.seed,
            "train-iters": args.steps,
            "eval-iters": args.eval_batches,  # one micro-batch per rank and iteration
            "tensorboard-dir": str(run_dir / "tensorboard"),
            **data,
        }
    )
    entry = dict(preset.sweep[run.name])
    if router_class(run.router_type).reads_setting("hash_token_counts"):
        entry["locmoe-hash-token-counts"] = domains["counts"]
    preset.sweep = {run.name: entry}
    preset.schedule = {run.name: preset.schedule[run.name]}
    return preset


def settings_for(run: SweepRun, args, layout: str, domains: dict, run_dir: Path):
    """(TrainSettings, ParallelLayout) of ``run``: its preset through the launcher's plan and
    translator (build_plan -> cpu_settings.train_settings: Megatron's parser and checks, its
    TransformerConfig, GPT options and optimizer for the flags), progress in ``run_dir``."""
    preset = run_preset(run, args, layout, domains, run_dir)
    opts = Options(config=PRESET, runs=[run.name], runs_dir=str(run_dir.parent))
    (rp,) = build_plan(opts, preset=preset).runs
    settings, par = rp.cpu_loop
    return dataclasses.replace(settings, progress_path=str(run_dir / "progress.jsonl")), par


def run_one(cluster, run: SweepRun, args, layout: str, domains: dict, run_dir: Path, bar: bool):
    """Train one run and write its run.json (the demo's record plus the sweep's fields)."""
    from megatron_locmoe.analysis.demo import run_record, run_with_progress
    from megatron_locmoe.analysis.runlog import write_run_record

    nodes, rpn = LAYOUTS[layout]
    run_dir.mkdir(parents=True, exist_ok=True)
    for old in run_dir.glob("tensorboard/events.*"):  # a run that did not finish
        old.unlink()
    settings, par = settings_for(run, args, layout, domains, run_dir)
    t0 = time.perf_counter()
    results, progress = run_with_progress(cluster, settings, par, f"{layout} {run.name}", bar)
    seconds = time.perf_counter() - t0
    meta = dict(
        name=run.name,
        label=run.label,
        router_type=run.router_type,
        node_limited=run.node_limited,
        nodes=nodes,
        ranks_per_node=rpn,
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

    from megatron_locmoe.analysis.runlog import code_version

    code = code_version()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "megatron_core": importlib.metadata.version("megatron-core"),
        "git_commit": code["commit"],
        "git_dirty": code["dirty"],
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


if __name__ == "__main__":
    main()
