"""The cost model's command line, ``python -m megatron_locmoe.analysis.costmodel`` (its
``__main__`` calls ``main``; examples in the package docstring, ``--help`` for every option).
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from megatron_locmoe.analysis import published
from megatron_locmoe.analysis.costmodel.check import check_report
from megatron_locmoe.analysis.costmodel.cluster import CLUSTERS, describe_cluster
from megatron_locmoe.analysis.costmodel.reproduction import (
    measured_table,
    reproduction_table,
    sweep_reproduction_table,
)
from megatron_locmoe.analysis.costmodel.routing import SCHEMES, RoutingStats
from megatron_locmoe.analysis.costmodel.tables import estimates_table
from megatron_locmoe.analysis.costmodel.workload import WORKLOADS, Workload
from megatron_locmoe.analysis.errors import InputError, read_json, require_keys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="alpha-beta MoE step-time estimates from measured routing statistics"
    )
    parser.add_argument("--cluster", choices=sorted(CLUSTERS), default="h100-dgx")
    parser.add_argument(
        "--nodes", type=int, default=None, help="nodes the EP group spans (default: the run's)"
    )
    parser.add_argument(
        "--traffic",
        nargs="+",
        metavar="RUN",
        help="run directories written by megatron_locmoe.analysis.demo (or the demo's output directory)",
    )
    parser.add_argument(
        "--workload",
        choices=sorted(WORKLOADS) + ["run"],
        default="pangu-sigma",
        help="model and batch to scale the routing to ('run': the runs' own tiny model)",
    )
    parser.add_argument("--tokens-per-device", type=int, help="override the workload's")
    parser.add_argument("--hidden-size", type=int, help="override the workload's")
    parser.add_argument("--overlap", type=float, help="override the workload's (0..1)")
    parser.add_argument("--scheme", choices=SCHEMES, default="hierarchical")
    parser.add_argument("--baseline", help="router the speed-ups are relative to")
    parser.add_argument("--list", action="store_true", help="print the presets and exit")
    parser.add_argument(
        "--check",
        metavar="NAME",
        help="the model against a published measurement: "
        + ", ".join(published.MEASUREMENTS)
        + " (analysis/published.py)",
    )
    parser.add_argument(
        "--reproduce",
        nargs="+",
        metavar="RUN",
        help="print the reproduction table of docs/reproduction.md from these runs",
    )
    parser.add_argument(
        "--sweep",
        metavar="JSON",
        help="print the paper's claims against the locality sweep's results, measured at "
        "every node count (ascend-910a and h100-dgx)",
    )
    parser.add_argument("--locmoe", default="locmoe-top1", help="LocMoE run for --reproduce")
    parser.add_argument(
        "--baselines", default="hash,switch", help="comma-separated baseline runs for --reproduce"
    )
    parser.add_argument(
        "--equal-fanout",
        default="megatron,megatron-node-limited,locmoe-top2",
        help="comma-separated top-2 runs for --reproduce's equal-fan-out table ('' for none)",
    )
    args = parser.parse_args(argv)
    if args.check:
        print(check_report(args.check))
        return
    if args.list:
        print("\n\n".join(describe_cluster(c) for c in CLUSTERS.values()))
        print("\nworkloads:")
        for w in WORKLOADS.values():
            print(f"  {w.name}: {w.source}")
        return
    from megatron_locmoe.analysis.runlog import load_runs

    if args.sweep:
        results = read_json(args.sweep, "a locality sweep's results file")
        require_keys(results, ("runs",), args.sweep, "a locality sweep's results file")
        rows = results["runs"]
        pairs = (
            ("domains", "locmoe-mu0.1", ["hash", "switch", "megatron"]),
            ("domains", "locmoe-node0.5", ["hash", "switch", "megatron"]),
            ("control", "ctl-locmoe-node0.5", ["ctl-megatron", "ctl-hash"]),
        )
        for cname in ("ascend-910a", "h100-dgx"):
            for setting, loc, bases in pairs:
                try:
                    table = sweep_reproduction_table(
                        rows, loc, bases, setting, CLUSTERS[cname], WORKLOADS["pangu-sigma"]
                    )
                except ValueError:
                    continue  # not measured (yet)
                print(f"\n{cname}, pangu-sigma workload, {setting}: {loc}\n")
                print(table)
        return
    if args.reproduce:
        runs = load_runs(args.reproduce)
        stats = [RoutingStats.from_run(r) for r in runs]
        print("Paper's claims vs the model (ascend-910a, pangu-sigma workload):\n")
        print(reproduction_table(stats, args.locmoe, args.baselines.split(",")))
        print("\nLoss parity, top-1 (same tokens):\n")
        print(measured_table(runs, [args.locmoe, *args.baselines.split(",")]))
        if args.equal_fanout:
            print("\nEqual fan-out (top-2): LocMoE vs Megatron's node-limited routing:\n")
            print(measured_table(runs, args.equal_fanout.split(",")))
        return
    if not args.traffic:
        parser.error("give --traffic RUN... (or --list / --reproduce)")
    cluster = CLUSTERS[args.cluster]
    runs = load_runs(args.traffic)
    stats = [RoutingStats.from_run(r) for r in runs]
    if args.workload == "run":
        rec = runs[0].record
        workload = Workload(
            name="run",
            tokens_per_device=rec["tokens_per_rank_step"],
            hidden_size=rec["hidden_size"],
            ffn_hidden_size=rec.get("ffn_hidden_size", 4 * rec["hidden_size"]),
            num_moe_layers=rec["num_layers"],
            num_experts=rec["num_experts"],
            bytes_per_element=rec["hidden_element_bytes"],
        )
    else:
        workload = WORKLOADS[args.workload]
    changes = {
        k: v
        for k, v in (
            ("tokens_per_device", args.tokens_per_device),
            ("hidden_size", args.hidden_size),
            ("overlap", args.overlap),
        )
        if v is not None
    }
    workload = replace(workload, **changes)
    if args.nodes is not None and args.nodes < 1:
        raise InputError(f"--nodes {args.nodes}: the EP group spans at least 1 node")
    routers = [st.name for st in stats]
    if args.baseline is not None and args.baseline not in routers:
        raise InputError(
            f"--baseline {args.baseline} is none of the runs given ({', '.join(routers)})"
        )
    nodes = args.nodes or stats[0].nodes
    print(describe_cluster(cluster))
    print(
        f"\nworkload {workload.name}: {workload.tokens_per_device} tokens/device, H="
        f"{workload.hidden_size}, F={workload.ffn_hidden_size}, {workload.num_moe_layers} MoE "
        f"layers, {workload.num_experts} experts, overlap {workload.overlap:g}; EP over {nodes} "
        f"nodes; {args.scheme} dispatcher. Routing measured at "
        f"{stats[0].nodes} nodes x {stats[0].devices_per_node}, {stats[0].num_experts} experts"
        + (
            ""
            if (nodes, workload.num_experts) == (stats[0].nodes, stats[0].num_experts)
            else " (extrapolated by locality gain, no dedup)"
        )
        + ". Every router keeps its own top-k and drop rate."
    )
    print()
    print(estimates_table(stats, cluster, nodes, workload, args.scheme, args.baseline))
