"""The alpha-beta model of one training step's MoE time per device: All-to-All volumes and
times from a router's copies per token, expert compute, overlap.

Per MoE layer and training step, per device (all numbers per device, one direction):

* token copies per token: ``c_intra``, ``c_inter`` (dispatch direction; the combine sends the
  same copies back and the backward pass mirrors both, so 4 All-to-Alls per layer and step);
* volume of one All-to-All: ``V = T * c * H * b`` (T tokens per device, H hidden size, b bytes
  per element; the dispatcher's few metadata bytes are left out at cluster scale);
* time of one All-to-All: ``t = alpha_intra * m_intra + alpha_inter * m_inter +
  max(V_intra / B_intra, V_inter / B_inter)``: intra- and inter-node links work at the same
  time (the slower one bounds), and every peer message pays its link's latency (m = peers:
  G - 1 inside the node; N - 1 rail peers for the hierarchical dispatcher, (N - 1) * G for
  the flat All-to-All);
* expert compute: ``3 * 2 * T * a * H * F * m`` FLOPs (forward + 2x backward; a = assignments
  per token after drops, F the expert FFN size, m = 3 matrices with a gated linear unit, else
  2) at a measured or assumed matmul throughput;
* overlap: a fraction ``phi`` of the communication can hide under expert compute (never more
  than the compute): ``t_moe = t_expert + t_comm - min(phi * t_comm, t_expert)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_locmoe.analysis.costmodel.cluster import Cluster
from megatron_locmoe.analysis.costmodel.routing import RoutingStats
from megatron_locmoe.analysis.costmodel.workload import Workload


@dataclass(frozen=True)
class StepEstimate:
    """Modeled MoE time of one training step on one device (seconds, bytes)."""

    router: str
    node_local_fraction: float
    intra_bytes: float
    """Intra-node bytes one device sends per step (all MoE layers, 4 All-to-Alls each)."""
    inter_bytes: float
    t_comm: float
    """All-to-All time, before overlap."""
    t_expert: float
    t_moe: float
    """Expert compute + exposed All-to-All."""

    @property
    def comm_share(self) -> float:
        """Share of the MoE time spent in exposed All-to-All."""
        return (self.t_moe - self.t_expert) / self.t_moe if self.t_moe else 0.0


def alltoall_seconds(
    intra_bytes: float, inter_bytes: float, cluster: Cluster, nodes: int, scheme: str
) -> tuple[float, float, float]:
    """(intra bandwidth time, inter bandwidth time, latency) of one All-to-All of one device."""
    if intra_bytes < 0 or inter_bytes < 0:
        raise ValueError(f"negative volume: intra {intra_bytes}, inter {inter_bytes} bytes")
    G = cluster.devices_per_node
    t_intra = intra_bytes / (cluster.intra.bandwidth_GBps * 1e9)
    t_inter = inter_bytes / (cluster.inter.bandwidth_GBps * 1e9)
    inter_peers = (nodes - 1) * (1 if scheme == "hierarchical" else G)
    latency = (cluster.intra.latency_us * (G - 1) * (intra_bytes > 0)) * 1e-6
    latency += cluster.inter.latency_us * inter_peers * (inter_bytes > 0) * 1e-6
    return t_intra, t_inter, latency


@dataclass(frozen=True)
class AllToAllPass:
    """One All-to-All (one dispatch or one combine) of one device: bytes and seconds."""

    node_local_fraction: float
    intra_bytes: float
    inter_bytes: float
    t_intra: float
    """Intra-node bandwidth time."""
    t_inter: float
    """Inter-node bandwidth time."""
    latency: float

    @property
    def seconds(self) -> float:
        """The pass's time: latency + the slower link (both links work at the same time)."""
        return self.latency + max(self.t_intra, self.t_inter)


def alltoall_pass(
    stats: RoutingStats,
    cluster: Cluster,
    nodes: int,
    tokens_per_device: int,
    row_bytes: float,
    num_experts: int,
    scheme: str = "hierarchical",
) -> AllToAllPass:
    """One All-to-All of ``row_bytes`` per token copy for ``stats``'s routing at ``nodes``
    nodes of ``cluster`` with ``num_experts`` experts."""
    p, c_intra, c_inter = stats.copies_at(nodes, cluster.devices_per_node, num_experts, scheme)
    v_intra = tokens_per_device * c_intra * row_bytes
    v_inter = tokens_per_device * c_inter * row_bytes
    t_intra, t_inter, lat = alltoall_seconds(v_intra, v_inter, cluster, nodes, scheme)
    return AllToAllPass(p, v_intra, v_inter, t_intra, t_inter, lat)


def estimate(
    stats: RoutingStats,
    cluster: Cluster,
    nodes: int,
    workload: Workload,
    scheme: str = "hierarchical",
) -> StepEstimate:
    """Modeled MoE time of one step per device for ``stats``'s routing at ``nodes`` nodes of
    ``cluster`` (the nodes the EP group spans) running ``workload``."""
    row = workload.hidden_size * workload.bytes_per_element
    T, L = workload.tokens_per_device, workload.num_moe_layers
    one = alltoall_pass(stats, cluster, nodes, T, row, workload.num_experts, scheme)
    t_comm = 4 * L * one.seconds
    a = stats.assignments_per_token  # every router keeps its own top-k and drops
    mats = 3 if workload.gated_linear_unit else 2
    flops = 3 * 2 * T * a * workload.hidden_size * workload.ffn_hidden_size * mats * L
    t_expert = flops / (cluster.expert_tflops * 1e12)
    hidden = min(workload.overlap * t_comm, t_expert)
    return StepEstimate(
        router=stats.name,
        node_local_fraction=one.node_local_fraction,
        intra_bytes=4 * L * one.intra_bytes,
        inter_bytes=4 * L * one.inter_bytes,
        t_comm=t_comm,
        t_expert=t_expert,
        t_moe=t_expert + t_comm - hidden,
    )
