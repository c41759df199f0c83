"""A simulated multi-node cluster on one machine: CPU processes on gloo, reused across jobs.

With ``device="cuda"`` the same jobs run one process per GPU on NCCL (deterministic algorithms
on, so bitwise comparisons stay meaningful); the simulated node size stays a job setting.

Starting a rank costs ~12 s (torch + Megatron-Core imports), so a SimCluster starts its
processes once and then runs many *jobs* on them. CPU ranks are forked from a rank server
(multiprocessing's forkserver) that made those imports once, as a rank makes them (see
``_rank_context``): a cluster's start, and its restart after a failed job, then take about a
second instead of every rank importing them anew. Each job re-initialises Megatron's parallel
state with its own layout (TP/PP/EP/ETP/CP and the simulated devices per node), runs a function
on every rank and returns the per-rank results.

No hangs: every collective has a timeout (gloo raises after ``collective_timeout_s``), a job
that does not answer within ``job_timeout_s`` gets its ranks' Python stacks dumped
(faulthandler) and the cluster killed, and any rank's failure is raised with that rank's
traceback first. Ranks still silent ``fail_grace_s`` after a rank failed (waiting for it in a
collective) are stopped then, not after their collective timeout. After a failure the
processes are restarted for the next job (a timed-out gloo group cannot be reused).

Ranks are ordinary (non-daemon) processes, because Megatron's torch_dist checkpoint writer
starts a multiprocessing Manager, which daemon processes may not do (the CPU loop's synchronous
saves do without it: see the adaptor's ``filesystem_async._results_queue`` patch). A rank
therefore runs in a process group of its own and watches its parent: when the driver dies the
rank kills its group (itself and whatever it started), and the driver kills every rank's group
when it stops the cluster or exits, so nothing is left orphaned.

Stopping (Ctrl-C, SIGTERM): since the ranks have their own process groups, the terminal's
SIGINT reaches only the driver. The driver's handler forwards SIGINT / SIGTERM to every rank at
once; a rank only notes it (``stop_signal``), and a job that checks it at its step boundaries
(the CPU trainer: every rank agrees in one all-reduce, so all stop at the same step) raises
``StopRequested``. The driver then raises ``Interrupted`` (a KeyboardInterrupt) naming the
signal and the step; ranks that have not answered ``stop_grace_s`` after the signal are
killed. A second signal kills the ranks at once. Ranks that receive the signal themselves (a
scheduler signalling every process of a job step) behave the same.
"""

from __future__ import annotations

import atexit
import faulthandler
import os
import queue
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp


@dataclass(frozen=True)
class ParallelLayout:
    """Megatron parallel sizes of one job plus the simulated node size."""

    devices_per_node: int
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int | None = None
    cp: int = 1
    order: str = "tp-cp-ep-dp-pp"
    vp: int | None = None
    """Virtual pipeline stages (model chunks) per pipeline rank; None: one chunk, no
    interleaving (Megatron's --num-virtual-stages-per-pipeline-rank)."""

    def describe(self) -> str:
        etp = self.etp if self.etp is not None else self.tp
        vp = f" vp{self.vp}" if self.vp is not None else ""
        return (
            f"{self.devices_per_node}/node tp{self.tp} cp{self.cp} ep{self.ep} etp{etp} "
            f"pp{self.pp}{vp}"
        )


@dataclass
class RankContext:
    """What a job function gets on every rank."""

    rank: int
    world_size: int
    layout: ParallelLayout
    timeout: timedelta
    scratch: Path
    """A directory shared by all ranks of the cluster (files, checkpoints)."""
    device: torch.device = torch.device("cpu")
    """Where this rank's tensors and modules live (``cpu``, or its GPU)."""

    @property
    def devices_per_node(self) -> int:
        return self.layout.devices_per_node

    def topology(self):
        from megatron_locmoe.topology import get_topology

        return get_topology(self.devices_per_node, timeout=self.timeout)


