"""The locality study (issue 32): one record per training run, seeds pooled into arms, and the
Pareto front of held-out loss against inter-node bytes, with the seed noise beside every delta.

A run is one ``pretrain_gpt`` training (usually on the virtual cluster) with a TensorBoard
directory. Its record holds what the study compares, read from the TensorBoard scalars Megatron
and the plugin write:

- held-out loss: the last evaluation's ``lm loss validation`` (the mixture) and each
  ``lm loss domain d validation`` (per domain, where the run evaluated domains);
- the training loss curve (``lm loss``);
- traffic per token and MoE layer, means over the last fifth of the run: the plugin's bytes per
  rank, layer and micro-batch over the tokens of a micro-batch (``dedup_inter_node_bytes``:
  one copy per token and remote node; the flat and two-hop schemes beside it), the node-local
  share, the tokens received per rank (max / mean) and the dropped tokens;
- speed: seconds per step, tokens/s and MFU from Megatron's ``--log-throughput`` with
  ``--log-timers-to-tensorboard`` (TFLOP/s per GPU over the card's dense bf16 peak); for runs
  without the timers in TensorBoard, ``collect`` reads the same numbers from Megatron's log
  lines. ``collect`` also records how many runs shared the card (``tools/gpu_study.sh``'s
  ``calls.jsonl``): a speed measured beside other runs is not the run's own.

Arms pool the seeds of one setting; ``compare`` calls a difference smaller than the seed
standard deviation "no difference" (in both directions), and one measured with fewer than
three seeds "unresolved". Where two arms share three seeds or more, the difference is the paired
one (``paired``): runs of one seed read the same batches and the same held-out samples, so the
seed standard deviation of the per-seed differences is the noise of a difference.

    python -m megatron_locmoe.analysis.study record TB_DIR --name NAME --arm ARM --seed S \\
        --setting 16x8-finegrained-control --tokens-per-micro-batch 8192 \\
        --command-file cmd.txt --out benchmarks/results/study/NAME.json
    python -m megatron_locmoe.analysis.study table benchmarks/results/study/*.json \\
        [--baseline megatron]
    python -m megatron_locmoe.analysis.study collect OUT --setting gpu-8x8-control \\
        --tokens-per-micro-batch 4096 --out benchmarks/results/study/gpu-8x8-control
        (every run of a tools/gpu_study.sh call: OUT/seedS/PRESET/ARM/tensorboard; or of the
        launcher's runs with --runs-dir OUT/seedS, each with its manifest ARM/launch.json)
    python -m megatron_locmoe.analysis.study plot benchmarks/results/study/*.json \\
        --out docs/figures    (one Pareto plot per setting: pareto_SETTING.png)
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from megatron_locmoe.analysis.errors import InputError, read_json, require_keys, run_tool
from megatron_locmoe.analysis.runlog import MANIFEST_FILE, read_scalars, tail_length
from megatron_locmoe.sim.progress import read_progress, steady_step_seconds

BYTE_METRICS = (
    "dedup_inter_node_bytes",
    "two_hop_inter_node_bytes",
    "flat_inter_node_bytes",
    "dedup_intra_node_bytes",
)
"""Bytes per rank, layer and micro-batch (dispatch + combine), as the plugin records them."""
ROUTING_METRICS = ("node_local_fraction", "received_tokens_max_over_mean", "tokens_dropped")
MIN_SEEDS = 3
"""Seeds an arm needs before a difference to it is called one."""
_DOMAIN_TAG = re.compile(r"^lm loss domain (\d+) validation$")
RECORD_KEYS = ("name", "arm", "seed", "setting", "heldout", "per_token", "routing", "speed")


def _last(scalars, tag: str) -> float | None:
    series = scalars.get(tag)
    return None if series is None or not len(series[1]) else float(series[1][-1])


def _tail(scalars, tag: str) -> float | None:
    series = scalars.get(tag)
    if series is None or not len(series[1]):
        return None
    values = series[1]
    return float(values[-tail_length(len(values)) :].mean())


_LOG_ITERATION = re.compile(
    r"iteration +(\d+)/ *\d+ \|.*?elapsed time per iteration \(ms\): ([0-9.]+) \|"
    r"(?:.*?throughput per GPU \(TFLOP/s/GPU\): ([0-9.]+) \|)?"
)


def log_speed(log: str | Path) -> tuple[float | None, float | None]:
    """(seconds per step, TFLOP/s per GPU) from Megatron's iteration lines in ``log``: means
    over the last fifth of the iterations after the first, as the TensorBoard timers would
    have them (Megatron leaves the first iteration, with its start-up, out of TensorBoard)."""
    seconds, tflops = {}, {}
    for line in Path(log).read_text(errors="replace").splitlines():
        if (m := _LOG_ITERATION.search(line)) is None or int(m.group(1)) < 2:
            continue
        seconds[int(m.group(1))] = float(m.group(2)) / 1000.0
        if m.group(3) is not None:
            tflops[int(m.group(1))] = float(m.group(3))

    def tail(series: dict) -> float | None:
        values = [series[k] for k in sorted(series)]
        return statistics.fmean(values[-tail_length(len(values)) :]) if values else None

    return tail(seconds), tail(tflops)


def command_value(command: str, flag: str) -> str | None:
    """The value after ``flag`` in a run's command line (None when absent)."""
    m = re.search(rf"(?:^|\s){re.escape(flag)}\s+(\S+)", command)
    return None if m is None else m.group(1)


