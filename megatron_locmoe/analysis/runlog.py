"""Runs on disk: what the demo writes and what the report, cost model and dashboard read.

A *run directory* holds the TensorBoard event files of one training run (the metrics exactly
as Megatron's MoE tracker names them) and, when the demo wrote it, ``run.json``: the run's
settings (router, top-k, layout, sizes), its loss curve and step times. The report reads the
event files, so any TensorBoard directory of the trainer works; the cost model also needs
``run.json`` (element sizes and tokens per step turn byte counts into token copies).

    runs/demo/
      megatron/        run.json  tensorboard/events.out.tfevents.*
      locmoe-top2/     ...
      wandb/           offline W&B runs of all of them
"""

from __future__ import annotations

import json
import logging
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megatron_locmoe.analysis.errors import read_json, require_types

RUN_FILE = "run.json"
MANIFEST_FILE = "launch.json"
"""The launcher's account of a run in its directory (``launch.manifest``): the command as
typed, the Megatron flags, the node commands, the code (``code_version``) and versions."""
_PACKAGE_DIR = Path(__file__).resolve().parents[1]
TAIL_FRACTION = 0.2
"""Steady-state statistics are means over this last fraction of a run's steps."""


def tail_length(steps: int, fraction: float = TAIL_FRACTION) -> int:
    """How many of the last ``steps`` a tail mean covers (at least one)."""
    return max(1, int(round(steps * fraction)))


def code_version(where: Path = _PACKAGE_DIR) -> dict:
    """``{"commit", "dirty"}`` of the git checkout holding ``where`` (default: this package's),
    dirty meaning tracked files with changes; both None outside one (an installed wheel, a tree
    copied without its .git)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(where), *args], capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def write_run_record(run_dir: str | Path, record: dict) -> Path:
    """Write ``record`` as RUN_DIR/run.json (creating the directory)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / RUN_FILE
    path.write_text(json.dumps(record, indent=1, sort_keys=True))
    return path


_EVENTS = "events.out.tfevents.*"


def find_run_dirs(paths: list[str | Path]) -> list[Path]:
    """Run directories among ``paths``: a directory with run.json, or with TensorBoard event
    files directly in it, is a run; otherwise its subdirectories that are runs (a demo output
    directory, or a directory of TensorBoard runs), sorted."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_file() and p.name == RUN_FILE:
            p = p.parent
        if not p.is_dir():
            raise FileNotFoundError(f"{p}: no such run directory")
        if (p / RUN_FILE).exists() or any(p.glob(_EVENTS)):
            found.append(p)
            continue
        subs = sorted(d for d in p.iterdir() if d.is_dir() and (d / RUN_FILE).exists())
        if not subs:
            subs = sorted(d for d in p.iterdir() if d.is_dir() and any(d.rglob(_EVENTS)))
        if subs:
            found.extend(subs)
        else:
            raise FileNotFoundError(
                f"{p} holds no run: expected {RUN_FILE} or TensorBoard event files in it or in "
                "its subdirectories (e.g. the demo's runs/demo)"
            )
    return found


def read_scalars(logdir: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every scalar tag of the TensorBoard events under ``logdir``: {tag: (steps, values)}."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    # TensorBoard logs each step of its reading at INFO, which Megatron's logging setup prints
    # (a dozen lines a run around the demo's table): quiet while reading, warnings still shown
    tb_logger = logging.getLogger("tensorboard")
    level = tb_logger.level
    tb_logger.setLevel(max(level, logging.WARNING))
    try:
        mux = EventMultiplexer(size_guidance={"scalars": 0})  # 0 = keep every point
        mux.AddRunsFromDirectory(str(logdir))
        mux.Reload()
    finally:
        tb_logger.setLevel(level)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for run, tags in mux.Runs().items():
        for tag in tags.get("scalars", []):
            events = mux.Scalars(run, tag)
            steps = np.array([e.step for e in events], dtype=np.int64)
            values = np.array([e.value for e in events], dtype=np.float64)
            if tag in out:  # several event files (e.g. a resumed run): concatenate by step
                steps = np.concatenate([out[tag][0], steps])
                values = np.concatenate([out[tag][1], values])
            order = np.argsort(steps, kind="stable")
            out[tag] = (steps[order], values[order])
    return out


@dataclass
class Run:
    """One run: its name, the demo's record (empty for a bare TensorBoard dir), its scalars."""

    path: Path
    name: str
    record: dict
    scalars: dict[str, tuple[np.ndarray, np.ndarray]] = field(repr=False)

    @property
    def label(self) -> str:
        return self.record.get("label", self.name)

    def series(self, tag: str) -> tuple[np.ndarray, np.ndarray] | None:
        return self.scalars.get(tag)

    def tail_mean(self, tag: str, fraction: float = TAIL_FRACTION) -> float:
        """Mean of the last ``fraction`` of the logged steps of ``tag`` (at least one point):
        steady-state routing statistics, less noisy than the last step."""
        if tag not in self.scalars:
            raise KeyError(f"run {self.name} logged no {tag!r} (logged: {sorted(self.scalars)})")
        values = self.scalars[tag][1]
        return float(values[-tail_length(len(values), fraction) :].mean())

    def layer_tags(self, metric: str) -> list[str]:
        """Megatron's per-layer tags of ``metric`` (``moe/<metric>_layer_<i>``) in layer order."""
        prefix = f"moe/{metric}_layer_"
        tags = [t for t in self.scalars if t.startswith(prefix) and t[len(prefix) :].isdigit()]
        return sorted(tags, key=lambda t: int(t[len(prefix) :]))


