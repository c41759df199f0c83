"""Stopping cleanly and saying so (issue 35): real signals to real processes.

SIGINT / SIGTERM to the driver (this test process, whose SimCluster handles them) or to every
process at once (as Slurm signals a job step) stop every rank at one step boundary; with
--exit-signal-handler a final checkpoint is written first and a resume from it trains the
uninterrupted run's losses; nothing is left running. A failed save names its OS error and file
and leaves no partial checkpoint. The launcher's end of it (exit status, one error line, no
temp directory): the last test.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from megatron_locmoe.sim.cluster import ClusterJobError, Interrupted, ParallelLayout
from megatron_locmoe.sim.trainer import TrainSettings, train_job
from tests.tiny_settings import tiny_settings

LAYOUT = ParallelLayout(devices_per_node=1, ep=2)
ROOT = Path(__file__).resolve().parent.parent


def _settings(corpus, tmp_path, **kw) -> TrainSettings:
    return tiny_settings(
        corpus,
        LAYOUT,
        steps=60,  # the same for every run: the dataset's sample order depends on it
        progress_path=str(tmp_path / "progress.jsonl"),
        **kw,
    )


def _signal_after(progress: Path, steps: int, pids, done: threading.Event, lock: threading.Lock):
    """Send SIGNAL to ``pids()`` once ``steps`` steps are logged (from a thread; the driver's
    handler runs in the main thread, which waits on the job) - never once the job is over
    (``done``): a late signal would land on whatever the test process runs next."""

    def go(signum):
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not done.is_set():
            if progress.exists() and len(progress.read_text().splitlines()) >= steps:
                break
            time.sleep(0.05)
        with lock:
            if done.is_set():
                return
            for pid in pids():
                os.kill(pid, signum)

    return go


def _run_interrupted(cluster, settings, signum, pids):
    done, lock = threading.Event(), threading.Lock()
    go = _signal_after(Path(settings.progress_path), 2, pids, done, lock)
    thread = threading.Thread(target=go, args=(signum,), daemon=True)
    thread.start()
    start = time.monotonic()
    try:
        with pytest.raises(Interrupted) as e:
            cluster.run(train_job, settings, layout=LAYOUT)
    finally:  # however the job ended, no signal after it
        with lock:
            done.set()
        thread.join()
    return e.value, time.monotonic() - start


def _rank_of(ctx) -> int:
    time.sleep(9.0)  # longer than the stop grace (8 s): a stale signal would interrupt it
    return ctx.rank


def _rank_pids(cluster) -> list[int]:
    return [p.pid for p in cluster._procs]


@pytest.mark.slow
def test_ctrl_c_stops_every_rank_at_one_step_boundary(cluster_factory, corpus, tmp_path):
    """SIGINT to the driver only (the terminal's Ctrl-C; ranks are in their own process groups):
    forwarded to every rank, which stop together at the next step, without a checkpoint (SIGINT
    is not --exit-signal); the cluster stays usable."""
    cluster = cluster_factory(2)
    idle = cluster_factory(1).start()  # another live cluster of this process, between jobs
    settings = _settings(corpus, tmp_path, save_dir=str(tmp_path / "ckpt"), save_interval=100)
    settings.exit_signal_handler = True
    stop, _ = _run_interrupted(cluster, settings, signal.SIGINT, lambda: [os.getpid()])
    # the signal was the running job's: the idle cluster's next job runs (it was interrupted
    # once the grace ran out, the full suite's next test with it)
    assert idle.run(_rank_of, layout=ParallelLayout(devices_per_node=1)) == [0]
    logged = len(Path(settings.progress_path).read_text().splitlines())
    assert stop.signum == signal.SIGINT and stop.exit_status == 130
    assert stop.step == logged < settings.steps  # stopped where the last logged step ended
    assert str(stop).startswith(f"interrupted at step {logged} (SIGINT)")
    assert stop.saved is None and not (tmp_path / "ckpt").exists()
    assert all(psutil.Process(pid).is_running() for pid in _rank_pids(cluster))
    settings.steps, settings.save_dir = 1, None
    assert cluster.run(train_job, settings, layout=LAYOUT)[0]["losses"]  # still usable


def test_sigterm_to_every_process_saves_and_the_resume_equals_the_uninterrupted_run(
    cluster_factory, corpus, tmp_path
):
    """SIGTERM to the driver and every rank at once (a scheduler's time limit): every rank stops
    at one step, writes a checkpoint of that step first (--exit-signal-handler), and no rank has
    a process of its own left (before, each rank's checkpoint writer, a Manager process, stayed
    alive after its rank). Resumed, the run trains the uninterrupted run's losses exactly."""
    cluster = cluster_factory(2)
    ckpt = tmp_path / "ckpt"
    settings = _settings(corpus, tmp_path, save_dir=str(ckpt), save_interval=100)
    settings.exit_signal_handler = True

    def everyone():
        return [os.getpid(), *_rank_pids(cluster)]

    stop, _ = _run_interrupted(cluster, settings, signal.SIGTERM, everyone)
    step = stop.step
    assert stop.signum == signal.SIGTERM and stop.exit_status == 143
    assert str(stop).startswith(f"terminated at step {step} (SIGTERM); checkpoint ")
    assert stop.saved == str(ckpt / f"iter_{step:07d}")
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == str(step)
    for pid in _rank_pids(cluster):  # no checkpoint writer (or anything else) left per rank
        assert psutil.Process(pid).children(recursive=True) == []

    reference = _settings(corpus, tmp_path, exit_interval=step + 2)
    reference.progress_path = None
    expected = cluster.run(train_job, reference, layout=LAYOUT)[0]["losses"][step:]
    resumed = _settings(corpus, tmp_path, load_dir=str(ckpt), exit_interval=step + 2)
    resumed.progress_path = None
    out = cluster.run(train_job, resumed, layout=LAYOUT)[0]
    assert out["first_step"] == step + 1
    assert out["losses"] == expected


def test_load_without_optimizer_state_or_rng(cluster_factory, corpus, tmp_path):
    """--no-load-optim resumes with fresh Adam moments (the second step after the resume then
    differs from a full resume; the first, computed before any update, does not);
    --no-load-rng loads everything else."""
    cluster = cluster_factory(2)
    ckpt = tmp_path / "ckpt"
    first = _settings(corpus, tmp_path, save_dir=str(ckpt), save_interval=2, exit_interval=2)
    first.progress_path = None
    cluster.run(train_job, first, layout=LAYOUT)
    runs = {}
    for name, optim, rng in (
        ("full", True, True),
        ("no_optim", False, True),
        ("no_rng", True, False),
    ):
        s = _settings(corpus, tmp_path, load_dir=str(ckpt), exit_interval=4)
        s.progress_path, s.load_optim, s.load_rng = None, optim, rng
        runs[name] = cluster.run(train_job, s, layout=LAYOUT)[0]["losses"]
    assert runs["no_optim"][0] == runs["full"][0]
    assert runs["no_optim"][1] != runs["full"][1]
    assert runs["no_rng"] == runs["full"]  # no dropout: the RNGs change nothing here


def limited_file_size_job(ctx, settings, rank, limit):
    """train_job with files of at most ``limit`` bytes on ``rank`` (RLIMIT_FSIZE; SIGXFSZ
    ignored, so a write past it fails with EFBIG as a full disk fails with ENOSPC)."""
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    if ctx.rank == rank:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old[1]))
    try:
        return train_job(ctx, settings)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, previous)