def tokens_per_step(command: str) -> int | None:
    """Global batch x sequence length of a ``pretrain_gpt`` command (None without either)."""
    gbs, seq = command_value(command, "--global-batch-size"), command_value(command, "--seq-length")
    return None if gbs is None or seq is None else int(gbs) * int(seq)


def speed_entry(
    seconds_per_step: float | None,
    tflops: float | None,
    *,
    tokens: int | None,
    peak_tflops: float,
    shared_by: int | None = None,
) -> dict:
    """A record's speed: seconds per step, tokens/s, TFLOP/s per GPU and MFU, and how many
    runs shared the card (None: not recorded)."""
    return {
        "seconds_per_step": seconds_per_step,
        "tokens_per_s": None if not (seconds_per_step and tokens) else tokens / seconds_per_step,
        "tflops": tflops,
        "mfu": None if tflops is None else tflops / peak_tflops,
        "peak_tflops": peak_tflops,
        "card_shared_by": shared_by,
    }


def run_record(
    tensorboard_dir: str | Path,
    *,
    name: str,
    arm: str,
    seed: int,
    setting: str,
    tokens_per_micro_batch: int,
    peak_tflops: float,
    command: str = "",
    versions: dict | None = None,
    megatron_flags: str | None = None,
) -> dict:
    """The study's record of one run from its TensorBoard scalars (see the module doc);
    ``megatron_flags`` (default: ``command``) give the tokens of a step."""
    scalars = read_scalars(tensorboard_dir)
    if "lm loss" not in scalars:
        raise InputError(
            f"{tensorboard_dir}: no 'lm loss' scalars; give the --tensorboard-dir of a "
            "pretrain_gpt run that logged at least one iteration"
        )
    if "lm loss validation" not in scalars:
        raise InputError(
            f"{tensorboard_dir}: no evaluation ('lm loss validation'); the study compares "
            "held-out loss: train with --eval-iters > 0 and held-out data"
        )
    domains = {
        int(m.group(1)): _last(scalars, tag)
        for tag in scalars
        if (m := _DOMAIN_TAG.match(tag)) is not None
    }
    steps, losses = scalars["lm loss"]
    per_token = {
        m: v / tokens_per_micro_batch for m in BYTE_METRICS if (v := _tail(scalars, m)) is not None
    }
    return {
        "name": name,
        "arm": arm,
        "seed": seed,
        "setting": setting,
        "command": command,
        "versions": versions or {},
        "tensorboard_dir": str(tensorboard_dir),
        "steps": int(steps[-1]),
        "heldout": {
            "mixture": _last(scalars, "lm loss validation"),
            "domains": {str(d): domains[d] for d in sorted(domains)},
            "at_step": int(scalars["lm loss validation"][0][-1]),
        },
        "curve": {int(s): float(v) for s, v in zip(steps, losses, strict=True)},
        "per_token": per_token,
        "routing": {m: v for m in ROUTING_METRICS if (v := _tail(scalars, m)) is not None},
        "speed": speed_entry(
            _tail(scalars, "iteration-time"),
            _tail(scalars, "throughput"),
            tokens=tokens_per_step(command if megatron_flags is None else megatron_flags),
            peak_tflops=peak_tflops,
        ),
    }


