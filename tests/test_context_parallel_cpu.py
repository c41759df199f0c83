"""Context parallelism on the CPU loop: the CP attention (megatron_locmoe.attention) against
Megatron's own causal DotProductAttention on the full sequence, and RoPE's / YaRN's CP split
(the adaptor's) against Megatron's batch split (2 ranks); then 2 simulated nodes x 4 ranks, CP 2
against CP 1 from one start saved under CP 1: Megatron's TopKRouter (learned positions and RoPE)
and the routers whose choice depends on the token alone train CP 1's losses and gradient norms;
the batch-wise plugin routers train with one set of metrics on every rank; the locality loss
counts once per CP group."""

from __future__ import annotations

import inspect
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.distributed as dist

from megatron_locmoe.sim.cluster import ParallelLayout
from megatron_locmoe.sim.trainer import train_job
from tests.test_tensor_parallel_cpu import (
    BATCH_WISE,
    ROUTING_PATHS,
    TOKEN_WISE,
    TP1,
    _train,
    assert_same_gradient,
    assert_same_training,
    check_batch_wise_router_trains,
    locality_router,
    one_start,
    trained_from_one_start,
)
from tests.test_tensor_parallel_cpu import _settings as tp_settings

pytestmark = pytest.mark.slow  # 8-rank cluster trainings: `make test-fast` leaves them out

JOB_TIMEOUT_S = 240
CP2 = ParallelLayout(devices_per_node=2, cp=2)


def _cp_local(x_S: torch.Tensor, seq_dim: int = 0) -> torch.Tensor:
    """This CP rank's share of a tensor with the sequence at ``seq_dim``, by Megatron's own
    batch split (get_batch_on_this_cp_rank, which cuts dim 1 of [b, S, ...])."""
    from megatron.core import parallel_state
    from megatron.core.utils import get_batch_on_this_cp_rank

    group = parallel_state.get_context_parallel_group()
    batch = {"x": x_S.transpose(seq_dim, 1)}
    out = get_batch_on_this_cp_rank(batch, False, cp_group=group)["x"]
    return out.transpose(seq_dim, 1).contiguous()


def attention_job(ctx):
    """(max |CP out - full out|, max |grad diffs|) for q, k, v of this rank's tokens."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_locmoe.attention import ContextParallelDotProductAttention
    from megatron_locmoe.sim.testing import moe_config

    config = moe_config(ep=1, context_parallel_size=2, num_query_groups=2, attention_dropout=0.0)
    S, b, n, d = 16, 2, 4, 4
    g = torch.Generator().manual_seed(7)
    q, k, v, grad = (torch.randn(S, b, n if i in (0, 3) else 2, d, generator=g) for i in range(4))
    grad = grad.flatten(2)

    cp_attn = ContextParallelDotProductAttention(config, 1, AttnMaskType.causal, "self")
    full_config = moe_config(ep=1, num_query_groups=2, attention_dropout=0.0)
    full_attn = DotProductAttention(full_config, 1, AttnMaskType.causal, "self")
    inputs = [_cp_local(t).requires_grad_() for t in (q, k, v)]
    out = cp_attn(*inputs, None)
    (out * _cp_local(grad)).sum().backward()
    ref_inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = full_attn(*ref_inputs, None)
    (ref * grad).sum().backward()
    diffs = [float((out - _cp_local(ref)).abs().max())]
    diffs += [
        float((x.grad - _cp_local(r.grad)).abs().max())
        for x, r in zip(inputs, ref_inputs, strict=True)
    ]
    return diffs


def test_cp_attention_equals_full_causal_attention(cluster2):
    """CP 2's outputs and q/k/v gradients are Megatron's CP 1 causal attention's (on the full
    sequence), on both ranks: the gather's backward returns every rank's key/value gradient."""
    for diffs in cluster2.run(attention_job, layout=CP2, timeout_s=JOB_TIMEOUT_S):
        np.testing.assert_allclose(diffs, 0.0, atol=1e-5)


ROPE_SPLIT = "megatron.core.models.common.embeddings.rope_utils.get_pos_emb_on_this_cp_rank"


def rope_split_job(ctx):
    """(whether Megatron's own RoPE CP split failed here, max |diffs| against Megatron's batch
    split of the full sequence's embedding: the installed split on a [S, 1, 1, d] and a
    [3, S, d] tensor, RoPE's forward, YaRN's forward), on this CP rank."""
    from megatron.core import parallel_state
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        YarnRotaryEmbedding,
    )

    from megatron_locmoe.adaptor import REGISTRY

    group = parallel_state.get_context_parallel_group()
    S = 32
    megatron_failed = None  # None: not replaced on this device (CUDA runs Megatron's own)
    if ROPE_SPLIT in REGISTRY.applied:
        try:
            REGISTRY.applied[ROPE_SPLIT].original(torch.zeros(S, 1, 1, 4), 0, group)
            megatron_failed = False
        except RuntimeError:  # pinned host memory and .cuda() without a CUDA driver
            megatron_failed = True
    split = rope_utils.get_pos_emb_on_this_cp_rank
    emb = torch.randn(S, 1, 1, 8, generator=torch.Generator().manual_seed(5))
    emb3 = torch.randn(3, S, 8, generator=torch.Generator().manual_seed(6))
    diffs = [(split(emb, 0, group) - _cp_local(emb)), (split(emb3, 1, group) - _cp_local(emb3, 1))]
    rope = RotaryEmbedding(
        kv_channels=8, rotary_percent=1.0, use_cpu_initialization=True, cp_group=group
    )
    diffs.append(rope(S) - _cp_local(rope.get_emb(S)))
    yarn = YarnRotaryEmbedding(  # its __init__ already splits its cos/sin cache's embedding
        kv_channels=8,
        rotary_percent=1.0,
        use_cpu_initialization=True,
        scaling_factor=4.0,
        original_max_position_embeddings=16,
        cp_group=group,
    )
    diffs.append(yarn(S)[0] - _cp_local(yarn.get_emb(S)[0]))
    return megatron_failed, [float(d.abs().max()) for d in diffs]


def test_rope_and_yarn_keep_the_positions_of_this_cp_ranks_tokens(cluster2):
    """RoPE's and YaRN's CP split (Megatron's get_pos_emb_on_this_cp_rank, which fails on a
    CPU rank, replaced by the adaptor) keeps the rows of exactly the positions that Megatron's
    batch split gives this rank's tokens, on both ranks and for any sequence dimension."""
    for megatron_failed, diffs in cluster2.run(rope_split_job, layout=CP2, timeout_s=JOB_TIMEOUT_S):
        assert megatron_failed in (True, None)
        assert diffs == [0.0] * 4


