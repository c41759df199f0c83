"""Tensor parallelism with sequence parallelism on the CPU loop: 2 simulated nodes x 4 ranks,
TP 2 inside a node with EP 4 (experts not TP-split, ETP 1), trains the same loss curve as TP 1
(EP 4) for the same global batch from one model-only checkpoint saved under TP 1 (torch_dist
reshards the vocabulary-, column- and row-parallel weights). The router is Megatron's TopKRouter
without aux loss: its choice depends on the token alone. The vocabulary (257 byte tokens) is
padded to 258 in both layouts, so TP 2 can split it. The plugin's routers follow, with EP
across both nodes (the hierarchical dispatcher's two hops): those whose routing SP cannot
change train TP 1's loss, the others train with one set of metrics on every rank."""

from __future__ import annotations

import functools
from dataclasses import replace

import numpy as np
import pytest
import torch.distributed as dist

from megatron_locmoe.sim import data
from megatron_locmoe.sim.cluster import ParallelLayout
from megatron_locmoe.sim.trainer import TrainSettings, train_job
from tests.test_pipeline_cpu import (
    NO_AUX_LOSS,
    OPTIMIZER,  # clipping that bites: the norm must dedupe TP
)
from tests.test_pipeline_cpu import _settings as pipeline_settings

pytestmark = pytest.mark.slow  # 8-rank cluster trainings: `make test-fast` leaves them out

JOB_TIMEOUT_S = 240

TP1 = ParallelLayout(devices_per_node=4, ep=4)
TP2 = ParallelLayout(devices_per_node=4, tp=2, etp=1, ep=4)  # TP pairs (0, 1), ... in a node


def _settings(corpus, layout, **kw) -> TrainSettings:
    """2 layers, a global batch of 16 = 1 micro-batch x DP 8 at TP 1 = 2 x DP 4 at TP 2."""
    options = dict(vocab_size=data.VOCAB_SIZE + 1)  # 258: a multiple of TP 2
    model = dict(NO_AUX_LOSS, num_layers=2)
    return pipeline_settings(
        corpus, "megatron", layout, model=model, gpt_model_options=options, **kw
    )


def _key(settings: TrainSettings) -> tuple:
    """What tells two settings apart (a TransformerConfig compares its init methods, partials,
    by identity: the model by its repr)."""
    return replace(settings, model=None), repr(settings.model)


def one_start(cluster, start_cache, key, settings_for, layout) -> tuple:
    """(``settings_on(layout)``: the settings that start from one saved step, for any layout;
    every rank's result of them under ``layout``): ``settings_for(layout, **kw)`` trained one
    step under ``layout`` and saved, then trained from there. Once per session per ``key``
    and layout (conftest's ``start_cache``): the TP and CP tests compare against the same
    TP 1 / CP 1 runs."""

    def make(start: str) -> tuple:
        first = settings_for(layout, steps=1, save_interval=1, save_dir=start)
        cluster.run(train_job, first, layout=layout, timeout_s=JOB_TIMEOUT_S)
        settings = settings_for(layout, init_weights_dir=start)
        return start, _key(settings), cluster.run(train_job, settings, layout=layout, **run)

    run = dict(timeout_s=JOB_TIMEOUT_S)
    start, made_with, results = start_cache((*key, repr(layout)), make)

    def settings_on(other: ParallelLayout) -> TrainSettings:
        return settings_for(other, init_weights_dir=start)

    assert _key(settings_on(layout)) == made_with, f"start_cache: one key {key} for two settings"
    return settings_on, results


@pytest.fixture(scope="module")
def runs(cluster8, corpus, start_cache):
    """(TP 1 rank 0's result, TP 2's results by rank), both from one start saved under TP 1."""
    settings_on, reference = one_start(
        cluster8, start_cache, ("megatron", corpus), functools.partial(_settings, corpus), TP1
    )
    out = cluster8.run(train_job, settings_on(TP2), layout=TP2, timeout_s=JOB_TIMEOUT_S)
    return reference[0], out


