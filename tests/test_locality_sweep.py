"""The locality sweep in a reduced size (4 simulated nodes x 1 rank, EP = 4, 3 steps, two
routers, one per data setting): every field of the results file is there and agrees with what
the routing implies, a second call resumes (runs nothing), and the node-aware bias (ours)
raises the node-local share in the control, where the paper's form cannot."""

from __future__ import annotations

import html
import json
import shutil

import pytest

from megatron_locmoe.analysis import sweep

RUNS = ["megatron", "ctl-locmoe-node0.5"]
FIELDS = {
    "run", "label", "sweep_key", "layout", "nodes", "ranks_per_node", "setting", "router_type", "topk",
    "locality_loss_coeff", "node_target_share", "capacity_mode", "node_limited", "steps",
    "num_experts", "hidden_size", "hidden_element_bytes", "prob_element_bytes",
    "tokens_per_rank_step", "dedup",
    "train_loss", "eval_loss", "eval_loss_per_node", "node_local", "node_local_blind",
    "locality_gain", "node_local_rise_last_window", "node_local_curve",
    "inter_bytes_per_token", "intra_bytes_per_token", "flat_inter_bytes_per_token",
    "flat_intra_bytes_per_token", "load_cv", "dropped", "expert_capacity", "expert_choice",
    "tokens_per_expert_received_max", "tokens_per_expert_received_mean",
    "tokens_per_expert_sent_max", "capacity_cf_reference", "global_load_cv",
    "node_local_per_node",
    "tokens_per_second", "wall_seconds",
}  # fmt: skip


