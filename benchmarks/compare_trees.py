"""One benchmark of this directory run from two source trees of the plugin, alternately, and
the medians of each row's time and ratio side by side: did a change move a benchmark's ratios
beyond the run-to-run noise? (issue 34: the router and layer benchmarks before and after the
changes for newer Megatron versions).

    git worktree add /tmp/before COMMIT
    python benchmarks/compare_trees.py --before /tmp/before --after . --rounds 5 \\
        -- router_bench.py --shapes 2048,512,64,4 --routers megatron_aux locmoe hash
    python benchmarks/compare_trees.py --before /tmp/before --after . --rounds 5 \\
        --baseline megatron_local -- moe_layer_bench.py --shape 2048,512,64,4,512

Each round runs the benchmark once from each tree (before, after, before, after, ...), each
with its own tree first on PYTHONPATH and the same Python, so a machine whose speed drifts
slows both alike. Rows are read from the benchmark's ``--out`` JSON: every dictionary with an
``ms`` (router_bench: per shape and router; moe_layer_bench: per layer), with its ratio to the
benchmark's own baseline (``vs_megatron``) where it has one. The spread column is the range of
a row's ratio over the rounds of one tree: a change inside it is noise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def rows(record, path: tuple[str, ...] = ()) -> dict[str, tuple[float, float | None]]:
    """'a/b/c' -> (ms, vs_megatron or None) for every dictionary with an ``ms`` in ``record``."""
    out = {}
    if isinstance(record, dict):
        if isinstance(record.get("ms"), (int, float)):
            out["/".join(path)] = (float(record["ms"]), record.get("vs_megatron"))
        for key, value in record.items():
            out.update(rows(value, (*path, str(key))))
    elif isinstance(record, list):
        for i, value in enumerate(record):
            label = str(value.get("shape", i)) if isinstance(value, dict) else str(i)
            out.update(rows(value, (*path, label)))
    return out


def run_once(tree: Path, bench: list[str], out: Path) -> dict:
    script = tree / "benchmarks" / bench[0]
    if not script.is_file():
        raise SystemExit(f"{script}: no such benchmark in {tree}")
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, str(script), *bench[1:], "--out", str(out)]
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def with_baseline(found: dict, baseline: str | None) -> dict:
    """Rows without a ratio of their own get ms / the ms of their sibling row named
    ``baseline`` (the same shape's baseline, measured in the same run)."""
    if baseline is None:
        return found
    out = {}
    for row, (ms, ratio) in found.items():
        sibling = found.get(row.rsplit("/", 1)[0] + "/" + baseline)
        if ratio is None and sibling is not None:
            ratio = ms / sibling[0]
        out[row] = (ms, ratio)
    return out


def compare(
    before: Path, after: Path, bench: list[str], rounds: int, baseline: str | None = None
) -> dict:
    samples: dict[str, dict[str, list]] = {"before": {}, "after": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for name, tree in (("before", before), ("after", after)):
                record = run_once(tree, bench, Path(tmp) / f"{name}{r}.json")
                for row, value in with_baseline(rows(record), baseline).items():
                    samples[name].setdefault(row, []).append(value)
    table = {}
    for row in sorted(set(samples["before"]) & set(samples["after"])):
        entry = {}
        for name in ("before", "after"):
            ms = [v[0] for v in samples[name][row]]
            ratios = [v[1] for v in samples[name][row] if v[1] is not None]
            entry[name] = {
                "ms": statistics.median(ms),
                "ratio": statistics.median(ratios) if ratios else None,
                "ratio_range": [min(ratios), max(ratios)] if ratios else None,
            }
        table[row] = entry
    return table


def format_table(table: dict) -> str:
    lines = [
        f"{'row':<48} {'before ms':>10} {'after ms':>10} {'before ratio':>13} "
        f"{'after ratio':>12}  ratio range (before | after)"
    ]
    for row, e in table.items():
        b, a = e["before"], e["after"]
        ratio = (
            f"{b['ratio']:>13.3f} {a['ratio']:>12.3f}  "
            f"{b['ratio_range'][0]:.3f}-{b['ratio_range'][1]:.3f} | "
            f"{a['ratio_range'][0]:.3f}-{a['ratio_range'][1]:.3f}"
            if b["ratio"] is not None and a["ratio"] is not None
            else f"{'-':>13} {'-':>12}"
        )
        lines.append(f"{row:<48} {b['ms']:>10.3f} {a['ms']:>10.3f} {ratio}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, type=Path, help="the plugin's tree before")
    p.add_argument("--after", required=True, type=Path, help="the plugin's tree after")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument(
        "--baseline",
        default=None,
        help="for rows without a ratio (moe_layer_bench on the CPU): the sibling row to divide "
        "by, e.g. megatron_local",
    )
    p.add_argument("--out", default=None, help="JSON of the medians, the trees and the command")
    p.add_argument("bench", nargs=argparse.REMAINDER, help="-- BENCHMARK.py [its arguments]")
    a = p.parse_args(argv)
    bench = a.bench[1:] if a.bench[:1] == ["--"] else a.bench
    if not bench or a.rounds < 1:
        p.error("give --rounds >= 1 and the benchmark after --, e.g. -- router_bench.py")
    table = compare(a.before.resolve(), a.after.resolve(), bench, a.rounds, a.baseline)
    print(format_table(table))
    if a.out:
        Path(a.out).write_text(
            json.dumps(
                {
                    "command": " ".join(sys.argv),
                    "before": str(a.before),
                    "after": str(a.after),
                    "rounds": a.rounds,
                    "rows": table,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