_LAUNCH_LINE = "[launch] "


def _manifest_versions(manifest: dict | None) -> dict:
    """A run manifest's versions, with the card where the run had none (the CPU loop's
    host: ``CPU (N cores)``)."""
    if manifest is None:
        return {}
    out = dict(manifest.get("versions", {}))
    if manifest.get("device") == "cpu":
        out["card"] = f"CPU ({manifest.get('host', {}).get('cpus')} cores)"
    return out


def manifest_command(manifest: dict) -> str:
    """A run manifest's launcher command, with the commit it ran at (and a note where its
    tracked files had changes), as the records hold it."""
    command, code = manifest["command"], manifest.get("code") or {}
    if code.get("commit"):
        dirty = " with uncommitted changes" if code.get("dirty") else ""
        command += f"  # at {code['commit'][:12]}{dirty}"
    return command


def card_sharing(calls: Path) -> dict[str, int]:
    """'PRESET/ARM:SEED' -> how many runs shared the card in the ``tools/gpu_study.sh`` call
    that ran it (the last call naming it), from the script's ``calls.jsonl`` (items without a
    preset, as the first calls wrote them, are the line's preset's); empty without the file."""
    if not calls.is_file():
        return {}
    out = {}
    for n, line in enumerate(calls.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            call = json.loads(line)
            runs = call["runs"]
            named = [r if "/" in r else f"{call['preset']}/{r}" for r in runs]
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"{calls}:{n}: not a gpu_study.sh call line ({e})") from None
        out.update({run: len(runs) for run in named})
    return out