# ---- the CPU loop under CP 2: 2 simulated nodes x 4 ranks, the loss of CP 1 ----------------


CP1_EP4 = ParallelLayout(devices_per_node=4, ep=4)
CP2_EP4 = ParallelLayout(devices_per_node=4, cp=2, ep=4)  # CP pairs (0, 1), ... in a node


@pytest.fixture(scope="module", params=["learned_absolute", "rope"])
def cp_runs(request, cluster8, corpus, start_cache):
    """(CP 1 rank 0's result, CP 2's results by rank), both from one start saved under CP 1,
    with learned absolute positions (the position ids split as the tokens) or RoPE (its
    embedding split by the adaptor's get_pos_emb_on_this_cp_rank). Megatron's TopKRouter
    without aux loss: its choice depends on the token alone."""

    from megatron.core.models.gpt import GPTModel

    def settings_for(layout, **kw):
        settings = tp_settings(corpus, layout, **kw)
        if request.param == "learned_absolute":  # GPTModel's default: TP 1's start and run
            default = inspect.signature(GPTModel).parameters["position_embedding_type"].default
            assert default == "learned_absolute", default
            return settings
        options = {**settings.gpt_model_options, "position_embedding_type": request.param}
        return replace(settings, gpt_model_options=options)

    key = ("megatron", corpus) if request.param == "learned_absolute" else ("rope", corpus)
    settings_on, reference = one_start(cluster8, start_cache, key, settings_for, CP1_EP4)
    assert CP1_EP4 == TP1  # the same layout: the start and TP 1's run are shared
    out = cluster8.run(train_job, settings_on(CP2_EP4), layout=CP2_EP4, timeout_s=JOB_TIMEOUT_S)
    return reference[0], out


def test_context_parallel_trains_the_same_loss_as_cp1(cp_runs, record_property):
    """CP 2 (each rank 2 of the 4 sequence chunks, keys and values gathered over the CP pair,
    gradients averaged over the dp-cp group) against CP 1, with clipping that bites: the same
    losses and gradient norms for the same global batch and start."""
    reference, results = cp_runs
    out = results[0]
    assert_same_training(out, reference, record_property)


def test_context_parallel_metrics_are_identical_on_every_rank(cp_runs):
    _, results = cp_runs
    for r in results:
        for key in ("losses", "grad_norm", "metrics"):
            assert r[key] == results[0][key], key


# ---- plugin routers under CP 2, EP across both nodes (the hierarchical dispatcher's two hops) --