def test_a_failed_save_names_the_os_error_and_its_file_and_leaves_no_partial_checkpoint(
    cluster_factory, corpus, tmp_path
):
    """Before: 'Worker failure ... error: <class 'OSError'>' and a half-written iter_0000004."""
    cluster = cluster_factory(2)
    ckpt = tmp_path / "ckpt"
    settings = _settings(corpus, tmp_path, save_dir=str(ckpt), save_interval=2, exit_interval=4)
    settings.progress_path = None
    cluster.run(train_job, settings, layout=LAYOUT)  # iterations 2 and 4
    (ckpt / "latest_checkpointed_iteration.txt").write_text("2")
    import shutil

    shutil.rmtree(ckpt / "iter_0000004")
    settings.load_dir, settings.exit_interval = str(ckpt), 4
    with pytest.raises(ClusterJobError) as e:
        cluster.run(limited_file_size_job, settings, 1, 20_000, layout=LAYOUT)
    shard = ckpt / "iter_0000004" / "__1_0.distcp"
    assert e.value.headline == (
        f"rank 0: RuntimeError: File too large: {shard} (rank 1): checkpoint iter_0000004 was "
        f"not saved and its partial directory was removed; the last complete checkpoint under "
        f"{ckpt}: iteration 2. Free space or give another --save directory"
    )
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "iter_0000002",
        "latest_checkpointed_iteration.txt",
    ]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "2"


