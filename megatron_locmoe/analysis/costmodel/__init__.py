"""An alpha-beta model of one training step's MoE time on a real cluster, fed with routing
statistics measured in our runs.

Why: the simulated CPU cluster measures *what* each router sends (exact intra- and inter-node
byte counts from the hierarchical dispatcher), not how long that takes on NVLink/HCCS and
InfiniBand/RoCE. This package turns the measured counts into time on a cluster preset, so the
routers can be compared where the paper compared them.

One concept per module, bottom to top:

- ``cluster``: the cluster presets (link bandwidths and latencies, expert throughput, sources);
- ``workload``: the model and batch of one step the routing is scaled to;
- ``routing``: a router's measured copies per token, and the same at another layout (the
  locality-gain extrapolation);
- ``model``: the formulas: All-to-All volumes and times, expert compute, overlap;
- ``tables``: Markdown tables, the per-router estimates among them;
- ``check``: the model against published measurements (data: ``analysis/published.py``);
- ``reproduction``: the LocMoE paper's claims against the model (docs/reproduction.md);
- ``cli``: the command line.

    python -m megatron_locmoe.analysis.costmodel --cluster ascend-910a --nodes 2 --traffic runs/demo
    python -m megatron_locmoe.analysis.costmodel --list
    python -m megatron_locmoe.analysis.costmodel --reproduce runs/demo   # docs/reproduction.md's table
    python -m megatron_locmoe.analysis.costmodel --check fusco   # against a published measurement

The names below are the package's interface: import them from here.
"""

from megatron_locmoe.analysis.costmodel.check import (
    CheckRow,
    case_stats,
    check_published,
    check_report,
    devices_hit,
    marginal_costs,
    measurement_cluster,
    node_limited_stats,
    sweep_fit,
)
from megatron_locmoe.analysis.costmodel.cli import main
from megatron_locmoe.analysis.costmodel.cluster import CLUSTERS, Cluster, Link, describe_cluster
from megatron_locmoe.analysis.costmodel.model import (
    AllToAllPass,
    StepEstimate,
    alltoall_pass,
    alltoall_seconds,
    estimate,
)
from megatron_locmoe.analysis.costmodel.reproduction import (
    MAX_EP_NODES,
    PAPER_CLAIMS,
    claim_cells,
    measured_table,
    reproduction_table,
    share_needed,
    step_time_reduction,
    sweep_reproduction_table,
)
from megatron_locmoe.analysis.costmodel.routing import SCHEMES, RoutingStats, uniform_local_share
from megatron_locmoe.analysis.costmodel.tables import estimate_cells, estimates_table, format_table
from megatron_locmoe.analysis.costmodel.workload import WORKLOADS, Workload
from megatron_locmoe.dispatch.traffic import copy_bytes  # the dispatcher's bytes per token copy

__all__ = [
    "CLUSTERS",
    "MAX_EP_NODES",
    "PAPER_CLAIMS",
    "SCHEMES",
    "WORKLOADS",
    "AllToAllPass",
    "CheckRow",
    "Cluster",
    "Link",
    "RoutingStats",
    "StepEstimate",
    "Workload",
    "alltoall_pass",
    "alltoall_seconds",
    "case_stats",
    "check_published",
    "check_report",
    "claim_cells",
    "copy_bytes",
    "describe_cluster",
    "devices_hit",
    "estimate",
    "estimate_cells",
    "estimates_table",
    "format_table",
    "main",
    "marginal_costs",
    "measured_table",
    "measurement_cluster",
    "node_limited_stats",
    "reproduction_table",
    "share_needed",
    "step_time_reduction",
    "sweep_fit",
    "sweep_reproduction_table",
    "uniform_local_share",
]
