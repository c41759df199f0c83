"""The virtual cluster (megatron_locmoe.virtual) against the cluster it stands for.

The simulated cluster (4 nodes x 2 gloo ranks, EP 8 across the nodes, the two-hop dispatcher)
and the virtual cluster 4x2 in one process train the same model from one start, on the same
data with the same seed, 3 steps of 2 micro-batches per rank with clipping that bites: every
router of the study (Megatron's aux-loss router and its node-limited routing, hash, LocMoE with
its locality loss and with the node target, LocMoE+), with the same mixture on every rank and
with one domain per node. Losses, gradient norms and every routing, traffic and load metric
agree to float32 summation order. A virtual cluster that puts one rank on the wrong node fails.

One quantity may differ by construction and is covered here where it does not: LocMoE's
capacity estimate all-reduces delta over the data-parallel ranks in one micro step, which the
virtual ranks run one after the other; virtual rank v uses the mean over ranks 0..v for that
one micro-batch (routers/locmoe.py, ``_virtual_delta``). LocMoE+ here starts without an
estimate, so its first step estimates; at hidden 32 its capacity sits at the floor whatever
delta is, so the run still agrees exactly, and the recorded delta is the full mean.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from megatron_locmoe.config import LocMoEConfig
from megatron_locmoe.sim import data
from megatron_locmoe.sim.cluster import ParallelLayout
from megatron_locmoe.sim.trainer import TrainSettings, tiny_model, train_job
from tests.test_pipeline_cpu import OPTIMIZER

pytestmark = pytest.mark.slow  # 8-rank cluster trainings: `make test-fast` leaves them out

JOB_TIMEOUT_S = 240
REAL = ParallelLayout(devices_per_node=2, ep=8)  # 4 nodes x 2 ranks, one EP group of all 8
ONE = ParallelLayout(devices_per_node=1)  # the virtual cluster's one process

CASES = {  # name: (router, LocMoEConfig fields, TransformerConfig fields)
    "megatron": ("megatron", {}, dict(moe_router_load_balancing_type="aux_loss")),
    "megatron_node_limited": (
        "megatron",
        {},
        dict(
            moe_router_load_balancing_type="aux_loss",
            moe_router_topk=2,
            moe_router_num_groups=4,  # groups = nodes (4 experts each)
            moe_router_group_topk=2,
            moe_router_pre_softmax=False,
        ),
    ),
    "megatron_node_selection": (  # the margin, the fill and the node target in Megatron's top-k hook
        "megatron",
        dict(
            node_margin=0.1, node_fill_mass=0.9, node_target_share=0.5, node_bias_mode="selection"
        ),
        dict(moe_router_load_balancing_type="aux_loss", moe_router_topk=2),
    ),
    "hash": ("hash", {}, {}),
    "locmoe": ("locmoe", dict(locality_loss_coeff=0.1), {}),
    "locmoe_node_target": ("locmoe", dict(node_target_share=0.5), {}),
    "locmoe_node_aware": (  # the selection-only bias, the margin and the rank-balance loss
        "locmoe",
        dict(
            node_target_share=0.5,
            node_bias_mode="selection",
            node_margin=0.1,
            rank_balance_loss_coeff=0.01,
        ),
        {},
    ),
    "locmoe_learned_offset": (  # TA-MoE's offset: a parameter, the same on every rank
        "locmoe",
        dict(node_target_share=0.5, node_bias_mode="learned"),
        {},
    ),
    "locmoe_plus": ("locmoe_plus", {}, dict(moe_expert_capacity_factor=1.1)),
}
START_OF = {
    "locmoe_plus": "locmoe",
    "locmoe_node_aware": "locmoe_node_target",
}
"""Cases that start from another's checkpoint (LocMoE+ without a capacity estimate; the node
options from the node target's, whose node bias they step; Megatron's node options start from
their own, which holds the node bias Megatron's router lacks)."""


@pytest.fixture(scope="module")
def corpus(start_cache):
    """The control (one mixture) and 4 domains, one per node: built once per session
    (conftest's ``start_cache``; tests/test_outgoing_cap.py reads the same data)."""

    def build(out: str) -> dict:
        built = data.build_domain_datasets(Path(out), 4, max_stdlib_files=40, held_out_every=10)
        return {"control": built["mixture"], "domains": built["prefixes"]}

    return dict(start_cache(("domain corpus", 4, 40, 10), build))