# EP 8 over 2 nodes x 4 ranks: Megatron's expert grid has no CP dimension, so EP spans the CP
# pairs too (each CP rank dispatches its own 2 sequence chunks); the same experts on the same
# nodes as CP1_EP8
CP1_EP8 = ParallelLayout(devices_per_node=4, ep=8)
CP2_EP8 = ParallelLayout(devices_per_node=4, cp=2, ep=8)

CP_TOKEN_WISE = {  # (LocMoEConfig fields, TransformerConfig fields) of routers CP cannot change
    "hash": TOKEN_WISE["hash"],  # the expert is a function of this position's token id
    "locmoe": TOKEN_WISE["locmoe"],  # dropless; the Switch-form aux loss over the tp-cp group
    # Megatron's aux loss: tokens per expert summed over the tp-cp group, its gradient scaled
    # by CP in the schedule (the dp-cp average would otherwise take 1/CP of it)
    "megatron": ({}, dict(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.01)),
}


@pytest.mark.parametrize("router_type", list(CP_TOKEN_WISE))
def test_token_wise_routers_train_the_cp1_loss_under_cp(
    cluster8, corpus, start_cache, router_type, record_property
):
    """Routers whose choice and losses do not depend on how CP splits a sequence (hash, whose
    ids the CPU loop splits as the tokens; locmoe without locality loss; Megatron's TopKRouter
    with its aux loss) train CP 1's losses and gradient norms from one start under CP 2 with
    EP across the nodes, every rank reporting the same losses and metrics."""
    settings_on, reference = trained_from_one_start(
        cluster8, corpus, router_type, CP_TOKEN_WISE, start_cache, CP1_EP8
    )
    out = _train(cluster8, settings_on(CP2_EP8), CP2_EP8)
    record_property("losses", out["losses"])
    record_property("reference_losses", reference["losses"])
    for key in ("losses", "grad_norm"):
        np.testing.assert_allclose(out[key], reference[key], rtol=1e-5, err_msg=key)
    if router_type != "hash":
        key = "load_balancing_loss"
        np.testing.assert_allclose(out["metrics"][key], reference["metrics"][key], rtol=1e-5)


@pytest.mark.parametrize("router_type", list(BATCH_WISE))
def test_batch_wise_routers_train_under_cp(cluster8, corpus, router_type, record_property):
    """Routers that read this rank's tokens as a batch (LocMoE's locality loss, capacities and
    LocMoE's delta from this rank's T tokens) see half of each sequence per CP rank, so CP 2
    legitimately routes differently from CP 1: from scratch they train, every rank reports one
    set of metrics (averaged over the tp-cp and data-parallel ranks), the dispatcher crosses
    nodes."""
    check_batch_wise_router_trains(cluster8, corpus, router_type, CP2_EP8, record_property)


def locality_weight_gradient_job(ctx, fused_router: str, use_kernels: bool = True):
    """The router weight's gradient of a LocMoE router's attached locality loss (aux loss
    off), as the CPU loop finalizes it: under CP 2 each rank of a CP pair routes one [8, 2, 32]
    chunk x (the same on both ranks), the schedule's aux-loss scale is CP (Megatron's
    ``forward_step_calc_loss``) and the gradient is averaged over the CP pair (the dp-cp
    average); at CP 1 the rank routes [x; x], its scale 1."""
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    cp = ctx.layout.cp
    router, x = locality_router(
        ctx,
        fused_router,
        use_kernels,
        dict(context_parallel_size=cp),
        grap_mode="learnable",  # a gate weight that receives the gradient
    )
    batch = x if cp == 2 else torch.cat([x, x])
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(float(cp)))
    try:
        probs_TE, _ = router(batch)
        (probs_TE.sum() * 0).backward()  # only the attached loss reaches the weight
    finally:
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    grad = router.weight.grad
    if cp > 1:
        group = parallel_state.get_context_parallel_group()
        dist.all_reduce(grad, group=group, op=dist.ReduceOp.AVG)
    return grad


@ROUTING_PATHS
def test_the_locality_loss_counts_once_per_context_parallel_group(
    cluster8, fused_router, use_kernels
):
    """mu / (TP x CP) per rank is Megatron's z-loss rule under CP as well: the schedule scales
    every attached loss by CP and the dp-cp average divides it again, so with both chunks of
    a CP pair alike, CP 2's router gradient equals CP 1's on [x; x] (without the 1 / CP it
    was twice that), on the reference path, the fused path and the Triton kernels."""
    args = (fused_router, use_kernels)
    assert_same_gradient(cluster8, locality_weight_gradient_job, args, CP1_EP8, CP2_EP8)
