"""The study's records and tables (megatron_locmoe.analysis.study) from real TensorBoard event
files written as Megatron and the plugin name their scalars."""

from __future__ import annotations

import json

import pytest
from torch.utils.tensorboard import SummaryWriter

from megatron_locmoe.analysis import study
from megatron_locmoe.analysis.errors import InputError

TOKENS = 8192


def _write_run(path, loss, bytes_per_mb, domains=(), steps=10, validation=True, timers=True):
    w = SummaryWriter(str(path))
    for step in range(1, steps + 1):
        w.add_scalar("lm loss", 10.0 - 0.1 * step, step)
        if timers:
            w.add_scalar("throughput", 300.0, step)
            w.add_scalar("iteration-time", 2.0 if step < 9 else 0.5, step)
        w.add_scalar("dedup_inter_node_bytes", bytes_per_mb * (2.0 if step < 9 else 1.0), step)
        w.add_scalar("node_local_fraction", 0.4, step)
        w.add_scalar("received_tokens_max_over_mean", 1.05, step)
    if validation:
        w.add_scalar("lm loss validation", loss + 1.0, steps // 2)
        w.add_scalar("lm loss validation", loss, steps)
        for d, value in enumerate(domains):
            w.add_scalar(f"lm loss domain {d} validation", value, steps)
    w.close()


def _record(tmp_path, name, arm, seed, loss, bytes_per_mb, setting="16x8"):
    tb = tmp_path / name
    _write_run(tb, loss, bytes_per_mb, domains=(loss - 0.1, loss + 0.1))
    return study.run_record(
        tb,
        name=name,
        arm=arm,
        seed=seed,
        setting=setting,
        tokens_per_micro_batch=TOKENS,
        peak_tflops=790.0,
    )


def test_a_record_reads_the_held_out_losses_bytes_and_speed(tmp_path):
    r = _record(tmp_path, "a", "megatron", 1, 3.0, TOKENS * 100.0)
    assert r["heldout"]["mixture"] == pytest.approx(3.0)
    assert r["heldout"]["at_step"] == 10
    assert r["heldout"]["domains"] == {"0": pytest.approx(2.9), "1": pytest.approx(3.1)}
    # the last fifth of 10 steps (steps 9 and 10) at 1x: 100 bytes per token and layer
    assert r["per_token"]["dedup_inter_node_bytes"] == pytest.approx(100.0)
    assert r["routing"]["node_local_fraction"] == pytest.approx(0.4)
    assert r["speed"]["mfu"] == pytest.approx(300.0 / 790.0)
    assert r["speed"]["seconds_per_step"] == pytest.approx(0.5)  # the tail, as the bytes
    assert r["speed"]["tokens_per_s"] is None  # no command: no tokens per step
    assert len(r["curve"]) == 10
    json.dumps(r)  # a JSON record


def test_a_run_without_evaluation_is_refused(tmp_path):
    _write_run(tmp_path / "x", 3.0, 1.0, validation=False)
    with pytest.raises(InputError, match="--eval-iters"):
        study.run_record(
            tmp_path / "x",
            name="x",
            arm="a",
            seed=1,
            setting="s",
            tokens_per_micro_batch=TOKENS,
            peak_tflops=790.0,
        )


def _arms(tmp_path, spec):
    records = [
        _record(tmp_path, f"{arm}-{seed}", arm, seed, loss, TOKENS * sent)
        for arm, runs in spec.items()
        for seed, (loss, sent) in enumerate(runs, start=1)
    ]
    return records, {a.arm: a for a in study.pool(records)}


def test_differences_within_the_seed_noise_are_no_difference(tmp_path):
    _, arms = _arms(
        tmp_path,
        {
            "megatron": [(3.00, 100), (3.02, 100), (2.98, 100)],  # std 0.02
            "close": [(3.03, 50), (3.00, 50), (2.99, 50)],  # +0.03, -0.02, +0.01: within the noise
            "worse": [(3.10, 40), (3.11, 40), (3.12, 40)],  # +0.10, +0.09, +0.14
            "two_seeds": [(2.50, 10), (2.51, 10)],
        },
    )
    assert study.compare(arms["close"], arms["megatron"])[2] == "no difference"
    delta, noise, verdict = study.compare(arms["worse"], arms["megatron"])
    assert verdict == "worse" and delta == pytest.approx(0.11)
    assert noise == pytest.approx(0.0007**0.5, abs=1e-6)  # the paired differences' std
    assert study.compare(arms["megatron"], arms["worse"])[2] == "better"
    assert study.compare(arms["two_seeds"], arms["megatron"])[2].startswith("unresolved")


def test_arms_sharing_seeds_are_compared_seed_by_seed(tmp_path):
    _, arms = _arms(
        tmp_path,
        {
            "megatron": [(3.00, 100), (3.10, 100), (2.90, 100)],  # std 0.1: the seed moves both
            "steady": [(3.03, 50), (3.12, 50), (2.94, 50)],  # +0.03, +0.02, +0.04 seed by seed
            "erratic": [(3.20, 50), (2.95, 50), (2.95, 50)],  # +0.2, -0.15, +0.05
        },
    )
    pair = study.paired(arms["steady"], arms["megatron"])
    assert pair.seeds == [1, 2, 3]
    assert pair.delta == pytest.approx(0.03) and pair.std == pytest.approx(0.01)
    # the means differ by less than either arm's seed std; the paired differences resolve it
    assert abs(arms["steady"].loss - arms["megatron"].loss) < arms["megatron"].loss_std
    delta, noise, verdict = study.compare(arms["steady"], arms["megatron"])
    assert verdict == "worse" and delta == pytest.approx(0.03) and noise == pytest.approx(0.01)
    assert study.compare(arms["erratic"], arms["megatron"])[2] == "no difference"
    # fewer than three shared seeds: the unpaired rule
    records = [
        _record(tmp_path, f"m{s}", "megatron", s, loss, TOKENS)
        for s, loss in ((1, 3.0), (2, 3.1), (3, 2.9))
    ] + [
        _record(tmp_path, f"o{s}", "other", s, loss, TOKENS)
        for s, loss in ((3, 2.93), (4, 3.03), (5, 3.13))
    ]
    other, base = sorted(study.pool(records), key=lambda a: a.arm != "other")
    assert study.paired(other, base).seeds == [3]
    delta, noise, verdict = study.compare(other, base)
    assert delta == pytest.approx(0.03, abs=1e-6) and noise == pytest.approx(0.1, abs=1e-6)
    assert verdict == "no difference"
    row = next(line for line in study.table(records).splitlines() if line.startswith("| other |"))
    assert "| +0.0300 (1) |" in row


def test_the_pareto_front_and_the_table(tmp_path):
    records, arms = _arms(
        tmp_path,
        {
            "megatron": [(3.00, 100), (3.00, 100), (3.00, 100)],
            "cheap": [(3.00, 50), (3.00, 50), (3.00, 50)],  # same loss, half the bytes
            "dominated": [(3.05, 60), (3.05, 60), (3.05, 60)],
            "cheapest": [(3.20, 10), (3.20, 10), (3.20, 10)],
        },
    )
    assert study.pareto_front(list(arms.values())) == {"cheap", "cheapest"}
    text = study.table(records)
    assert "### 16x8" in text
    row = next(line for line in text.splitlines() if line.startswith("| cheap |"))
    assert "no difference" in row and row.endswith("| yes |")
    assert "50.0 ± 0.0" in row


def test_records_of_different_evaluation_steps_are_refused(tmp_path):
    records = [_record(tmp_path, f"r{i}", "megatron", i, 3.0, 1.0) for i in (1, 2)]
    records.append(_record(tmp_path, "h", "hash", 1, 3.0, 1.0))
    records[-1]["heldout"]["at_step"] = 5  # a run stopped after its first evaluation
    with pytest.raises(InputError, match="equal tokens"):
        study.pool(records)


def test_a_seed_given_twice_is_refused(tmp_path):
    records = [_record(tmp_path, f"r{i}", "megatron", 1, 3.0, 1.0) for i in range(2)]
    with pytest.raises(InputError, match="seeds"):
        study.pool(records)


def test_the_command_line_writes_and_tabulates(tmp_path, capsys):
    _write_run(tmp_path / "tb", 3.0, TOKENS * 100.0)
    out = tmp_path / "rec.json"
    argv = f"record {tmp_path / 'tb'} --name r --arm megatron --seed 1 --setting s "
    argv += f"--tokens-per-micro-batch {TOKENS} --out {out}"
    study.main(argv.split())
    study.main(["table", str(out)])
    assert "| megatron | 1 | 3.0000 |" in capsys.readouterr().out


def test_the_pareto_plot_has_one_figure_per_setting(tmp_path, capsys):
    import matplotlib.image

    records, _ = _arms(
        tmp_path, {"megatron": [(3.0, 100), (3.01, 110), (2.99, 90)], "cheap": [(3.0, 50)]}
    )
    other = _record(tmp_path, "o1", "megatron", 1, 3.1, 80.0, setting="8x8 domains")
    other["per_token"] = {}  # a run that logged no traffic: named on the figure, not drawn
    paths = study.plot([*records, other], tmp_path / "fig")
    assert sorted(p.name for p in paths) == ["pareto_16x8.png", "pareto_8x8_domains.png"]
    for p in paths:
        height, width, _ = matplotlib.image.imread(p).shape
        assert (width, height) == (900, 600)
    rec = tmp_path / "r.json"
    rec.write_text(json.dumps(records[0]))
    study.main(["plot", str(rec), "--out", str(tmp_path / "cli")])
    assert capsys.readouterr().out.strip().endswith("pareto_16x8.png")


def test_collect_records_every_run_of_a_gpu_study_call(tmp_path, capsys):
    root = tmp_path / "out"
    (root / "versions.json").parent.mkdir(parents=True)
    (root / "versions.json").write_text(json.dumps({"card": "NVIDIA H200"}))
    for seed, arm, loss in ((1, "megatron", 3.0), (2, "megatron", 3.1), (1, "locmoe", 3.2)):
        _write_run(root / f"seed{seed}/study-gpu-8x8-control/{arm}/tensorboard", loss, 4096.0)
        (root / f"seed{seed}/{arm}.launch.log").write_text(
            f"x\n[launch] env A=1 run {arm} --train-iters 10\n"
        )
    stopped = root / "seed3/study-gpu-8x8-control/hash/tensorboard"
    _write_run(stopped, 3.0, 4096.0, validation=False)  # the deadline came before its eval
    late = root / "seed3/study-gpu-8x8-control/locmoe/tensorboard"
    _write_run(late, 3.0, 4096.0, steps=9)  # evaluated at step 4, stopped at 9 of 10
    (root / "seed3/locmoe.launch.log").write_text("[launch] run --train-iters 10\n")
    written, skipped = study.collect(
        root, setting="8x8", tokens_per_micro_batch=4096, peak_tflops=790.0, out_dir=tmp_path / "r"
    )
    records = study.load_records(written)
    assert sorted((r["arm"], r["seed"], round(r["heldout"]["mixture"], 5)) for r in records) == [
        ("locmoe", 1, 3.2),
        ("megatron", 1, 3.0),
        ("megatron", 2, 3.1),
    ]
    assert {r["command"] for r in records} == {
        "env A=1 run megatron --train-iters 10",
        "env A=1 run locmoe --train-iters 10",
    }
    assert records[0]["versions"] == {"card": "NVIDIA H200"}
    assert records[0]["per_token"]["dedup_inter_node_bytes"] == 1.0
    assert len(skipped) == 2 and skipped[0].startswith("hash seed 3: ")
    assert skipped[1].startswith("locmoe seed 3: stopped before its final evaluation")
    with pytest.raises(InputError, match="no seedS"):
        study.collect(
            tmp_path / "r",
            setting="x",
            tokens_per_micro_batch=1,
            peak_tflops=1.0,
            out_dir=tmp_path / "q",
        )


def test_collect_records_the_launchers_runs_from_their_manifests(tmp_path):
    """The launcher's runs (``--runs-dir ROOT/seedS``, here the CPU loop's) are recorded from
    the manifest the launcher writes (launch.json): the command as typed with its commit, the
    Megatron flags (tokens per step and micro-batch), the versions; the speed from the CPU
    loop's progress file (the median step after the warm-up)."""
    from megatron_locmoe.launch.manifest import write_run_manifest
    from megatron_locmoe.launch.plan import Options, build_plan

    root = tmp_path / "out"
    sets = ["seed=2", "train-iters=10"]  # as the TensorBoard run below
    opts = Options(config="cpu-sim", sets=sets, runs_dir=str(root / "seed2"))
    plan = build_plan(opts)
    (rp,) = plan.runs
    write_run_manifest(plan, rp)
    _write_run(rp.log_dir / "tensorboard", 3.0, 4096.0, timers=False)
    seconds = [9.0, 9.0, 1.0, 1.0, 3.0, 1.0]
    (rp.log_dir / "progress.jsonl").write_text(
        "".join(json.dumps({"step": i + 1, "loss": 5.0, "seconds": x}) + "\n" for i, x in
                enumerate(seconds))
    )  # fmt: skip
    flags = dict(zip(rp.flags, rp.flags[1:], strict=False))
    micro, seq, gbs = (int(flags[f]) for f in ("--micro-batch-size", "--seq-length",
                                                "--global-batch-size"))  # fmt: skip
    written, skipped = study.collect(
        root,
        setting="cpu",
        tokens_per_micro_batch=micro * seq,
        peak_tflops=1.0,
        out_dir=tmp_path / "r",
    )
    assert skipped == []
    (record,) = study.load_records(written)
    assert (record["arm"], record["seed"], record["name"]) == ("cpu-sim", 2, "cpu-cpu-sim-s2")
    typed = "python -m megatron_locmoe.launch --config cpu-sim --set seed=2 --set train-iters=10"
    typed += f" --runs-dir {root / 'seed2'}"
    assert record["command"].split("  # at ")[0] == typed
    commit = record["launch"]["code"]["commit"]
    assert commit is None or record["command"].split("  # at ")[1].startswith(commit[:12])
    assert record["launch"]["megatron_flags"] == rp.flags
    assert record["versions"]["megatron-core"] and record["versions"]["torch"]
    assert record["versions"]["card"] == f"CPU ({record['launch']['host']['cpus']} cores)"
    speed = record["speed"]
    assert speed["source"] == "progress.jsonl" and speed["seconds_per_step"] == 1.0
    assert speed["tokens_per_s"] == pytest.approx(gbs * seq)
    (rp.log_dir / "launch.json").write_text(json.dumps({"command": "x"}))
    with pytest.raises(InputError, match="launch.json is not a run manifest: it has no megatron_"):
        study.collect(root, setting="cpu", tokens_per_micro_batch=1, peak_tflops=1.0,
                      out_dir=tmp_path / "q")  # fmt: skip
    write_run_manifest(plan, rp)
    with pytest.raises(InputError, match=f"{micro} x {seq} = {micro * seq} tokens"):
        study.collect(root, setting="cpu", tokens_per_micro_batch=micro * seq + 1,
                      peak_tflops=1.0, out_dir=tmp_path / "q")  # fmt: skip


_MEGATRON_LOG = (
    " [2026-12-07 12:53:21.01] iteration        {i}/      48 | consumed samples: 256 | "
    "elapsed time per iteration (ms): {ms:.1f} | throughput per GPU (TFLOP/s/GPU): {tf:.1f} | "
    "learning rate: 2.0E-04 | lm loss: 1.05E+01 |\n"
)


def test_collect_reads_speed_from_the_megatron_log_and_the_card_sharing(tmp_path):
    """Runs without the timers in TensorBoard (the first GPU seed) take seconds per step and
    TFLOP/s from Megatron's iteration lines, the first iteration (start-up) left out; the call
    file says how many runs shared the card."""
    root = tmp_path / "out"
    for arm in ("megatron", "hash"):
        run = root / f"seed2/study-gpu-8x8-control/{arm}"
        w = SummaryWriter(str(run / "tensorboard"))
        for step in range(1, 11):
            w.add_scalar("lm loss", 10.0 - 0.1 * step, step)
        w.add_scalar("lm loss validation", 3.0, 10)
        w.close()
        lines = [_MEGATRON_LOG.format(i=1, ms=9000.0, tf=1.0)]  # start-up: left out
        lines += [
            _MEGATRON_LOG.format(i=i, ms=4000.0 if i < 9 else 1000.0, tf=7.0) for i in range(2, 11)
        ]
        (run / "node0.log").write_text("".join(lines))
        (root / f"seed2/{arm}.launch.log").write_text(
            "[launch] python -m x --seq-length 1024 --global-batch-size 256 --seed 2\n"
        )
    calls = [
        {"preset": "study-gpu-8x8-control", "runs": ["megatron:1"]},
        {"preset": "study-gpu-8x8-control", "runs": ["megatron:2", "hash:2", "locmoe:2"]},
    ]
    (root / "calls.jsonl").write_text("".join(json.dumps(c) + "\n" for c in calls))
    written, _ = study.collect(
        root, setting="8x8", tokens_per_micro_batch=4096, peak_tflops=700.0, out_dir=tmp_path / "r"
    )
    for r in study.load_records(written):
        speed = r["speed"]
        # 9 timed iterations: the tail is the last 2 (tail_length(9)), both at 1.0 s
        assert speed["seconds_per_step"] == pytest.approx(1.0)
        assert speed["tokens_per_s"] == pytest.approx(256 * 1024 / 1.0)
        assert speed["mfu"] == pytest.approx(7.0 / 700.0)
        assert speed["card_shared_by"] == 3 and speed["source"] == "node0.log"
    (root / "calls.jsonl").write_text("not json\n")
    with pytest.raises(InputError, match="calls.jsonl:1"):
        study.collect(
            root, setting="8x8", tokens_per_micro_batch=1, peak_tflops=1.0, out_dir=tmp_path / "q"
        )


def test_collect_takes_one_preset_of_a_call_that_ran_two(tmp_path):
    """A call may run two presets' arms side by side (gpu_study.sh's OTHER/ARM:SEED): their
    arms share names, so each preset is recorded on its own (its launcher logs under
    seedS/PRESET/), the card sharing is read per preset, and a micro-batch that does not match
    --tokens-per-micro-batch stops the collect rather than scale the bytes wrongly."""
    root = tmp_path / "out"
    for preset, micro, loss in (("study-a", 4, 3.0), ("study-b", 16, 2.0)):
        _write_run(root / f"seed1/{preset}/megatron/tensorboard", loss, 4096.0)
        (root / f"seed1/{preset}/megatron.launch.log").write_text(
            f"[launch] run --micro-batch-size {micro} --seq-length 1024 --train-iters 10\n"
        )
    calls = [
        {"preset": "study-a", "runs": ["megatron:1"]},  # the first calls' items: no preset
        {"preset": "study-a", "runs": ["study-a/megatron:1", "study-b/megatron:1", "study-a/x:2"]},
    ]
    (root / "calls.jsonl").write_text("".join(json.dumps(c) + "\n" for c in calls))
    assert study.card_sharing(root / "calls.jsonl") == {
        "study-a/megatron:1": 3,
        "study-b/megatron:1": 3,
        "study-a/x:2": 3,
    }
    with pytest.raises(InputError, match="2 presets .*--preset"):
        study.collect(
            root, setting="a", tokens_per_micro_batch=4096, peak_tflops=1.0, out_dir=tmp_path / "r"
        )

    def collect_b(tokens: int, out: str):
        return study.collect(root, setting="b", tokens_per_micro_batch=tokens, peak_tflops=1.0,
                             out_dir=tmp_path / out, preset="study-b")  # fmt: skip

    written, _ = collect_b(16384, "r")
    (record,) = study.load_records(written)
    assert record["heldout"]["mixture"] == pytest.approx(2.0)
    assert record["speed"]["card_shared_by"] == 3
    assert record["command"].startswith("run --micro-batch-size 16")
    with pytest.raises(InputError, match="16 x 1024 = 16384 tokens"):
        collect_b(4096, "q")
