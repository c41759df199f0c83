"""The plugin's SDPA core attention (``--locmoe-attention sdpa``, megatron_locmoe.attention)
against Megatron's own local DotProductAttention: the same outputs and input gradients (causal,
grouped-query heads, query-key layer scaling, a padding mask); the spec swap; its refusals; and
the CPU loop trains Megatron's attention's losses with it (2 ranks, EP 2 over 2 nodes)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from megatron_locmoe.config import ConfigError, LocMoEConfig
from megatron_locmoe.sim.cluster import ParallelLayout
from megatron_locmoe.sim.trainer import TrainSettings, tiny_model, train_job
from megatron_locmoe.validation import validate
from tests.test_pipeline_cpu import OPTIMIZER

JOB_TIMEOUT_S = 180
DP2 = ParallelLayout(devices_per_node=1)


def attention_job(ctx):
    """Per case: max |SDPA - Megatron| over the output and the q, k, v gradients."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_locmoe.attention import SDPAttention
    from megatron_locmoe.sim.testing import moe_config

    S, b, n, d = 16, 2, 4, 4
    cases = {
        "causal": (dict(), AttnMaskType.causal, 1),
        "gqa": (dict(num_query_groups=2), AttnMaskType.causal, 1),
        "layer_scaling": (
            dict(apply_query_key_layer_scaling=True, attention_softmax_in_fp32=True),
            AttnMaskType.causal,
            3,
        ),
        "padding_mask": (dict(num_query_groups=2), AttnMaskType.padding, 1),
    }
    out = {}
    for name, (overrides, mask_type, layer) in cases.items():
        config = moe_config(ep=1, attention_dropout=0.1, **overrides)
        groups = config.num_query_groups or n
        g = torch.Generator().manual_seed(11)
        q = torch.randn(S, b, n, d, generator=g)
        k, v = (torch.randn(S, b, groups, d, generator=g) for _ in range(2))
        grad = torch.randn(S, b, n * d, generator=g)
        mask = None
        if mask_type == AttnMaskType.padding:  # True = masked: the last 5 keys of sample 1
            mask = torch.zeros(b, 1, S, S, dtype=torch.bool)
            mask[1, :, :, -5:] = True
        diffs = []
        results = []
        for cls in (SDPAttention, DotProductAttention):
            attn = cls(config, layer, mask_type, "self").eval()  # dropout off: eval
            inputs = [t.clone().requires_grad_() for t in (q, k, v)]
            y = attn(*inputs, mask)
            (y * grad).sum().backward()
            results.append([y, *(t.grad for t in inputs)])
        for a, r in zip(*results, strict=True):
            diffs.append(float((a - r).abs().max()))
        out[name] = diffs
    return out


def test_sdpa_attention_equals_megatrons_attention(cluster2):
    for rank_result in cluster2.run(attention_job, layout=DP2, timeout_s=JOB_TIMEOUT_S):
        for case, diffs in rank_result.items():
            assert max(diffs) < 1e-5, (case, diffs)


def spec_job(ctx):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_locmoe.attention import SDPAttention, with_local_core_attention
    from megatron_locmoe.sim.testing import moe_config

    config = moe_config(ep=1, num_layers=2)
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=False)

    def cores(spec):
        return [s.submodules.self_attention.submodules.core_attention for s in spec.layer_specs]

    refused = None
    try:
        SDPAttention(moe_config(ep=1, window_size=(4, 0)), 1, None, "self")
    except ConfigError as e:
        refused = str(e)
    return (
        cores(with_local_core_attention(block, config, "sdpa")),
        cores(with_local_core_attention(block, config, "megatron")),
        DotProductAttention,
        SDPAttention,
        refused,
    )


def test_the_spec_swaps_in_sdpa_attention_only_when_asked(cluster2):
    sdpa, megatron, dpa, sdpa_cls = cluster2.run(spec_job, layout=DP2, timeout_s=JOB_TIMEOUT_S)[0][
        :4
    ]
    assert sdpa == [sdpa_cls, sdpa_cls] and megatron == [dpa, dpa]
    refused = cluster2.run(spec_job, layout=DP2, timeout_s=JOB_TIMEOUT_S)[0][4]
    assert refused and "sliding-window" in refused and "drop --locmoe-attention sdpa" in refused


@pytest.mark.parametrize(
    "overrides, what",
    [
        (dict(transformer_impl="transformer_engine"), "transformer-impl transformer_engine"),
        (dict(context_parallel_size=2), "context-parallel-size"),
        (dict(softmax_type="learnable"), "softmax-type learnable"),
    ],
)
def test_sdpa_attention_refuses_what_it_cannot_run(overrides, what):
    from megatron_locmoe.sim.testing import moe_config

    cfg = LocMoEConfig(router_type="locmoe", attention="sdpa")
    validate(cfg, moe_config(ep=1))  # the plain local spec runs
    with pytest.raises(ConfigError, match=what):
        validate(cfg, moe_config(ep=1, **overrides))


EP2 = ParallelLayout(devices_per_node=1, ep=2)  # two simulated nodes x 1 rank


def _settings(corpus, attention: str) -> TrainSettings:
    return TrainSettings(
        data_prefix=corpus,
        locmoe=LocMoEConfig(router_type="locmoe", attention=attention),
        model=tiny_model("locmoe", EP2, hidden_size=32, num_moe_experts=4),
        steps=3,
        seq_length=32,
        micro_batch_size=2,
        global_batch_size=4,
        optimizer=OPTIMIZER,  # Megatron's optimizer path with clipping that bites
    )


def test_training_with_sdpa_attention_keeps_megatrons_losses(cluster2, corpus, tmp_path):
    """Two simulated nodes x 1 rank, EP 2 across them, from one start: the same losses and
    gradient norms with either attention (fp32; the kernels sum in another order)."""
    layout = EP2
    start = str(tmp_path / "start")
    first = replace(_settings(corpus, "megatron"), steps=1, save_interval=1, save_dir=start)
    cluster2.run(train_job, first, layout=layout, timeout_s=JOB_TIMEOUT_S)
    runs = {
        attention: cluster2.run(
            train_job,
            replace(_settings(corpus, attention), init_weights_dir=start),
            layout=layout,
            timeout_s=JOB_TIMEOUT_S,
        )[0]
        for attention in ("megatron", "sdpa")
    }
    for key in ("losses", "grad_norm"):
        np.testing.assert_allclose(runs["sdpa"][key], runs["megatron"][key], rtol=1e-5, err_msg=key)
    assert runs["sdpa"]["losses"][0] != runs["sdpa"]["losses"][-1]  # it trained
