"""The launcher's GPU path hands SIGINT / SIGTERM to torchrun (``launch.torchrun.run_logged`` with
``forwarding_signals``): a child that stands in for torchrun (it traps the signal, as torchrun
passes it to its ranks) gets the launcher's signal, and the launcher returns its exit status
once it has ended. No GPU needed: what is tested is the forwarding, not torchrun."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from megatron_locmoe.launch.plan import NodeCommand
from megatron_locmoe.launch.torchrun import run_logged

CHILD = """
import signal, sys, time
from pathlib import Path
def stop(signum, frame):
    print(f"child got {signum}", flush=True)
    sys.exit(128 + signum)
signal.signal(signal.SIGINT, stop)
signal.signal(signal.SIGTERM, stop)
Path(sys.argv[1]).write_text("ready")
time.sleep(60)
print("child was never signalled", flush=True)
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_the_launcher_hands_its_signal_to_torchrun(tmp_path, signum):
    ready, done, lock = tmp_path / "ready", threading.Event(), threading.Lock()

    def forwarding() -> bool:  # the launcher's handler is the one installed (not pytest's,
        # nor an idle SimCluster's of this session, which would keep the signal)
        return getattr(signal.getsignal(signum), "__qualname__", "").startswith(
            "forwarding_signals"
        )

    def signal_when_ready():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not done.is_set():
            if ready.exists() and forwarding():
                break
            time.sleep(0.02)
        with lock:  # never after run_logged returned: it would land on the test process
            if not done.is_set() and ready.exists() and forwarding():
                os.kill(os.getpid(), signum)

    thread = threading.Thread(target=signal_when_ready, daemon=True)
    cmd = NodeCommand(0, {}, [sys.executable, "-c", CHILD, str(ready)])
    thread.start()
    try:
        status = run_logged(cmd, tmp_path / "node0.log")
    finally:
        with lock:
            done.set()
        thread.join()
    log = Path(tmp_path / "node0.log").read_text()
    assert f"child got {int(signum)}" in log, log
    assert status == 128 + signum  # ended by the signal, not by the child's 60 s sleep
    assert "never signalled" not in log
