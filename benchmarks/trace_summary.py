"""Where a profiled training step's time goes: a PyTorch profiler trace (Chrome JSON, as
Megatron's ``--profile --use-pytorch-profiler`` writes it next to the TensorBoard folder) in a
page of numbers.

For each profiled step (``ProfilerStep#N``): its wall time, the time the GPU was busy (the union
of kernel and copy intervals; the rest is the host not keeping the GPU fed), the number of
kernels launched, and the kernels that took the most GPU time, summed by name (share: of all GPU
event time in the step, which counts overlapping streams twice).

    python benchmarks/trace_summary.py TRACE.json[.gz] [--top 25] [--out summary.json]
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from collections import defaultdict

GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)["traceEvents"]


def _union(intervals: list[tuple[float, float]]) -> float:
    busy, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        busy += b - max(a, end)
        end = b
    return busy


def short_name(name: str) -> str:
    """A kernel's name without template arguments and parameter lists, so launches of the same
    kernel with other shapes sum together."""
    name = re.sub(r"\(.*$", "", name)
    while True:
        shorter = re.sub(r"<[^<>]*>", "", name)
        if shorter == name:
            break
        name = shorter
    return name.replace("void ", "").strip()[:90]


def summarise(events: list[dict], top: int = 25) -> dict:
    steps = sorted(
        (e["ts"], e["ts"] + e["dur"], e["name"])
        for e in events
        if e.get("ph") == "X" and str(e.get("name", "")).startswith("ProfilerStep#")
    )
    gpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in GPU_CATS]
    if not gpu:
        raise SystemExit("no GPU events in the trace: was it taken on a GPU with CUDA activity?")
    if not steps:  # one window over everything
        steps = [(min(e["ts"] for e in gpu), max(e["ts"] + e["dur"] for e in gpu), "all")]
    out = {"steps": []}
    for start, end, name in steps:
        inside = [e for e in gpu if start <= e["ts"] < end]
        wall = end - start
        busy = _union([(e["ts"], min(e["ts"] + e["dur"], end)) for e in inside])
        by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        for e in inside:
            slot = by_name[short_name(e["name"]) if e["cat"] == "kernel" else e["cat"]]
            slot[0] += e["dur"]
            slot[1] += 1
        ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])
        total = sum(v[0] for v in by_name.values()) or 1.0
        out["steps"].append(
            {
                "step": name,
                "wall_ms": wall / 1e3,
                "gpu_busy_ms": busy / 1e3,
                "gpu_busy_share": busy / wall if wall else 0.0,
                "kernels": sum(1 for e in inside if e["cat"] == "kernel"),
                "top": [
                    {"name": k, "ms": v[0] / 1e3, "share": v[0] / total, "count": v[1]}
                    for k, v in ranked[:top]
                ],
            }
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    summary = summarise(load(a.trace), a.top)
    for s in summary["steps"]:
        print(
            f"{s['step']}: wall {s['wall_ms']:.1f} ms, GPU busy {s['gpu_busy_ms']:.1f} ms "
            f"({s['gpu_busy_share']:.0%}), {s['kernels']} kernels"
        )
        for t in s["top"]:
            print(f"  {t['ms']:9.2f} ms {t['share']:6.1%} x{t['count']:<6d} {t['name']}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
