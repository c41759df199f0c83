"""`make demo` end to end in a reduced size: every router on the simulated 2-node x 4-rank
cluster (EP = 8 across both nodes), same tokens, per-node data domains; the table, run
records, TensorBoard and offline W&B logs and the HTML report come out, and the byte counts
obey what the routing implies."""

from __future__ import annotations

import json

import pytest

from megatron_locmoe.analysis import demo
from megatron_locmoe.analysis.runlog import load_runs

RUNS = [
    "megatron",
    "megatron-node-limited",
    "locmoe-top2",
    "hash",
    "switch",
    "locmoe-top1",
    "locmoe-plus-top1",
]


@pytest.mark.slow
def test_demo_prints_table_and_report(demo_out, capsys):
    tmp, result = demo_out
    assert [r["run"] for r in result["rows"]] == RUNS
    assert result["report"] == tmp / "report.html" and result["report"].exists()
    summary = json.loads((tmp / "runs" / "summary.json").read_text())
    assert [r["run"] for r in summary] == RUNS
    assert [r["label"] for r in summary] == [  # the README's table, from the preset's flags
        "Megatron top-2 (aux loss)",
        "Megatron top-2, node-limited (1 node/token)",
        "LocMoE top-2 (mu 0.1)",
        "Hash top-1",
        "Switch top-1 (capacity 1.0)",
        "LocMoE top-1 (mu 0.1)",
        "LocMoE+ top-1 (mu 0.1, capacity <= 1.1)",
    ]
    for row in summary:
        assert 0.0 <= row["node_local"] <= 1.0
        assert row["loss"] < 6.0 and row["tokens_per_second"] > 0
        assert row["inter_bytes_per_token"] > 0
    # offline W&B: one run per router
    assert len(list((tmp / "runs" / "wandb").rglob("run-*.wandb"))) == len(RUNS)


@pytest.mark.slow
def test_demo_runs_share_tokens_and_layout(demo_out):
    tmp, _ = demo_out
    runs = {r.name: r for r in load_runs([tmp / "runs"])}
    assert set(runs) == set(RUNS)
    first_losses = {name: r.record["losses"][0] for name, r in runs.items()}
    # same tokens and same initial dense weights: the first losses agree closely
    assert max(first_losses.values()) - min(first_losses.values()) < 0.05, first_losses
    for r in runs.values():
        assert (r.record["nodes"], r.record["ranks_per_node"]) == (2, 4)
        assert r.record["domains"][0] == "topics"
        assert len(r.layer_tags("load_cv")) == 2  # per-layer logging
        assert len(r.record["step_seconds"]) == 5


@pytest.mark.slow
def test_byte_counts_follow_the_routing(demo_out):
    tmp, _ = demo_out
    runs = {r.name: r for r in load_runs([tmp / "runs"])}
    m = lambda name, tag: runs[name].tail_mean(tag, fraction=1.0)  # noqa: E731
    # top-1: the hierarchical dispatcher sends what the flat All-to-All sends
    for name in ("hash", "switch", "locmoe-top1"):
        assert m(name, "inter_node_bytes") == pytest.approx(m(name, "flat_inter_node_bytes"))
    # top-2 with per-node dedup: a token crosses to the other node at most once
    for name in ("megatron", "megatron-node-limited", "locmoe-top2"):
        assert m(name, "inter_node_bytes") < m(name, "flat_inter_node_bytes")
    # node-limited: one node per token, so fewer inter-node copies than unrestricted top-2
    assert m("megatron-node-limited", "inter_node_bytes") < m("megatron", "inter_node_bytes")
    assert m("switch", "expert_capacity") > 0 and m("hash", "tokens_dropped") == 0
    # LocMoE+: top-1, so its bytes follow the flat All-to-All's too; its capacity stays at or
    # below the cf 1.1 ceiling (ceil(1.1 * 256 tokens / 16 experts) = 18 per rank-step)
    plus = "locmoe-plus-top1"
    assert m(plus, "inter_node_bytes") == pytest.approx(m(plus, "flat_inter_node_bytes"))
    assert 0 < m(plus, "expert_capacity") <= 18


def test_demo_refuses_bad_arguments():
    with pytest.raises(SystemExit):
        demo.parse_args(["--set", "nodes=1"])
    with pytest.raises(SystemExit):
        demo.parse_args(["--routers", "megatron,nowhere"])
    with pytest.raises(SystemExit):
        demo.parse_args(["--config", "router-sweep"])  # not a CPU preset
    with pytest.raises(SystemExit):
        demo.parse_args(["--set", "sweep.nowhere.lr=1"])


