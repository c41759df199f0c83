"""A real Megatron GPTModel (local spec) with the plugin's MoE layers runs forward + backward on
CPU gloo ranks, and the hash router receives the model's input ids through attach_token_ids."""

from __future__ import annotations

import dataclasses

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