def assert_same_training(out: dict, reference: dict, record_property) -> None:
    """The same losses and gradient norms as the reference layout's within float32 tolerance,
    with clipping that bites (so the norm's reduction over the layout's groups counts)."""
    assert min(reference["grad_norm"]) > OPTIMIZER.clip_grad
    for key in ("losses", "grad_norm"):
        record_property(key, out[key])
        record_property(f"reference_{key}", reference[key])
        np.testing.assert_allclose(out[key], reference[key], rtol=1e-5, err_msg=key)


def test_tensor_and_sequence_parallel_train_the_same_loss_as_tp1(runs, record_property):
    """TP 2 + SP (vocabulary-parallel embedding and loss, column/row-parallel attention, the
    norms' and router's gradients summed over the TP group, the norm counted once per TP
    group) against TP 1 with clipping: the same losses and gradient norms, on every rank."""
    reference, results = runs
    for r in results:
        assert r["losses"] == results[0]["losses"] and r["grad_norm"] == results[0]["grad_norm"]
    out = results[0]
    assert_same_training(out, reference, record_property)
    assert out["metrics"]["inter_node_bytes"] == 0  # EP 4 inside a node
    assert out["metrics"]["intra_node_bytes"] > 0


def test_tensor_parallel_metrics_are_identical_on_every_rank(runs):
    _, results = runs
    for r in results:
        assert r["metrics"] == results[0]["metrics"]


def test_a_vocabulary_that_does_not_split_is_refused(cluster8, corpus):
    settings = replace(_settings(corpus, TP2, steps=1), gpt_model_options={})
    with pytest.raises(Exception, match="does not split over tensor-parallel size 2"):
        cluster8.run(train_job, settings, layout=TP2, timeout_s=JOB_TIMEOUT_S)


# ---- the plugin's routers under TP 2 + SP, EP across the 2 nodes (hierarchical dispatcher) -----

# EP 8 with expert-TP 1 over 2 nodes x 4 ranks: one EP group of every rank, 4 EP ranks per node
# (both TP ranks of a pair dispatch their own sequence shard); the same experts on the same
# nodes as TP1_EP8. TP2_ETP2: EP 4 of expert-TP pairs, EP ranks 0, 2, 4, 6 (2 per node)
TP1_EP8 = ParallelLayout(devices_per_node=4, ep=8)
TP2_EP8 = ParallelLayout(devices_per_node=4, tp=2, etp=1, ep=8)
TP2_ETP2 = ParallelLayout(devices_per_node=4, tp=2, ep=4)

TOKEN_WISE = {  # (LocMoEConfig fields, TransformerConfig fields) of routers SP cannot change
    "hash": ({}, {}),  # the expert is a function of the token id
    "locmoe": (dict(locality_loss_coeff=0.0), {}),  # dropless; the aux loss is over the TP group
    "switch": ({}, dict(moe_expert_capacity_factor=8.0)),  # capacity = T tokens: no drop
}
BATCH_WISE = {  # routers whose routing or losses read this rank's tokens as a batch
    "locmoe": ({}, {}),  # the locality loss: D_c is the mean over this rank's tokens
    "switch": ({}, dict(moe_expert_capacity_factor=1.0)),  # capacity from this rank's T
    "locmoe_plus": ({}, dict(moe_expert_capacity_factor=1.1)),  # capacity, delta and D_c
}


def _router_settings(corpus, router_type, cases, layout, **kw) -> TrainSettings:
    locmoe_fields, overrides = cases[router_type]
    settings = pipeline_settings(
        corpus,
        router_type,
        layout,
        model=dict(NO_AUX_LOSS, num_layers=2, **overrides),
        gpt_model_options=dict(vocab_size=data.VOCAB_SIZE + 1),
        **kw,
    )
    return replace(settings, locmoe=replace(settings.locmoe, **locmoe_fields))


def ep_topology_job(ctx):
    """(this rank's EP group, nodes it spans, whether the two-hop subgroups exist)."""
    from megatron.core import parallel_state

    topo = ctx.topology()
    ep_ranks = dist.get_process_group_ranks(parallel_state.get_expert_model_parallel_group())
    return ep_ranks, topo.num_nodes, topo.intra_node_group is not None, topo.rail_group is not None


