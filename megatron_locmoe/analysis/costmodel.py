"""An alpha-beta model of one training step's MoE time on a real cluster, fed with routing
statistics measured in our runs.

Why: the simulated CPU cluster measures *what* each router sends (exact intra- and inter-node
byte counts from the hierarchical dispatcher), not how long that takes on NVLink/HCCS and
InfiniBand/RoCE. This module turns the measured counts into time on a cluster preset, so the
routers can be compared where the paper compared them.

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

With the run's node and expert counts the measured copies are used (with per-node dedup where
the run used it; the flat scheme's intra-node copies, which the dispatcher does not log, use
the formula below); only the node size may differ from the run's, which rescales the
intra-node copies (``RoutingStats.copies_at``). Other node or expert counts are extrapolated
with one number per router, its *locality gain* ``g = (p - u) / (1 - u)``: p the measured
node-local share of assignments, u the share a router blind to locality gets (the experts on
the token's node over all experts). ``g = 0``: no locality (hash, switch, Megatron's aux-loss
top-k on average); ``g = 1``: every assignment stays on its node. At the new layout
``p' = u' + g (1 - u')``; a node hosting no expert (more nodes than experts) has ``p' = 0``.
Copies per token then follow without dedup (exact for top-1, an upper bound for top-k > 1):
hierarchical intra = ``a (1 - 1/G)`` (hop 1 also carries the rows bound for other rails),
inter = ``a (1 - p')``; flat intra = ``a p' (1 - 1/G)``, inter = ``a (1 - p')``. Every router
keeps its own top-k and drop rate: a workload sets the model and batch, not the routing.

The cluster presets give peak link bandwidths per device and direction, with their sources;
latencies and achieved matmul throughputs are assumptions where not measured (each preset
lists them). Peak bandwidths make every time a lower bound; relative comparisons between
routers on one preset are what this model is for.

    python -m megatron_locmoe.analysis.costmodel --cluster ascend-910a --nodes 2 --traffic runs/demo
    python -m megatron_locmoe.analysis.costmodel --list
    python -m megatron_locmoe.analysis.costmodel --reproduce runs/demo   # docs/reproduction.md's table
    python -m megatron_locmoe.analysis.costmodel --check fusco   # against a published measurement

The check (``check_published``, data in ``analysis/published.py``) puts a published
dispatch + combine measurement in the model's terms and reports the model's error
(docs/performance.md, "The cost model against a published measurement").
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from math import comb

from megatron_locmoe.analysis import published
from megatron_locmoe.analysis.errors import InputError, read_json, require_keys, run_tool
from megatron_locmoe.dispatch.traffic import copy_bytes

# --------------------------------------------------------------------------------------------
# Hardware and workload
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    """One device's share of a link class: peak bandwidth one direction, per-message latency."""

    bandwidth_GBps: float
    """GB/s (1e9 bytes/s) one device can send at once over this link class."""
    latency_us: float
    """Latency paid per peer message, microseconds."""

    def __post_init__(self):
        if self.bandwidth_GBps <= 0 or self.latency_us < 0:
            raise ValueError(
                f"link bandwidth {self.bandwidth_GBps} GB/s must be positive and latency "
                f"{self.latency_us} us non-negative"
            )


@dataclass(frozen=True)
class Cluster:
    """A cluster preset: node size, intra-/inter-node links per device, expert throughput."""

    name: str
    description: str
    devices_per_node: int
    intra: Link
    inter: Link
    expert_tflops: float
    """Achieved matmul throughput of the expert MLPs, TFLOP/s per device."""
    sources: tuple[str, ...]
    assumptions: tuple[str, ...]


