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


def one_device_job(ctx):
    """A virtual cluster's layer (one device: EP 1) with the allgather permutation put in place
    of Megatron's alltoall dispatcher, against the same layer with the alltoall one rebuilt as
    Megatron builds it: outputs and every gradient, several virtual ranks."""
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.token_dispatcher import (
        MoEAllGatherTokenDispatcher,
        MoEAlltoAllTokenDispatcher,
    )

    from megatron_locmoe import virtual

    ctx.topology()
    config = moe_config(ep=1, num_moe_experts=8, moe_router_topk=2)
    lm = LocMoEConfig(router_type="megatron", virtual_cluster="2x2")
    torch.manual_seed(5)
    layer = build_moe_layer(config, locmoe=lm)
    plain = build_moe_layer(config, locmoe=LocMoEConfig(router_type="megatron"))
    kinds = (type(layer.token_dispatcher), type(plain.token_dispatcher))
    runs = {}
    for name in ("allgather", "alltoall"):
        if name == "alltoall":
            layer.token_dispatcher = MoEAlltoAllTokenDispatcher(
                layer.num_local_experts,
                layer.local_expert_indices,
                config=config,
                pg_collection=get_default_pg_collection(),
            )
        layer.zero_grad()
        ys, grads = [], []
        for rank in range(4):
            x = torch.randn(6, 2, config.hidden_size, generator=torch.Generator().manual_seed(rank))
            x.requires_grad_(True)
            virtual.enter(layer, rank)
            y, _ = layer(x)
            y.square().sum().backward()
            ys.append(y.detach())
            grads.append(x.grad)
        params = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
        runs[name] = (ys, grads, params)
    (y1, g1, p1), (y0, g0, p0) = runs["allgather"], runs["alltoall"]
    return dict(
        kinds=kinds == (MoEAllGatherTokenDispatcher, MoEAlltoAllTokenDispatcher),
        outputs=all(torch.equal(a, b) for a, b in zip(y1, y0, strict=True)),
        input_grads=all(torch.equal(a, b) for a, b in zip(g1, g0, strict=True)),
        param_grads=p1.keys() == p0.keys() and all(torch.equal(p1[n], p0[n]) for n in p1),
    )


def test_the_virtual_cluster_permutes_without_the_alltoall_dispatchers_identity_sort(cluster1):
    """Only on the virtual cluster (a plain one-device layer keeps Megatron's dispatcher), and
    bitwise what the alltoall dispatcher computes there."""
    (r,) = cluster1.run(one_device_job, layout=ParallelLayout(devices_per_node=1))
    assert r == dict(kinds=True, outputs=True, input_grads=True, param_grads=True), r
