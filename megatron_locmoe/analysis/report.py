"""An HTML page with PNG plots comparing routers, from the runs' logged metrics.

    python -m megatron_locmoe.analysis.report runs/demo -o reports/router_comparison.html
    python -m megatron_locmoe.analysis.report runs/demo/hash runs/demo/locmoe-top1 -o reports/two.html

RUNS are run directories (TensorBoard event files of ``trainer.train_job``, plus the demo's
``run.json``) or a directory of them. Decided: the report reads the TensorBoard events, not
W&B's binary run files, because TensorBoard's reader is a plain library call and the demo logs
the same names to both. Plots: loss vs step, node-local fraction, inter-node bytes per token
(hierarchical dispatcher, with the flat All-to-All's count dashed), load CV per MoE layer,
dropped assignments, expert capacity, and the modeled MoE time per step on every cluster
preset of ``costmodel`` (runs with a run.json only). Everything is local files: the page links
its PNGs from ``<name>_png/`` beside it and loads nothing from a network.
"""

from __future__ import annotations

import argparse
import html
from pathlib import Path
from typing import NamedTuple

import numpy as np

from megatron_locmoe.analysis.costmodel import (
    CLUSTERS,
    WORKLOADS,
    RoutingStats,
    describe_cluster,
    estimate,
    estimate_cells,
)
from megatron_locmoe.analysis.errors import read_json, require_keys, run_tool
from megatron_locmoe.analysis.runlog import TAIL_FRACTION, Run, load_runs, summary_rows


class LinePlot(NamedTuple):
    """One metric over the steps, a line per run."""

    tag: str
    ylabel: str
    """May name {bytes} / {drops}: their units (per token when every run's size is known)."""
    title: str
    per: str | None = None
    """Divide by each run's "token"s or "assignment"s per rank-step."""
    dashed_tag: str | None = None
    """A second series drawn dashed in the run's colour."""


FIGURES = {
    # PNG name: (heading, plot; None: the per-layer load-CV bars of _load_cv_per_layer)
    "loss": (
        "Training loss",
        LinePlot("lm loss", "lm loss", "Training loss (same tokens for every run)"),
    ),
    "node_local_fraction": (
        "Node-local fraction",
        LinePlot(
            "node_local_fraction",
            "node-local share of assignments",
            "Assignments whose expert is on the token's node",
        ),
    ),
    "inter_node_bytes": (
        "Inter-node bytes per token",
        LinePlot(
            "inter_node_bytes",
            "{bytes}",
            "Inter-node bytes (solid: hierarchical dispatcher, dashed: flat All-to-All)",
            per="token",
            dashed_tag="flat_inter_node_bytes",
        ),
    ),
    "load_cv_per_layer": ("Load CV per layer", None),
    "tokens_dropped": (
        "Drops",
        LinePlot("tokens_dropped", "{drops}", "Dropped token-expert assignments", per="assignment"),
    ),
    "expert_capacity": (
        "Capacity",
        LinePlot("expert_capacity", "tokens per expert (0: dropless)", "Expert capacity"),
    ),
}
"""The report's figures in page order."""

