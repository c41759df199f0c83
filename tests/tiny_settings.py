"""The tiny run several CPU-loop tests train: one router's TransformerConfig from
``tiny_model`` (the loop's small GPT-MoE) on the test's layout, the plugin's defaults
otherwise."""

from __future__ import annotations

from megatron_locmoe.config import LocMoEConfig
from megatron_locmoe.sim.cluster import ParallelLayout
from megatron_locmoe.sim.trainer import TrainSettings, tiny_model


def tiny_settings(
    data_prefix: str, layout: ParallelLayout, router_type: str = "locmoe", **run
) -> TrainSettings:
    """``router_type``'s tiny model on ``layout`` reading ``data_prefix``; ``run``: the other
    TrainSettings fields (steps, saving, learning rate, ...)."""
    return TrainSettings(
        data_prefix=data_prefix,
        locmoe=LocMoEConfig(router_type=router_type),
        model=tiny_model(router_type, layout),
        **run,
    )