CLUSTERS: dict[str, Cluster] = {
    c.name: c
    for c in (
        Cluster(
            name="h100-dgx",
            description="NVIDIA DGX H100: 8 x H100 SXM5, NVLink 4 + NVSwitch, 8 x 400 Gb/s IB",
            devices_per_node=8,
            intra=Link(bandwidth_GBps=450.0, latency_us=2.0),
            inter=Link(bandwidth_GBps=50.0, latency_us=5.0),
            expert_tflops=510.0,
            sources=(
                "NVLink 4: 900 GB/s bidirectional per H100 SXM5 GPU = 450 GB/s per direction "
                "(NVIDIA H100 Tensor Core GPU datasheet, https://www.nvidia.com/en-us/data-center/h100/)",
                "8 x ConnectX-7 400 Gb/s InfiniBand NDR per DGX H100, one per GPU = 50 GB/s per "
                "direction per GPU (NVIDIA DGX H100 user guide, "
                "https://docs.nvidia.com/dgx/dgxh100-user-guide/introduction-to-dgxh100.html)",
                "expert throughput 510 TFLOP/s: torch._grouped_mm, bf16, E=64 top-6 H=2048 "
                "F=1408 SwiGLU, measured on one H100 by this project (docs/performance.md)",
            ),
            assumptions=(
                "latency per message 2 us on NVLink, 5 us on InfiniBand (typical NCCL "
                "point-to-point small-message latencies; not measured here)",
            ),
        ),
        Cluster(
            name="ascend-910a",
            description=(
                "Atlas 800 training server (model 9000): 8 x Ascend 910(A), HCCS in two "
                "4-NPU meshes, 100 GbE RoCE per NPU (the LocMoE paper's cluster)"
            ),
            devices_per_node=8,
            intra=Link(bandwidth_GBps=56.0, latency_us=5.0),
            inter=Link(bandwidth_GBps=12.5, latency_us=10.0),
            expert_tflops=128.0,
            sources=(
                "Ascend 910: 256 TFLOP/s FP16 peak, HCCS links of 240 Gb/s = 30 GB/s, three "
                "per NPU inside a 4-NPU full mesh (Huawei, Hot Chips 31, 2019: 'DaVinci: A "
                "Scalable Architecture for Neural Network Computing')",
                "cluster interconnect HCCS / PCIe 4.0 / 100G Ethernet; 100G Ethernet (RoCE) "
                "port per training NPU (Huawei Atlas 900 launch, 2019; Atlas 300T training "
                "card (model 9000) documentation, "
                "https://support.huawei.com/enterprise/en/doc/EDOC1100164821)",
                "LocMoE (arXiv 2401.13920) section 4: Ascend 910 nodes of 8 NPUs, HCCS inside "
                "a node, RoCE between nodes",
            ),
            assumptions=(
                "intra-node All-to-All bandwidth 56 GB/s per NPU, derived: of 7 peers, 3 are "
                "HCCS mesh peers (3 x 30 GB/s) and 4 sit in the other mesh, reached over "
                "PCIe 4.0 x16 (~32 GB/s per direction): max(3/7 V / 90, 4/7 V / 32) = V / 56",
                "100 GbE = 12.5 GB/s per NPU per direction (line rate, no protocol overhead)",
                "expert throughput 128 TFLOP/s = 50% of the FP16 peak (not measured)",
                "latency per message 5 us on HCCS, 10 us on RoCE (not measured)",
            ),
        ),
        Cluster(
            name="ascend-910b",
            description=(
                "Atlas 800T A2: 8 x Ascend 910B, HCCS full mesh, 200 GbE RoCE per NPU "
                "(the LocMoE+ paper's cluster)"
            ),
            devices_per_node=8,
            intra=Link(bandwidth_GBps=196.0, latency_us=5.0),
            inter=Link(bandwidth_GBps=25.0, latency_us=10.0),
            expert_tflops=160.0,
            sources=(
                "Atlas 800T A2: 8 Ascend 910B NPUs in an HCCS full mesh, 392 GB/s HCCS per "
                "NPU, 8 x 200GE RoCE ports (Huawei Atlas 800T A2 product documentation, "
                "vendor figures as commonly quoted; the dual-die 910C's 784 GB/s = 2 x 392 "
                "agrees)",
                "LocMoE+ (arXiv 2406.00023): Ascend 910B3 clusters, 32-256 NPUs",
            ),
            assumptions=(
                "392 GB/s read as bidirectional over 7 mesh links: 196 GB/s per direction "
                "for an All-to-All to the 7 peers",
                "200 GbE = 25 GB/s per NPU per direction (line rate)",
                "expert throughput 160 TFLOP/s, about 50% of the 910B's FP16 peak (not measured)",
                "latency per message 5 us on HCCS, 10 us on RoCE (not measured)",
            ),
        ),
    )
}