class Interrupted(KeyboardInterrupt):
    """The driver received SIGINT or SIGTERM: the job's ranks stopped (at ``step``, the last
    step they completed, when the job reported one) or were killed. ``saved``: the checkpoint
    the job wrote before stopping, if any. ``exit_status``: the shell's 128 + signal."""

    def __init__(self, signum: int, step: int | None = None, saved: str | None = None):
        self.signum, self.step, self.saved = signum, step, saved
        what = "interrupted" if signum == signal.SIGINT else "terminated"
        where = f" at step {step}" if step is not None else ""
        text = f"{what}{where} ({signal.Signals(signum).name})"
        if saved:
            text += f"; checkpoint {saved} written first: resume with --load {Path(saved).parent}"
        super().__init__(text)

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class StopRequested(Exception):  # noqa: N818 - a request, not an error
    """Raised by a job on every rank when it stopped at a step boundary on a signal
    (``stop_signal``): ``step`` the last step completed, ``saved`` a checkpoint written first."""

    def __init__(self, signum: int, step: int, saved: str | None = None):
        super().__init__(signum, step, saved)
        self.signum, self.step, self.saved = signum, step, saved


class ClusterJobError(RuntimeError):
    """A job failed or hung on one or more ranks; the message holds each rank's traceback,
    ``headline`` the root cause in one line (a dead rank, else the first failing rank's
    exception, else the timeout) for a command line to end with."""

    def __init__(self, message: str, headline: str | None = None):
        super().__init__(message)
        self.headline = headline or message.strip().splitlines()[0]


# --------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------


_STOP_SIGNAL = 0
"""The first SIGINT / SIGTERM this rank received during its current job (0: none)."""


def _note_stop_signal(signum, frame) -> None:
    global _STOP_SIGNAL
    _STOP_SIGNAL = _STOP_SIGNAL or signum


def stop_signal() -> int:
    """The signal (SIGINT, SIGTERM) asking this rank to stop, or 0: a job reads it at its step
    boundaries (and must agree on it with its peers, who may not have received it yet)."""
    return _STOP_SIGNAL


def _destroy_subgroups(dist) -> None:
    """Destroy every process group but the world: Megatron's destroy_model_parallel only drops
    its references, and gloo groups left alive keep threads and sockets: late in a full
    `make test` the topology jobs took about a minute each instead of a few seconds."""
    world = dist.group.WORLD
    for group in list(dist.distributed_c10d._world.pg_map):
        if group is not world:
            dist.destroy_process_group(group)


def _exit_with_parent() -> None:
    """Exit this rank, with every process it started, when the driver is gone (ranks are not
    daemons, and what they start, such as the checkpoint writer's Manager, is not either)."""
    from multiprocessing.connection import wait

    parent = mp.parent_process()
    if parent is None:
        return

    def watch() -> None:
        wait([parent.sentinel])
        os.killpg(0, signal.SIGKILL)  # this rank's process group: the rank and its children

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def _kill_groups(procs) -> None:
    """SIGKILL every rank's process group: the rank and what it started (a rank that has
    exited may have left children in it). A rank still in start-up has no group yet."""
    for p in procs:
        if p.pid is None:
            continue
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):  # no group (yet), or already gone
            if p.is_alive():
                p.kill()