def collect(
    root: str | Path,
    *,
    setting: str,
    tokens_per_micro_batch: int,
    peak_tflops: float,
    out_dir: str | Path,
    preset: str | None = None,
) -> tuple[list[Path], list[str]]:
    """Record every run of ``preset`` under ``root`` into ``out_dir/SETTING-ARM-sS.json``:
    runs laid out as ``seedS/PRESET/ARM/tensorboard``, as ``tools/gpu_study.sh`` lays them out
    (the launcher's output in ``seedS/PRESET/ARM.launch.log`` or, from the first calls,
    ``seedS/ARM.launch.log``, the card and versions in ``versions.json``) and as the launcher
    does with ``--runs-dir ROOT/seedS`` (its manifest ``ARM/launch.json``: the command, the
    Megatron flags, the commit and versions; the CPU loop's step times in
    ``ARM/progress.jsonl``). ``preset`` may be left out where ``root`` holds one preset's
    runs. Returns (the records written, one line per run that has no record and why: e.g.
    stopped by the call's deadline before its first evaluation)."""
    root, out_dir = Path(root), Path(out_dir)
    versions_file = root / "versions.json"
    versions = read_json(versions_file, "versions") if versions_file.is_file() else {}
    shared = card_sharing(root / "calls.jsonl")
    runs = sorted(root.glob(f"seed*/{preset or '*'}/*/tensorboard"))
    if not runs:
        raise InputError(
            f"{root}: no seedS/{preset or 'PRESET'}/ARM/tensorboard directories (gpu_study.sh's)"
        )
    presets = sorted({tb.parents[1].name for tb in runs})
    if len(presets) > 1:
        raise InputError(
            f"{root} holds the runs of {len(presets)} presets ({', '.join(presets)}): name the "
            "one to record (--preset NAME), each with its own --setting"
        )
    written, skipped = [], []
    for tb in runs:
        arm, preset_dir, seed_dir = tb.parent.name, tb.parents[1], tb.parents[2]
        seed = int(seed_dir.name.removeprefix("seed"))
        log = preset_dir / f"{arm}.launch.log"
        if not log.is_file():
            log = seed_dir / f"{arm}.launch.log"
        lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
        command = next((x[len(_LAUNCH_LINE) :] for x in lines if x.startswith(_LAUNCH_LINE)), "")
        manifest_file = tb.parent / MANIFEST_FILE
        manifest = read_json(manifest_file, "run manifest") if manifest_file.is_file() else None
        flags = command
        if manifest is not None:  # the launcher's own account of the run (CPU and GPU)
            require_keys(manifest, ("command", "megatron_flags"), manifest_file, "a run manifest")
            flags = shlex.join(manifest["megatron_flags"])
            command = command or manifest_command(manifest)
            log = manifest_file
        micro, seq = (
            command_value(flags, "--micro-batch-size"),
            command_value(flags, "--seq-length"),
        )
        if (
            micro is not None
            and seq is not None
            and int(micro) * int(seq) != tokens_per_micro_batch
        ):
            raise InputError(
                f"{log}: the run's micro-batch is {micro} x {seq} = {int(micro) * int(seq)} tokens, "
                f"not --tokens-per-micro-batch {tokens_per_micro_batch}: its bytes per token would "
                "be wrong; give its own (one preset a collect)"
            )
        try:
            record = run_record(
                tb,
                name=f"{setting}-{arm}-s{seed}",
                arm=arm,
                seed=seed,
                setting=setting,
                tokens_per_micro_batch=tokens_per_micro_batch,
                peak_tflops=peak_tflops,
                command=command,
                versions={**_manifest_versions(manifest), **versions},
                megatron_flags=flags,
            )
        except InputError as e:
            skipped.append(f"{arm} seed {seed}: {e}")
            continue
        if manifest is not None:
            record["launch"] = manifest
        iters = command_value(flags, "--train-iters")
        if iters is not None and record["heldout"]["at_step"] != int(iters):
            skipped.append(
                f"{arm} seed {seed}: stopped before its final evaluation (held-out loss at step "
                f"{record['heldout']['at_step']}, --train-iters {iters}, last step {record['steps']}); "
                "the study compares equal tokens: run it again"
            )
            continue
        record["tensorboard_dir"] = tb.relative_to(root).as_posix()
        speed = record["speed"]
        node_log, progress = tb.parent / "node0.log", tb.parent / "progress.jsonl"
        if speed["seconds_per_step"] is None and node_log.is_file():
            speed.update(
                speed_entry(
                    *log_speed(node_log), tokens=tokens_per_step(flags), peak_tflops=peak_tflops
                ),
                source="node0.log",
            )
        elif speed["seconds_per_step"] is None and progress.is_file():  # the CPU loop's
            step = steady_step_seconds([p["seconds"] for p in read_progress(progress)])
            speed.update(
                speed_entry(step, None, tokens=tokens_per_step(flags), peak_tflops=peak_tflops),
                source="progress.jsonl",
            )
        speed["card_shared_by"] = shared.get(f"{preset_dir.name}/{arm}:{seed}")
        out = out_dir / f"{record['name']}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1, sort_keys=True))
        written.append(out)
    return written, skipped


