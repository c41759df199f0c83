"""The cost model against published All-to-All measurements (data: ``analysis/published.py``):
each measurement's routing cases put in the model's terms, the model's dispatch + combine time
next to the measured one, and the model's error (docs/performance.md, "The cost model against
a published measurement").

    python -m megatron_locmoe.analysis.costmodel --check fusco
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from math import comb

from megatron_locmoe.analysis import published
from megatron_locmoe.analysis.costmodel.cluster import CLUSTERS, Cluster, Link, provenance_lines
from megatron_locmoe.analysis.costmodel.model import alltoall_pass
from megatron_locmoe.analysis.costmodel.routing import RoutingStats
from megatron_locmoe.analysis.costmodel.tables import format_table
from megatron_locmoe.analysis.errors import InputError


def devices_hit(k: int, experts_per_node: int, devices_per_node: int) -> float:
    """Expected distinct devices that ``k`` distinct experts of one node sit on, drawn
    uniformly from the node's ``experts_per_node`` (spread evenly over its devices):
    G (1 - C(E_n - E_n / G, k) / C(E_n, k))."""
    G, En = devices_per_node, experts_per_node
    if not 1 <= k <= En or En % G:
        raise ValueError(f"{k} experts of a node with {En} experts on {G} devices")
    return G * (1.0 - comb(En - En // G, k) / comb(En, k))


def node_limited_stats(
    name: str,
    topk: int,
    nodes_per_token: int,
    own_node_share: float,
    nodes: int,
    devices_per_node: int,
    num_experts: int,
) -> RoutingStats:
    """Expected copies per token of a two-hop dispatcher with per-node dedup (one copy per
    token and remote node over the rail, then one per target device inside the node:
    DeepEP's normal kernels, this plugin's hierarchical dispatcher with dedup) for a routing
    that puts each token's ``topk`` experts on ``nodes_per_token`` nodes, ``topk / n`` on
    each, its own node among them with probability ``own_node_share``.

    inter = n - own_node_share; intra = n D (1 - 1/G), D = ``devices_hit(k / n, ...)``, less
    the forwarding device's own share 1/G; node-local share of assignments = own / n."""
    n = nodes_per_token
    if not 1 <= n <= nodes or topk % n or not 0.0 <= own_node_share <= 1.0:
        raise ValueError(f"{name}: {topk} experts on {n} of {nodes} nodes, own {own_node_share}")
    G = devices_per_node
    d = devices_hit(topk // n, num_experts // nodes, G)
    inter = n - own_node_share
    return RoutingStats(
        name=name,
        topk=topk,
        assignments_per_token=float(topk),
        node_local_fraction=own_node_share / n,
        intra_copies_per_token=n * d * (1 - 1 / G),
        inter_copies_per_token=inter,
        flat_inter_copies_per_token=inter * d,
        nodes=nodes,
        devices_per_node=G,
        num_experts=num_experts,
        dedup=True,
    )


@dataclass(frozen=True)
class CheckRow:
    """The model against one routing case of a published measurement (forward, one layer)."""

    case: str
    description: str
    inter_copies: float
    intra_copies: float
    t_inter: float
    """Inter-node bandwidth time of dispatch + combine, seconds."""
    t_intra: float
    predicted: float
    """Modeled dispatch + combine, seconds."""
    measured: float | None
    """Measured dispatch + combine, seconds (None where the source gives bandwidths)."""
    predicted_GBps: tuple[float, float] | None = None
    measured_GBps: tuple[float, float] | None = None

    @property
    def error(self) -> float | None:
        """(predicted - measured) / measured of the time."""
        return None if self.measured is None else self.predicted / self.measured - 1.0


def measurement_cluster(m: published.AllToAllMeasurement) -> Cluster:
    """The preset a measurement is checked on: its named preset, or one built from the
    source's stated link bandwidths with the h100-dgx preset's latencies."""
    if m.cluster != "stated":
        return CLUSTERS[m.cluster]
    base = CLUSTERS["h100-dgx"]
    return replace(
        base,
        name=f"{m.name}-stated",
        description=m.description,
        intra=Link(bandwidth_GBps=m.nvlink_GBps, latency_us=base.intra.latency_us),
        inter=Link(bandwidth_GBps=m.nic_GBps, latency_us=base.inter.latency_us),
        sources=m.sources,
        assumptions=m.assumptions,
    )


def case_stats(m: published.AllToAllMeasurement, case: published.RoutingCase) -> RoutingStats:
    return node_limited_stats(
        case.name,
        m.topk,
        case.nodes_per_token,
        case.own_node_share,
        m.nodes,
        m.devices_per_node,
        m.num_experts,
    )


def check_published(m: published.AllToAllMeasurement) -> list[CheckRow]:
    """The model's dispatch + combine time (and, where the source gives bandwidths, its
    bandwidth as the source counts it) for every routing case of ``m``."""
    cluster = measurement_cluster(m)
    rows = []
    for case in m.cases:
        stats = case_stats(m, case)
        T = m.tokens_per_device
        d = alltoall_pass(stats, cluster, m.nodes, T, m.dispatch_row_bytes, m.num_experts)
        c = alltoall_pass(stats, cluster, m.nodes, T, m.combine_row_bytes, m.num_experts)
        predicted_GBps = None
        if case.measured_GBps is not None:
            # DeepEP counts every node a token reaches, its own included (tests/test_internode.py)
            logical = T * case.nodes_per_token
            predicted_GBps = (
                logical * m.dispatch_row_bytes / d.seconds / 1e9,
                logical * m.combine_row_bytes / c.seconds / 1e9,
            )
        rows.append(
            CheckRow(
                case=case.name,
                description=case.description,
                inter_copies=stats.inter_copies_per_token,
                intra_copies=stats.intra_copies_per_token,
                t_inter=d.t_inter + c.t_inter,
                t_intra=d.t_intra + c.t_intra,
                predicted=d.seconds + c.seconds,
                measured=None if case.measured_ms is None else case.measured_ms / 1e3,
                predicted_GBps=predicted_GBps,
                measured_GBps=case.measured_GBps,
            )
        )
    return rows


def sweep_fit(m: published.AllToAllMeasurement) -> dict[str, tuple[float, float]]:
    """Least-squares line through each case's length sweep: (intercept ms, slope us per token)."""
    fits = {}
    for name, points in (m.length_sweep or {}).items():
        xs = [float(t) for t, _ in points]
        ys = [ms for _, ms in points]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
            (x - mx) ** 2 for x in xs
        )
        fits[name] = (my - slope * mx, slope * 1e3)
    return fits