def _worker_main(
    rank, world_size, port, jobs, results, timeout_s, scratch, log_path, device, env=None
):
    if _FORKED:  # from the rank server: the driver's environment now, numpy's seed anew
        for key, value in (env or {}).items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _reseed_after_fork()
    log = open(log_path, "w", buffering=1)  # noqa: SIM115 - lives as long as the process
    if not os.environ.get("LOCMOE_SIMCLUSTER_VERBOSE"):
        # ranks' prints and warnings go to their log; failures come back with tracebacks
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    faulthandler.register(signal.SIGUSR1, file=log, all_threads=True)
    os.setpgid(0, 0)  # a group of its own, so the rank goes with everything it started
    _exit_with_parent()
    for sig in (signal.SIGINT, signal.SIGTERM):  # noted; the job stops at a step boundary
        signal.signal(sig, _note_stop_signal)
    import torch.distributed as dist

    from megatron_locmoe.device import BACKEND_FOR_DEVICE, DeviceChoice

    os.environ["LOCMOE_DEVICE"] = device
    choice = DeviceChoice(device, BACKEND_FOR_DEVICE[device])
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        torch.set_num_threads(1)  # several ranks share few cores
        rank_device = choice.torch_device()
    else:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)  # e.g. unpermute then sums with index_add
        accel = getattr(torch, device)
        rank_device = choice.torch_device(rank % accel.device_count())
        accel.set_device(rank_device)
    timeout = timedelta(seconds=timeout_s)
    try:
        dist.init_process_group(
            choice.backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timeout,
        )
        from megatron.core import parallel_state, tensor_parallel
        from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        from megatron_locmoe import adaptor
        from megatron_locmoe.metrics import install_metrics_tracker
        from megatron_locmoe.topology import destroy_topology

        adaptor.apply()
    except BaseException:
        results.put((rank, -1, False, traceback.format_exc()))
        return
    results.put((rank, -1, True, None))

    while True:
        job = jobs.get()
        if job is None:
            break
        job_id, fn, args, kwargs, layout, seed = job
        global _STOP_SIGNAL
        _STOP_SIGNAL = 0  # a signal before this job was the last job's (the driver stopped it)
        try:
            destroy_topology()
            parallel_state.destroy_model_parallel()
            _destroy_subgroups(dist)
            destroy_moe_metrics_tracker()  # entries are sized by the last job's layer count
            install_metrics_tracker()
            # the aux-loss scale a job's backward outside Megatron's schedules created (0-d)
            # would clash with the schedules' set_loss_scale (shape [1]) in the next job
            MoEAuxLossAutoScaler.main_loss_backward_scale = None
            parallel_state.initialize_model_parallel(
                tensor_model_parallel_size=layout.tp,
                pipeline_model_parallel_size=layout.pp,
                virtual_pipeline_model_parallel_size=layout.vp,
                context_parallel_size=layout.cp,
                expert_model_parallel_size=layout.ep,
                expert_tensor_parallel_size=layout.etp,
                order=layout.order,
                distributed_timeout_minutes=max(1, round(timeout_s / 60)),
                create_gloo_process_groups=False,
            )
            torch.manual_seed(seed)
            tensor_parallel.model_parallel_cuda_manual_seed(seed)  # as initialize_megatron does
            ctx = RankContext(rank, world_size, layout, timeout, Path(scratch), rank_device)
            out = fn(ctx, *args, **kwargs)
            results.put((rank, job_id, True, out))
        except StopRequested as stop:
            results.put((rank, job_id, "stopped", (stop.signum, stop.step, stop.saved)))
        except BaseException:
            results.put((rank, job_id, False, traceback.format_exc()))
    destroy_topology()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Rank start-up: CPU ranks fork from a server that made a rank's imports once
# --------------------------------------------------------------------------------------------

_RANK_SERVER_MARK = "LOCMOE_SIMCLUSTER_RANK_SERVER"
"""Set (to "1") in the environment of the rank server's start only: this module, preloaded
there, then makes the ranks' imports (``_preload_rank_imports``)."""
_RANK_SERVER_LOCK = threading.Lock()
_RANK_SERVER: dict[str, Any] = {}
"""The rank server this process started: its ``pid`` and the ``env`` it started with."""
_RANK_SERVER_IMPORT_TIMEOUT_S = 300
_VOLATILE_ENV = ("PYTEST_CURRENT_TEST",)
"""Variables that change under a running process and that no import reads (pytest rewrites
this one for every test phase): a forked rank takes the driver's values at its start."""
_FORKED = False
"""True in the rank server, hence in every rank forked from it."""