def load_records(paths: list[str | Path]) -> list[dict]:
    records = []
    for path in paths:
        record = read_json(path, "study record", "write it with 'study record'")
        require_keys(record, RECORD_KEYS, path, "study record")
        records.append(record)
    return records


@dataclass
class Arm:
    """The seeds of one arm in one setting: means and seed standard deviations."""

    setting: str
    arm: str
    loss: float
    loss_std: float | None
    bytes: float | None
    bytes_std: float | None
    load: float | None
    loss_by_seed: dict[int, float]

    @property
    def seeds(self) -> list[int]:
        return sorted(self.loss_by_seed)

    @property
    def resolved(self) -> bool:
        return len(self.seeds) >= MIN_SEEDS


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def pool(records: list[dict], byte_metric: str = "dedup_inter_node_bytes") -> list[Arm]:
    """One Arm per (setting, arm), its seeds pooled; a seed given twice is an error."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    steps: dict[str, set[int]] = defaultdict(set)
    for r in records:
        groups[(r["setting"], r["arm"])].append(r)
        steps[r["setting"]].add(r["heldout"]["at_step"])
    for setting, at in steps.items():
        if len(at) != 1:
            raise InputError(
                f"{setting}: held-out losses at steps {sorted(at)}; the study compares equal "
                "tokens: give the records of one evaluation step"
            )
    arms = []
    for (setting, arm), runs in sorted(groups.items()):
        seeds = [r["seed"] for r in runs]
        if len(set(seeds)) != len(seeds):
            raise InputError(f"{setting} / {arm}: seeds {seeds} repeat; one record per seed")
        loss, loss_std = _mean_std([r["heldout"]["mixture"] for r in runs])
        sent = [r["per_token"].get(byte_metric) for r in runs]
        sent_mean, sent_std = _mean_std(sent) if all(s is not None for s in sent) else (None, None)
        loads = [r["routing"].get("received_tokens_max_over_mean") for r in runs]
        load = max(loads) if all(x is not None for x in loads) else None
        by_seed = {r["seed"]: r["heldout"]["mixture"] for r in runs}
        arms.append(Arm(setting, arm, loss, loss_std, sent_mean, sent_std, load, by_seed))
    return arms


@dataclass
class Paired:
    """a's loss - b's loss seed by seed, over the seeds both ran: their mean and standard
    deviation. Runs of one seed read the same training batches in the same order and are
    evaluated on the same held-out samples (Megatron's datasets shuffle by the seed), so what
    the seed changes for both arms alike cancels in the difference."""

    seeds: list[int]
    delta: float
    std: float | None


def paired(a: Arm, b: Arm) -> Paired | None:
    common = sorted(set(a.loss_by_seed) & set(b.loss_by_seed))
    if not common:
        return None
    delta, std = _mean_std([a.loss_by_seed[s] - b.loss_by_seed[s] for s in common])
    return Paired(common, delta, std)


def unpaired(a: Arm, b: Arm) -> tuple[float, float | None]:
    """(the difference of the means, the larger of the seed standard deviations known)."""
    noise = max((s for s in (a.loss_std, b.loss_std) if s is not None), default=None)
    return a.loss - b.loss, noise


def compare(a: Arm, b: Arm) -> tuple[float, float | None, str]:
    """(a's loss - b's loss, the seed noise, the verdict). Where the two arms share
    MIN_SEEDS seeds or more, the difference and its noise are the paired ones (``paired``:
    the mean and the seed standard deviation of the per-seed differences); otherwise the
    difference of the means and the larger of the two seed standard deviations. A difference
    within its noise is "no difference" (either direction); arms with fewer than MIN_SEEDS
    seeds are "unresolved"."""
    if not (a.resolved and b.resolved):
        return *unpaired(a, b), f"unresolved ({len(a.seeds)} vs {len(b.seeds)} seeds)"
    pair = paired(a, b)
    if pair is not None and len(pair.seeds) >= MIN_SEEDS:
        delta, noise = pair.delta, pair.std
    else:
        delta, noise = unpaired(a, b)
    if abs(delta) <= noise:
        return delta, noise, "no difference"
    return delta, noise, "worse" if delta > 0 else "better"


def pareto_front(arms: list[Arm]) -> set[str]:
    """Arms of one setting that no other arm beats on both held-out loss and bytes (lower is
    better on both; an arm without bytes is left out)."""
    scored = [a for a in arms if a.bytes is not None]
    front = set()
    for a in scored:
        dominated = any(
            b is not a
            and b.loss <= a.loss
            and b.bytes <= a.bytes
            and (b.loss < a.loss or b.bytes < a.bytes)
            for b in scored
        )
        if not dominated:
            front.add(a.arm)
    return front


def _pm(mean: float | None, std: float | None, fmt: str) -> str:
    if mean is None:
        return "-"
    return format(mean, fmt) + ("" if std is None else " ± " + format(std, fmt))


def table(records: list[dict], baseline: str = "megatron") -> str:
    """A markdown table per setting: held-out loss ± seed std, inter-node bytes per token and
    layer (dedup) ± std, max/mean load, the delta to ``baseline`` with its verdict, and the
    Pareto front."""
    out = []
    by_setting: dict[str, list[Arm]] = defaultdict(list)
    for arm in pool(records):
        by_setting[arm.setting].append(arm)
    for setting, arms in by_setting.items():
        base = next((a for a in arms if a.arm == baseline), None)
        front = pareto_front(arms)
        out.append(f"### {setting}\n")
        out.append(
            "| arm | seeds | held-out loss | inter-node bytes / token / layer (dedup) | "
            f"max/mean load | Δ loss vs {baseline} | paired Δ (seeds) | verdict | front |"
        )
        out.append("|---|---|---|---|---|---|---|---|---|")
        for a in sorted(arms, key=lambda a: (a.bytes is None, a.bytes or 0.0)):
            delta = pair_text = verdict = "-"
            if base is not None and a is not base:
                verdict = compare(a, base)[2]
                d, noise = unpaired(a, base)
                delta = f"{d:+.4f}" + ("" if noise is None else f" (noise {noise:.4f})")
                pair = paired(a, base)
                if pair is not None:
                    std = "" if pair.std is None else f" ± {pair.std:.4f}"
                    pair_text = f"{pair.delta:+.4f}{std} ({len(pair.seeds)})"
            load = "-" if a.load is None else f"{a.load:.3f}"
            out.append(
                f"| {a.arm} | {len(a.seeds)} | {_pm(a.loss, a.loss_std, '.4f')} | "
                f"{_pm(a.bytes, a.bytes_std, '.1f')} | {load} | {delta} | {pair_text} | "
                f"{verdict} | {'yes' if a.arm in front else ''} |"
            )
        out.append("")
    return "\n".join(out)


def plot(records: list[dict], out_dir: str | Path) -> list[Path]:
    """One figure per setting, ``pareto_SETTING.png`` in ``out_dir``: held-out loss against
    inter-node bytes per token and layer (dedup), each arm at its seed mean with the seed
    standard deviations as error bars, its seed count in the label, the Pareto front joined.
    Arms without bytes (a run that logged no traffic) are named on the figure, not drawn."""
    from megatron_locmoe.analysis.report import _plt  # matplotlib: only to draw

    plt = _plt()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_setting: dict[str, list[Arm]] = defaultdict(list)
    for arm in pool(records):
        by_setting[arm.setting].append(arm)
    paths = []
    for setting, arms in by_setting.items():
        drawn = sorted((a for a in arms if a.bytes is not None), key=lambda a: a.bytes)
        fig, ax = plt.subplots(figsize=(7.5, 5))
        for k, a in enumerate(drawn):
            ax.errorbar(
                a.bytes,
                a.loss,
                xerr=a.bytes_std or 0.0,
                yerr=a.loss_std or 0.0,
                fmt="o",
                color=f"C{k % 10}",
                capsize=3,
                label=f"{a.arm} ({len(a.seeds)} seed{'s' if len(a.seeds) != 1 else ''})",
            )
        front = pareto_front(arms)
        line = [a for a in drawn if a.arm in front]
        if len(line) > 1:
            ax.plot([a.bytes for a in line], [a.loss for a in line], "k--", lw=0.8, zorder=0)
        missing = sorted(a.arm for a in arms if a.bytes is None)
        title = f"{setting}: held-out loss against inter-node bytes (mean ± seed std)"
        if missing:
            title += f"\nno bytes logged: {', '.join(missing)}"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("inter-node bytes per token and MoE layer (one copy per token and node)")
        ax.set_ylabel("held-out loss (nats)")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=7)
        path = out_dir / f"pareto_{re.sub(r'[^A-Za-z0-9_.-]+', '_', setting)}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m megatron_locmoe.analysis.study")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record", help="one run's record from its TensorBoard directory")
    r.add_argument("tensorboard_dir")
    r.add_argument("--name", required=True)
    r.add_argument("--arm", required=True)
    r.add_argument("--seed", type=int, required=True)
    r.add_argument("--setting", required=True, help="e.g. 16x8-finegrained-control")
    r.add_argument("--tokens-per-micro-batch", type=int, required=True)
    r.add_argument("--peak-tflops", type=float, default=790.0)
    r.add_argument("--command-file", default=None, help="the run's command line, as run")
    r.add_argument("--versions", default="{}", help="JSON: torch, megatron-core, card, ...")
    r.add_argument("--out", required=True)
    t = sub.add_parser("table", help="the Pareto table of study records")
    t.add_argument("records", nargs="+")
    t.add_argument("--baseline", default="megatron")
    c = sub.add_parser(
        "collect",
        help="record every run of ROOT/seedS/PRESET/ARM (gpu_study.sh's output, or the "
        "launcher's with --runs-dir ROOT/seedS)",
    )
    c.add_argument("root")
    c.add_argument("--setting", required=True, help="e.g. gpu-8x8-control")
    c.add_argument("--tokens-per-micro-batch", type=int, required=True)
    c.add_argument("--peak-tflops", type=float, default=790.0)
    c.add_argument("--out", required=True, help="directory for SETTING-ARM-sS.json")
    c.add_argument("--preset", default=None, help="the preset to record, where ROOT holds several")
    f = sub.add_parser("plot", help="one Pareto plot (loss against bytes) per setting")
    f.add_argument("records", nargs="+")
    f.add_argument("--out", required=True, help="directory for pareto_SETTING.png")
    a = p.parse_args(argv)
    if a.cmd == "record":
        command = Path(a.command_file).read_text().strip() if a.command_file else ""
        record = run_record(
            a.tensorboard_dir,
            name=a.name,
            arm=a.arm,
            seed=a.seed,
            setting=a.setting,
            tokens_per_micro_batch=a.tokens_per_micro_batch,
            peak_tflops=a.peak_tflops,
            command=command,
            versions=json.loads(a.versions),
        )
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(record, indent=1, sort_keys=True))
        print(f"{a.out}: held-out {record['heldout']['mixture']:.4f}, {record['per_token']}")
    elif a.cmd == "collect":
        written, skipped = collect(
            a.root,
            setting=a.setting,
            tokens_per_micro_batch=a.tokens_per_micro_batch,
            peak_tflops=a.peak_tflops,
            out_dir=a.out,
            preset=a.preset,
        )
        for path in written:
            print(path)
        for line in skipped:
            print(f"no record: {line}")
    elif a.cmd == "plot":
        for path in plot(load_records(a.records), a.out):
            print(path)
    else:
        print(table(load_records(a.records), a.baseline))


if __name__ == "__main__":
    raise SystemExit(run_tool(main))
