"""The plugin's block spec in a real GPTModel: every MoE layer becomes a LocMoELayer, the
pre-wrap check rejects stock MoE layers, and the plugin's metrics come out of Megatron's tracker
report (the path of training_log) with one set of names."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_locmoe.config import LocMoEConfig
from megatron_locmoe.sim.cluster import ParallelLayout
from megatron_locmoe.sim.testing import moe_config

VOCAB, SEQ, BATCH = 100, 16, 2


class _Writer:
    """Collects add_scalar calls like a TensorBoard SummaryWriter."""

    def __init__(self):
        self.scalars = {}

    def add_scalar(self, name, value, step):
        self.scalars[name] = float(value)


def spec_job(ctx, router_type: str):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    from megatron_locmoe.layer import LocMoELayer
    from megatron_locmoe.metrics import LocMoEMetricsTracker
    from megatron_locmoe.spec import check_and_connect, locmoe_block_spec

    config = moe_config(
        ep=ctx.layout.ep,
        num_layers=3,
        moe_layer_freq=[0, 1, 1],
        num_moe_experts=8,
        hidden_size=32,
        moe_router_topk=1,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    config.locmoe = LocMoEConfig(
        router_type=router_type, dispatcher="hierarchical", devices_per_node=ctx.devices_per_node
    )
    model_config = SimpleNamespace(transformer=config, vocab_size=VOCAB, should_pad_vocab=False)
    block = locmoe_block_spec(model_config)
    model = GPTModel(
        config=config, transformer_layer_spec=block, vocab_size=VOCAB, max_sequence_length=SEQ
    )
    check_and_connect([model])
    kinds = [type(layer.mlp).__name__ for layer in model.decoder.layers]

    stock = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_decoder_block_spec(config, use_transformer_engine=False),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
    )
    try:
        check_and_connect([stock])
        rejected = None
    except RuntimeError as e:
        rejected = str(e)

    tracker = get_moe_metrics_tracker()
    tracker.clear()
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(ctx.rank))
    logits = model(ids, torch.arange(SEQ)[None].expand(BATCH, SEQ), None)
    logits.float().square().mean().backward()
    writer = _Writer()
    totals = {}
    tracker.report(
        1.0,
        1,
        writer=writer,
        track_names=["load_balancing_loss"],
        num_layers=3,
        moe_layer_freq=[0, 1, 1],
        force_initialize=True,
        total_loss_dict=totals,
    )
    return dict(
        kinds=kinds,
        rejected=rejected,
        scalars=writer.scalars,
        tracker=isinstance(tracker, LocMoEMetricsTracker),
        moe_count=sum(isinstance(m, LocMoELayer) for m in model.modules()),
    )


@pytest.mark.parametrize("router_type", ["locmoe", "hash"])
def test_block_spec_and_metrics_report(cluster2, router_type):
    from megatron_locmoe.metrics import PLUGIN_METRICS

    results = cluster2.run(
        spec_job, router_type=router_type, layout=ParallelLayout(devices_per_node=1, ep=2)
    )
    for r in results:
        assert r["kinds"] == ["MLP", "LocMoELayer", "LocMoELayer"]
        assert r["moe_count"] == 2
        assert r["rejected"] and "2 of 2 MoE layers are Megatron's own" in r["rejected"]
        assert r["tracker"]
        assert set(PLUGIN_METRICS) <= set(r["scalars"])
        assert r["scalars"]["inter_node_bytes"] > 0  # 2 nodes x 1: every remote copy crosses
        assert 0 <= r["scalars"]["node_local_fraction"] <= 1
    # identical names on every rank (a mismatch would hang the pipeline all-reduce)
    assert len({tuple(sorted(r["scalars"])) for r in results}) == 1


@pytest.mark.parametrize(
    "modules, layer_class",
    [(["moe_router"], "MoETransformerLayer"), (["attn", "moe_router"], "MoETransformerLayer")],
)
def test_local_cuda_graphs_build_moe_layers_megatron_can_graph_in_part(modules, layer_class):
    """Under ``--cuda-graph-impl local`` with moe_router, the MoE layers are Megatron's
    MoETransformerLayer (router and postprocess graphed, dispatch eager); the spec's dense
    layers and every layer without local graphs keep TransformerLayer."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from megatron_locmoe.spec import moe_layer_class, with_locmoe_layers

    config = moe_config(ep=1)
    dense, moe = get_gpt_layer_local_spec(), get_gpt_layer_local_spec(num_experts=8)
    block = TransformerBlockSubmodules(layer_specs=[dense, moe])
    graphed = SimpleNamespace(cuda_graph_impl="local", cuda_graph_modules=modules)
    for cfg, moe_class in ((graphed, layer_class), (config, "TransformerLayer")):
        lm = LocMoEConfig(router_type="locmoe")
        spec = with_locmoe_layers(block, lm, layer_class=moe_layer_class(cfg))
        assert [s.module.__name__ for s in spec.layer_specs] == ["TransformerLayer", moe_class]


@pytest.mark.parametrize("modules", [[], ["attn"]])
def test_local_cuda_graphs_of_whole_dropless_moe_layers_are_refused(modules):
    """Whole-layer local graphs of a dropless MoE layer would fail after the warm-up steps
    with an invalidated capture (the dispatch waits on the host): refused up front, with the
    fix; padding to capacity makes them capturable."""
    from megatron_locmoe.config import ConfigError
    from megatron_locmoe.spec import check_local_cuda_graphs

    cfg = SimpleNamespace(
        cuda_graph_impl="local",
        cuda_graph_modules=modules,
        moe_expert_capacity_factor=None,
        moe_pad_expert_input_to_capacity=False,
    )
    with pytest.raises(ConfigError, match="add moe_router to --cuda-graph-modules"):
        check_local_cuda_graphs(cfg)
    cfg.moe_expert_capacity_factor, cfg.moe_pad_expert_input_to_capacity = 1.0, True
    check_local_cuda_graphs(cfg)
    check_local_cuda_graphs(
        SimpleNamespace(cuda_graph_impl="local", cuda_graph_modules=["moe_router"])
    )
