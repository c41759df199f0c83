"""A real Megatron GPTModel (local spec) with the plugin's MoE layers runs forward + backward on
CPU gloo ranks, and the hash router receives the model's input ids through attach_token_ids."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from megatron_locmoe.config import LocMoEConfig
from megatron_locmoe.sim.cluster import ParallelLayout
from megatron_locmoe.sim.testing import moe_config

VOCAB, SEQ, BATCH = 128, 16, 2


def gpt_job(ctx, router_type: str):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_locmoe.layer import LocMoELayer, locmoe_mlp_builder
    from megatron_locmoe.routers import HashRouter, attach_token_ids

    ctx.topology()
    config = moe_config(
        ep=ctx.layout.ep,
        num_layers=2,
        num_moe_experts=8,
        hidden_size=32,
        moe_router_topk=1,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    locmoe = LocMoEConfig(router_type=router_type, dispatcher="hierarchical")
    spec = get_gpt_layer_local_spec(num_experts=8, moe_grouped_gemm=False)
    mlp = locmoe_mlp_builder(spec.submodules.mlp, locmoe, vocab_size=VOCAB)
    spec = dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, mlp=mlp))
    model = GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=SEQ
    )
    handle = attach_token_ids(model)
    seen = []
    for layer in model.modules():
        if isinstance(layer, LocMoELayer):
            fwd = layer.router.forward

            def record(*args, _fwd=fwd, **kwargs):
                probs, routing_map = _fwd(*args, **kwargs)
                seen.append(routing_map.int().argmax(-1))
                return probs, routing_map

            layer.router.forward = record
    gen = torch.Generator().manual_seed(ctx.rank)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    pos = torch.arange(SEQ)[None].expand(BATCH, SEQ)
    logits = model(ids, pos, None)
    logits.float().square().mean().backward()
    hash_expected = None
    routers = [m.router for m in model.modules() if isinstance(m, LocMoELayer)]
    if isinstance(routers[0], HashRouter):
        hash_expected = [r.hash_table[ids.t().reshape(-1)].tolist() for r in routers]
    grads = [p.grad is not None for p in model.embedding.parameters()]
    return dict(
        moe_layers=len(routers),
        logits_shape=tuple(logits.shape),
        finite=bool(torch.isfinite(logits).all()),
        embedding_grad=all(grads),
        experts=[s.tolist() for s in seen],
        hash_expected=hash_expected,
        hook=handle is not None,
        dispatcher=type(model.decoder.layers[0].mlp.token_dispatcher).__name__,
    )


def test_gpt_model_with_plugin_layers(cluster2):
    layout = ParallelLayout(devices_per_node=1, ep=2)
    for router_type in ("hash", "locmoe"):
        for r in cluster2.run(gpt_job, router_type=router_type, layout=layout):
            assert r["moe_layers"] == 2 and r["finite"] and r["embedding_grad"]
            assert r["logits_shape"] == (BATCH, SEQ, VOCAB)
            assert r["dispatcher"] == "HierarchicalAlltoAllTokenDispatcher"
            if router_type == "hash":
                assert r["hook"]
                assert r["experts"] == r["hash_expected"]  # routed by the model's input ids
            else:
                assert not r["hook"] and r["hash_expected"] is None


def hash_graph_replay_job(ctx):
    """(routing maps replayed for new ids, what eager routing gives for them)."""
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megatron_locmoe.routers import attach_token_ids, router_builder

    ctx.topology()
    config = moe_config(
        ep=1, num_moe_experts=8, hidden_size=32, moe_router_topk=1,
        cuda_graph_impl="local", cuda_graph_modules=["moe_router"],
    )  # fmt: skip
    router = router_builder(LocMoEConfig(router_type="hash"), vocab_size=VOCAB)(
        config=config, pg_collection=get_default_pg_collection()
    ).to(ctx.device)

    class Model(torch.nn.Module):  # the GPT model's place: its pre-hook hands the ids over
        def __init__(self):
            super().__init__()
            self.router = router

        def forward(self, input_ids, hidden=None):
            return None if hidden is None else self.router(hidden)

    model = Model()
    attach_token_ids(model)
    gen = torch.Generator().manual_seed(5)
    ids = [torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen).to(ctx.device) for _ in range(3)]
    hidden = torch.randn(SEQ, BATCH, 32, device=ctx.device)
    model(ids[0].clone(), hidden)  # eager first steps, as Megatron's warm-up
    graph = torch.cuda.CUDAGraph()
    model(ids[0].clone())  # this forward's ids reach the routers; the layer is captured
    with torch.cuda.graph(graph):
        _, captured_map = router(hidden)
    replayed, eager = [], []
    for step_ids in ids[1:]:
        model(step_ids.clone())  # a new forward: its ids, fresh memory, then the replay
        graph.replay()
        torch.cuda.synchronize()
        replayed.append(captured_map.int().argmax(-1).tolist())
        eager.append(model(step_ids.clone(), hidden)[1].int().argmax(-1).tolist())
    return replayed, eager


@pytest.mark.skipif(
    os.environ.get("LOCMOE_TEST_DEVICE") != "cuda", reason="CUDA graphs: LOCMOE_TEST_DEVICE=cuda"
)
def test_hash_routing_replayed_in_a_cuda_graph_follows_each_forwards_ids(cluster_factory):
    """With Megatron's CUDA graphs capturing the router, a replay routes by the ids of the
    forward it replays for (not those of the captured one): the ids go through one buffer
    that stays put."""
    layout = ParallelLayout(devices_per_node=1, ep=1)
    ((replayed, eager),) = cluster_factory(1).run(hash_graph_replay_job, layout=layout)
    assert replayed == eager
    assert replayed[0] != replayed[1]  # the two forwards' ids route differently
