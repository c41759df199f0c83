"""The workloads of the cost model: the model and batch of one training step, per device, to
which a run's measured routing is scaled (a workload sets the model and batch, not the routing).
"""

from __future__ import annotations

from dataclasses import dataclass


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