def _argv(tmp):
    return [
        "--layouts", "4x1", "--steps", "3", "--runs", ",".join(RUNS),
        "--eval-batches", "2", "--max-stdlib-files", "40", "--progress", "off",
        "--out", str(tmp / "runs"), "--results", str(tmp / "sweep.json"),
        "--data-dir", str(tmp / "data"),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def swept(cluster_factory, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    sweep.main(_argv(tmp), cluster=cluster_factory(4))
    return tmp


@pytest.mark.slow
def test_results_file_has_every_field(swept):
    data = json.loads((swept / "sweep.json").read_text())
    assert "locality_sweep" in data["command"] or "main(" in data["command"]
    assert {"torch", "megatron_core", "python", "git_commit"} <= set(data["versions"])
    assert data["settings"]["steps"] == 3 and data["settings"]["held_out_every"] == 20
    domains = data["domains"]["4"]
    assert [d["name"] for d in domains][0] == "topics" and len(domains) == 4
    assert all(d["kl_vs_rest"] > 0 and d["tokens"] > 0 for d in domains)
    rows = {r["run"]: r for r in data["runs"]}
    assert set(rows) == set(RUNS)
    T, E, world = 4 * 64, 16, 4
    for r in rows.values():
        assert set(r) == FIELDS, set(r) ^ FIELDS
        assert (r["nodes"], r["ranks_per_node"], r["layout"], r["topk"]) == (4, 1, "4x1", 1)
        assert 0 < r["train_loss"] < 6 and 0 < r["eval_loss"] < 6
        assert len(r["eval_loss_per_node"]) == 4 and len(r["node_local_curve"]) == 3
        assert r["node_local_blind"] == 0.25 and 0 <= r["node_local"] <= 1
        assert r["locality_gain"] == pytest.approx((r["node_local"] - 0.25) / 0.75)
        # one rank per node: nothing stays inside a node but off the rank
        assert r["intra_bytes_per_token"] == 0 and r["flat_intra_bytes_per_token"] == 0
        # top-1: hierarchical sends what flat sends; the routing counts give the same bytes
        assert r["inter_bytes_per_token"] == pytest.approx(r["flat_inter_bytes_per_token"])
        copy = 2 * 64 * 4 + 4
        assert r["inter_bytes_per_token"] == pytest.approx((1 - r["node_local"]) * copy, rel=0.1)
        # every assignment is received by some expert (dropless), the busiest at least the mean
        assert r["tokens_per_expert_received_mean"] == pytest.approx(T * world / E)
        assert r["tokens_per_expert_received_max"] >= r["tokens_per_expert_received_mean"]
        assert T / E <= r["tokens_per_expert_sent_max"] <= T
        assert r["capacity_cf_reference"] == 18 and r["expert_capacity"] == 0
        assert r["dropped"] == 0 and r["load_cv"] >= 0 and r["tokens_per_second"] > 0
        assert 0 <= r["global_load_cv"] < 4
        assert sum(r["node_local_per_node"]) / 4 == pytest.approx(r["node_local"], abs=0.05)
    assert rows["megatron"]["setting"] == "domains"
    assert rows["ctl-locmoe-node0.5"]["setting"] == "control"
    assert rows["ctl-locmoe-node0.5"]["node_target_share"] == 0.5
    for png in ("pareto", "node_local_vs_mu", "node_local_curves", "tokens_per_expert"):
        assert (swept / "sweep_png" / f"{png}.png").stat().st_size > 1000


@pytest.mark.slow
def test_sweep_resumes_without_rerunning(swept, cluster_factory, capsys):
    before = (swept / "runs" / "4x1" / "megatron" / "run.json").stat().st_mtime_ns
    out = sweep.main([*_argv(swept), "--dry-run"], cluster=cluster_factory(4))
    assert out["pending"] == []
    assert "2 done, 0 to run" in capsys.readouterr().out
    assert (swept / "runs" / "4x1" / "megatron" / "run.json").stat().st_mtime_ns == before
    # a fresh checkout: the committed results file alone marks its runs done and keeps them
    shutil.rmtree(swept / "runs" / "4x1" / "megatron")
    out = sweep.main([*_argv(swept), "--dry-run"], cluster=cluster_factory(4))
    assert out["pending"] == []


@pytest.mark.slow
def test_node_bias_raises_locality_in_the_control(cluster_factory, swept):
    """Same mixture on every node: the node-aware target moves the share above 1/nodes (with
    a fast bias), which no token-only router can do on average; off, it stays near 1/nodes."""
    from dataclasses import replace

    from megatron_locmoe.config import LocMoEConfig
    from megatron_locmoe.sim.cluster import ParallelLayout
    from megatron_locmoe.sim.trainer import TrainSettings, tiny_model, train_job

    mixture = str(swept / "data" / "nodes4" / "mixture")
    layout = ParallelLayout(devices_per_node=1, ep=4)
    base = TrainSettings(
        data_prefix=mixture, locmoe=LocMoEConfig(router_type="locmoe", dispatcher="hierarchical"),
        model=tiny_model("locmoe", layout, num_moe_experts=16),
        steps=6, lr=1e-3, routing_stats_steps=2,
    )  # fmt: skip
    share = {}
    for target in (0.0, 0.9):
        cfg = replace(base.locmoe, node_target_share=target, node_bias_rate=5.0)
        res = cluster_factory(4).run(train_job, replace(base, locmoe=cfg), layout=layout)
        local = sum(
            c
            for rank, per_layer in enumerate(res[0]["tokens_per_expert"])
            for layer in per_layer
            for e, c in enumerate(layer)
            if e // 4 == rank  # one rank per node, 4 experts per rank
        )
        share[target] = local / sum(sum(map(sum, r)) for r in res[0]["tokens_per_expert"])
    assert share[0.0] < 0.45 and share[0.9] > 0.7, share


@pytest.mark.slow
def test_report_page_gains_the_sweep_figures(swept):
    from megatron_locmoe.analysis import report
    from megatron_locmoe.analysis.runlog import load_runs

    rows = json.loads((swept / "sweep.json").read_text())["runs"]
    page = report.build_report(
        load_runs([swept / "runs" / "4x1"]), swept / "page.html", sweep_rows=rows
    )
    text = page.read_text()
    for name, title in report.SWEEP_FIGURES.items():
        assert f"page_png/{name}.png" in text and html.escape(title) in text
        assert (swept / "page_png" / f"{name}.png").exists()
