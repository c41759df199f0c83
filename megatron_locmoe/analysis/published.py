"""Published All-to-All measurements the cost model is checked against: the setup each ran on,
the numbers, and where they come from. Data only (no model): ``costmodel.check.check_published``
turns a record into the model's terms and prints prediction against measurement.

    python -m megatron_locmoe.analysis.costmodel --check fusco
    python -m megatron_locmoe.analysis.costmodel --check deepep

Every figure below is either quoted from a source (``sources``) or an assumption, listed in
``assumptions`` with the reason it was made.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class RoutingCase:
    """One routing of a measurement: how each token's top-k experts spread over the nodes."""

    name: str
    description: str
    nodes_per_token: int
    """Distinct nodes a token's top-k experts sit on (the experts split evenly over them)."""
    own_node_share: float
    """Probability that the token's own node is one of them (nodes_per_token / nodes for a
    routing that does not depend on where the token is)."""
    measured_ms: float | None = None
    """Measured time (dispatch + combine), where the source gives a time."""
    measured_GBps: tuple[float, float] | None = None
    """Measured (dispatch, combine) bandwidth, where the source gives bandwidths."""
    reading_of: str | None = None
    """Another reading of the named case's measurement (its length sweep applies)."""


@dataclass(frozen=True)
class AllToAllMeasurement:
    """A published dispatch + combine measurement of one MoE layer's forward pass."""

    name: str
    description: str
    nodes: int
    devices_per_node: int
    cluster: str
    """Cost-model preset the check runs on (``costmodel.CLUSTERS``) or 'stated': a preset
    built from ``nvlink_GBps`` / ``nic_GBps`` below."""
    nvlink_GBps: float
    """NVLink bandwidth per GPU and direction the source states."""
    nic_GBps: float
    """Inter-node (RDMA) bandwidth per GPU and direction the source states."""
    hidden_size: int
    topk: int
    num_experts: int
    tokens_per_device: int
    dispatch_row_bytes: int
    """Bytes of one token copy in the dispatch (hidden x element size, + scales for FP8)."""
    combine_row_bytes: int
    covers: str
    """What the measured time includes."""
    cases: tuple[RoutingCase, ...]
    sources: tuple[str, ...]
    assumptions: tuple[str, ...]
    length_sweep: dict[str, tuple[tuple[int, float], ...]] | None = None
    """(tokens per GPU, measured ms) per case name, where the source sweeps the length."""


# both measurements: DeepSeek-V3's MoE layer (hidden 7168, top-8 of 256 experts) at EP 64 =
# 8 nodes x 8 GPUs, 4096 tokens per GPU
_DEEPSEEK_V3_EP64 = dict(
    nodes=8, devices_per_node=8, hidden_size=7168, topk=8, num_experts=256, tokens_per_device=4096
)

_FUSCO_ONE_NODE = RoutingCase(
    name="one-node",
    description="every token's 8 experts on one node (any node: 7/8 of them remote)",
    nodes_per_token=1,
    own_node_share=1 / 8,
    measured_ms=24.7,
)

