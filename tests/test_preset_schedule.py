"""The presets' ``extends`` (another preset's keys and flags as defaults) and ``schedule`` (how
the locality sweep runs each sweep entry) keys, checked with a clear error."""

from __future__ import annotations

import pytest

from megatron_locmoe.launch.presets import PresetError, load_preset, preset_from_dict


def _raw(**schedule):
    return {
        "device": "cpu",
        "nodes": 2,
        "devices_per_node": 4,
        "megatron": {"num-layers": 2},
        "sweep": {"a": {"moe-router-topk": 1}},
        "schedule": schedule,
    }


@pytest.mark.parametrize(
    "schedule, error",
    [
        ({"b": {"label": "B"}}, "schedule names b, which the sweep does not have"),
        ({"a": {"label": "A", "prio": 2}}, "unknown key.*prio; a schedule entry has label"),
        ({"a": {"label": "A", "setting": "mixed"}}, "setting 'mixed'; use one of domains"),
        ({"a": {"label": "A", "priority": 0}}, "priority is a positive integer"),
        ({"a": {"label": "A", "layouts": "8x1"}}, "layouts is a list of layout names"),
        ({"a": {"priority": 1}}, "give its table label"),
    ],
)
def test_schedule_errors(schedule, error):
    with pytest.raises(PresetError, match=error):
        preset_from_dict("p", _raw(**schedule))


def test_schedule_priorities_and_layouts():
    p = preset_from_dict(
        "p", _raw(a={"label": "A", "layouts": ["8x1"], "priority": {"8x1": 2, "other": 4}})
    )
    entry = p.schedule["a"]
    assert (entry.priority_at("8x1"), entry.priority_at("2x4"), entry.setting) == (2, 4, "domains")
    assert entry.runs_at("8x1") and not entry.runs_at("2x4")


def test_extends_merges_flags_and_refuses_a_cycle(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "a.yaml").write_text("extends: b\n")
    (tmp_path / "configs" / "b.yaml").write_text("extends: a\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PresetError, match="a cycle"):
        load_preset("a")
    p = preset_from_dict(
        "p", {"extends": "demo", "megatron": {"num-layers": 4, "data-path": None}, "sweep": {}}
    )
    assert p.megatron["num-layers"] == 4 and p.megatron["hidden-size"] == 64
    assert p.megatron["data-path"] is None and p.sweep == {} and p.prepare_data == "pydoc-domains"


def test_a_preset_without_runs_of_its_own_takes_the_sweep_it_extends(tmp_path):
    """The same arms on another model or cluster (the study's CPU presets): no sweep and no
    schedule here, so the extended preset's; a sweep here replaces both."""
    from megatron_locmoe.launch.presets import load_preset

    (tmp_path / "base.yaml").write_text(
        "device: cpu\nnodes: 1\ndevices_per_node: 1\nmegatron: {num-layers: 2}\n"
        "sweep: {a: {moe-router-topk: 1}, b: {moe-router-topk: 2}}\n"
        "schedule: {a: {label: A}}\n"
    )
    (tmp_path / "same.yaml").write_text(
        f"extends: {tmp_path / 'base.yaml'}\nmegatron: {{num-layers: 4}}\n"
    )
    (tmp_path / "own.yaml").write_text(
        f"extends: {tmp_path / 'base.yaml'}\nsweep: {{c: {{moe-router-topk: 1}}}}\n"
    )
    same = load_preset(str(tmp_path / "same.yaml"))
    assert [r for r, _ in same.runs()] == ["a", "b"] and same.megatron["num-layers"] == 4
    assert same.schedule["a"].label == "A"
    own = load_preset(str(tmp_path / "own.yaml"))
    assert [r for r, _ in own.runs()] == ["c"] and not own.schedule