@dataclass(frozen=True)
class Workload:
    """The model and batch of one training step, per device."""

    name: str
    tokens_per_device: int
    """Tokens each device routes per step (micro-batch tokens x micro-batches)."""
    hidden_size: int
    ffn_hidden_size: int
    """Hidden size of one expert's FFN."""
    num_moe_layers: int
    num_experts: int
    bytes_per_element: int = 2
    gated_linear_unit: bool = True
    overlap: float = 0.0
    """Fraction of the All-to-All time that can hide under expert compute (0..1)."""
    source: str = ""

    def __post_init__(self):
        for f in ("tokens_per_device", "hidden_size", "ffn_hidden_size", "num_moe_layers"):
            if getattr(self, f) < 1:
                raise ValueError(f"workload {self.name}: {f}={getattr(self, f)} must be >= 1")
        if not 0.0 <= self.overlap <= 1.0:
            raise ValueError(f"workload {self.name}: overlap={self.overlap} must lie in [0, 1]")


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            name="pangu-sigma",
            tokens_per_device=4096,
            hidden_size=5120,
            ffn_hidden_size=20480,
            num_moe_layers=8,
            num_experts=16,
            bytes_per_element=2,
            gated_linear_unit=False,
            source=(
                "LocMoE's setting: PanGu-Sigma, 16 experts, 8 MoE layers, top-1 (arXiv "
                "2401.13920 section 4). Assumed: hidden 5120 and FFN 20480 of PanGu-alpha 13B, "
                "which PanGu-Sigma extends (arXiv 2303.10845); 4096 tokens per NPU per step; "
                "fp16 activations; GELU FFN"
            ),
        ),
        Workload(
            name="mixtral-8x7b",
            tokens_per_device=4096,
            hidden_size=4096,
            ffn_hidden_size=14336,
            num_moe_layers=32,
            num_experts=8,
            bytes_per_element=2,
            gated_linear_unit=True,
            source=(
                "LocMoE+'s model: Mixtral 8x7B (hidden 4096, FFN 14336 SwiGLU, 32 layers, 8 "
                "experts, top-2; arXiv 2401.04088). Assumed: 4096 tokens per device per step"
            ),
        ),
    )
}


