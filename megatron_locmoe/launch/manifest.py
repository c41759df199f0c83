"""A run's manifest, ``RUNS/PRESET/RUN/launch.json``, written before the run starts: the
launcher's command line as typed, the Megatron flags it became, the code it ran (the package's
git commit, and whether its tracked files had changes) and the versions, so that a run
directory says how to repeat it. The study's ``collect`` reads it into its records
(:mod:`megatron_locmoe.analysis.study`)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
from pathlib import Path

from megatron_locmoe.analysis.runlog import MANIFEST_FILE, code_version
from megatron_locmoe.launch.plan import Plan, RunPlan


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_manifest(plan: Plan, rp: RunPlan) -> dict:
    """The manifest of run ``rp`` of ``plan`` (see the module doc)."""
    return {
        "preset": plan.preset.name,
        "run": rp.name,
        "command": plan.command,
        "megatron_flags": list(rp.flags),
        "node_commands": {str(c.node_rank): c.shell() for c in rp.commands},
        "device": plan.preset.device,
        "cluster": {"nodes": plan.nodes, "devices_per_node": plan.devices_per_node},
        "code": code_version(),
        "versions": {
            "python": platform.python_version(),
            "torch": _version("torch"),
            "megatron-core": _version("megatron-core"),
            "megatron-locmoe": _version("megatron-locmoe"),
        },
        "host": {"name": platform.node(), "cpus": os.cpu_count()},
    }


def write_run_manifest(plan: Plan, rp: RunPlan) -> Path:
    """Write ``rp``'s manifest into its directory (created); the path."""
    rp.log_dir.mkdir(parents=True, exist_ok=True)
    path = rp.log_dir / MANIFEST_FILE
    path.write_text(json.dumps(run_manifest(plan, rp), indent=1) + "\n")
    return path
