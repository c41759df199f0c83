"""Smoke run of the virtual cluster on the real-text corpus's format (issue 31, part 4): the tiny
corpus that tests/test_corpus.py builds from fake packages (its subword tokenizer, its domains
and held-out sets), a tiny GPT-MoE on the virtual cluster 4x2 of the CPU loop, domain-sharded
(node k reads domain k), a few steps: the loss falls, every routing, traffic and load metric is
there and finite, the held-out loss is there for every virtual rank, and in TensorBoard under
pretrain_gpt's tags (the mixture and each node's domain) where the study's record reads it."""

from __future__ import annotations

import json
import math

import pytest

from megatron_locmoe.analysis import study
from megatron_locmoe.config import LocMoEConfig
from megatron_locmoe.metrics import DISPATCH_METRICS, ROUTER_METRICS
from megatron_locmoe.sim.cluster import ParallelLayout
from megatron_locmoe.sim.trainer import TrainSettings, tiny_model, train_job
from tests.test_corpus import SETTINGS, built, no_registry, registry  # noqa: F401 (fixtures)


def test_the_virtual_cluster_trains_on_the_real_text_corpus(built, cluster_factory, tmp_path):  # noqa: F811
    out = built["b"]
    record = json.loads((out / "build.json").read_text())
    names = list(record["domains"])[:4]
    vocab = SETTINGS["vocab_size"]
    layout = ParallelLayout(devices_per_node=1)  # the virtual cluster's one process
    settings = TrainSettings(
        data_prefix=str(out / "mixture"),
        data_prefix_per_node=[str(out / n) for n in names],
        eval_prefix_per_node=[str(out / f"{n}_valid") for n in names],
        eval_batches=1,
        locmoe=LocMoEConfig(router_type="locmoe", virtual_cluster="4x2", dispatcher="hierarchical"),
        model=tiny_model("locmoe", layout, hidden_size=32, num_moe_experts=16, moe_router_topk=2),
        steps=4,
        seq_length=32,
        micro_batch_size=2,
        global_batch_size=16,
        lr=3e-3,
        gpt_model_options=dict(vocab_size=vocab),
        tensorboard_dir=str(tmp_path / "tb"),
    )
    result = cluster_factory(1).run(train_job, settings, layout=layout, timeout_s=240)[0]
    losses, metrics = result["losses"], result["metrics"]
    assert len(losses) == 4 and losses[-1] < losses[0] < math.log(vocab) + 1
    for name in (*ROUTER_METRICS, *DISPATCH_METRICS, "load_balancing_loss"):
        assert name in metrics and math.isfinite(metrics[name]), name
    assert metrics["inter_node_bytes"] > 0 and metrics["dedup_inter_node_bytes"] > 0
    assert metrics["received_tokens_max_over_mean"] >= 1 and metrics["locality_loss"] > 0
    assert len(result["eval_loss_per_rank"]) == 8
    assert all(math.isfinite(x) for x in result["eval_loss_per_rank"])
    record = study.run_record(
        tmp_path / "tb",
        name="smoke",
        arm="locmoe",
        seed=1,
        setting="smoke",
        tokens_per_micro_batch=64,
        peak_tflops=1.0,
    )
    per_rank = result["eval_loss_per_rank"]  # 4 nodes x 2: node k's ranks 2k, 2k + 1
    assert record["heldout"]["at_step"] == 4
    assert record["heldout"]["mixture"] == pytest.approx(result["eval_loss"], rel=1e-6)
    assert record["heldout"]["domains"] == pytest.approx(
        {str(k): (per_rank[2 * k] + per_rank[2 * k + 1]) / 2 for k in range(4)}, rel=1e-6
    )
