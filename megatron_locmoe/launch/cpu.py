"""The CPU loop: a cpu preset's runs trained on the simulated cluster, in this process.

:func:`run_cpu` starts one :class:`~megatron_locmoe.sim.cluster.SimCluster` (gloo, nodes x
devices-per-node ranks) and trains every run of the plan in it, one after another, with the
settings the plan holds for it (:mod:`megatron_locmoe.launch.cpu_settings`); it prints the lm
loss per logged step and the routing metrics, and returns each run's losses and speed. A run
that fails raises :class:`RunFailed` with every rank's traceback.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from megatron_locmoe.launch.manifest import write_run_manifest
from megatron_locmoe.launch.plan import Plan


class RunFailed(RuntimeError):
    """A run of the simulated cluster failed: ``details`` (every rank's traceback, root cause
    first) and the one-line ``headline``."""

    def __init__(self, run: str, details: str, headline: str):
        super().__init__(f"run {run} failed: {headline}")
        self.details = details


def run_cpu(plan: Plan) -> dict[str, dict]:
    """Every run of a cpu preset in one simulated cluster (started once); the results."""
    # torch and the cluster only for a CPU run: the launcher imports them nowhere else
    from megatron_locmoe.sim.checkpoint import latest_iteration
    from megatron_locmoe.sim.cluster import ClusterJobError, SimCluster
    from megatron_locmoe.sim.progress import read_progress, steady_step_seconds
    from megatron_locmoe.sim.trainer import train_job

    results = {}
    print(
        f"[launch] {plan.preset.name}: simulated cluster of {plan.nodes} nodes x "
        f"{plan.devices_per_node} CPU ranks (gloo), starting {plan.world_size} processes",
        flush=True,
    )
    with SimCluster(plan.world_size) as cluster:
        for rp in plan.runs:
            settings, layout = rp.cpu_loop
            write_run_manifest(plan, rp)
            progress = Path(settings.progress_path)
            progress.unlink(missing_ok=True)
            print(
                f"[launch] run {rp.name}: {layout.describe()}, {settings.steps} steps", flush=True
            )
            if settings.load_dir and latest_iteration(settings.load_dir) is None:
                print(  # as Megatron warns; a --load naming nothing at all was refused
                    f"[launch] warning: --load {settings.load_dir} holds no checkpoint yet: "
                    "training from step 1",
                    file=sys.stderr,
                    flush=True,
                )
            try:
                # no wall-clock limit, as Megatron's pretrain has none (--exit-duration-in-mins
                # is refused): a hung collective fails its rank after the cluster's collective
                # timeout, a dead rank ends the run at once, Ctrl-C stops it at a step boundary
                out = cluster.run(train_job, settings, layout=layout, timeout_s=math.inf)
            except ClusterJobError as e:  # the ranks' tracebacks, then one line (main)
                raise RunFailed(rp.name, str(e), e.headline) from None
            losses, metrics = out[0]["losses"], out[-1]["metrics"]
            first = out[0].get("first_step", 1)
            every = max(1, rp.args.log_interval)
            for step, loss in enumerate(losses, first):
                if step == first or step % every == 0 or step == first + len(losses) - 1:
                    print(f"  {rp.name} step {step:4d}  lm loss {loss:.4f}", flush=True)
            shown = ("node_local_fraction", "inter_node_bytes", "intra_node_bytes", "load_cv")
            print("  " + "  ".join(f"{k} {metrics[k]:.4g}" for k in shown if k in metrics))
            res = {"loss": dict(enumerate(losses, first)), "metrics": metrics}
            if "eval_loss" in out[0]:  # the held-out loss after the last step
                res["eval_loss"] = out[0]["eval_loss"]
                print(f"  {rp.name} held-out lm loss {res['eval_loss']:.4f}", flush=True)
            steady = steady_step_seconds([p["seconds"] for p in read_progress(progress)])
            if steady:
                res["ms_per_iteration"] = steady * 1000
                if rp.tokens_per_iteration:
                    res["tokens_per_s"] = rp.tokens_per_iteration / steady
            results[rp.name] = res
    return results