@pytest.mark.slow
def test_the_launcher_ends_on_ctrl_c_at_the_next_step_with_one_line_and_status_130(
    corpus, tmp_path
):
    """Through the launcher (2 simulated nodes x 1 rank): SIGINT once training runs; the job is
    gone within 10 s with `error: interrupted at step N`, exit status 130, no process of its
    left and no temp directory of the cluster's in a private TMPDIR."""
    runs, tmp = tmp_path / "runs", tmp_path / "tmp"
    tmp.mkdir()
    progress = runs / "cpu-sim" / "cpu-sim" / "progress.jsonl"
    cmd = [
        sys.executable, "-m", "megatron_locmoe.launch", "--config", "cpu-sim",
        "--nodes", "2", "--devices-per-node", "1", "--runs-dir", str(runs),
        "--set", "expert-model-parallel-size=2", "--set", "global-batch-size=8",
        "--set", f"data-path={corpus}", "--set", "train-iters=500",
    ]  # fmt: skip
    env = {**os.environ, "TMPDIR": str(tmp)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (progress.exists() and len(progress.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.1)
    family = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
    logged = len(progress.read_text().splitlines())
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)  # a hang guard; the seconds are the fault drill's
    errors = [line for line in err.splitlines() if "error:" in line]
    assert proc.returncode == 130, err[-3000:]
    assert len(errors) == 1 and errors[0].startswith(
        "megatron_locmoe.launch: error: interrupted at step "
    ), errors
    stopped = int(re.search(r"interrupted at step (\d+)", errors[0]).group(1))
    assert logged <= stopped <= logged + 1  # the next step boundary (was: 218 more steps)
    time.sleep(0.5)
    left = [p for p in family if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert left == []
    # the cluster's scratch and logs (torch's own caches, e.g. torchinductor_USER, stay by design)
    assert [p.name for p in tmp.iterdir() if p.name.startswith("locmoe-")] == []


def _cpu_plan(tmp_path, *sets):
    from megatron_locmoe.launch.plan import Options, build_plan

    base = ["train-iters=4"]  # the preset's own corpus: only parsed here, never built
    return build_plan(Options(config="cpu-sim", sets=[*base, *sets], runs_dir=str(tmp_path)))


REFUSED = [
    (["no-save-optim=true"], "--no-save-optim: the CPU loop saves torch_dist synchronously"),
    (["async-save=true", "use-persistent-ckpt-worker=true"], "--async-save: the CPU loop saves"),
    (["ckpt-format=torch"], "--ckpt-format torch: the CPU loop writes torch_dist"),
    (["exit-signal-handler-for-dataloader=true"], "has no data-loader workers; drop it"),
    (["load={tmp}/typo"], "--load {tmp}/typo: no such directory; point it at a checkpoint"),
    (["load={tmp}", "finetune=true"], "--load {tmp}: no checkpoint there to take the model"),
    (["load={tmp}", "exit-on-missing-checkpoint=true"], "--exit-on-missing-checkpoint is set"),
    (["pretrained-checkpoint={tmp}"], "--pretrained-checkpoint {tmp}: no checkpoint there"),
]  # fmt: skip


@pytest.mark.parametrize("sets, message", REFUSED, ids=[m[:28] for _, m in REFUSED])
def test_checkpoint_flags_the_cpu_loop_cannot_honour_are_refused(tmp_path, sets, message):
    """Before, --no-load-optim, --finetune, --exit-signal-handler were accepted and ignored,
    and a --load naming nothing started from step 1 without a word."""
    from megatron_locmoe.launch.presets import PresetError

    with pytest.raises(PresetError) as e:
        _cpu_plan(tmp_path, *(s.format(tmp=tmp_path) for s in sets))
    assert message.format(tmp=tmp_path) in str(e.value)


def test_checkpoint_flags_the_cpu_loop_honours_reach_it(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "latest_checkpointed_iteration.txt").write_text("2")
    (tmp_path / "ck" / "iter_0000002").mkdir()
    sets = ["load={t}/ck", "no-load-optim=true", "no-load-rng=true", "ckpt-step=2"]
    sets += ["save={t}/new", "save-interval=2", "exit-signal-handler=true"]
    settings, _ = _cpu_plan(tmp_path, *(s.format(t=tmp_path) for s in sets)).runs[0].cpu_loop
    assert (settings.load_dir, settings.load_optim, settings.load_rng) == (
        f"{tmp_path}/ck",
        False,
        False,
    )
    assert settings.load_iteration == 2 and settings.exit_signal_handler
    assert settings.exit_signal == signal.SIGTERM
    settings, _ = _cpu_plan(tmp_path, f"load={tmp_path}/ck", "finetune=true").runs[0].cpu_loop
    assert (settings.load_dir, settings.init_weights_dir) == (None, f"{tmp_path}/ck")
    # the resume-or-start idiom: --load naming the (not yet written) --save directory
    plan = _cpu_plan(tmp_path, f"load={tmp_path}/new", f"save={tmp_path}/new", "save-interval=2")
    assert plan.runs[0].cpu_loop[0].load_dir == f"{tmp_path}/new"