@pytest.mark.parametrize("steps", ["0", "-1"])
def test_demo_refuses_steps_below_one_in_one_line(capsys, steps):
    """--steps 0 passed parse_args and died with a bare AssertionError after the ranks started."""
    with pytest.raises(SystemExit):
        demo.parse_args(["--steps", steps])
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert len(err) == 1 and f"error: --steps {steps}: the demo trains at least 1 step" in err[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--set", "num-experts=7"], "7 experts do not split over EP 8"),
        (["--set", "hidden-size=60"], "GrAP splits the hidden size 60 into 16 equal chunks"),
        (["--set", "num-experts=0"], "num_experts must be non None"),
        (["--mu", "-1"], "locality_loss_coeff=-1.0 is negative; use 0 to switch the loss off"),
    ],
)
def test_demo_refuses_a_preset_that_does_not_fit_in_one_line(tmp_path, capsys, argv, message):
    """These were tracebacks (issue 35); now one error line, exit status 2, before any data is
    built or any rank starts."""
    out, data_dir = tmp_path / "out", tmp_path / "data"
    assert demo.cli([*argv, "--out", str(out), "--data-dir", str(data_dir)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert len(err) == 1 and message in err[0], err
    assert not out.exists() and not data_dir.exists()


def test_demo_never_deletes_a_directory_it_did_not_write(tmp_path, capsys):
    """A mistyped --out (a home directory, say) is refused before anything is deleted."""
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(SystemExit):
        demo.parse_args(["--out", str(precious)])
    assert "was not written by the demo" in capsys.readouterr().err
    assert (precious / "thesis.tex").read_text() == "years of work"
    file_out = tmp_path / "a_file"
    file_out.write_text("x")
    with pytest.raises(SystemExit):
        demo.parse_args(["--out", str(file_out)])
    (tmp_path / "empty").mkdir()
    demo.parse_args(["--out", str(tmp_path / "empty")])  # empty: fine
    marked = tmp_path / "earlier_demo"
    marked.mkdir()
    (marked / demo.OUT_MARKER).write_text("")
    (marked / "megatron").mkdir()
    demo.parse_args(["--out", str(marked)])  # the demo's own: replaced


@pytest.mark.slow
def test_the_sweeps_runs_train_what_their_committed_results_trained(cluster8, tmp_path):
    """The locality sweep's runs, built by the launcher's translator from
    configs/locality-sweep.yaml (which extends configs/demo.yaml: Megatron's TransformerConfig,
    GPT options and optimizer for the flags), train bitwise what the loop's own config trained
    for the committed results (the former run table's settings_for, written out here for four
    runs): the configs differ only in fields that change nothing (tests/test_sweep_presets.py
    compares every run field by field), so those results stay the sweep's results. One run
    description now: the demo's and the sweep's runs are preset entries of one model, through
    one translator."""
    import dataclasses

    from megatron_locmoe.analysis import sweep
    from megatron_locmoe.config import LocMoEConfig
    from megatron_locmoe.sim.trainer import TrainSettings, tiny_model, train_job

    domains = demo.prepare_domains(tmp_path / "data", 2, 40, held_out_every=20)
    args = sweep.parse_args(["--steps", "3"])
    former = {  # name: (router, top-k, LocMoEConfig settings, loop-config overrides)
        "locmoe-mu0.1": ("locmoe", 1, {"locality_loss_coeff": 0.1}, {}),
        "switch": ("switch", 1, {}, {}),
        "hash": ("hash", 1, {"hash_token_counts": domains["counts"]}, {}),
        "node-limited-top2": (
            "megatron",
            2,
            {},
            {"moe_router_num_groups": 2, "moe_router_group_topk": 1},
        ),
    }
    runs = {r.name: r for r in sweep.sweep_runs("2x4")}
    for name, (router, topk, settings, overrides) in former.items():
        ours, layout = sweep.settings_for(runs[name], args, "2x4", domains, tmp_path / name)
        theirs = TrainSettings(  # the former settings_for, without its held-out evaluation
            data_prefix=domains["prefixes"][0],
            data_prefix_per_node=list(domains["prefixes"]),
            locmoe=LocMoEConfig(router_type=router, dispatcher="hierarchical", **settings),
            model=tiny_model(
                router,
                layout,
                num_layers=2,
                hidden_size=64,
                num_attention_heads=4,
                num_moe_experts=16,
                moe_router_topk=topk,
                moe_ffn_hidden_size=128,
                **overrides,
            ),
            steps=3,
            seq_length=64,
            micro_batch_size=4,
            lr=1e-3,
            seed=1234,
            per_layer_logging=True,
        )
        ours = dataclasses.replace(  # (the held-out evaluation runs after training)
            ours, tensorboard_dir=None, progress_path=None, eval_batches=0, routing_stats_steps=0
        )
        a = cluster8.run(train_job, ours, layout=layout)[0]
        b = cluster8.run(train_job, theirs, layout=layout)[0]
        assert a["losses"] == b["losses"], (name, a["losses"], b["losses"])
        assert a["metrics"] == b["metrics"], name