_NUMBER = (int, float)
RECORD_TYPES: dict[str, type | tuple] = {
    "name": str,
    "label": str,
    "tensorboard_dir": str,
    "router_type": str,
    "topk": int,
    "num_experts": int,
    "num_layers": int,
    "hidden_size": int,
    "ffn_hidden_size": int,
    "nodes": int,
    "ranks_per_node": int,
    "steps": int,
    "routing_stats_steps": int,
    "hidden_element_bytes": int,
    "prob_element_bytes": int,
    "dedup": bool,
    "node_limited": bool,
    "tokens_per_rank_step": _NUMBER,
    "tokens_per_second": _NUMBER,
    "wall_seconds": _NUMBER,
    "eval_loss": _NUMBER,
    "losses": list,
    "eval_loss_per_rank": list,
    "tokens_per_expert": list,
    "domains": list,
    "locmoe": dict,
}
"""The run record's fields the tools read, and their JSON types (``load_run`` checks them, so
a wrong-typed field is named with its file rather than failing later as a bare TypeError)."""


def load_run(path: str | Path) -> Run:
    path = Path(path)
    record = {}
    if (path / RUN_FILE).exists():
        record = read_json(path / RUN_FILE, "a run record", "rerun the run or remove the file")
        require_types(record, RECORD_TYPES, path / RUN_FILE, "a run record")
    logdir = path / record["tensorboard_dir"] if "tensorboard_dir" in record else path
    scalars = read_scalars(logdir)
    if not scalars:
        raise FileNotFoundError(
            f"{logdir}: no TensorBoard scalars (a run directory holds its event files)"
        )
    return Run(path=path, name=record.get("name", path.name), record=record, scalars=scalars)


def load_runs(paths: list[str | Path]) -> list[Run]:
    runs = [load_run(p) for p in find_run_dirs(paths)]
    names = [r.name for r in runs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"runs with the same name {dupes}: pass each run once")
    return runs


def summary_rows(runs: list[Run]) -> list[dict]:
    """The demo's table from the runs' logs: tail means, bytes and drops per token of a rank
    (per rank and step for runs without run.json, whose sizes are unknown); None where a run
    did not log a metric."""
    rows = []
    for r in runs:
        rec = r.record
        T, k = rec.get("tokens_per_rank_step"), rec.get("topk")

        def tail(tag, div=1.0, r=r):
            return r.tail_mean(tag) / div if r.series(tag) is not None else None

        rows.append(
            {
                "run": r.name,
                "label": r.label,
                "k": k,
                "loss": tail("lm loss"),
                "node_local": tail("node_local_fraction"),
                "inter_bytes_per_token": tail("inter_node_bytes", T or 1.0),
                "flat_inter_bytes_per_token": tail("flat_inter_node_bytes", T or 1.0),
                "load_cv": tail("load_cv"),
                "dropped": tail("tokens_dropped", T * k if T and k else 1.0),
                "tokens_per_second": rec.get("tokens_per_second"),
            }
        )
    return rows
