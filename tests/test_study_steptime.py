"""The study's modeled step time (megatron_locmoe.analysis.study_steptime) against a hand
calculation on the h100-dgx preset."""

from __future__ import annotations

import dataclasses
import json

import pytest

from megatron_locmoe.analysis import study_steptime
from megatron_locmoe.analysis.costmodel import CLUSTERS
from megatron_locmoe.analysis.errors import InputError

CMD = (
    "python -m megatron_locmoe.pretrain_gpt --num-layers 6 --hidden-size 512 "
    "--num-attention-heads 8 --seq-length 1024 --num-experts 64 --moe-router-topk 4 "
    "--moe-ffn-hidden-size 512 --swiglu --locmoe-virtual-cluster 8x8 --global-batch-size 256 "
    "--vocab-size 32768"
)


def _record(arm, seed, *, inter, intra, load, seconds=None, shared=None, loss=3.0):
    return {
        "name": f"s-{arm}-{seed}",
        "arm": arm,
        "seed": seed,
        "setting": "gpu-8x8-control",
        "command": CMD,
        "versions": {"card": "H100"},
        "heldout": {"mixture": loss, "at_step": 48},
        "per_token": {"dedup_inter_node_bytes": inter, "dedup_intra_node_bytes": intra},
        "routing": {"received_tokens_max_over_mean": load},
        "speed": {"seconds_per_step": seconds, "mfu": 0.07, "card_shared_by": shared},
    }


def test_the_shapes_come_from_the_command():
    s = study_steptime.Shapes.from_command(CMD)
    assert (s.nodes, s.devices_per_node, s.tokens_per_device, s.moe_layers) == (8, 8, 4096, 6)
    h, f, seq = 512, 512, 1024
    attention = 2 * h * 3 * h + 2 * h * h + 4 * seq * h
    expert = 4 * 2 * h * f * 3
    total = 6 * (attention + expert + 2 * h * 64) + 2 * h * 32768
    assert s.expert_flop_share == pytest.approx(6 * expert / total)
    with pytest.raises(InputError, match="--locmoe-virtual-cluster"):
        study_steptime.Shapes.from_command(CMD.replace("--locmoe-virtual-cluster 8x8", ""))


def test_the_step_time_by_hand():
    records = [
        _record("megatron", 1, inter=6000.0, intra=7000.0, load=3.0, seconds=0.64, shared=1),
        _record("megatron", 2, inter=6000.0, intra=7000.0, load=3.0, seconds=9.0, shared=8),
        _record("group_m1", 1, inter=2000.0, intra=7000.0, load=1.0),
    ]
    cluster = CLUSTERS["h100-dgx"]
    times, ref = study_steptime.step_times(records, cluster)
    assert ref["seed"] == 1  # the run alone, not the shared one
    by = {t.arm.arm: t for t in times}
    compute = 0.64 / 64
    share = study_steptime.Shapes.from_command(CMD).expert_flop_share
    for arm, inter, load in (("megatron", 6000.0, 3.0), ("group_m1", 2000.0, 1.0)):
        half = 4096 * load / 2
        inter_s = half * inter / 50e9  # 400 Gb/s per GPU
        intra_s = half * 7000.0 / 450e9
        latency = (2.0 * 7 + 5.0 * 7) * 1e-6  # 7 NVLink peers, 7 rail peers (two-hop)
        t = by[arm]
        assert t.comm == pytest.approx(4 * 6 * (latency + max(inter_s, intra_s)))
        assert t.compute == pytest.approx(compute)
        assert t.imbalance == pytest.approx(compute * share * (load - 1.0))
    assert by["group_m1"].step < by["megatron"].step


def test_the_table_and_its_refusals(tmp_path, capsys):
    records = [
        _record("megatron", 1, inter=6000.0, intra=7000.0, load=3.0, seconds=0.64, shared=1),
        _record("hash", 1, inter=2500.0, intra=7000.0, load=1.9, loss=2.9),
    ]
    text = study_steptime.steptime_table(records, CLUSTERS["h100-dgx"], target_mfu=0.35)
    assert "compute at 35% MFU" in text
    row = next(x for x in text.splitlines() if x.startswith("| megatron |"))
    assert row.count("1.000x") == 2
    paths = []
    for r in records:
        paths.append(tmp_path / f"{r['name']}.json")
        paths[-1].write_text(json.dumps({**r, "heldout": {**r["heldout"], "domains": {}}}))
    study_steptime.main([str(p) for p in paths])
    assert "| hash |" in capsys.readouterr().out
    shared = [{**r, "speed": {**r["speed"], "card_shared_by": 8}} for r in records]
    with pytest.raises(InputError, match="alone"):
        study_steptime.step_times(shared, CLUSTERS["h100-dgx"])
    with pytest.raises(InputError, match="node size"):
        sixteen = dataclasses.replace(CLUSTERS["h100-dgx"], devices_per_node=16)
        study_steptime.step_times(records, sixteen)
    mixed = [records[0], {**records[1], "setting": "other"}]
    with pytest.raises(InputError, match="one setting"):
        study_steptime.step_times(mixed, CLUSTERS["h100-dgx"])


def test_the_compute_from_the_log_of_a_run_alone(tmp_path):
    """A run alone that stopped before its evaluation has no record; its log's timed steps
    still give the compute (iteration 1, the start-up, left out)."""
    log = tmp_path / "node0.log"
    line = (
        " [t] iteration {i}/ 48 | consumed samples: 1 | elapsed time per iteration (ms): "
        "{ms} | throughput per GPU (TFLOP/s/GPU): 14.0 | lm loss: 7.0 |\n"
    )
    log.write_text("".join(line.format(i=i, ms=9000.0 if i == 1 else 1280.0) for i in range(1, 12)))
    records = [_record("megatron", 1, inter=6000.0, intra=7000.0, load=3.0, seconds=9.9, shared=8)]
    for r in records:
        r["speed"]["peak_tflops"] = 700.0
    times, ref = study_steptime.step_times(records, CLUSTERS["h100-dgx"], compute_log=log)
    assert times[0].compute == pytest.approx(1.28 / 64)
    assert ref["speed"]["mfu"] == pytest.approx(14.0 / 700.0)
    log.write_text("no iterations\n")
    with pytest.raises(InputError, match="no timed iterations"):
        study_steptime.step_times(records, CLUSTERS["h100-dgx"], compute_log=log)
