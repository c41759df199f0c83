"""The accelerators' path: this node's torchrun, run and logged, and the Ascend rank entry.

The plan holds each node's command (:class:`~megatron_locmoe.launch.plan.NodeCommand`:
``python -m torch.distributed.run ... ENTRY FLAGS`` and its environment). On this node:
:func:`check_device_present` fails before torchrun when the node cannot run the preset's
device kind; :func:`run_logged` runs the command with its output on the terminal and in the
run's log, handing SIGINT / SIGTERM to torchrun (:func:`forwarding_signals`), which passes them
to its ranks; :func:`summarize_log` reads the lm loss and the speed from Megatron's log.
:func:`worker` is what torchrun starts on every Ascend rank (``python -m megatron_locmoe.launch
--worker ENTRY``): torch_npu first, then the entry.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import runpy
import signal
import statistics
import subprocess
import sys
import threading
from pathlib import Path

from megatron_locmoe.launch.plan import NodeCommand, Plan
from megatron_locmoe.launch.presets import PresetError

LOG_LINE = re.compile(
    r"iteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration \(ms\): ([\d.]+)"
    r".*?lm loss: ([\d.Ee+-]+)"
)
"""One line of Megatron's training log (logged by the last rank)."""


def check_device_present(plan: Plan) -> None:
    """Fail before torchrun when this node cannot run the preset's device kind."""
    dpn = plan.devices_per_node
    if plan.preset.device == "cuda":
        import torch  # the launcher imports no torch for --help or a dry run

        n = torch.cuda.device_count()
        if n < dpn:
            raise PresetError(
                f"preset {plan.preset.name} runs {dpn} CUDA devices per node, this node has {n}: "
                f"pass --devices-per-node {n} with a layout that fits, or run where {dpn} GPUs "
                "are visible"
            )
    elif plan.preset.device == "npu":
        if importlib.util.find_spec("torch_npu") is None:
            raise PresetError(
                f"preset {plan.preset.name} runs on Ascend NPUs but torch_npu is not installed "
                "here: use the Ascend image (docker/ascend.Dockerfile) or pip install the "
                "torch-npu release matching torch and CANN"
            )
        if not (os.environ.get("ASCEND_TOOLKIT_HOME") or os.environ.get("ASCEND_HOME_PATH")):
            raise PresetError(
                "CANN's environment is not loaded: start through launch/ascend.sh (it sources "
                "CANN's set_env.sh) or source /usr/local/Ascend/ascend-toolkit/set_env.sh first"
            )


def run_logged(cmd: NodeCommand, log_path: Path) -> int:
    """Run one node's command; its output goes to the terminal and to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"[launch] {cmd.shell()}", flush=True)
    env = {**os.environ, **cmd.env}
    with (
        open(log_path, "w") as log,
        subprocess.Popen(
            cmd.argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as proc,
        forwarding_signals(proc),
    ):
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
    return proc.returncode


@contextlib.contextmanager
def forwarding_signals(proc: subprocess.Popen):
    """While ``proc`` (torchrun) runs, SIGINT and SIGTERM sent to the launcher go to it (torchrun
    passes them to its ranks: Megatron's --exit-signal-handler saves on SIGTERM); the launcher
    keeps reading its output until it exits, and returns its exit status."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum, frame):
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def summarize_log(text: str, tokens_per_iteration: int | None) -> dict | None:
    """lm loss per logged iteration and the median steady-state speed (first two logs skipped:
    warm-up), from Megatron's training log; None when the log has no iteration line (only the
    last rank logs them)."""
    points = [(int(i), float(ms), float(loss)) for i, ms, loss in LOG_LINE.findall(text)]
    if not points:
        return None
    steady = [ms for _, ms, _ in points[2:]] or [points[-1][1]]
    ms = statistics.median(steady)
    out = {"loss": {i: loss for i, _, loss in points}, "ms_per_iteration": ms}
    if tokens_per_iteration:
        out["tokens_per_s"] = tokens_per_iteration / (ms / 1000)
    return out


# --------------------------------------------------------------------------------------------
# Ascend rank entry
# --------------------------------------------------------------------------------------------


def worker(argv: list[str]) -> None:
    """``--worker ENTRY ARGS``: one Ascend rank. torch_npu first, then the entry.

    ``transfer_to_npu`` must run before Megatron is imported: it redirects ``torch.cuda`` to
    ``torch.npu`` and the ``nccl`` backend name to ``hccl`` for the code that binds them at
    import (megatron.training's initialisation, memory reports, DDP)."""
    if not argv:
        sys.exit("usage: python -m megatron_locmoe.launch --worker ENTRY [ARGS...]")
    if "megatron" in sys.modules:
        sys.exit("megatron_locmoe.launch --worker: Megatron was imported before torch_npu")
    if importlib.util.find_spec("torch_npu") is None:
        sys.exit(
            "megatron_locmoe.launch --worker is the Ascend rank entry and needs torch_npu; "
            "install the torch-npu release matching torch and CANN"
        )
    import torch_npu  # noqa: F401  registers torch.npu and the hccl backend
    from torch_npu.contrib import transfer_to_npu  # noqa: F401

    entry, args = argv[0], argv[1:]
    if entry.endswith(".py"):
        from megatron_locmoe import run  # after torch_npu: it imports Megatron

        run.main([entry, *args])  # applies the adaptor (idempotent for a patched script)
    else:
        sys.argv = [entry, *args]
        runpy.run_module(entry, run_name="__main__", alter_sys=True)
