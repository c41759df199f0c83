"""Megatron-Core's own MoELayer (TopKRouter, alltoall dispatcher, SequentialMLP) runs across 8
gloo ranks (2 simulated nodes x 4, EP=8) through the device patches, and equals a
single-process reference holding all experts: outputs, input grads, router and expert grads."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_locmoe.sim.cluster import ParallelLayout
from megatron_locmoe.sim.testing import (
    build_moe_layer,
    gather_expert_weights,
    moe_config,
    solo_pg_collection,
)

SEQ, BATCH = 12, 2


def _forward_backward(layer, x, grad_out):
    x = x.clone().requires_grad_(True)
    out, _ = layer(x)
    out.backward(grad_out)
    return out.detach(), x.grad


def moe_layer_vs_reference(ctx, topk: int, dispatcher: str):
    from megatron.core import parallel_state

    ep, tp = ctx.layout.ep, ctx.layout.tp
    config = moe_config(
        ep=ep,
        tp=tp,
        expert_tensor_parallel_size=ctx.layout.etp or tp,
        moe_router_topk=topk,
        moe_token_dispatcher_type=dispatcher,
    )
    layer = build_moe_layer(config)
    kind = type(layer.token_dispatcher).__name__

    # Router weights identical on all ranks (replicated), experts random per rank.
    torch.manual_seed(7)
    layer.router.weight.data.normal_(0, 0.5)
    gen = torch.Generator().manual_seed(100 + ctx.rank)
    for expert in layer.experts.local_experts:
        for p in expert.parameters():
            p.data.normal_(0, 0.3, generator=gen)
    x = torch.randn(SEQ, BATCH, config.hidden_size, generator=gen)
    grad_out = torch.randn(SEQ, BATCH, config.hidden_size, generator=gen)

    out, x_grad = _forward_backward(layer, x, grad_out)
    expert_grads = [
        {n: p.grad.clone() for n, p in e.named_parameters()} for e in layer.experts.local_experts
    ]
    router_grad = layer.router.weight.grad.clone()

    # Reference: the same module type with every group of size one, holding all experts.
    ep_group = parallel_state.get_expert_model_parallel_group()
    all_experts = gather_expert_weights(layer, config.num_moe_experts, ep_group)
    ref_config = moe_config(
        ep=1,
        moe_router_topk=topk,
        moe_token_dispatcher_type="allgather",
    )
    ref = build_moe_layer(ref_config, solo_pg_collection(ctx.timeout))
    ref.router.weight.data.copy_(layer.router.weight.data)
    for expert, state in zip(ref.experts.local_experts, all_experts, strict=True):
        expert.load_state_dict(state)
    ref_out, ref_x_grad = _forward_backward(ref, x, grad_out)

    # Expert grads are sums over every rank's tokens: sum the references over the EP group.
    ref_expert_grads = []
    for e in ref.experts.local_experts:
        grads = {}
        for n, p in e.named_parameters():
            g = p.grad.clone()
            dist.all_reduce(g, group=ep_group)
            grads[n] = g
        ref_expert_grads.append(grads)
    mine = layer.local_expert_indices
    diffs = {
        "out": (out - ref_out).abs().max().item(),
        "x_grad": (x_grad - ref_x_grad).abs().max().item(),
        "router_grad": (router_grad - ref.router.weight.grad).abs().max().item(),
        "expert_grad": max(
            (expert_grads[i][n] - ref_expert_grads[e][n]).abs().max().item()
            for i, e in enumerate(mine)
            for n in expert_grads[i]
        ),
    }
    return {"dispatcher": kind, "diffs": diffs, "out_norm": out.norm().item()}


def _check(results, expected_kind):
    for rank, r in enumerate(results):
        assert r["dispatcher"] == expected_kind
        assert r["out_norm"] > 0
        for name, d in r["diffs"].items():
            assert d < 1e-5, f"rank {rank}: {name} differs from the reference by {d}"


def test_alltoall_moe_layer_equals_reference_2x4(cluster8):
    layout = ParallelLayout(devices_per_node=4, ep=8)
    for topk in (2, 1):
        results = cluster8.run(
            moe_layer_vs_reference, topk=topk, dispatcher="alltoall", layout=layout
        )
        _check(results, "MoEAlltoAllTokenDispatcher")


def test_moe_layer_equals_reference_tp2_sequence_parallel(cluster8):
    """TP=2 with sequence parallel (each rank holds its sequence shard), EP=4, expert-TP=1."""
    layout = ParallelLayout(devices_per_node=4, ep=4, tp=2, etp=1)
    for dispatcher, kind in (
        ("alltoall", "MoEAlltoAllTokenDispatcher"),
        ("allgather", "MoEAllGatherTokenDispatcher"),
    ):
        results = cluster8.run(moe_layer_vs_reference, topk=2, dispatcher=dispatcher, layout=layout)
        _check(results, kind)