PLOTS = (*FIGURES, "modeled_step_time")
"""PNG names (without .png) a full report contains."""


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path) -> None:
    """Write the figure as a PNG and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _colors(runs: list[Run]) -> dict[str, str]:
    palette = [f"C{i}" for i in range(10)]
    return {r.name: palette[i % len(palette)] for i, r in enumerate(runs)}


def _per_token(run: Run) -> float | None:
    """Tokens per rank and step (bytes and drops are per rank), when the run recorded it."""
    return run.record.get("tokens_per_rank_step")


def _line_plot(runs, colors, tag, ylabel, title, path, scale=None, dashed_tag=None):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for r in runs:
        s = r.series(tag)
        if s is None:
            continue
        div = scale(r) if scale else 1.0
        ax.plot(s[0], s[1] / div, color=colors[r.name], label=r.label, lw=1.3)
        if dashed_tag and r.series(dashed_tag) is not None:
            d = r.series(dashed_tag)
            ax.plot(d[0], d[1] / div, color=colors[r.name], ls="--", lw=0.9, alpha=0.7)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    _save(plt, fig, path)


def _load_cv_per_layer(runs, colors, path):
    """Grouped bars: steady-state load CV of every MoE layer, one bar per run."""
    plt = _plt()
    per_run = {}
    for r in runs:
        tags = r.layer_tags("load_cv")
        if tags:
            per_run[r.name] = [r.tail_mean(t) for t in tags]
        elif r.series("load_cv") is not None:
            per_run[r.name] = [r.tail_mean("load_cv")]  # no per-layer logging: the mean
    layers = max((len(v) for v in per_run.values()), default=1)
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    width = 0.8 / max(1, len(per_run))
    for i, r in enumerate(x for x in runs if x.name in per_run):
        vals = per_run[r.name]
        xs = np.arange(len(vals)) + i * width
        ax.bar(xs, vals, width=width, color=colors[r.name], label=r.label)
    ax.set_xticks(np.arange(layers) + width * (len(per_run) - 1) / 2)
    ax.set_xticklabels([f"layer {i}" for i in range(layers)])
    ax.set_ylabel("load CV (std/mean of tokens per expert)")
    ax.set_title(f"Load imbalance per MoE layer (mean of the last {TAIL_FRACTION:.0%} of steps)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    _save(plt, fig, path)


def modeled_step_times(runs: list[Run], workload_name: str = "pangu-sigma"):
    """{cluster: [(run, StepEstimate)]} for the runs with a run.json, EP over the runs' nodes
    (and the node size of each preset: copies extrapolated by locality gain)."""
    stats = []
    for r in runs:
        try:
            stats.append((r, RoutingStats.from_run(r)))
        except (ValueError, KeyError):
            continue
    out = {}
    for cname, cluster in CLUSTERS.items():
        out[cname] = [
            (r, estimate(s, cluster, s.nodes, WORKLOADS[workload_name])) for r, s in stats
        ]
    return out


def _modeled_plot(times, colors, path, workload_name):
    plt = _plt()
    clusters = list(times)
    runs = [r for r, _ in times[clusters[0]]]  # every cluster lists the runs in this order
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    width = 0.8 / max(1, len(runs))
    for i, r in enumerate(runs):
        expert = [times[c][i][1].t_expert * 1e3 for c in clusters]
        total = [times[c][i][1].t_moe * 1e3 for c in clusters]
        xs = np.arange(len(clusters)) + i * width
        ax.bar(xs, total, width=width, color=colors[r.name], label=r.label, alpha=0.9)
        ax.bar(xs, expert, width=width, color="none", edgecolor="k", hatch="//", lw=0.4)
    ax.set_xticks(np.arange(len(clusters)) + width * (len(runs) - 1) / 2)
    ax.set_xticklabels(clusters)
    ax.set_ylabel("modeled MoE time per step (ms)")
    ax.set_title(
        f"alpha-beta model, {workload_name} workload, EP over the runs' nodes (hatched: experts)"
    )
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    _save(plt, fig, path)


SUMMARY_COLUMNS = (
    # (summary_rows key, header, format)
    ("label", "run", "{}"),
    ("k", "k", "{}"),
    ("loss", "lm loss", "{:.3f}"),
    ("node_local", "node-local", "{:.3f}"),
    ("inter_bytes_per_token", "inter-node B/token", "{:.0f}"),
    ("flat_inter_bytes_per_token", "flat inter-node B/token", "{:.0f}"),
    ("load_cv", "load CV", "{:.2f}"),
    ("dropped", "dropped", "{:.1%}"),
    ("tokens_per_second", "tokens/s", "{:,.0f}"),
)


def _summary_table_html(runs: list[Run]) -> str:
    """runlog.summary_rows (the demo's table) as HTML; '-' where a run has no value."""
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title, _ in SUMMARY_COLUMNS)
    body = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(fmt.format(row[key]) if row[key] is not None else '-')}</td>"
            for key, _, fmt in SUMMARY_COLUMNS
        )
        + "</tr>"
        for row in summary_rows(runs)
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _modeled_table_html(times) -> str:
    parts = []
    for cname, ests in times.items():
        if not ests:
            continue
        base = ests[0][1]
        rows = "".join(
            "<tr>"
            + "".join(
                f"<td>{html.escape(c)}</td>"
                for c in (r.label, *estimate_cells(e), f"{base.t_moe / e.t_moe:.3f}")
            )
            + "</tr>"
            for r, e in ests
        )
        parts.append(
            f"<h3>{html.escape(cname)}</h3><table><tr><th>run</th><th>node-local</th>"
            "<th>inter GB/device/step</th><th>intra GB/device/step</th><th>All-to-All ms</th>"
            f"<th>expert ms</th><th>MoE ms</th><th>speed-up vs {html.escape(ests[0][0].label)}"
            f"</th></tr>{rows}</table>"
        )
    return "".join(parts)


