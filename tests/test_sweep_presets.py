"""The locality sweep's runs are preset entries (configs/locality-sweep.yaml) turned into
TrainSettings by the launcher's one translator (launch/cpu_settings.train_settings):

- every run of every layout and both data settings trains what the former Python run table
  trained (its settings, written by tests/sweep_equivalence.py at commit 03c7b47 into
  tests/fixtures/locality_sweep_settings.json), compared field by field in the form the CPU
  loop builds them; its run key, label and priority are the former's too (the two LocMoE top-2
  runs' moe_router_pre_softmax reads true since 2026-12-07: until then the locmoe router took
  the softmax over all experts whatever the flag said, which is what they trained);
- every committed result (benchmarks/results/locality_sweep*.json) is still recognised as done;
- the sweep preset extends the demo's (one model).

The translator's new capabilities: tests/test_cpu_loop_data.py; the presets' ``extends`` and
``schedule`` keys: tests/test_preset_schedule.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest

from megatron_locmoe.analysis import sweep
from megatron_locmoe.config import LocMoEConfig
from megatron_locmoe.launch.presets import PresetError, load_preset
from tests.sweep_equivalence import comparable, tiny_corpora

ROOT = Path(__file__).resolve().parents[1]


def _former() -> dict:
    """The former table's runs from the fixture (what all runs share is stored once)."""
    data = json.loads((ROOT / "tests" / "fixtures" / "locality_sweep_settings.json").read_text())
    common, runs = data["common"], data["runs"]
    for run in runs.values():
        run["run_key"] = {**common["run_key"], **run["run_key"]}
        s = run["settings"]
        s.update(common["settings"])
        s["locmoe"] = {**common["locmoe"], **s["locmoe"]}
        s["model"] = {**common["model"], **s["model"]}
    return runs


FORMER = _former()
ADDED_SINCE_THE_RECORD = {
    f.name: f.default
    for f in dataclasses.fields(LocMoEConfig)
    if f.name not in next(iter(FORMER.values()))["settings"]["locmoe"]
}
"""LocMoEConfig fields the recorded runs predate (the node-aware options), at their defaults."""
LAYOUTS = (*sweep.SWEEP_LAYOUTS, "4x1")

SAME_TRAINING = {
    "bias_dropout_fusion": "no bias (--disable-bias-linear) and dropout 0: x + residual either way",
    "ffn_hidden_size": "the dense MLP's; every layer is an MoE layer (moe_ffn_hidden_size is equal)",
    "moe_per_layer_logging": "the loop logs per layer from TrainSettings.per_layer_logging (equal)",
    "attention_softmax_in_fp32": "the model computes in fp32",
    "deallocate_pipeline_outputs": "one pipeline stage",
    "tensor_parallel_num_weight_shards": "TP 1",
    "expert_tensor_parallel_num_weight_shards": "expert TP 1",
    "cp_comm_type": "CP 1",
    "inference_sampling_seed": "inference only",
}
"""TransformerConfig fields where Megatron's config for the flags differs from the loop's own
config without changing what trains (tests/test_demo.py trains three runs both ways, bitwise)."""


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep-presets")
    return root, tiny_corpora(root / "data")


def _former_runs():
    return [(key.split("/")[0], key.split("/")[1]) for key in sorted(FORMER)]


def test_the_sweeps_runs_are_the_former_tables_with_their_keys_labels_and_priorities():
    args = sweep.parse_args([])
    ours = {f"{lay}/{r.name}": r for lay in LAYOUTS for r in sweep.sweep_runs(lay)}
    assert set(ours) == set(FORMER)
    for name, run in ours.items():
        layout = name.split("/")[0]
        former = FORMER[name]
        assert json.loads(json.dumps(sweep.run_key(run, args, layout))) == former["run_key"], name
        assert (run.label, run.priority) == (former["label"], former["priority"]), name
    order = {lay: [r.name for r in sweep.sweep_runs(lay)] for lay in LAYOUTS}
    assert order["8x1"][:3] == ["megatron", "hash", "switch"]  # the results file's order


def test_every_run_trains_what_the_former_table_trained(corpora):
    """Field by field, every run of every layout and both settings (but node-limited top-2 at
    16 x 1, where a node holds one expert: the sweep never plans it, and Megatron's
    validation now refuses it)."""
    root, data = corpora
    args = sweep.parse_args([])
    compared = 0
    for layout, name in _former_runs():
        nodes, rpn = sweep.LAYOUTS[layout]
        (run,) = [r for r in sweep.sweep_runs(layout) if r.name == name]
        run_dir = root / "runs" / layout / name
        if not sweep._feasible(run, args.experts, nodes):
            with pytest.raises(PresetError, match="cannot come from --moe-router-group-topk 1"):
                sweep.settings_for(run, args, layout, data[nodes], run_dir)
            continue
        settings, par = sweep.settings_for(run, args, layout, data[nodes], run_dir)
        assert (par.devices_per_node, par.ep, par.tp, par.pp) == (rpn, nodes * rpn, 1, 1)
        ours = json.loads(json.dumps(comparable(settings, nodes * rpn, root / "data", run_dir)))
        former = dict(FORMER[f"{layout}/{name}"]["settings"])
        # a LocMoE setting added since the record: the former table trained it at its default
        former["locmoe"] = {**ADDED_SINCE_THE_RECORD, **former["locmoe"]}
        former.setdefault("routing_profile", None)  # added since: the former profiled nothing
        model, former_model = ours.pop("model"), former.pop("model")
        assert ours == former, (layout, name)
        differ = {k for k in model if model[k] != former_model.get(k)}
        assert differ <= set(SAME_TRAINING), (layout, name, differ - set(SAME_TRAINING))
        compared += 1
    assert compared == len(FORMER) - 1


@pytest.mark.parametrize("results", ["locality_sweep.json", "locality_sweep_8x1_600steps.json"])
def test_committed_results_stay_done(results):
    """Every row of a committed results file is a run the sweep plans with the file's
    settings, under the same key: a fresh checkout reruns none of them."""
    path = ROOT / "benchmarks" / "results" / results
    data = json.loads(path.read_text())
    s = data["settings"]
    argv = ["--steps", str(s["steps"]), "--eval-batches", str(s["eval_batches"])]
    argv += ["--held-out-every", str(s["held_out_every"]), "--seed", str(s["seed"])]
    args = sweep.parse_args(argv)
    planned = {
        sweep._key_text(json.loads(json.dumps(sweep.run_key(r, args, lay))))
        for lay in sweep.LAYOUTS
        for r in sweep.sweep_runs(lay)
    }
    committed = sweep.committed_rows(path)
    assert set(committed) <= planned
    # every row keyed, but the 600-step file's single row, written before run keys existed
    keyed = [r for r in data["runs"] if "sweep_key" in r]
    assert len(committed) == len(keyed) == (0 if "600steps" in results else len(data["runs"]))


def test_the_sweep_preset_extends_the_demo():
    demo, ours = load_preset("demo"), load_preset("locality-sweep")
    model = [k for k in demo.megatron if k not in ("train-iters",)]
    assert {k: ours.megatron[k] for k in model} == {k: demo.megatron[k] for k in model}
    assert (ours.device, ours.nodes, ours.devices_per_node) == ("cpu", 2, 4)
    assert set(ours.schedule) == set(ours.sweep) and ours.sweep != demo.sweep
    assert ours.megatron["eval-iters"] == 8 and not demo.schedule


def test_parse_args_namespace():  # the sweep's options keep their names (the run keys read them)
    args = sweep.parse_args([])
    assert isinstance(args, argparse.Namespace) and args.eval_batches == 8 and args.steps == 200