def _settings(
    corpus, case: str, data_setting: str, virtual: bool, layout=None, model=None, **kw
) -> TrainSettings:
    """``case`` on ``data_setting``, virtual or real, for ``layout`` (default: the virtual
    cluster's one process or the real cluster); ``model``: more of the model's fields."""
    router, fields, overrides = CASES[case]
    locmoe = LocMoEConfig(router_type=router, dispatcher="hierarchical", **fields)
    if virtual:
        locmoe = replace(locmoe, virtual_cluster="4x2")
    prefixes = dict(data_prefix=corpus["control"])
    if data_setting == "domains":
        prefixes.update(data_prefix_per_node=corpus["domains"])
    fields = dict(num_layers=2, hidden_size=32, num_moe_experts=16, moe_aux_loss_coeff=0.01)
    fields.update(overrides, **(model or {}))
    settings = TrainSettings(
        locmoe=locmoe,
        model=tiny_model(router, layout or (ONE if virtual else REAL), **fields),
        steps=3,
        seq_length=32,
        micro_batch_size=2,
        global_batch_size=32,  # 2 micro-batches per rank of 8
        optimizer=OPTIMIZER,
        **prefixes,
    )
    return replace(settings, **kw)


@pytest.fixture(scope="module")
def starts(cluster8, corpus, tmp_path_factory):
    """One start per router, saved by the real cluster after one step on the mixture."""
    out = {}
    for case in dict.fromkeys(START_OF.get(c, c) for c in CASES):
        path = str(tmp_path_factory.mktemp(f"start_{case}"))
        settings = _settings(corpus, case, "control", False, steps=1, save_interval=1)
        cluster8.run(
            train_job, replace(settings, save_dir=path), layout=REAL, timeout_s=JOB_TIMEOUT_S
        )
        out[case] = path
    return out


def _real(cluster8, settings) -> dict:
    results = cluster8.run(train_job, settings, layout=REAL, timeout_s=JOB_TIMEOUT_S)
    for r in results:
        assert r["losses"] == results[0]["losses"] and r["metrics"] == results[0]["metrics"]
    return results[0]


@pytest.fixture(scope="module")
def real_from_start(cluster8, corpus, starts):
    """``real_from_start(case, data_setting)``: the real cluster's run of the case from its
    start, once per module: the comparison and the wrong-node test read the same run of
    LocMoE on the domains (each ran it itself before)."""
    done = {}

    def get(case: str, data_setting: str) -> dict:
        if (case, data_setting) not in done:
            start = starts[START_OF.get(case, case)]
            settings = _settings(corpus, case, data_setting, False, init_weights_dir=start)
            done[case, data_setting] = _real(cluster8, settings)
        return done[case, data_setting]

    return get


def assert_same_run(virtual: dict, real: dict, record_property) -> None:
    """Losses, gradient norms and every metric of the real run, within float32 summation."""
    assert min(real["grad_norm"]) > OPTIMIZER.clip_grad  # clipping bites
    for key in ("losses", "grad_norm"):
        record_property(f"real {key}", real[key])
        record_property(f"virtual {key}", virtual[key])
        np.testing.assert_allclose(virtual[key], real[key], rtol=1e-5, err_msg=key)
    assert set(virtual["metrics"]) == set(real["metrics"])
    record_property("real metrics", real["metrics"])
    record_property("virtual metrics", virtual["metrics"])
    for name, value in real["metrics"].items():
        np.testing.assert_allclose(
            virtual["metrics"][name], value, rtol=1e-5, atol=1e-6, err_msg=name
        )


OPTION_CASES = ("locmoe_node_aware", "locmoe_learned_offset", "megatron_node_selection")
"""Routing options on a router the other cases cover on both data settings: the control alone
(what they add reads the node map, not the data)."""


@pytest.mark.parametrize(
    "case, data_setting",
    [
        (case, setting)
        for case in CASES
        for setting in ("control", "domains")
        if case not in OPTION_CASES or setting == "control"
    ],
)
def test_the_virtual_cluster_trains_what_the_real_cluster_trains(
    cluster1, corpus, starts, real_from_start, case, data_setting, record_property
):
    start = starts[START_OF.get(case, case)]
    real = real_from_start(case, data_setting)
    virtual = cluster1.run(
        train_job,
        _settings(corpus, case, data_setting, True, init_weights_dir=start),
        layout=ONE,
        timeout_s=JOB_TIMEOUT_S,
    )[0]
    assert_same_run(virtual, real, record_property)
    metrics = real["metrics"]
    assert metrics["inter_node_bytes"] > 0 and metrics["intra_node_bytes"] > 0
    assert metrics["received_tokens_max_over_mean"] >= 1


def misplaced_rank_job(ctx, settings, rank: int):
    """``train_job`` on a virtual cluster whose rank ``rank`` is on the next node's experts (a
    planted bug: the node map of one rank wrong)."""
    from megatron_locmoe.virtual import VirtualCluster

    right = VirtualCluster.expert_is_local

    def wrong(self, num_experts):
        table = right(self, num_experts).clone()
        table[rank] = table[(rank + self.gpus_per_node) % self.ranks]
        return table

    VirtualCluster.expert_is_local = wrong
    try:
        return train_job(ctx, settings)
    finally:
        VirtualCluster.expert_is_local = right


