"""Fault drill (issue 18): every fault and bad input of "Fail loud, fast and together", through
the commands a user runs, each in a subprocess with a time limit; what the user sees, the exit
status and the wall time to fail.

    python tools/fault_drill.py --out benchmarks/results/fault_drill.json [--cases a,b] [--list]

Training cases run the launcher's ``cpu-sim`` preset shrunk to 2 simulated nodes x 1 CPU rank
(EP 2) on a small offline corpus built once in a scratch directory; tools run their CLIs.
Each case names what it expects: an error whose output contains a given text (exit status
non-zero), or a clean run (exit 0), plus case-specific checks (nothing left running after a
killed rank, the demo's refused --out left intact, no peer stopped after waiting for a failed
rank). A case that hangs is stopped at its limit and reported as such. The seconds are wall
time of the failing command (for the killed rank: from the kill to the launcher's exit), on
whatever machine runs it: on a shared machine they are upper bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ZERO_TOKEN_TESTS = ROOT / "tests" / "test_zero_tokens.py"
PY = sys.executable
LAUNCH = [PY, "-m", "megatron_locmoe.launch", "--config", "cpu-sim"]
SMALL = [  # 2 nodes x 1 rank, EP 2: the smallest multi-node layout of the preset
    "--nodes", "2", "--devices-per-node", "1",
    "--set", "expert-model-parallel-size=2", "--set", "global-batch-size=8",
]  # fmt: skip
NOISE = re.compile(
    r"UserWarning|warnings\.warn|cpp_extension\.py|^\s*$|FutureWarning|DeprecationWarning"
)
ERROR_LINE = re.compile(r"^[\w.-]+: error: ")
HEADLINE = re.compile(r"^[\w.]*(Error|Exception)\b: |^\S.*\b(failed|died) |^FAILED |^\d+ passed")


@dataclass
class Case:
    name: str
    what: str
    """The case as the issue lists it."""
    expect: str
    """Text the output must contain; '' for a case that must work (exit 0)."""
    command: Callable[[Path], list[str]]
    """The command, given the scratch directory (set up there as needed)."""
    timeout_s: float = 120.0
    during: Callable[[subprocess.Popen, Path], float | None] | None = None
    """Runs while the command runs (the killed rank); returns when the fault was made."""
    after: Callable[[Path], list[str]] | None = None
    """Problems found after the command (files deleted, processes left)."""
    cluster: bool = False
    """Starts the simulated cluster: no peer may be left waiting for the failed rank."""
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Set-ups
# --------------------------------------------------------------------------------------------


def corpus(work: Path) -> str:
    prefix = work / "pydoc"
    if not Path(f"{prefix}.idx").exists():
        from megatron_locmoe.sim.data import build_indexed_dataset

        build_indexed_dataset(prefix, max_stdlib_files=0)
    return str(prefix)


def train(work: Path, *sets: str, steps: int = 3) -> list[str]:
    argv = [*LAUNCH, *SMALL, "--runs-dir", str(work / "runs")]
    for s in (f"data-path={corpus(work)}", f"train-iters={steps}", *sets):
        argv += ["--set", s]
    return argv


def saved_checkpoint(work: Path) -> Path:
    """A checkpoint of 2 steps (saved once, by a run outside the timed case)."""
    ckpt = work / "ckpt"
    if not (ckpt / "latest_checkpointed_iteration.txt").exists():
        argv = train(work, f"save={ckpt}", "save-interval=2", steps=2)
        subprocess.run(argv, cwd=work, capture_output=True, timeout=300, check=True)
    return ckpt


def damaged_checkpoint(work: Path, how: str) -> Path:
    root = work / f"ckpt_{how}"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(saved_checkpoint(work), root)
    shard = sorted((root / "iter_0000002").glob("*.distcp"))[-1]
    raw = bytearray(shard.read_bytes())
    if how == "corrupted":  # 4 KiB overwritten in the middle, the size unchanged
        mid = len(raw) // 2
        raw[mid : mid + 4096] = os.urandom(4096)
    else:
        raw = raw[: len(raw) // 2]
    shard.write_bytes(bytes(raw))
    return root


def resume_from(how: str):
    def command(work: Path) -> list[str]:
        return train(work, f"load={damaged_checkpoint(work, how)}", steps=4)

    return command


def trained_two_steps(proc: subprocess.Popen, work: Path, poll_s: float) -> bool:
    """Wait (up to 240 s, while the launcher runs) until the cpu-sim run has logged two steps."""
    progress = work / "runs" / "cpu-sim" / "cpu-sim" / "progress.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if progress.exists() and len(progress.read_text().splitlines()) >= 2:
            return True
        time.sleep(poll_s)
    return False


def kill_rank_when_training(proc: subprocess.Popen, work: Path) -> float | None:
    """Kill rank 1 (SIGKILL) once the run has logged two steps; the time of the kill."""
    import psutil

    if not trained_two_steps(proc, work, 0.2):
        return None
    ranks = [
        p for p in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(p.cmdline())
    ]
    ranks.sort(key=lambda p: p.create_time())
    rank_pids = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
    (work / "kill_rank_pids.json").write_text(json.dumps(sorted(rank_pids)))
    ranks[-1].send_signal(signal.SIGKILL)
    return time.monotonic()


def signal_when_training(signum: int, every_process: bool):
    """Once the run has logged two steps, send ``signum`` to the launcher (Ctrl-C reaches only
    it: the ranks have their own process groups) or to every process of the job (as Slurm
    signals a job step); the time of the signal."""

    def during(proc: subprocess.Popen, work: Path) -> float | None:
        import psutil

        if not trained_two_steps(proc, work, 0.1):
            return None
        family = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
        (work / "kill_rank_pids.json").write_text(json.dumps(family))
        for pid in family if every_process else [proc.pid]:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
        return time.monotonic()

    return during


def signal_run(work: Path, *sets: str) -> list[str]:
    """A long run whose temp files go to a private TMPDIR (checked empty afterwards)."""
    tmp = work / "tmp_signal"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    shutil.rmtree(work / "runs" / "cpu-sim", ignore_errors=True)
    return ["env", f"TMPDIR={tmp}", *train(work, *sets, steps=400)]


def nothing_left_after_a_signal(work: Path) -> list[str]:
    problems = nothing_left_running(work)
    left = [p.name for p in (work / "tmp_signal").iterdir() if p.name.startswith("locmoe-")]
    return problems + ([f"temp directories left: {left}"] if left else [])


def final_checkpoint_written(work: Path) -> list[str]:
    tracker = work / "ckpt_signal" / "latest_checkpointed_iteration.txt"
    problems = nothing_left_after_a_signal(work)
    if not tracker.exists():
        return [*problems, "no final checkpoint"]
    step = tracker.read_text().strip()
    return (
        problems
        if (work / "ckpt_signal" / f"iter_{int(step):07d}").is_dir()
        else problems + [f"the tracker names {step} but its directory is missing"]
    )


def small_files(work: Path, *sets: str) -> list[str]:
    """A run whose processes may write files of at most 1 MiB (RLIMIT_FSIZE, inherited; the
    ignored SIGXFSZ too): a shard write fails with EFBIG, as a full disk fails with ENOSPC."""
    limit = "import os,resource,signal,sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
    limit += "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20)); "
    limit += "os.execv(sys.argv[1], sys.argv[1:])"
    shutil.rmtree(work / "ckpt_small", ignore_errors=True)
    run = train(work, f"save={work / 'ckpt_small'}", "save-interval=2")
    # eager (the same math): torch.compile's own cache files would hit the limit first
    return ["env", "TORCH_COMPILE_DISABLE=1", PY, "-c", limit, *run]


def no_partial_checkpoint(work: Path) -> list[str]:
    root = work / "ckpt_small"
    left = [p.name for p in root.iterdir()] if root.exists() else []
    return [f"left in the --save directory: {left}"] if left else []


def typed_run_dir(work: Path) -> Path:
    bad = work / "typed_run"
    bad.mkdir(exist_ok=True)
    (bad / "run.json").write_text('{"name": "hash", "topk": "two"}')
    return bad


def nothing_left_running(work: Path) -> list[str]:
    import psutil

    time.sleep(1.0)
    pids = json.loads((work / "kill_rank_pids.json").read_text())
    left = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    return [f"processes left running after the launcher exited: {left}"] if left else []


def hash_counts(work: Path, n: int | None) -> list[str]:
    import numpy as np

    path = work / ("no_such_counts.npy" if n is None else f"counts_{n}.npy")
    if n is not None:
        np.save(path, np.ones(n, dtype=np.int64))
    sets = ["moe-router-type=hash", f"locmoe-hash-token-counts={path}"]
    return train(work, *sets)


def damaged_corpus(how: str):
    def command(work: Path) -> list[str]:
        prefix = work / f"corpus_{how}"
        src = corpus(work)
        if how == "empty":
            for suffix in (".bin", ".idx"):
                Path(f"{prefix}{suffix}").write_bytes(b"")
        else:
            for suffix in (".bin", ".idx"):
                shutil.copy(f"{src}{suffix}", f"{prefix}{suffix}")
            with open(f"{prefix}.bin", "r+b") as f:
                f.truncate(f.seek(0, 2) // 2)
        return train(work, f"data-path={prefix}")

    return command


def bad_run_dir(work: Path) -> Path:
    bad = work / "bad_run"
    bad.mkdir(exist_ok=True)
    (bad / "run.json").write_text('{"name": "hash", "topk": 1, "num_exp')  # cut off mid-write
    return bad


def good_run_dir(work: Path) -> Path:
    """A run record and its TensorBoard events, as the cost-model tests write them."""
    runs = work / "good_runs"
    if not (runs / "hash" / "run.json").exists():
        from megatron_locmoe.analysis.synthetic import synthetic_run

        synthetic_run(runs, "hash", 1, False, inter_copies=0.5, intra_copies=0.375, local=0.5)
    return runs


def tool(name: str) -> list[str]:
    return [PY, "-m", f"megatron_locmoe.analysis.{name}"]


def report_on(run_dir: Callable[[Path], Path]):
    """The report on the run directory ``run_dir(work)`` sets up."""

    def command(work: Path) -> list[str]:
        return [*tool("report"), str(run_dir(work)), "-o", str(work / "report.html")]

    return command


def costmodel(*extra: str):
    def command(work: Path) -> list[str]:
        base = [*tool("costmodel"), "--cluster", "ascend-910a"]
        return [*base, "--traffic", str(good_run_dir(work)), *extra]

    return command


def corrupt_wandb_file(work: Path) -> list[str]:
    bad = work / "wandb_bad" / "run-x.wandb"
    bad.parent.mkdir(exist_ok=True)
    bad.write_bytes(b"\x00\x01 not a run file")
    dash = [*tool("dashboard"), "--entity", "e", "--project", "p"]
    return [*dash, "--check", str(bad.parent), "--dry-run"]


def non_utf8_script(work: Path) -> list[str]:
    checkout = work / "megatron_lm_latin1"
    checkout.mkdir(exist_ok=True)
    (checkout / "pretrain_gpt.py").write_bytes(
        '"""Pretrain GPT, by Jos\xe9."""\n'.encode("latin-1")
    )
    return [PY, "-m", "megatron_locmoe.patch_megatron_lm", str(checkout)]


def precious_dir(work: Path) -> list[str]:
    home = work / "home"
    home.mkdir(exist_ok=True)
    (home / "thesis.tex").write_text("years of work")
    return [PY, "-m", "megatron_locmoe.analysis.demo", "--out", str(home), "--steps", "2"]


def precious_dir_intact(work: Path) -> list[str]:
    f = work / "home" / "thesis.tex"
    return [] if f.exists() and f.read_text() == "years of work" else [f"{f} was deleted"]


def patched_script_untouched(work: Path) -> list[str]:
    f = work / "megatron_lm_latin1" / "pretrain_gpt.py"
    return [] if f.read_bytes().startswith(b'"""Pretrain GPT, by Jos\xe9') else [f"{f} changed"]


