"""The cluster presets of the cost model: per device, the peak bandwidth and per-message latency
of its intra- and inter-node links and the expert MLPs' matmul throughput.

The presets give peak link bandwidths per device and direction, with their sources; latencies
and achieved matmul throughputs are assumptions where not measured (each preset lists them).
Peak bandwidths make every time a lower bound; relative comparisons between routers on one
preset are what this model is for.
"""

from __future__ import annotations

from dataclasses import dataclass


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


def provenance_lines(
    sources: tuple[str, ...], assumptions: tuple[str, ...], indent: str = ""
) -> list[str]:
    """One line per source, then one per assumption: where a preset's figures come from."""
    return [
        *(f"{indent}source: {s}" for s in sources),
        *(f"{indent}assumption: {a}" for a in assumptions),
    ]


def describe_cluster(c: Cluster) -> str:
    lines = [
        f"{c.name}: {c.description}",
        f"  {c.devices_per_node} devices/node; intra {c.intra.bandwidth_GBps:g} GB/s, "
        f"{c.intra.latency_us:g} us; inter {c.inter.bandwidth_GBps:g} GB/s, "
        f"{c.inter.latency_us:g} us (per device, one direction); experts "
        f"{c.expert_tflops:g} TFLOP/s",
    ]
    return "\n".join(lines + provenance_lines(c.sources, c.assumptions, indent="  "))