# --------------------------------------------------------------------------------------------
# Routing statistics
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoutingStats:
    """What one router does per token and MoE layer, measured in a run (dispatch direction)."""

    name: str
    topk: int
    assignments_per_token: float
    """Token-expert assignments per token after drops (top-k minus dropped)."""
    node_local_fraction: float
    """Share of assignments whose expert is on the token's node."""
    intra_copies_per_token: float
    """Intra-node token copies per token of the run's dispatcher (hierarchical)."""
    inter_copies_per_token: float
    """Inter-node token copies per token of the run's dispatcher."""
    flat_inter_copies_per_token: float
    """Inter-node copies Megatron's flat All-to-All would send for the same routing."""
    nodes: int
    devices_per_node: int
    num_experts: int
    dedup: bool = False

    def __post_init__(self):
        if not 0.0 <= self.node_local_fraction <= 1.0:
            raise ValueError(
                f"{self.name}: node-local fraction {self.node_local_fraction} outside [0, 1]"
            )
        if self.nodes < 1 or self.devices_per_node < 1:
            raise ValueError(f"{self.name}: nodes and devices per node must be >= 1")

    @property
    def locality_gain(self) -> float:
        """g = (p - u) / (1 - u): 0 = locality-blind, 1 = all assignments on their node."""
        u = uniform_local_share(self.num_experts, self.nodes)
        return 0.0 if u >= 1.0 else (self.node_local_fraction - u) / (1.0 - u)

    @classmethod
    def from_run(cls, run) -> RoutingStats:
        """From a demo run (``runlog.Run`` with run.json): the byte counts of the last
        TAIL_FRACTION of the steps, turned into copies with the dispatcher's per-copy sizes."""
        rec = run.record
        need = (
            "topk",
            "num_experts",
            "nodes",
            "ranks_per_node",
            "tokens_per_rank_step",
            "hidden_size",
            "hidden_element_bytes",
            "prob_element_bytes",
            "dedup",
        )
        missing = [k for k in need if k not in rec]
        if missing:
            raise InputError(
                f"run {run.name} has no {missing} in its run.json: the cost model needs a run "
                "written by megatron_locmoe.analysis.demo (TensorBoard events alone hold no sizes)"
            )
        T = rec["tokens_per_rank_step"]
        return cls._from_bytes(
            run.name,
            rec,
            dropped_per_token=run.tail_mean("tokens_dropped") / T,
            node_local=run.tail_mean("node_local_fraction"),
            intra=run.tail_mean("intra_node_bytes") / T,
            inter=run.tail_mean("inter_node_bytes") / T,
            flat_inter=run.tail_mean("flat_inter_node_bytes") / T,
        )

    @classmethod
    def from_sweep_row(cls, row: dict) -> RoutingStats:
        """From one run of the locality sweep's results file (``megatron_locmoe.analysis.sweep``)."""
        return cls._from_bytes(
            row["run"],
            row,
            dropped_per_token=row["dropped"] * row["topk"],
            node_local=row["node_local"],
            intra=row["intra_bytes_per_token"],
            inter=row["inter_bytes_per_token"],
            flat_inter=row["flat_inter_bytes_per_token"],
        )

    @classmethod
    def _from_bytes(cls, name, rec, dropped_per_token, node_local, intra, inter, flat_inter):
        """Bytes per token (dispatch + combine) turned into copies with the dispatcher's
        per-copy sizes (``copy_bytes``); ``rec``: the run's sizes."""
        N, G, E = rec["nodes"], rec["ranks_per_node"], rec["num_experts"]
        hidden = rec["hidden_size"] * rec["hidden_element_bytes"]
        pb = rec["prob_element_bytes"]
        flat_copy = copy_bytes(hidden, pb)
        if rec["dedup"]:
            intra_copy = copy_bytes(hidden, pb, dedup_width=E // (N * G))
            inter_copy = copy_bytes(hidden, pb, dedup_width=E // N)
        else:
            intra_copy = inter_copy = flat_copy
        return cls(
            name=name,
            topk=rec["topk"],
            assignments_per_token=rec["topk"] - dropped_per_token,
            node_local_fraction=node_local,
            intra_copies_per_token=intra / intra_copy,
            inter_copies_per_token=inter / inter_copy,
            flat_inter_copies_per_token=flat_inter / flat_copy,
            nodes=N,
            devices_per_node=G,
            num_experts=E,
            dedup=bool(rec["dedup"]),
        )

    def copies_at(
        self, nodes: int, devices_per_node: int, num_experts: int, scheme: str = "hierarchical"
    ) -> tuple[float, float, float]:
        """(node-local share, intra copies, inter copies) per token at another layout.

        With the run's nodes and experts the measured node-local share and inter-node copies
        hold whatever the node size (which node hosts an expert does not depend on it); the
        intra-node copies are scaled by (1 - 1/G') / (1 - 1/G) for G' devices per node instead
        of G (the copies to the sender itself, 1/G of them, are free). Any other node or
        expert count: the locality-gain extrapolation of the module docstring (no dedup)."""
        if scheme not in SCHEMES:
            raise ValueError(f"scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
        if nodes < 1 or devices_per_node < 1 or num_experts < 1:
            raise ValueError("nodes, devices per node and experts must be >= 1")
        a, G = self.assignments_per_token, devices_per_node
        if (nodes, num_experts) == (self.nodes, self.num_experts):
            p = self.node_local_fraction
            if scheme == "flat":
                return p, a * p * (1 - 1 / G), self.flat_inter_copies_per_token
            run_G = self.devices_per_node
            rescale = (1 - 1 / G) / (1 - 1 / run_G) if run_G > 1 else 1.0
            return p, self.intra_copies_per_token * rescale, self.inter_copies_per_token
        hosting = min(1.0, num_experts / nodes)  # share of nodes that host experts
        u = uniform_local_share(num_experts, nodes)  # 1 on one node, so p = 1 there
        p = hosting * (u + self.locality_gain * (1.0 - u))
        inter = a * (1.0 - p)
        intra = a * (1 - 1 / G) if scheme == "hierarchical" else a * p * (1 - 1 / G)
        return p, intra, inter


SCHEMES = ("hierarchical", "flat")


def uniform_local_share(num_experts: int, nodes: int) -> float:
    """Node-local share a locality-blind router gets: the experts of a node that hosts any (at
    least 1; experts are spread evenly) over all experts."""
    return max(1.0, num_experts / nodes) / num_experts


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


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


def estimate(
    stats: RoutingStats,
    cluster: Cluster,
    nodes: int,
    workload: Workload,
    scheme: str = "hierarchical",
) -> StepEstimate:
    """Modeled MoE time of one step per device for ``stats``'s routing at ``nodes`` nodes of
    ``cluster`` (the nodes the EP group spans) running ``workload``."""
    p, c_intra, c_inter = stats.copies_at(
        nodes, cluster.devices_per_node, workload.num_experts, scheme
    )
    a = stats.assignments_per_token  # every router keeps its own top-k and drops
    row = workload.hidden_size * workload.bytes_per_element
    T, L = workload.tokens_per_device, workload.num_moe_layers
    v_intra, v_inter = T * c_intra * row, T * c_inter * row
    t_intra, t_inter, lat = alltoall_seconds(v_intra, v_inter, cluster, nodes, scheme)
    per_a2a = lat + max(t_intra, t_inter)
    t_comm = 4 * L * per_a2a
    mats = 3 if workload.gated_linear_unit else 2
    flops = 3 * 2 * T * a * workload.hidden_size * workload.ffn_hidden_size * mats * L
    t_expert = flops / (cluster.expert_tflops * 1e12)
    hidden = min(workload.overlap * t_comm, t_expert)
    return StepEstimate(
        router=stats.name,
        node_local_fraction=p,
        intra_bytes=4 * L * v_intra,
        inter_bytes=4 * L * v_inter,
        t_comm=t_comm,
        t_expert=t_expert,
        t_moe=t_expert + t_comm - hidden,
    )


# --------------------------------------------------------------------------------------------
# Against published measurements (data: analysis/published.py)
# --------------------------------------------------------------------------------------------


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


def alltoall_pass_seconds(
    stats: RoutingStats,
    cluster: Cluster,
    nodes: int,
    tokens_per_device: int,
    row_bytes: float,
    num_experts: int,
    scheme: str = "hierarchical",
) -> tuple[float, float, float]:
    """(inter bandwidth time, intra bandwidth time, total) of one All-to-All (one dispatch or
    one combine) of ``row_bytes`` per token copy: ``estimate``'s per-All-to-All time."""
    _, c_intra, c_inter = stats.copies_at(nodes, cluster.devices_per_node, num_experts, scheme)
    v_intra = tokens_per_device * c_intra * row_bytes
    v_inter = tokens_per_device * c_inter * row_bytes
    t_intra, t_inter, lat = alltoall_seconds(v_intra, v_inter, cluster, nodes, scheme)
    return t_inter, t_intra, lat + max(t_intra, t_inter)


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
        d_inter, d_intra, d_t = alltoall_pass_seconds(
            stats, cluster, m.nodes, T, m.dispatch_row_bytes, m.num_experts
        )
        c_inter, c_intra, c_t = alltoall_pass_seconds(
            stats, cluster, m.nodes, T, m.combine_row_bytes, m.num_experts
        )
        predicted_GBps = None
        if case.measured_GBps is not None:
            # DeepEP counts every node a token reaches, its own included (tests/test_internode.py)
            logical = T * case.nodes_per_token
            predicted_GBps = (
                logical * m.dispatch_row_bytes / d_t / 1e9,
                logical * m.combine_row_bytes / c_t / 1e9,
            )
        rows.append(
            CheckRow(
                case=case.name,
                description=case.description,
                inter_copies=stats.inter_copies_per_token,
                intra_copies=stats.intra_copies_per_token,
                t_inter=d_inter + c_inter,
                t_intra=d_intra + c_intra,
                predicted=d_t + c_t,
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
    out += ["", *(f"source: {s}" for s in m.sources), *(f"assumption: {a}" for a in m.assumptions)]
    return "\n".join(out)


def step_time_reduction(alltoall_share: float, comm_ratio: float) -> float:
    """Share of the baseline's step time saved when its All-to-All, ``alltoall_share`` of the
    step, takes ``comm_ratio`` times as long and nothing else changes: s (1 - r)."""
    if not 0.0 <= alltoall_share < 1.0:
        raise ValueError(f"All-to-All share {alltoall_share} must lie in [0, 1)")
    if comm_ratio < 0:
        raise ValueError(f"comm ratio {comm_ratio} must be non-negative")
    return alltoall_share * (1.0 - comm_ratio)


def share_needed(reduction: float, comm_ratio: float) -> float | None:
    """The All-to-All share that would give ``reduction`` at ``comm_ratio`` (None if r >= 1)."""
    return reduction / (1.0 - comm_ratio) if comm_ratio < 1.0 else None


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


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


def describe_cluster(c: Cluster) -> str:
    lines = [
        f"{c.name}: {c.description}",
        f"  {c.devices_per_node} devices/node; intra {c.intra.bandwidth_GBps:g} GB/s, "
        f"{c.intra.latency_us:g} us; inter {c.inter.bandwidth_GBps:g} GB/s, "
        f"{c.inter.latency_us:g} us (per device, one direction); experts "
        f"{c.expert_tflops:g} TFLOP/s",
    ]
    lines += [f"  source: {s}" for s in c.sources]
    lines += [f"  assumption: {a}" for a in c.assumptions]
    return "\n".join(lines)


PAPER_CLAIMS = {
    "time_per_epoch_reduction": (0.1268, 0.2224),
    "speedup_64npu": {"hash": 1.15, "switch": 1.29},
    "alltoall_share": {128: 0.181, 256: 0.287},
}
"""LocMoE (arXiv 2401.13920) section 4, as recorded in docs/design.md section 1.4: time per epoch
-12.68% to -22.24% against hash and switch routers (over its 64-256 NPU settings), 1.15x /
1.29x step speed-up against hash / switch at 64 NPUs, All-to-All 18.1% / 28.7% of the step at
128 / 256 NPUs."""


def _without_drops(stats: RoutingStats) -> RoutingStats:
    """The routing with every assignment kept (copies scaled up by top-k / assignments)."""
    f = stats.topk / stats.assignments_per_token if stats.assignments_per_token else 1.0
    return replace(
        stats,
        assignments_per_token=float(stats.topk),
        intra_copies_per_token=stats.intra_copies_per_token * f,
        inter_copies_per_token=stats.inter_copies_per_token * f,
        flat_inter_copies_per_token=stats.flat_inter_copies_per_token * f,
    )


def claim_cells(
    loc: StepEstimate, base: StepEstimate, baseline: str, npus: int, paper_share: float | None
) -> list[str]:
    """r, All-to-All share s, modeled step-time change s (1 - r), the paper's claim and the
    share that would explain it, for LocMoE's and a baseline's estimates at ``npus`` devices
    (s: the paper's measured share where given, else the model's share of the MoE time)."""
    lo, hi = PAPER_CLAIMS["time_per_epoch_reduction"]
    r = loc.t_comm / base.t_comm if base.t_comm else 1.0
    if paper_share is not None:
        share, share_txt = paper_share, f"{paper_share:.1%} (paper)"
    else:
        share, share_txt = base.comm_share, f"{base.comm_share:.1%} (model, MoE only)"
    reduction = step_time_reduction(share, r)
    speedup = PAPER_CLAIMS["speedup_64npu"].get(baseline) if npus == 64 else None
    if speedup is not None:
        targets = [1.0 - 1.0 / speedup]
        claim_txt = f"{speedup:.2f}x = -{targets[0]:.1%}"
    else:
        targets = [lo, hi]
        claim_txt = f"-{lo:.2%} .. -{hi:.2%}"
    shares = [share_needed(t, r) for t in targets]
    needed = (
        " .. ".join(f"{x:.1%}" for x in shares) if shares[0] is not None else "impossible (r >= 1)"
    )
    return [
        f"{r:.3f}",
        share_txt,
        f"-{reduction:.1%}" if reduction >= 0 else f"+{-reduction:.1%}",
        claim_txt,
        needed,
    ]


def reproduction_table(
    stats: list[RoutingStats],
    locmoe: str,
    baselines: list[str],
    cluster: Cluster | None = None,
    workload: Workload | None = None,
) -> str:
    """The paper's claims next to the model's estimates from ``stats`` (a Markdown table).

    The paper's setting: 16 experts, top-1, 8 / 16 / 32 nodes x 8 Ascend 910. How PanGu-Sigma's
    expert-parallel group maps onto the nodes is not stated, so two readings: EP = 16 NPUs =
    2 nodes (one expert per NPU, the other nodes data-parallel), or EP over all nodes (2, 1 and
    0.5 experts per node). Every router is modeled without drops (its full top-k volume): our
    runs' drop rates come from 256 tokens per rank, far noisier than the paper's batches, and
    static-shape training on Ascend pads experts to capacity anyway.

    ``r`` = modeled All-to-All time of LocMoE / the baseline's. With an All-to-All share ``s``
    of the baseline's step and nothing else changed, the step time falls by ``s (1 - r)``: s is
    the paper's measured share where it gives one (128 / 256 NPUs), else the model's share of
    the MoE-layer time (a stand-in). "share needed" = the s that would explain the paper's
    number with our r: reduction / (1 - r).
    """
    cluster = cluster or CLUSTERS["ascend-910a"]
    workload = workload or WORKLOADS["pangu-sigma"]
    by_name = {s.name: _without_drops(s) for s in stats}
    for n in [locmoe, *baselines]:
        if n not in by_name:
            raise ValueError(f"no run named {n!r} among {sorted(by_name)}")
    lo, hi = PAPER_CLAIMS["time_per_epoch_reduction"]
    rows = []
    for nodes_total in (8, 16, 32):
        npus = nodes_total * cluster.devices_per_node
        paper_share = PAPER_CLAIMS["alltoall_share"].get(npus)
        for reading, ep_nodes in (
            ("EP = 16 NPUs (2 nodes)", 2),
            ("EP over all nodes", nodes_total),
        ):
            loc = estimate(by_name[locmoe], cluster, ep_nodes, workload)
            for b in baselines:
                base = estimate(by_name[b], cluster, ep_nodes, workload)
                rows.append(
                    [
                        f"{nodes_total} x 8 = {npus}",
                        reading,
                        f"{locmoe} vs {b}",
                        f"{base.node_local_fraction:.3f} -> {loc.node_local_fraction:.3f}",
                        *claim_cells(loc, base, b, npus, paper_share),
                    ]
                )
    return format_table(
        [
            "NPUs",
            "EP reading",
            "routers",
            "node-local (base -> LocMoE)",
            "A2A ratio r",
            "A2A share s",
            "modeled step time",
            "paper",
            "share needed",
        ],
        rows,
    )


MAX_EP_NODES = 16
"""EP = 16 (one expert per device) spans at most 16 nodes: on 32 nodes of 8 each EP group
holds one device of every other node, the rest of the cluster data-parallel replicas."""


def sweep_reproduction_table(
    rows: list[dict],
    locmoe: str,
    baselines: list[str],
    setting: str = "domains",
    cluster: Cluster | None = None,
    workload: Workload | None = None,
) -> str:
    """The paper's claims against the model fed, at every node count, with the routing the
    locality sweep measured at that node count (no locality carried over from elsewhere).

    ``rows``: the sweep's results (``megatron_locmoe.analysis.sweep``). 16 experts, EP = 16 one per
    device, spread over ``min(nodes, 16)`` nodes (8 nodes: 2 experts per node, the 8x1 runs;
    16 and 32 nodes: 1 per node, the 16x1 runs), and, where the sweep has 2-node runs, over
    2 nodes (the 2x4 runs; the other nodes data-parallel). Columns as ``reproduction_table``.
    """
    cluster = cluster or CLUSTERS["ascend-910a"]
    workload = workload or WORKLOADS["pangu-sigma"]
    at = {
        (r["nodes"], r["run"]): _without_drops(RoutingStats.from_sweep_row(r))
        for r in rows
        if r["setting"] == setting
    }
    out = []
    for nodes_total in (8, 16, 32):
        npus = nodes_total * cluster.devices_per_node
        paper_share = (  # the paper measured its share on its own cluster only
            PAPER_CLAIMS["alltoall_share"].get(npus) if cluster.name == "ascend-910a" else None
        )
        for ep_nodes in sorted({2, min(nodes_total, MAX_EP_NODES)}):
            if (ep_nodes, locmoe) not in at:
                continue
            loc = estimate(at[ep_nodes, locmoe], cluster, ep_nodes, workload)
            for b in baselines:
                if (ep_nodes, b) not in at:
                    continue
                base = estimate(at[ep_nodes, b], cluster, ep_nodes, workload)
                cells = claim_cells(loc, base, b, npus, paper_share)
                out.append(
                    [
                        f"{nodes_total} x {cluster.devices_per_node} = {npus}",
                        f"EP 16 over {ep_nodes} nodes",
                        f"{locmoe} vs {b}",
                        f"{base.node_local_fraction:.3f} -> {loc.node_local_fraction:.3f}",
                        *cells[:3],
                        f"{1 - loc.t_moe / base.t_moe:+.1%}",
                        *cells[3:],
                    ]
                )
    if not out:
        raise ValueError(f"no {setting} runs named {locmoe!r} with a baseline among {baselines}")
    return format_table(
        [
            "NPUs",
            "EP layout (measured there)",
            "routers",
            "node-local (base -> LocMoE)",
            "A2A ratio r",
            "A2A share s",
            "modeled step time",
            "MoE time saved (model)",
            "paper",
            "share needed",
        ],
        out,
    )


def measured_table(runs, names: list[str]) -> str:
    """Loss and routing of the named runs (``runlog.Run``), means over the runs' last steps:
    the loss-parity and equal-fan-out comparisons of docs/reproduction.md."""
    from megatron_locmoe.analysis.runlog import summary_rows

    by_name = {r.name: r for r in runs}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ValueError(f"no runs named {missing} among {sorted(by_name)}")
    picked = [by_name[n] for n in names]
    rows = []
    for r, row in zip(picked, summary_rows(picked), strict=True):
        losses = r.record.get("losses") or []
        rows.append(
            [
                row["label"],
                str(row["k"]),
                f"{row['loss']:.3f}",
                f"{losses[-1]:.3f}" if losses else "-",
                f"{row['node_local']:.3f}",
                f"{row['inter_bytes_per_token']:.0f}",
                f"{row['flat_inter_bytes_per_token']:.0f}",
                f"{row['dropped']:.1%}",
            ]
        )
    return format_table(
        [
            "run",
            "k",
            "lm loss (tail mean)",
            "lm loss (last step)",
            "node-local",
            "inter-node B/token (hierarchical)",
            "inter-node B/token (flat)",
            "dropped",
        ],
        rows,
    )


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


if __name__ == "__main__":
    raise SystemExit(run_tool(main))