def _preload_rank_imports() -> None:
    """In the rank server: import what a CPU rank imports before its first job, in
    ``_worker_main``'s order and environment (``LOCMOE_DEVICE=cpu``, no CUDA device), so that
    ranks forked from here hold the same modules a spawned rank imports itself. What comes
    after (the adaptor's patches, the jobs' imports) stays in the rank. The imports' prints
    and warnings go nowhere (a spawned rank's went to its log); the environment is restored
    afterwards (a rank sets those variables itself). SIGTERM is ignored here, so a signal to
    every process of a job step leaves the ranks to stop at a step boundary (the server's
    death would read as every rank's); SIGINT the forkserver ignores itself."""
    global _FORKED
    _FORKED = True
    os.environ.pop(_RANK_SERVER_MARK, None)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    quiet = not os.environ.get("LOCMOE_SIMCLUSTER_VERBOSE")
    saved = {k: os.environ.get(k) for k in ("LOCMOE_DEVICE", "CUDA_VISIBLE_DEVICES")}
    fds = [os.dup(1), os.dup(2)]
    if quiet:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.close(devnull)
    signal.alarm(_RANK_SERVER_IMPORT_TIMEOUT_S)  # a hung import ends the server: ranks fail
    try:
        import torch.distributed  # noqa: F401

        import megatron_locmoe.device  # noqa: F401

        os.environ["LOCMOE_DEVICE"] = "cpu"
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        import megatron.core.parallel_state  # noqa: F401
        import megatron.core.tensor_parallel  # noqa: F401
        import megatron.core.transformer.moe.moe_logging  # noqa: F401
        import megatron.core.transformer.moe.moe_utils  # noqa: F401
    except BaseException:  # noqa: S110 - a rank makes (and reports) any failing import itself
        pass
    finally:
        signal.alarm(0)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: S110 - a closed stream: nothing buffered to lose
                pass
        os.dup2(fds[0], 1)
        os.dup2(fds[1], 2)
        for fd in fds:
            os.close(fd)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _reseed_after_fork() -> None:
    """A forked rank draws numpy's global seed anew, as a spawned rank's fresh import does
    (Python's ``random`` reseeds itself after a fork)."""
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()


def _rank_context(device: str) -> tuple[Any, dict[str, str | None]]:
    """(the multiprocessing context that starts this cluster's ranks, the environment
    variables a rank sets first). CPU ranks: the rank server (multiprocessing's forkserver,
    started here with this module preloaded, which makes the ranks' imports once), while this
    process's environment is the one the server started with but for ``_VOLATILE_ENV``,
    whose values the ranks then set (a rank gets the environment it would get from spawn);
    else, and for GPU ranks (no fork after a CUDA initialisation), spawn: a fresh interpreter
    per rank."""
    spawn = mp.get_context("spawn")
    if device != "cpu":
        return spawn, {}
    volatile = {k: os.environ.get(k) for k in _VOLATILE_ENV}
    env = {k: v for k, v in os.environ.items() if k not in _VOLATILE_ENV}
    try:
        from multiprocessing import forkserver

        server = forkserver._forkserver  # the process's one forkserver
        with _RANK_SERVER_LOCK:
            pid = server._forkserver_pid
            if pid is not None and pid != _RANK_SERVER.get("pid"):
                return spawn, {}  # started by someone else, without the ranks' imports
            context = mp.get_context("forkserver")
            context.set_forkserver_preload([__name__])
            os.environ[_RANK_SERVER_MARK] = "1"
            try:
                forkserver.ensure_running()  # (re)starts it only when it is not running
            finally:
                os.environ.pop(_RANK_SERVER_MARK, None)
            if server._forkserver_pid != _RANK_SERVER.get("pid"):
                _RANK_SERVER.update(pid=server._forkserver_pid, env=env)
            if _RANK_SERVER["env"] != env:
                return spawn, {}  # the server's imports saw another environment
            return context, volatile
    except (AttributeError, ImportError, OSError, ValueError):  # another Python's internals
        return spawn, {}