FUSCO = AllToAllMeasurement(
    name="fusco",
    description=(
        "FUSCO's 64-GPU table: DeepEP dispatch + combine on 8 servers x 8 H100, DeepSeek-V3's "
        "MoE shape (hidden 7168, top-8 of 256 experts), 4,096 tokens per GPU"
    ),
    **_DEEPSEEK_V3_EP64,
    cluster="h100-dgx",
    nvlink_GBps=480.0,
    nic_GBps=50.0,
    dispatch_row_bytes=7168 * 2,
    combine_row_bytes=7168 * 2,
    covers=(
        "one layer's forward: pre-MoE permutation, DeepEP dispatch, post-MoE unpermutation, "
        "DeepEP combine (no expert compute, no backward)"
    ),
    cases=(
        RoutingCase(
            name="deepseek-v3",
            description="DeepSeek-V3's routing (inference traces; node-limited, 4 of 8 groups)",
            nodes_per_token=4,
            own_node_share=4 / 8,
            measured_ms=30.7,
        ),
        _FUSCO_ONE_NODE,
        replace(  # the same measurement, read the other way
            _FUSCO_ONE_NODE,
            name="one-node-own",
            description="reading 2: every token's 8 experts on its own node (no inter-node bytes)",
            own_node_share=1.0,
            reading_of=_FUSCO_ONE_NODE.name,
        ),
    ),
    sources=(
        "FUSCO README, Performance (https://github.com/infinigence/FUSCO): 64 H100 GPUs (~480 "
        "GB/s NVLink) across 8 servers, 10 CX7 400 Gb/s RoCE NICs per server (~50 GB/s each); "
        "DeepSeek-V3 MoE setup (7168 hidden, top-8); latency = pre-MoE and post-MoE data "
        "permutation + dispatch/combine communication; DeepEP 30.7 ms with DeepSeek-V3 "
        "inference routing, 24.7 ms with per-token routing confined to a single node, at 4096 "
        "tokens per GPU (and 8192 / 16384 / 32768: 58.4 / 116.1 / 219.6 and 43.8 / 81.8 / "
        "144.2 ms). Paper: Zhu et al., 'FUSCO: High-Performance Distributed Data Shuffling via "
        "Transformation-Communication Fusion', arXiv 2512.22036",
        "FUSCO's benchmark (tests/test_comparison.py, tests/deepep_dispatcher.py): bf16 hidden "
        "states, 256 experts (4 per GPU at 64 GPUs), DeepEP normal dispatch/combine with 24 "
        "SMs, permutation in plain PyTorch (index_select / scatter_add), time = mean of 49 "
        "CUDA-event-timed forward iterations of dispatch + combine",
        "DeepSeek-V3: 256 routed experts in 8 groups, top-8 from the best 4 groups "
        "(config.json: n_group 8, topk_group 4, num_experts_per_tok 8, hidden_size 7168; "
        "https://huggingface.co/deepseek-ai/DeepSeek-V3; arXiv 2412.19437 section 2.1.2: each "
        "token is sent to at most 4 nodes)",
    ),
    assumptions=(
        "one 400 Gb/s NIC per GPU (8 of the server's 10 NICs carry the EP traffic): 50 GB/s "
        "per GPU and direction, the h100-dgx preset's figure; the preset's NVLink 450 GB/s "
        "(datasheet) stands for FUSCO's '~480'",
        "bf16 (2 bytes) in both directions: FUSCO's benchmark dispatches bf16 hidden states; "
        "the table's own harness (with routing traces) is not published",
        "DeepSeek-V3 routing at EP 64 = 8 nodes x 32 experts: a group is a node; each token "
        "reaches 4 nodes with 2 experts on each (the most the node limit allows, an upper bound "
        "on bytes; the traces' distribution of nodes per token is not published), and its own "
        "node is one of the 4 with probability 4/8 (routing does not depend on the GPU a "
        "token sits on)",
        "'confined to a single node' read two ways: any node (7/8 of the tokens leave their "
        "node; the main reading) and the token's own node (no inter-node bytes)",
        "experts of a node spread evenly, 4 per GPU; a node's k experts are k distinct of its "
        "32, uniformly",
    ),
    length_sweep={
        "deepseek-v3": ((4096, 30.7), (8192, 58.4), (16384, 116.1), (32768, 219.6)),
        "one-node": ((4096, 24.7), (8192, 43.8), (16384, 81.8), (32768, 144.2)),
    },
)


DEEPEP_EP64 = AllToAllMeasurement(
    name="deepep",
    description=(
        "DeepEP's own normal-kernel numbers at EP 64 (8 nodes x 8 H800): 4096 tokens, hidden "
        "7168, top-4 groups, top-8, FP8 dispatch, BF16 combine"
    ),
    **_DEEPSEEK_V3_EP64,
    cluster="stated",
    nvlink_GBps=160.0,
    nic_GBps=50.0,
    dispatch_row_bytes=7168 + 7168 // 128 * 4,
    combine_row_bytes=7168 * 2,
    covers="the dispatch kernel and the combine kernel alone (tuned chunk sizes, 24 SMs)",
    cases=(
        RoutingCase(
            name="top-4-groups",
            description="random scores, group-limited: 4 of 8 groups (= nodes), top-8",
            nodes_per_token=4,
            own_node_share=4 / 8,
            measured_GBps=(51.0, 50.0),
        ),
    ),
    sources=(
        "DeepEP README (V1, docs/legacy.md, https://github.com/deepseek-ai/DeepEP): normal "
        "kernels on H800 (~160 GB/s NVLink), one CX7 InfiniBand 400 Gb/s NIC per GPU (~50 "
        "GB/s); DeepSeek-V3/R1 pretraining setting (4096 tokens per batch, 7168 hidden, top-4 "
        "groups, top-8 experts, FP8 dispatching, BF16 combining); internode EP 64: dispatch "
        "51 GB/s, combine 50 GB/s bottleneck bandwidth (RDMA)",
        "DeepEP tests/test_internode.py: the RDMA bandwidth is (tokens x nodes each token "
        "reaches, the token's own node included) x hidden x bytes / time; FP8 rows carry one "
        "fp32 scale per 128 channels (factor (1 + 4/128) / 2 of bf16)",
    ),
    assumptions=(
        "4 nodes per token, 2 experts each (the group limit's maximum; random scores reach "
        "nearly 4): the nodes per token cancel out of the modeled bandwidth but for the "
        "per-message latency (< 3% of the time)",
        "latencies of the h100-dgx preset (2 us NVLink, 5 us InfiniBand per message)",
    ),
)


MEASUREMENTS: dict[str, AllToAllMeasurement] = {m.name: m for m in (FUSCO, DEEPEP_EP64)}
