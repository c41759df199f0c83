"""The per-step progress a CPU training job writes (``TrainSettings.progress_path``: one JSON line
per step, from the logging rank) and what the launcher and the demo read from it: one place, beside
the trainer that writes it."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

WARMUP_STEPS = 2
"""Steps left out of step-time summaries (caches, allocator, first collectives)."""


def steady_step_seconds(seconds: list[float]) -> float | None:
    """One step's time for tokens/s: the median after the warm-up steps (all steps if there
    are no more), so one slow step (a checkpoint save, a busy host) does not move it; the demo
    and the launcher report the same quantity. None without steps."""
    if not seconds:
        return None
    return statistics.median(seconds[WARMUP_STEPS:] or seconds)


def read_progress(path) -> list[dict]:
    """The JSON lines a training job appends per step (``TrainSettings.progress_path``), up to
    a line still being written; [] before the file exists."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            break
    return out
