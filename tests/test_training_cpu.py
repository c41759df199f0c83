"""End to end on the CPU: a tiny GPT-MoE (Megatron-Core GPTModel with the plugin's layers and
the hierarchical dispatcher) trains on the offline corpus for each router on 2 simulated nodes
x 2 ranks (EP=4); the loss falls and the plugin's metrics land in TensorBoard event files and
in W&B offline run files."""

from __future__ import annotations

import pytest

from megatron_locmoe import data
from megatron_locmoe.config import LocMoEConfig
from megatron_locmoe.metrics import PLUGIN_METRICS
from megatron_locmoe.simcluster import ParallelLayout
from megatron_locmoe.trainer import TrainSettings, train_job


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("corpus") / "pydoc"
    data.build_indexed_dataset(prefix, max_stdlib_files=0)  # the help topics: ~490k tokens
    return str(prefix)


def _tensorboard_tags(logdir) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return set(acc.Tags()["scalars"])


@pytest.mark.parametrize("router_type", ["megatron", "locmoe", "hash", "switch"])
def test_training_reduces_loss_and_logs_metrics(cluster_factory, corpus, tmp_path, router_type):
    cluster = cluster_factory(4)
    settings = TrainSettings(
        data_prefix=corpus,
        locmoe=LocMoEConfig(router_type=router_type, dispatcher="hierarchical"),
        steps=30,
        tensorboard_dir=str(tmp_path / "tb"),
        wandb_dir=str(tmp_path / "wb"),
    )
    results = cluster.run(train_job, settings, layout=ParallelLayout(devices_per_node=2, ep=4))
    losses = results[0]["losses"]
    assert all(r["losses"] == losses for r in results)  # data-parallel mean, same on all ranks
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, losses  # byte-level loss: ~5.5 -> ~3.5
    metrics = results[-1]["metrics"]
    assert set(PLUGIN_METRICS) <= set(metrics)
    assert metrics["inter_node_bytes"] > 0 and metrics["intra_node_bytes"] > 0
    if router_type == "switch":
        assert metrics["expert_capacity"] > 0
    tags = _tensorboard_tags(tmp_path / "tb")
    assert {"lm loss", *PLUGIN_METRICS} <= tags
    # W&B offline run file (binary records; metric names are stored as strings)
    (run_file,) = (tmp_path / "wb").glob("wandb/offline-run-*/run-*.wandb")
    raw = run_file.read_bytes()
    assert all(name.encode() in raw for name in ("lm loss", *PLUGIN_METRICS))