if os.environ.get(_RANK_SERVER_MARK) == "1":
    _preload_rank_imports()


# --------------------------------------------------------------------------------------------
# Driver side
# --------------------------------------------------------------------------------------------


def _is_collective_timeout(tb: str) -> bool:
    return "Timed out" in tb.strip().splitlines()[-1]


def _root_cause_first(failures: dict[int, str]) -> list[int]:
    """The failing ranks, those that merely timed out waiting for another last."""
    return sorted(failures, key=lambda r: (_is_collective_timeout(failures[r]), r))


def _failure_headline(failures: dict[int, str]) -> str:
    """``rank R: ITS EXCEPTION``, for the root-cause rank."""
    first = _root_cause_first(failures)[0]
    return f"rank {first}: {failures[first].strip().splitlines()[-1]}"


def _describe_failures(what: str, failures: dict[int, str]) -> str:
    """The root-cause traceback first (ranks that merely timed out waiting for it come last)."""
    order = _root_cause_first(failures)
    first = order[0]
    msg = f"{what} failed on rank {first}:\n{failures[first]}"
    by_error: dict[str, list[int]] = {}
    for r in order[1:]:
        by_error.setdefault(failures[r].strip().splitlines()[-1], []).append(r)
    for last_line, ranks in by_error.items():
        msg += f"\nranks {ranks}: {last_line}"
    return msg


def _exit_cause(code: int | None) -> str:
    """``exit code 3``, or the signal that killed the process (``killed by SIGKILL``)."""
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"exit code {code}"


_LIVE: list[SimCluster] = []
"""Started clusters of this process: the driver's signal handler stops them all."""
_PREVIOUS_HANDLERS: dict[int, Any] = {}


def _on_signal(signum, frame) -> None:
    """To the clusters running a job (the signal is for that job); when none runs, to every
    live cluster (a signal between jobs: none starts another). Several clusters live in one
    process (a test session): an idle one must not keep a signal meant for another's job."""
    live = list(_LIVE)
    for cluster in [c for c in live if c._in_job] or live:
        cluster._signalled(signum)


