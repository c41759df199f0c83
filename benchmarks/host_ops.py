"""Host work per micro-batch: the PyTorch operator calls one training micro-batch issues.

The study's 8x8 runs on one GPU take ~20 ms a micro-batch of 4,096 tokens whether the card
runs one or eight of them (docs/study.md): they are bound by the host, which dispatches every
operator (kernel or view) one after another. This counts those calls on the CPU, where the
host path is the same: one training step of the CPU loop (the preset's model, its virtual
cluster, one micro-batch per virtual rank) under the PyTorch profiler, its top-level operator
calls (aten operators not called from another aten operator: from Python, the autograd engine
or the optimizer) divided by the micro-batches, per arm, with the ratio to the first arm and
the operators that issue the most, with the autograd node or ``-`` (Python) that called them.

    python benchmarks/host_ops.py --config study-cpu-8x8-control --runs megatron,locmoe \\
        --out benchmarks/results/host_ops_cpu.json
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def count_job(ctx, settings, top: int) -> dict:
    """SimCluster job: one warm-up step, then one profiled step of ``settings``."""
    from torch.profiler import ProfilerActivity, profile

    from megatron_locmoe.sim.trainer import train_job

    one = dataclasses.replace(settings, steps=1)
    train_job(ctx, one)  # warm-up: first-call work (data index, caches) left out
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_job(ctx, one)
    calls, callers = collections.Counter(), collections.Counter()
    for e in prof.events():
        parent = e.cpu_parent
        if not e.name.startswith("aten::") or (
            parent is not None and parent.name.startswith("aten::")
        ):
            continue
        calls[e.name] += 1
        callers[(e.name, parent.name[:48] if parent is not None else "-")] += 1
    return dict(
        total=sum(calls.values()),
        top=[[name, caller, n] for (name, caller), n in callers.most_common(top)],
    )


def main(argv: list[str] | None = None) -> int:
    from megatron_locmoe.launch.plan import Options, build_plan
    from megatron_locmoe.sim.cluster import SimCluster

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="study-cpu-8x8-control", help="a preset the CPU loop runs")
    p.add_argument(
        "--runs", default="megatron", help="comma-separated arms; the first is the baseline"
    )
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--out", help="JSON of the counts")
    a = p.parse_args(argv)
    rows = []
    for arm in a.runs.split(","):
        plan = build_plan(
            Options(config=a.config, runs=[arm], sets=["train-iters=2", "lr-warmup-iters=1"],
                    runs_dir="/tmp/host_ops_runs", check=False)
        )  # fmt: skip
        (run,) = plan.runs
        settings, layout = run.cpu_loop
        micro = settings.global_batch_size // settings.micro_batch_size
        with SimCluster(1) as cluster:
            counts = cluster.run(count_job, settings, a.top, layout=layout, timeout_s=1800)[0]
        rows.append(dict(arm=arm, micro_batches=micro, per_micro_batch=counts["total"] / micro,
                         top=[[x, c, n / micro] for x, c, n in counts["top"]]))  # fmt: skip
    base = rows[0]["per_micro_batch"]
    print(f"{a.config}: top-level operator calls per training micro-batch")
    for r in rows:
        print(f"{r['arm']:<28} {r['per_micro_batch']:8.0f}  {r['per_micro_batch'] / base:5.2f}x")
        for name, caller, n in r["top"]:
            print(f"    {n:7.1f}  {name:<28} from {caller}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(config=a.config, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
