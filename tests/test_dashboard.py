"""The W&B workspace builds offline, and every panel key is a name the runs really log
(read back from an offline W&B run file of a short training run)."""

from __future__ import annotations

import pytest

from megatron_locmoe.analysis import dashboard
from megatron_locmoe.config import LocMoEConfig
from megatron_locmoe.metrics import PLUGIN_METRICS
from megatron_locmoe.sim.cluster import ParallelLayout
from megatron_locmoe.sim.trainer import TrainSettings, tiny_model, train_job


@pytest.fixture(scope="module")
def logged(cluster8, corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dashboard")
    layout = ParallelLayout(devices_per_node=4, ep=8)
    settings = TrainSettings(
        data_prefix=corpus,
        locmoe=LocMoEConfig(router_type="locmoe", dispatcher="hierarchical"),
        model=tiny_model("locmoe", layout, num_moe_experts=16),
        steps=2,
        wandb_dir=str(tmp / "wb"),
        per_layer_logging=True,
    )
    cluster8.run(train_job, settings, layout=layout)
    return dashboard.logged_keys(tmp / "wb")


def test_every_panel_key_is_logged(logged):
    assert {"lm loss", "load_balancing_loss", *PLUGIN_METRICS} <= logged
    ws = dashboard.build_workspace("entity", "megatron-locmoe", num_layers=2)
    keys = dashboard.workspace_keys(ws)
    assert keys == dashboard.panel_keys(2)
    assert keys <= logged, sorted(keys - logged)
    assert {"moe/load_cv_layer_0", "moe/load_cv_layer_1", "node_local_fraction"} <= keys
    dashboard.check_keys(ws, logged)  # no error


def test_check_names_missing_keys(logged):
    ws = dashboard.build_workspace("entity", "megatron-locmoe", num_layers=3)  # runs had 2
    with pytest.raises(ValueError, match="moe/load_cv_layer_2"):
        dashboard.check_keys(ws, logged)


def test_cli_dry_run_and_errors(logged, tmp_path, capsys):
    dashboard.main(["--entity", "e", "--project", "p", "--dry-run"])
    out = capsys.readouterr().out
    assert "Locality and traffic" in out and "inter_node_bytes" in out
    with pytest.raises(FileNotFoundError, match="no W&B run files"):
        dashboard.logged_keys(tmp_path)
    bad = tmp_path / "run-x.wandb"
    bad.write_bytes(b"not a run file")
    with pytest.raises(ValueError, match="not a W&B run file"):
        dashboard.logged_keys(bad)
    with pytest.raises(ValueError, match="num_layers"):
        dashboard.build_workspace("e", "p", num_layers=0)