def _train(cluster, settings, layout) -> dict:
    """Rank 0's result, after checking that every rank reports the same losses and metrics
    (the last stage's loss; the metrics averaged over the TP peers and data parallelism)."""
    return _checked(cluster.run(train_job, settings, layout=layout, timeout_s=JOB_TIMEOUT_S))


def _checked(results: list[dict]) -> dict:
    """``_train``'s checks on every rank's result; rank 0's."""
    for r in results:
        assert r["losses"] == results[0]["losses"]
        assert r["metrics"] == results[0]["metrics"], "metrics differ between ranks"
    out = results[0]
    assert out["metrics"]["inter_node_bytes"] > 0 and out["metrics"]["intra_node_bytes"] > 0
    return out


@pytest.mark.parametrize("layout", [TP2_EP8, TP2_ETP2], ids=["etp1-ep8", "etp2-ep4"])
def test_ep_groups_span_both_nodes_under_tensor_parallelism(cluster8, layout):
    """The layouts below put the hierarchical dispatcher to work: every EP group has ranks on
    both nodes and both of its hops (intra-node and rail subgroups)."""
    for ep_ranks, nodes, intra, rail in cluster8.run(
        ep_topology_job, layout=layout, timeout_s=JOB_TIMEOUT_S
    ):
        assert len({r // layout.devices_per_node for r in ep_ranks}) == nodes == 2
        assert intra and rail


def trained_from_one_start(cluster, corpus, router_type, cases, start_cache, layout) -> tuple:
    """(``settings_on(layout)``, ``layout``'s result): one step of ``router_type`` saved under
    ``layout``, then the run from there that other layouts must equal (with clipping that
    bites); once per session for the same router fields (``one_start``)."""
    key = (router_type, repr(cases[router_type]), corpus)
    settings_for = functools.partial(_router_settings, corpus, router_type, cases)
    settings_on, results = one_start(cluster, start_cache, key, settings_for, layout)
    reference = _checked(results)
    assert min(reference["grad_norm"]) > OPTIMIZER.clip_grad
    return settings_on, reference


@pytest.mark.parametrize("router_type", list(TOKEN_WISE))
def test_token_wise_plugin_routers_train_the_tp1_loss_under_tp(
    cluster8, corpus, start_cache, router_type, record_property
):
    """Routers whose choice and losses do not depend on how sequence parallelism splits a
    micro-batch (hash; locmoe without locality loss, dropless, whose Switch-form aux loss
    Megatron counts over the TP group; switch at a capacity that drops nothing) train TP 1's
    losses and gradient norms from one start under TP 2 + SP with EP across the nodes (and,
    for locmoe, with expert-TP 2: the dispatcher's expert-TP all-gather / reduce-scatter)."""
    settings_on, reference = trained_from_one_start(
        cluster8, corpus, router_type, TOKEN_WISE, start_cache, TP1_EP8
    )
    layouts = [TP2_EP8, TP2_ETP2] if router_type == "locmoe" else [TP2_EP8]
    for layout in layouts:
        out = _train(cluster8, settings_on(layout), layout)
        record_property(f"losses {layout.describe()}", out["losses"])
        for key in ("losses", "grad_norm"):  # measured: 5e-7 apart at most
            np.testing.assert_allclose(out[key], reference[key], rtol=1e-5, err_msg=key)
    record_property("reference_losses", reference["losses"])


@pytest.mark.parametrize("router_type", list(BATCH_WISE))
def test_batch_wise_plugin_routers_train_under_tp(cluster8, corpus, router_type, record_property):
    """Routers that read this rank's tokens as a batch (LocMoE's locality loss, capacities and
    LocMoE's delta from this rank's T tokens) see half a micro-batch per TP rank under SP, so
    TP 2 legitimately routes differently from TP 1 (docs/cluster.md has the numbers): from
    scratch they train, every rank reports one set of metrics, the dispatcher crosses nodes."""
    check_batch_wise_router_trains(cluster8, corpus, router_type, TP2_EP8, record_property)


def check_batch_wise_router_trains(cluster, corpus, router_type, layout, record_property):
    """``router_type`` (of BATCH_WISE) trains 4 steps from scratch under ``layout``: the loss
    falls, its locality loss and drops are there (every rank reported one set: ``_train``)."""
    settings = _router_settings(corpus, router_type, BATCH_WISE, layout, steps=4, optimizer=None)
    out = _train(cluster, settings, layout)
    losses, metrics = out["losses"], out["metrics"]
    record_property("losses", losses)
    record_property("metrics", metrics)
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    if router_type.startswith("locmoe"):
        assert metrics["locality_loss"] > 0
    if router_type != "locmoe":
        assert metrics["tokens_dropped"] > 0


def locality_router(ctx, fused_router: str, use_kernels: bool, config: dict, **locmoe):
    """(router, x) of the locality-gradient jobs (TP here, CP in test_context_parallel_cpu): a
    top-1 LocMoE router over hidden 32 with only its locality loss attached (mu 0.1, aux loss
    off), ``config`` and ``locmoe`` added to its TransformerConfig and LocMoEConfig, in training
    mode on the given path; x the [8, 2, 32] shard both ranks of a pair (ranks 2i, 2i + 1)
    route."""
    import torch
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megatron_locmoe.config import LocMoEConfig
    from megatron_locmoe.resolve import settled
    from megatron_locmoe.routers.locmoe import LocMoERouter
    from megatron_locmoe.sim.testing import moe_config

    ctx.topology()
    tc = moe_config(ep=ctx.layout.ep, hidden_size=32, moe_router_topk=1, **config)
    lm = LocMoEConfig(
        router_type="locmoe",
        aux_loss_coeff=0.0,
        locality_loss_coeff=0.1,
        fused_router=fused_router,
        **locmoe,
    )
    # resolved first: a router takes a Resolution
    router = LocMoERouter(tc, get_default_pg_collection(), locmoe=settled(lm, tc))
    router.use_kernels = use_kernels
    router.train()
    x = torch.randn(8, 2, 32, generator=torch.Generator().manual_seed(ctx.rank // 2))
    return router, x


def locality_gradient_job(ctx, fused_router: str, use_kernels: bool = True):
    """The gradient of a LocMoE router's attached locality loss (aux loss off) on its input:
    under TP 2 each rank routes one [8, 2, 32] shard x (the same on both TP ranks); at TP 1
    the rank routes the micro-batch [x; x] those two shards make up. Returns the gradient on x
    (TP 1: on the first half)."""
    import torch

    layout = ctx.layout
    tp = dict(tp=layout.tp, expert_tensor_parallel_size=layout.etp)
    router, x = locality_router(ctx, fused_router, use_kernels, tp)
    batch = x if layout.tp == 2 else torch.cat([x, x])
    batch.requires_grad_(True)
    probs_TE, _ = router(batch)
    (probs_TE.sum() * 0).backward()  # only the attached loss reaches the input
    return batch.grad[:8]


ROUTING_PATHS = pytest.mark.parametrize(
    "fused_router, use_kernels",
    [("off", True), ("on", False), ("on", True)],
    ids=["reference", "fused", "kernels"],
)
"""The LocMoE router's three paths: reference, compiled graph, Triton kernels."""


def assert_same_gradient(cluster, job, args, reference_layout, layout) -> None:
    """``job(*args)``'s gradient on every rank equals the reference layout's (rank by rank:
    the same x, node and local experts on rank r in both layouts), and is not zero."""
    run = dict(timeout_s=JOB_TIMEOUT_S)
    reference = cluster.run(job, *args, layout=reference_layout, **run)
    out = cluster.run(job, *args, layout=layout, **run)
    assert float(reference[0].abs().max()) > 0
    for got, want in zip(out, reference, strict=True):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-9)


@ROUTING_PATHS
def test_the_locality_loss_counts_once_per_tensor_parallel_group(
    cluster8, fused_router, use_kernels
):
    """Under SP every TP rank attaches its own locality loss and the TP ranks' gradients add
    up (sequence-parallel activations, router weights), so each rank's share must be 1/TP of
    the micro-batch's, as Megatron scales its z-loss: with both shards alike, TP 2's gradient
    on a shard equals TP 1's on that half of the micro-batch (it was twice that), on the
    reference path, the fused path and the Triton kernels (interpreted on the CPU)."""
    args = (fused_router, use_kernels)
    assert_same_gradient(cluster8, locality_gradient_job, args, TP1_EP8, TP2_EP8)