def marginal_costs(
    m: published.AllToAllMeasurement, base: str, local: str
) -> tuple[float, float] | None:
    """What the length sweep says the model lacks: comparing the per-token slopes of routing
    ``base`` and the more local routing ``local``, (effective inter-node GB/s of the copies
    the locality removes, locality-independent us per token left over). None without sweeps."""
    fits = sweep_fit(m)
    cases = {c.name: c for c in m.cases}
    key = lambda c: c.reading_of or c.name  # noqa: E731
    b, loc = cases[base], cases[local]
    if key(b) not in fits or key(loc) not in fits:
        return None
    sb, sl = fits[key(b)][1], fits[key(loc)][1]
    rb, rl = case_stats(m, b), case_stats(m, loc)
    row = m.dispatch_row_bytes + m.combine_row_bytes
    removed = (rb.inter_copies_per_token - rl.inter_copies_per_token) * row  # bytes per token
    gbps = removed / ((sb - sl) * 1e-6) / 1e9
    rest = sl - rl.inter_copies_per_token * row / (gbps * 1e9) * 1e6
    return gbps, rest


def check_report(name: str) -> str:
    """The check of one published measurement as text (Markdown tables)."""
    if name not in published.MEASUREMENTS:
        raise InputError(f"--check {name}: known measurements: {', '.join(published.MEASUREMENTS)}")
    m = published.MEASUREMENTS[name]
    cluster = measurement_cluster(m)
    rows = check_published(m)
    out = [
        m.description,
        f"covers: {m.covers}",
        f"model: preset {cluster.name} (NVLink {cluster.intra.bandwidth_GBps:g} GB/s, inter-node "
        f"{cluster.inter.bandwidth_GBps:g} GB/s per GPU and direction); source states "
        f"{m.nvlink_GBps:g} / {m.nic_GBps:g}; rows of {m.dispatch_row_bytes} B (dispatch) and "
        f"{m.combine_row_bytes} B (combine)",
        "",
    ]
    table = []
    for r in rows:
        cells = [
            r.case,
            f"{r.inter_copies:.3f}",
            f"{r.intra_copies:.3f}",
            f"{r.t_inter * 1e3:.2f}",
            f"{r.t_intra * 1e3:.2f}",
            f"{r.predicted * 1e3:.2f}",
        ]
        if r.measured is not None:
            cells += [f"{r.measured * 1e3:.1f}", f"{r.error:+.0%}"]
        else:
            (pd, pc), (md, mc) = r.predicted_GBps, r.measured_GBps
            cells += [
                f"{pd:.1f} / {pc:.1f} GB/s (model) vs {md:g} / {mc:g} (measured)",
                f"{pd / md - 1:+.0%} / {pc / mc - 1:+.0%}",
            ]
        table.append(cells)
    out.append(
        format_table(
            [
                "routing",
                "inter copies/token",
                "intra copies/token",
                "inter ms",
                "intra ms",
                "predicted ms",
                "measured",
                "error",
            ],
            table,
        )
    )
    timed = [r for r in rows if r.measured is not None]
    if len(timed) > 1:
        base = timed[0]
        out.append("")
        for r in timed[1:]:
            pr, mr = r.predicted / base.predicted, r.measured / base.measured
            out.append(
                f"{r.case} / {base.case}: predicted {pr:.3f}, measured {mr:.3f} "
                f"(error of the ratio {pr / mr - 1:+.0%}; predicted cut {1 - pr:.0%}, "
                f"measured cut {1 - mr:.0%})"
            )
            fit = marginal_costs(m, base.case, r.case)
            if fit is not None:
                gbps, rest = fit
                out.append(
                    f"  length sweep: the inter-node copies {r.case} removes cost as if sent at "
                    f"{gbps:.1f} GB/s; {rest:.2f} us per token do not depend on the routing"
                )
    out += ["", *provenance_lines(m.sources, m.assumptions)]
    return "\n".join(out)