def _handle_signals(cluster: SimCluster) -> None:
    """Route SIGINT / SIGTERM to ``cluster`` while it runs (main thread only: elsewhere Python
    cannot install handlers, and the caller keeps its own)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if not _LIVE:
        for sig in (signal.SIGINT, signal.SIGTERM):
            _PREVIOUS_HANDLERS[sig] = signal.signal(sig, _on_signal)
    if cluster not in _LIVE:
        _LIVE.append(cluster)


def _release_signals(cluster: SimCluster) -> None:
    if cluster in _LIVE:
        _LIVE.remove(cluster)
        if not _LIVE:
            for sig, handler in _PREVIOUS_HANDLERS.items():
                signal.signal(sig, handler)
            _PREVIOUS_HANDLERS.clear()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class SimCluster:
    """``world_size`` ranks (CPU on gloo, or one GPU each on NCCL); jobs choose how many ranks
    form a simulated node."""

    world_size: int
    device: str = "cpu"
    collective_timeout_s: float = 90.0
    job_timeout_s: float = 600.0
    startup_timeout_s: float = 300.0
    fail_grace_s: float = 5.0
    """After one rank fails, how long the others may take to answer before they are stopped."""
    stop_grace_s: float = 8.0
    """After SIGINT / SIGTERM, how long the ranks may take to reach a step boundary (and write
    a final checkpoint) before they are killed."""
    _signal: int = 0
    _signal_at: float = 0.0
    _in_job: bool = False
    _procs: list = field(default_factory=list, repr=False)
    _jobs: list = field(default_factory=list, repr=False)
    _results: Any = field(default=None, repr=False)
    _next_job: int = 0
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> SimCluster:
        if self._procs:
            return self
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="locmoe-simcluster-")
        ctx, env = _rank_context(self.device)
        self._results = ctx.Queue()
        self._jobs = [ctx.Queue() for _ in range(self.world_size)]
        port = _free_port()
        for rank in range(self.world_size):
            p = ctx.Process(
                target=_worker_main,
                args=(
                    rank,
                    self.world_size,
                    port,
                    self._jobs[rank],
                    self._results,
                    self.collective_timeout_s,
                    self.scratch,
                    self._log_path(rank),
                    self.device,
                    env,
                ),
                daemon=False,  # see the module docstring
            )
            p.start()
            self._procs.append(p)
        atexit.register(self._kill)  # before multiprocessing joins non-daemon children
        _handle_signals(self)
        self._collect(-1, self.startup_timeout_s, what="start-up")
        return self

    def close(self, timeout_s: float = 10.0) -> None:
        """Ask every rank to exit, wait ``timeout_s`` for all of them together, then kill the
        ranks' groups (what they started goes with them)."""
        for q, p in zip(self._jobs, self._procs, strict=False):  # start() may have failed
            if p.is_alive():
                q.put(None)
        deadline = time.monotonic() + timeout_s
        for p in self._procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        self._kill()  # whatever did not stop in time, and their groups

    def __enter__(self) -> SimCluster:
        try:
            return self.start()
        except BaseException as e:  # __exit__ is not called when __enter__ raises
            self.__exit__(type(e), e, None)
            raise

    def __exit__(self, exc_type, *exc) -> None:
        stopping = exc_type is not None and issubclass(exc_type, KeyboardInterrupt)
        self.close(timeout_s=2.0 if stopping else 10.0)  # after a stop, ranks are idle
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    @property
    def scratch(self) -> str:
        return os.path.join(self._tmp.name, "scratch") if self._tmp else ""

    def _log_path(self, rank: int) -> str:
        return os.path.join(self._tmp.name, f"rank{rank}.log")

    # ---- jobs -----------------------------------------------------------------------------
    def run(
        self,
        fn: Callable[..., Any],
        *args: Any,
        layout: ParallelLayout,
        seed: int = 1234,
        timeout_s: float | None = None,
        **kwargs: Any,
    ) -> list[Any]:
        """Run ``fn(ctx, *args, **kwargs)`` on every rank; return the results by rank.

        ``fn`` must be importable by name (a module-level function), as must its arguments.
        """
        self.start()
        if self._signal:  # a signal between jobs: start nothing more
            raise self._interrupted()
        os.makedirs(self.scratch, exist_ok=True)
        self._next_job += 1
        job_id = self._next_job
        self._in_job = True
        for q in self._jobs:
            q.put((job_id, fn, args, kwargs, layout, seed))
        try:
            return self._collect(
                job_id, timeout_s or self.job_timeout_s, what=f"{fn.__name__} [{layout.describe()}]"
            )
        except ClusterJobError:
            self._kill()  # a timed-out gloo group cannot be reused; the next run restarts
            raise
        except Interrupted:
            self._signal = 0  # told; the object may run jobs again (ranks restart if killed)
            raise
        finally:
            self._in_job = False

    # ---- signals --------------------------------------------------------------------------
    def _signalled(self, signum: int) -> None:
        """The driver's SIGINT / SIGTERM: forwarded to every rank at once (each stops at its
        job's next step boundary); a second signal kills the ranks now."""
        if self._signal:
            _kill_groups(self._procs)
            return
        self._signal, self._signal_at = signum, time.monotonic()
        for p in self._procs:
            if p.pid is not None and p.is_alive():
                try:
                    os.kill(p.pid, signum)
                except ProcessLookupError:
                    pass

    def _interrupted(self, step: int | None = None, saved: str | None = None) -> Interrupted:
        signum, self._signal = self._signal, 0
        return Interrupted(signum, step, saved)

    def _collect(self, job_id: int, timeout_s: float, what: str) -> list[Any]:
        deadline = time.monotonic() + timeout_s
        answers: dict[int, tuple[bool, Any]] = {}
        while len(answers) < self.world_size:
            if self._signal and time.monotonic() > self._signal_at + self.stop_grace_s:
                self._kill()  # ranks that did not reach a step boundary in time
                raise self._interrupted()
            remaining = deadline - time.monotonic()
            dead = [r for r, p in enumerate(self._procs) if not p.is_alive() and r not in answers]
            if self._signal and dead:  # killed by a second signal, or the job's own signal
                self._kill()
                raise self._interrupted()
            if remaining <= 0 or dead:
                self._raise_hung(what, answers, dead, timeout_s)
            try:
                rank, jid, ok, payload = self._results.get(timeout=min(remaining, 0.2))
            except queue.Empty:
                continue
            if jid != job_id:
                continue  # a late answer of an earlier, failed job
            answers[rank] = (ok, payload)
            if ok is False:
                # ranks failing on their own answer within the grace; the rest are most likely
                # blocked in a collective with the failed rank: stopped, not waited out
                deadline = min(deadline, time.monotonic() + self.fail_grace_s)
        failures = {r: tb for r, (ok, tb) in sorted(answers.items()) if ok is False}
        stops = [payload for ok, payload in answers.values() if ok == "stopped"]
        if stops and not failures:
            signum, step, saved = min(stops, key=lambda s: s[1])
            self._signal = self._signal or signum  # a rank signalled alone stops the job too
            return_step = step if all(s[1] == step for s in stops) else None
            raise self._interrupted(return_step, saved)
        if failures:
            raise ClusterJobError(_describe_failures(what, failures), _failure_headline(failures))
        if self._signal:  # the job ended before any step boundary saw the signal
            raise self._interrupted()
        return [answers[r][1] for r in range(self.world_size)]

    def _raise_hung(self, what, answers, dead, timeout_s) -> None:
        """Stop the ranks that did not answer (their Python stacks go to the message) and
        raise: the root cause first (dead ranks, then ranks' exceptions, else the timeout)."""
        missing = [r for r in range(self.world_size) if r not in answers]
        for r in missing:
            if self._procs[r].is_alive():
                os.kill(self._procs[r].pid, signal.SIGUSR1)
        time.sleep(1.0)
        stacks = []
        for r in missing[:2]:
            try:
                text = Path(self._log_path(r)).read_text()[-3000:]
            except OSError:
                text = "(no log)"
            stacks.append(f"--- rank {r} ---\n{text}")
        failed = {r: tb for r, (ok, tb) in answers.items() if not ok}
        stopped = [r for r in missing if r not in dead]
        parts, headlines = [], []
        if dead:  # a dead rank is the root cause of its peers' broken collectives
            codes = ", ".join(f"rank {r}: {_exit_cause(self._procs[r].exitcode)}" for r in dead)
            headlines.append(f"ranks {dead} died ({codes})")
            parts.append(f"{what}: {headlines[-1]}")
        if failed:
            headlines.append(_failure_headline(failed))
            parts.append(_describe_failures(what, failed))
        if not parts:
            headlines.append(f"no answer within {timeout_s:.0f} s")
            parts.append(f"{what}: {headlines[-1]}")
        if stopped:
            why = (
                " (most likely waiting for the failed rank in a collective)"
                if failed or dead
                else ""
            )
            parts.append(f"ranks {stopped} had not answered and were stopped{why}")
        msg = "\n".join(parts) + f"\nlogs of ranks {missing[:2]}:\n" + "\n".join(stacks)
        self._kill()
        raise ClusterJobError(msg, headlines[0])

    def _kill(self) -> None:
        _kill_groups(self._procs)
        for p in self._procs:
            p.join(timeout=5)
        self._procs, self._jobs = [], []
        atexit.unregister(self._kill)
        _release_signals(self)