# --------------------------------------------------------------------------------------------
# The cases
# --------------------------------------------------------------------------------------------

NAN_LR = ["lr=1e30"]  # step 1's update makes the weights ~1e30: step 2 overflows to inf / NaN

CASES = [
    Case(
        "kill_rank",
        "a rank killed (SIGKILL) mid-training",
        "died",
        lambda w: train(w, steps=400),
        timeout_s=300,
        during=kill_rank_when_training,
        after=nothing_left_running,
        cluster=True,
    ),
    Case(
        "truncated_shard",
        "resume from a checkpoint whose last shard is truncated to half",
        "does not match its checksum",
        resume_from("truncated"),
        cluster=True,
    ),
    Case(
        "corrupted_shard",
        "resume from a checkpoint with 4 KiB of a shard overwritten (size unchanged)",
        "does not match its checksum",
        resume_from("corrupted"),
        cluster=True,
    ),
    Case(
        "zero_token_rank",
        "a rank with no tokens, every router x both dispatchers (tests/test_zero_tokens.py)",
        "",
        lambda w: [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ZERO_TOKEN_TESTS)],
        timeout_s=420,
    ),
    Case(
        "nan_router_input",
        "non-finite router input with --locmoe-check-router-input (lr 1e30, loss check off)",
        "router input tokens on rank",
        lambda w: train(
            w, *NAN_LR, "locmoe-check-router-input=true", "no-check-for-nan-in-loss-and-grad=true"
        ),
        cluster=True,
    ),
    Case(
        "nan_loss",
        "non-finite loss (lr 1e30; the loss check is on by default)",
        "the loss or a gradient is not finite",
        lambda w: train(w, *NAN_LR),
        cluster=True,
    ),
    Case(
        "topk_0",
        "--moe-router-topk 0",
        "error:",
        lambda w: train(w, "moe-router-topk=0"),
    ),
    Case(
        "nan_locality_coeff",
        "--locmoe-locality-loss-coeff nan",
        "error:",
        lambda w: train(w, "locmoe-locality-loss-coeff=nan"),
    ),
    Case(
        "inf_capacity_floor",
        "--locmoe-capacity-floor-factor inf",
        "error:",
        lambda w: train(w, "locmoe-capacity-floor-factor=inf"),
    ),
    Case(
        "hash_counts_missing",
        "hash router, --locmoe-hash-token-counts naming no file",
        "error:",
        lambda w: hash_counts(w, None),
    ),
    Case(
        "hash_counts_wrong_vocab",
        "hash router, a counts file with 1000 ids for a vocabulary of 257",
        "error:",
        lambda w: hash_counts(w, 1000),
    ),
    Case(
        "corpus_empty",
        "--data-path naming an empty .bin and .idx",
        "error:",
        damaged_corpus("empty"),
    ),
    Case(
        "corpus_truncated",
        "--data-path naming a .bin truncated to half",
        "error:",
        damaged_corpus("truncated"),
    ),
    Case(
        "save_without_interval",
        "--save without --save-interval (a bare assert in Megatron)",
        "AssertionError at",
        lambda w: train(w, f"save={w / 'never_written'}"),
    ),
    Case(
        "save_interval_0",
        "--save with --save-interval 0 (a bare assert in Megatron)",
        "AssertionError at",
        lambda w: train(w, f"save={w / 'never_written'}", "save-interval=0"),
    ),
    Case(
        "heads_not_dividing_hidden",
        "--num-attention-heads 5 with hidden 64 (a bare assert in Megatron)",
        "AssertionError at",
        lambda w: train(w, "num-attention-heads=5"),
    ),
    Case(
        "report_corrupt_run_json",
        "the report on a run directory whose run.json is cut off",
        "run.json is not a run record",
        report_on(bad_run_dir),
        timeout_s=60,
    ),
    Case(
        "costmodel_corrupt_run_json",
        "the cost model on a run directory whose run.json is cut off",
        "run.json is not a run record",
        lambda w: [*tool("costmodel"), "--nodes", "2", "--traffic", str(bad_run_dir(w))],
        timeout_s=60,
    ),
    Case(
        "dashboard_corrupt_run_file",
        "the dashboard's --check on a damaged W&B run file",
        "error:",
        corrupt_wandb_file,
        timeout_s=60,
    ),
    Case(
        "costmodel_nodes_0",
        "the cost model with --nodes 0",
        "--nodes 0",
        costmodel("--nodes", "0"),
        timeout_s=60,
    ),
    Case(
        "costmodel_unknown_baseline",
        "the cost model with --baseline naming none of the runs",
        "--baseline switch is none of the runs",
        costmodel("--baseline", "switch"),
        timeout_s=60,
    ),
    Case(
        "patch_non_utf8",
        "megatron-locmoe-patch on a Latin-1 pretrain_gpt.py",
        "is not UTF-8 text",
        non_utf8_script,
        timeout_s=60,
        after=patched_script_untouched,
    ),
    Case(
        "ctrl_c",
        "Ctrl-C (SIGINT to the launcher) mid-training, 2 nodes x 1 rank",
        "error: interrupted at step",
        lambda w: signal_run(w),
        timeout_s=300,
        during=signal_when_training(signal.SIGINT, every_process=False),
        after=nothing_left_after_a_signal,
        cluster=True,
    ),
    Case(
        "sigterm_every_process_save",
        "SIGTERM to every process of the job (Slurm) with --save and --exit-signal-handler",
        "error: terminated at step",
        lambda w: signal_run(
            w, f"save={w / 'ckpt_signal'}", "save-interval=1000", "exit-signal-handler=true"
        ),
        timeout_s=300,
        during=signal_when_training(signal.SIGTERM, every_process=True),
        after=final_checkpoint_written,
        cluster=True,
    ),
    Case(
        "save_file_too_large",
        "a shard write fails (files limited to 1 MiB: EFBIG, as a full disk's ENOSPC)",
        "was not saved and its partial directory was removed",
        small_files,
        after=no_partial_checkpoint,
        cluster=True,
    ),
    Case(
        "load_missing_dir",
        "--load naming a directory that does not exist",
        "no such directory",
        lambda w: train(w, f"load={w / 'no_such_ckpt'}"),
    ),
    Case(
        "no_save_optim",
        "--no-save-optim (a checkpoint flag the CPU loop does not honour)",
        "--no-save-optim: the CPU loop saves torch_dist synchronously",
        lambda w: train(w, f"save={w / 'never_written'}", "save-interval=2", "no-save-optim=true"),
    ),
    Case(
        "demo_experts_7",
        "the demo with --set num-experts=7 (EP 8)",
        "7 experts do not split over EP 8",
        lambda w: [*tool("demo"), "--set", "num-experts=7", "--out", str(w / "demo_x")],
        timeout_s=60,
    ),
    Case(
        "report_wrong_typed_field",
        "the report on a run.json whose topk is a string",
        "its field 'topk' is 'two' (str), not int",
        report_on(typed_run_dir),
        timeout_s=60,
    ),
    Case(
        "demo_out_existing_dir",
        "the demo with --out an existing directory it did not write",
        "was not written by the demo",
        precious_dir,
        timeout_s=60,
        after=precious_dir_intact,
    ),
]


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def user_sees(text: str, expect: str) -> list[str]:
    """The line(s) a user reads: the tool's ``error:`` line(s) where there are any, else the
    headlines (an exception's last line, a failed / died line, pytest's summary); warnings
    left out."""
    lines = [ln.rstrip() for ln in text.splitlines() if not NOISE.search(ln)]
    errors = [ln for ln in lines if ERROR_LINE.search(ln)]
    heads = errors or [ln for ln in lines if HEADLINE.search(ln)]
    if expect and not any(expect in ln for ln in heads):
        heads += [ln for ln in lines if expect in ln][:1]
    out = list(dict.fromkeys(ln[:400] for ln in heads))
    return out[:2] or lines[-2:]


