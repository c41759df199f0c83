"""Markdown tables (readable as plain text too): the one table format of the analysis tools,
and the cost model's per-router estimates in it.
"""

from __future__ import annotations

from megatron_locmoe.analysis.costmodel.cluster import Cluster
from megatron_locmoe.analysis.costmodel.model import StepEstimate, estimate
from megatron_locmoe.analysis.costmodel.routing import RoutingStats
from megatron_locmoe.analysis.costmodel.workload import Workload


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (readable as plain text too)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def estimate_cells(e: StepEstimate) -> list[str]:
    """node-local, inter / intra GB per device and step, All-to-All / expert / MoE ms: the
    columns every table of estimates shows."""
    return [
        f"{e.node_local_fraction:.3f}",
        f"{e.inter_bytes / 1e9:.3f}",
        f"{e.intra_bytes / 1e9:.3f}",
        f"{e.t_comm * 1e3:.2f}",
        f"{e.t_expert * 1e3:.2f}",
        f"{e.t_moe * 1e3:.2f}",
    ]


def estimates_table(
    stats: list[RoutingStats],
    cluster: Cluster,
    nodes: int,
    workload: Workload,
    scheme: str = "hierarchical",
    baseline: str | None = None,
) -> str:
    """Per-router estimates as a table; times relative to ``baseline`` (default: the first)."""
    ests = [estimate(s, cluster, nodes, workload, scheme) for s in stats]
    base = next((e for e in ests if e.router == baseline), ests[0])
    rows = []
    for s, e in zip(stats, ests, strict=True):
        rows.append(
            [
                e.router,
                f"{s.locality_gain:+.3f}",
                *estimate_cells(e),
                f"{e.comm_share:.1%}",
                f"{base.t_moe / e.t_moe:.3f}",
            ]
        )
    headers = [
        "router",
        "locality gain",
        "node-local",
        "inter GB/dev/step",
        "intra GB/dev/step",
        "A2A ms",
        "expert ms",
        "MoE ms",
        "A2A share",
        f"speed-up vs {base.router}",
    ]
    return format_table(headers, rows)
