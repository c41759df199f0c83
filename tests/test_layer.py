"""LocMoELayer chooses the dispatcher from the LocMoE config: hierarchical across nodes
(equal to Megatron's flat alltoall layer on the same weights and input), flat fallback inside
one node, and a clear error with Megatron's allgather/flex dispatchers."""

from __future__ import annotations

import pytest
import torch

from megatron_locmoe.config import ConfigError, LocMoEConfig
from megatron_locmoe.sim.cluster import ParallelLayout
from megatron_locmoe.sim.testing import build_moe_layer, moe_config
from megatron_locmoe.validation import validate


def layer_dispatcher_job(ctx):
    from megatron_locmoe.dispatch.dispatcher import HierarchicalAlltoAllTokenDispatcher

    ctx.topology()
    config = moe_config(ep=2, moe_router_topk=2)
    out = {}
    for name, lm in {
        "flat": LocMoEConfig(router_type="megatron"),
        "hier": LocMoEConfig(
            router_type="megatron", dispatcher="hierarchical", dispatcher_dedup="off"
        ),
    }.items():
        torch.manual_seed(5)  # same weights for both layers
        layer = build_moe_layer(config, locmoe=lm)
        x = torch.randn(6, 2, config.hidden_size, generator=torch.Generator().manual_seed(ctx.rank))
        x.requires_grad_(True)
        y, _ = layer(x)
        y.square().sum().backward()
        d = layer.token_dispatcher
        out[name] = dict(
            kind=type(layer).__name__,
            hierarchical=isinstance(d, HierarchicalAlltoAllTokenDispatcher),
            scheme=getattr(d, "scheme", "megatron"),
            y=y.detach(),
            x_grad=x.grad,
        )
    out["bitwise"] = torch.equal(out["flat"]["y"], out["hier"]["y"]) and torch.equal(
        out["flat"]["x_grad"], out["hier"]["x_grad"]
    )
    return out


@pytest.mark.parametrize("devices_per_node, scheme", [(1, "hierarchical"), (2, "flat")])
def test_layer_picks_dispatcher_from_config(cluster2, devices_per_node, scheme):
    results = cluster2.run(
        layer_dispatcher_job, layout=ParallelLayout(devices_per_node=devices_per_node, ep=2)
    )
    for r in results:
        assert r["flat"]["kind"] == r["hier"]["kind"] == "LocMoELayer"
        assert not r["flat"]["hierarchical"] and r["hier"]["hierarchical"]
        assert r["hier"]["scheme"] == scheme
        assert r["bitwise"]


def test_hierarchical_needs_alltoall():
    with pytest.raises(ConfigError, match="--moe-token-dispatcher-type is 'allgather'"):
        validate(
            LocMoEConfig(dispatcher="hierarchical"),
            moe_config(ep=1, moe_token_dispatcher_type="allgather"),
        )
    with pytest.raises(ConfigError, match="dispatcher_dedup='maybe'"):
        validate(LocMoEConfig(dispatcher_dedup="maybe"))