def test_a_virtual_rank_on_the_wrong_node_fails_the_comparison(
    cluster1, corpus, starts, real_from_start, record_property
):
    start = starts["locmoe"]
    real = real_from_start("locmoe", "domains")
    settings = _settings(corpus, "locmoe", "domains", True, init_weights_dir=start)
    planted = cluster1.run(misplaced_rank_job, settings, 3, layout=ONE, timeout_s=JOB_TIMEOUT_S)[0]
    with pytest.raises(AssertionError):
        assert_same_run(planted, real, record_property)
    # the node-local share is what moves: rank 3 counts the next node's experts as its own
    assert planted["metrics"]["node_local_fraction"] != pytest.approx(
        real["metrics"]["node_local_fraction"], rel=1e-5
    )


def test_a_virtual_checkpoint_resumes_as_a_real_clusters_does(
    cluster8, cluster1, corpus, starts, tmp_path, record_property
):
    """Per-rank state through a checkpoint (LocMoE's node bias, one per rank): a real cluster
    saves data-parallel rank 0's and every rank resumes from it; the virtual cluster saves
    virtual rank 0's (whichever rank routed last) and every virtual rank resumes from it. Saved
    after step 2 and resumed to step 4, both train the same losses and metrics."""
    start = starts["locmoe_node_target"]
    out = {}
    for name, virtual, cluster, layout in (
        ("real", False, cluster8, REAL),
        ("virtual", True, cluster1, ONE),
    ):
        save = str(tmp_path / name)
        first = _settings(
            corpus,
            "locmoe_node_target",
            "domains",
            virtual,
            init_weights_dir=start,
            steps=2,
            save_dir=save,
            save_interval=2,
        )
        cluster.run(train_job, first, layout=layout, timeout_s=JOB_TIMEOUT_S)
        resumed = replace(first, steps=4, load_dir=save, save_dir=None, save_interval=0)
        out[name] = cluster.run(train_job, resumed, layout=layout, timeout_s=JOB_TIMEOUT_S)[0]
        assert out[name]["first_step"] == 3
    assert_same_run(out["virtual"], out["real"], record_property)


def op_count_job(ctx, settings):
    """aten ops of each of 8 micro-batches (forward and backward) of ``settings``' model, each
    entered as virtual rank i on a virtual cluster: what a device would launch per micro-batch."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from megatron_locmoe import virtual
    from megatron_locmoe.sim import trainer
    from megatron_locmoe.virtual import VirtualCluster

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            return func(*args, **(kwargs or {}))

    ctx.topology()
    torch.manual_seed(0)
    model = trainer._model(settings, ep=1)
    data = trainer._dataset(settings, 64)
    cluster = VirtualCluster.from_config(settings.locmoe)
    counts = []
    for i in range(8):
        tokens, labels, loss_mask, positions, mask = trainer._micro_batch(data, 2 * i, settings)
        with Count() as count:
            if cluster is not None:
                virtual.enter(model, i)
            model(tokens, positions, mask, labels=labels).sum().backward()
        counts.append(count.ops)
    return counts


def test_the_virtual_cluster_launches_nothing_per_micro_batch(cluster1, corpus):
    """Identical routing (LocMoE without the locality loss), plain training against the virtual
    cluster 4x2 (EP 8): a micro-batch adds no device op, but where the node changes (one copy of
    the node map per layer) and at an EP group's last rank (its traffic, counted once)."""
    # the same physical permutation in both: Megatron's allgather dispatcher on one device,
    # which the virtual cluster puts in place of the alltoall one (tests/test_layer.py)
    model = dict(moe_token_dispatcher_type="allgather")
    plain = _settings(corpus, "locmoe", "control", False, layout=ONE, model=model)
    plain = replace(plain, locmoe=replace(plain.locmoe, locality_loss_coeff=0.0, dispatcher="auto"))
    virtual = replace(plain, locmoe=replace(plain.locmoe, virtual_cluster="4x2"))
    layout = ONE
    plain_ops = cluster1.run(op_count_job, plain, layout=layout, timeout_s=JOB_TIMEOUT_S)[0]
    virtual_ops = cluster1.run(op_count_job, virtual, layout=layout, timeout_s=JOB_TIMEOUT_S)[0]
    extra = [v - p for v, p in zip(virtual_ops, plain_ops, strict=True)]
    layers = 2
    # rank 0 warms up (first calls differ); ranks 1..6: a node change on 2, 4 and 6, where each
    # router takes the node map's row (a view) and copies it (one kernel)
    for rank in range(1, 7):
        assert extra[rank] == (2 * layers if rank in (2, 4, 6) else 0), (rank, extra, plain_ops)
    # rank 7, the EP group's last: a node change and the group's traffic, counted once (measured
    # 134 ops a layer here; on a cluster of EP 64 that is about 2 ops a layer and micro-batch)
    assert 2 * layers < extra[7] <= 150 * layers, (extra, plain_ops)