def run_case(case: Case, work: Path) -> dict:
    argv = case.command(work)
    paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    out_path = work / f"{case.name}.out"
    started = time.monotonic()
    fault_at = None
    with open(out_path, "w") as out:
        proc = subprocess.Popen(
            argv, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        if case.during is not None:
            fault_at = case.during(proc, work)
        try:
            rc = proc.wait(timeout=max(1.0, case.timeout_s - (time.monotonic() - started)))
            hung = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc, hung = proc.wait(), True
    ended = time.monotonic()
    text = out_path.read_text(errors="replace")
    problems = []
    if hung:
        problems.append(f"no exit within {case.timeout_s:.0f} s (stopped)")
    if case.during is not None and fault_at is None:
        problems.append("the fault could not be made (the run never logged two steps)")
    if case.expect:
        if rc == 0:
            problems.append("exit status 0: the fault was not reported")
        if case.expect not in text:
            problems.append(f"the output lacks {case.expect!r}")
    elif rc != 0:
        problems.append(f"exit status {rc}: should have worked")
    if case.cluster and "were stopped" in text and case.name != "kill_rank":
        problems.append("a healthy rank was left waiting and had to be stopped")
    if case.cluster and ("no answer within" in text or "Timed out" in text):
        problems.append("a rank waited out a timeout")
    if case.after is not None:
        problems += case.after(work)
    clean = [ln for ln in text.splitlines() if not NOISE.search(ln)]
    return dict(
        case=case.name,
        what=case.what,
        command=shlex.join(["python", *argv[1:]]).replace(str(work), "$SCRATCH"),
        exit_status=rc,
        user_sees=[ln.replace(str(work), "$SCRATCH") for ln in user_sees(text, case.expect)],
        traceback_shown="Traceback (most recent call last)" in text,
        seconds=round(ended - (fault_at or started), 1),
        seconds_from="the fault (kill or signal)" if fault_at else "the command's start",
        ok=not problems,
        problems=problems,
        output_tail=[ln.replace(str(work), "$SCRATCH") for ln in clean[-12:]],
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/fault_drill.json")
    p.add_argument("--cases", help="comma-separated subset (default: all)")
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = p.parse_args(argv)
    if args.list:
        for c in CASES:
            print(f"{c.name:28s} {c.what}")
        return 0
    chosen = args.cases.split(",") if args.cases else [c.name for c in CASES]
    unknown = set(chosen) - {c.name for c in CASES}
    if unknown:
        p.error(f"unknown cases {sorted(unknown)}; --list shows them")
    sys.path.insert(0, str(ROOT))
    warnings.filterwarnings("ignore")  # the set-ups' imports (Megatron's "not installed" notes)
    work = Path(tempfile.mkdtemp(prefix="locmoe-fault-drill-"))
    results, t0 = [], time.monotonic()
    try:
        for case in (c for c in CASES if c.name in chosen):
            r = run_case(case, work)
            results.append(r)
            status = "ok " if r["ok"] else "BAD"
            print(f"{status} {r['case']:28s} exit {r['exit_status']:3d} {r['seconds']:6.1f} s  "
                  f"{(r['user_sees'] or [''])[0][:110]}", flush=True)  # fmt: skip
            for problem in r["problems"]:
                print(f"      problem: {problem}", flush=True)
    finally:
        if args.keep:
            print(f"scratch kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    record = dict(
        machine=dict(cpus=os.cpu_count(), load_average_at_end=list(os.getloadavg())),
        total_seconds=round(time.monotonic() - t0, 1),
        cases=results,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"{sum(r['ok'] for r in results)} of {len(results)} cases as expected; {out}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
