"""The study's presets (issue 32) describe what they say: node-limited routing with groups = the
nodes of an expert-parallel group (DeepSeek's M nodes a token), M from 1 to 4, on the virtual
cluster they name. A group of half a node (the 16x8 presets had 16 groups for 8 nodes per EP
group) makes 'M nodes' mean nothing."""

from __future__ import annotations

import pytest

from megatron_locmoe.launch.presets import _REPO_CONFIGS, load_preset

STUDY = sorted(p.stem for p in _REPO_CONFIGS.glob("study-*.yaml"))


def _nodes_per_ep_group(flags: dict) -> int:
    nodes, gpus = (int(x) for x in str(flags["locmoe-virtual-cluster"]).lower().split("x"))
    ep = int(flags.get("locmoe-virtual-ep-size") or nodes * gpus)
    assert ep % gpus == 0, "an EP group of whole nodes"
    return ep // gpus


def test_there_are_study_presets():
    assert STUDY, "configs/study-*.yaml"


@pytest.mark.parametrize("name", STUDY)
def test_node_limited_arms_take_one_group_per_node_and_m_from_1_to_4(name):
    preset = load_preset(name)
    limits = []
    for run, flags in preset.runs():
        groups = flags.get("moe-router-num-groups")
        if groups is None:
            continue
        assert groups == _nodes_per_ep_group(flags), (run, groups)
        assert flags["num-experts"] % groups == 0
        limits.append(flags["moe-router-group-topk"])
    topk = {flags["moe-router-topk"] for _, flags in preset.runs()}
    # top-1 (the paper regime): a token has one expert, so "M nodes a token" limits nothing
    assert sorted(limits) == ([] if topk == {1} else [1, 2, 3, 4]), (topk, limits)


@pytest.mark.parametrize(
    "name, nodes", [("study-gpu-8x2-paper-domains", 8), ("study-gpu-16x1-paper-domains", 16)]
)
def test_the_paper_regime_spreads_its_16_experts_over_every_node(name, nodes):
    """EP across all nodes with 16 experts: 8 nodes x 2 GPUs (two experts a node, so a blind
    router keeps 1/8 of the tokens local, as on the paper's 8 nodes) or 16 x 1; and no arm that
    needs top-k > 1."""
    preset = load_preset(name)
    for run, flags in preset.runs():
        assert (flags["num-experts"], flags["moe-router-topk"]) == (16, 1), run
        assert _nodes_per_ep_group(flags) == nodes, run
        assert flags["locmoe-domain-data-path"], run
        assert "locmoe-node-fill-mass" not in flags, run