_CSS = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
.note { color: #555; font-size: 0.9em; }
"""


def build_report(
    runs: list[Run],
    out_html: str | Path,
    workload: str = "pangu-sigma",
    sweep_rows: list[dict] | None = None,
) -> Path:
    """Write the HTML page and its PNGs (``<stem>_png/`` beside it); return the page's path.
    ``sweep_rows``: the locality sweep's results (``megatron_locmoe.analysis.sweep``), whose figures
    the page then shows too."""
    if not runs:
        raise ValueError("no runs to report on")
    out_html = Path(out_html)
    png_dir = out_html.parent / f"{out_html.stem}_png"
    png_dir.mkdir(parents=True, exist_ok=True)
    colors = _colors(runs)
    per_token = lambda r: _per_token(r) or 1.0  # noqa: E731
    per_assignment = lambda r: (_per_token(r) or 1.0) * r.record.get("topk", 1)  # noqa: E731
    sized = all(_per_token(r) for r in runs)
    bytes_unit = "B per token and MoE layer" if sized else "B per rank-step"
    drop_unit = "share of assignments" if sized else "per rank-step"
    units = dict(bytes=bytes_unit, drops=drop_unit)
    divisors = {"token": per_token, "assignment": per_assignment, None: None}
    for name, (_, plot) in FIGURES.items():
        path = png_dir / f"{name}.png"
        if plot is None:
            _load_cv_per_layer(runs, colors, path)
            continue
        ylabel = plot.ylabel.format(**units)
        scale, dashed = divisors[plot.per], plot.dashed_tag
        _line_plot(runs, colors, plot.tag, ylabel, plot.title, path, scale, dashed)
    times = modeled_step_times(runs, workload)
    modeled = any(times.values())
    if modeled:
        _modeled_plot(times, colors, png_dir / "modeled_step_time.png", workload)

    rel = png_dir.name
    figs = "".join(
        f'<h2>{html.escape(title)}</h2><img src="{rel}/{name}.png" alt="{html.escape(title)}">'
        for name, (title, _) in FIGURES.items()
    )
    settings = "".join(
        f"<li><b>{html.escape(r.label)}</b> ({html.escape(str(r.path))}): "
        + html.escape(
            ", ".join(
                f"{k}={r.record[k]}"
                for k in ("router_type", "topk", "node_limited", "steps", "lr", "dedup")
                if k in r.record
            )
            or "TensorBoard run"
        )
        + "</li>"
        for r in runs
    )
    if modeled:
        model_html = (
            f'<h2>Modeled MoE time per step</h2><img src="{rel}/modeled_step_time.png" '
            f'alt="modeled step time">{_modeled_table_html(times)}'
            "<p class='note'>alpha-beta model (megatron_locmoe/analysis/costmodel/): each run's measured "
            "copies per token (its own top-k, drops and dedup) scaled to the "
            f"<code>{html.escape(workload)}</code> workload, EP over the runs' nodes; where a "
            "preset's node size differs from the run's, copies are extrapolated by locality "
            "gain. Presets:</p><pre>"
            + html.escape("\n\n".join(describe_cluster(c) for c in CLUSTERS.values()))
            + "</pre>"
        )
    else:
        model_html = (
            "<p class='note'>No modeled step time: the runs have no run.json (written by "
            "megatron_locmoe.analysis.demo), so their sizes are unknown.</p>"
        )
    sweep_html = ""
    if sweep_rows:
        plot_sweep(sweep_rows, png_dir)
        sweep_html = "<h1>Locality sweep</h1>" + "".join(
            f'<h2>{html.escape(title)}</h2><img src="{rel}/{name}.png" alt="{html.escape(title)}">'
            for name, title in SWEEP_FIGURES.items()
        )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>LocMoE router comparison</title>
<style>{_CSS}</style></head><body>
<h1>Router comparison</h1>
<p class="note">Means over the last {TAIL_FRACTION:.0%} of each run's steps. Bytes: what one
rank sends per MoE layer and step (dispatch + combine, forward), per token of the rank.</p>
{_summary_table_html(runs)}
<ul>{settings}</ul>
{figs}
{model_html}
{sweep_html}
</body></html>
"""
    out_html.write_text(page)
    return out_html


# --------------------------------------------------------------------------------------------
# The locality sweep's figures (megatron_locmoe.analysis.sweep: one row per run of its results file)
# --------------------------------------------------------------------------------------------

SWEEP_FIGURES = {
    "pareto": "Held-out loss against inter-node bytes per token (Pareto front per node count)",
    "node_local_vs_mu": "Node-local share against LocMoE's locality coefficient mu",
    "node_local_curves": "Node-local share over training (top-1, domains and control)",
    "tokens_per_expert": "Tokens per expert with and without the capacity bound",
}
"""PNG name: heading, in page order."""


def _by_nodes(rows: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for r in rows:
        out.setdefault(r["nodes"], []).append(r)
    return dict(sorted(out.items()))


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both coordinates (lower is better), by x."""
    front, best = [], float("inf")
    for x, y in sorted(points):
        if y < best:
            front.append((x, y))
            best = y
    return front


def _panels(plt, n: int):
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _legend(ax, **kwargs) -> None:
    if ax.get_legend_handles_labels()[0]:  # no empty legends (matplotlib warns)
        ax.legend(**kwargs)


def _locmoe_series(router_type: str) -> bool:
    """Whether the mu and capacity figures draw this router's runs: LocMoE's locality loss
    without LocMoE+'s affinity routing, whose adaptive capacity moves the same numbers by other
    means (asked of the router class; a name the registry does not know: not drawn)."""
    from megatron_locmoe.routers import ROUTERS  # imports Megatron-Core: only with a sweep

    cls = ROUTERS.get(router_type)
    return cls is not None and cls.has_locality_loss and not cls.has_affinity_routing


def plot_sweep(rows: list[dict], png_dir: str | Path) -> list[str]:
    """Write the sweep's PNGs into ``png_dir``; return the names written."""
    plt = _plt()
    png_dir = Path(png_dir)
    png_dir.mkdir(parents=True, exist_ok=True)
    groups = _by_nodes(rows)
    written = []

    def save(fig, name: str) -> None:
        _save(plt, fig, png_dir / f"{name}.png")
        written.append(name)

    markers = {"domains": "o", "control": "s"}

    fig, axes = _panels(plt, len(groups))
    for ax, (nodes, rs) in zip(axes, groups.items(), strict=True):
        for setting in ("domains", "control"):
            for k in (1, 2):
                pts = [r for r in rs if r["setting"] == setting and r["topk"] == k]
                if not pts:
                    continue
                xy = [(r["inter_bytes_per_token"], r["eval_loss"]) for r in pts]
                color = "C0" if setting == "domains" else "C3"
                face = color if k == 1 else "none"
                ax.scatter(
                    *zip(*xy, strict=True),
                    marker=markers[setting],
                    edgecolors=color,
                    facecolors=face,
                    label=f"{setting}, top-{k}",
                    zorder=3,
                )
                for r, (x, y) in zip(pts, xy, strict=True):
                    ax.annotate(
                        r["run"], (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points"
                    )
                front = pareto_front(xy)
                ax.plot(
                    *zip(*front, strict=True),
                    color=color,
                    lw=0.8,
                    alpha=0.6,
                    ls="-" if k == 1 else "--",
                )
        ax.set_title(f"{nodes} nodes")
        ax.set_xlabel("inter-node B per token and MoE layer (hierarchical)")
        ax.set_ylabel("held-out loss")
        ax.grid(alpha=0.3)
        _legend(ax, fontsize=7)
    save(fig, "pareto")

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for i, (nodes, rs) in enumerate(groups.items()):
        pts = sorted(
            (r["locality_loss_coeff"], r["node_local"])
            for r in rs
            if _locmoe_series(r["router_type"])
            and r["setting"] == "domains"
            and r["topk"] == 1
            and r["capacity_mode"] == "none"
            and not r["node_target_share"]
        )
        if not pts:
            continue
        xs = [max(x, 1e-3) for x, _ in pts]  # mu = 0 drawn at 1e-3 on the log axis
        ax.plot(xs, [y for _, y in pts], "o-", color=f"C{i}", label=f"{nodes} nodes")
        ax.axhline(rs[0]["node_local_blind"], color=f"C{i}", ls=":", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("mu (0 drawn at 1e-3); dotted: a locality-blind router's 1/nodes")
    ax.set_ylabel("node-local share (last 20% of steps)")
    ax.set_title("LocMoE top-1, domain-sharded data")
    ax.grid(alpha=0.3)
    _legend(ax, fontsize=7)
    save(fig, "node_local_vs_mu")

    fig, axes = _panels(plt, len(groups))
    for ax, (nodes, rs) in zip(axes, groups.items(), strict=True):
        for i, r in enumerate(x for x in rs if x["topk"] == 1):
            ls = "-" if r["setting"] == "domains" else "--"
            ax.plot(
                range(1, len(r["node_local_curve"]) + 1),
                r["node_local_curve"],
                ls=ls,
                lw=0.9,
                color=f"C{i % 10}",
                label=r["run"],
            )
        ax.axhline(rs[0]["node_local_blind"], color="k", ls=":", lw=0.8)
        ax.set_title(f"{nodes} nodes (dashed: control; dotted: 1/nodes)")
        ax.set_xlabel("step")
        ax.set_ylabel("node-local share")
        ax.grid(alpha=0.3)
        _legend(ax, fontsize=6, ncol=2)
    save(fig, "node_local_curves")

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    names = [
        n
        for n, _ in sorted(
            {
                (r["run"], r["capacity_mode"])
                for r in rows
                if _locmoe_series(r["router_type"])
                and r["setting"] == "domains"
                and r["topk"] == 1
                and r["locality_loss_coeff"] == 0.1
                and not r["node_target_share"]
            }
        )
    ]
    width = 0.8 / max(1, len(names) + 1)
    xs = np.arange(len(groups))
    for i, name in enumerate(names):
        vals = [
            next((r["tokens_per_expert_sent_max"] for r in rs if r["run"] == name), np.nan)
            for rs in groups.values()
        ]
        ax.bar(
            xs + i * width,
            vals,
            width=width,
            color=f"C{i}",
            label=f"{name}: max sent to one expert",
        )
    ref = [rs[0]["capacity_cf_reference"] for rs in groups.values()]
    ax.bar(xs + len(names) * width, ref, width=width, color="0.6", label="capacity at cf 1.1")
    ax.set_xticks(xs + width * len(names) / 2)
    ax.set_xticklabels([f"{n} nodes" for n in groups])
    ax.set_ylabel("tokens per expert per rank and step")
    ax.set_title("Tokens per expert (busiest expert of each rank), LocMoE top-1 mu 0.1")
    ax.grid(alpha=0.3, axis="y")
    _legend(ax, fontsize=7)
    save(fig, "tokens_per_expert")
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories (or a parent)")
    parser.add_argument("-o", "--out", default="reports/router_comparison.html")
    parser.add_argument(
        "--workload",
        choices=sorted(WORKLOADS),
        default="pangu-sigma",
        help="costmodel workload for the modeled step time",
    )
    parser.add_argument(
        "--sweep",
        metavar="JSON",
        help="the locality sweep's results file (benchmarks/results/locality_sweep.json): "
        "add its figures",
    )
    args = parser.parse_args(argv)
    sweep_rows = None
    if args.sweep:
        results = read_json(args.sweep, "a locality sweep's results file")
        require_keys(results, ("runs",), args.sweep, "a locality sweep's results file")
        sweep_rows = results["runs"]
    path = build_report(load_runs(args.runs), args.out, args.workload, sweep_rows)
    print(f"report: {path} (plots in {path.parent / (path.stem + '_png')})")


if __name__ == "__main__":
    raise SystemExit(run_tool(main))
