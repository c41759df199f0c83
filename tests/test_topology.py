"""Topology: node map, local experts and rail groups of every EP group, against an independent
computation of Megatron's expert rank grid, on 8 gloo ranks in six layouts; invalid layouts are
rejected with messages that name the clashing numbers."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_locmoe.sim.cluster import ParallelLayout
from megatron_locmoe.topology import TopologyError, layout_ep_groups, resolve_devices_per_node

NUM_EXPERTS = 16


def expected_ep_groups(world: int, ep: int, etp: int, pp: int) -> list[tuple[int, ...]]:
    """Megatron's expert grid in order tp-cp-ep-dp-pp, written out by hand:
    rank = etp_r + ETP * (ep_r + EP * (edp_r + EDP * pp_r))."""
    edp = world // (etp * ep * pp)
    groups = []
    for pp_r in range(pp):
        for edp_r in range(edp):
            for etp_r in range(etp):
                groups.append(
                    tuple(etp_r + etp * (ep_r + ep * (edp_r + edp * pp_r)) for ep_r in range(ep))
                )
    return groups


def topology_job(ctx):
    topo = ctx.topology()
    # The subgroups are real: a sum over each must add up exactly its members' ranks.
    me = torch.tensor([float(ctx.rank)])
    intra = me.clone()
    if topo.intra_node_group is not None:
        dist.all_reduce(intra, group=topo.intra_node_group)
    rail = me.clone()
    if topo.rail_group is not None:
        dist.all_reduce(rail, group=topo.rail_group)
    return dict(
        ep_groups=[g.ranks for g in topo.ep_groups],
        ep_ranks=topo.ep.ranks,
        ep_rank=topo.ep_rank,
        node=topo.node,
        num_nodes=topo.num_nodes,
        intra=topo.intra_node_ranks,
        rail=topo.rail_ranks,
        intra_sum=intra.item(),
        rail_sum=rail.item(),
        local_experts=list(topo.local_experts(topo.ep_rank, NUM_EXPERTS)),
        expert_nodes=topo.expert_nodes(NUM_EXPERTS),
        experts_on_my_node=list(topo.experts_on_node(topo.node, NUM_EXPERTS)),
    )


LAYOUTS = [
    # (nodes x devices, tp, ep, etp, pp)
    pytest.param(ParallelLayout(devices_per_node=8, ep=8), id="1x8-ep8"),
    pytest.param(ParallelLayout(devices_per_node=4, ep=8), id="2x4-ep8"),
    pytest.param(ParallelLayout(devices_per_node=2, ep=8), id="4x2-ep8"),
    pytest.param(ParallelLayout(devices_per_node=1, ep=8), id="8x1-ep8"),
    pytest.param(ParallelLayout(devices_per_node=4, ep=4, tp=2), id="2x4-tp2-ep4-etp2"),
    pytest.param(ParallelLayout(devices_per_node=4, ep=8, tp=2, etp=1), id="2x4-tp2-ep8-etp1"),
    pytest.param(ParallelLayout(devices_per_node=4, ep=4, pp=2), id="2x4-pp2-ep4"),
    pytest.param(ParallelLayout(devices_per_node=2, ep=2, pp=2), id="4x2-pp2-ep2-dp2"),
]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_topology_matches_independent_layout(cluster8, layout):
    results = cluster8.run(topology_job, layout=layout)
    world, G = 8, layout.devices_per_node
    etp = layout.etp if layout.etp is not None else layout.tp
    groups = expected_ep_groups(world, layout.ep, etp, layout.pp)
    assert sorted(results[0]["ep_groups"]) == sorted(groups)
    per_expert = NUM_EXPERTS // layout.ep
    for rank, r in enumerate(results):
        group = next(g for g in groups if rank in g)
        ep_rank = group.index(rank)
        nodes = [m // G for m in group]
        node_ids = sorted(set(nodes))
        my_node = node_ids.index(rank // G)
        same_node = tuple(m for m in group if m // G == rank // G)
        local_index = same_node.index(rank)
        rail = tuple(
            next(m for i, m in enumerate(m2 for m2 in group if m2 // G == n) if i == local_index)
            for n in node_ids
        )
        assert r["ep_ranks"] == group
        assert r["ep_rank"] == ep_rank
        assert r["node"] == my_node and r["num_nodes"] == len(node_ids)
        assert r["intra"] == same_node
        assert r["rail"] == rail
        assert r["intra_sum"] == sum(same_node)
        assert r["rail_sum"] == sum(rail)
        assert r["local_experts"] == list(range(ep_rank * per_expert, (ep_rank + 1) * per_expert))
        expected_nodes = [node_ids.index(group[e // per_expert] // G) for e in range(NUM_EXPERTS)]
        assert r["expert_nodes"] == expected_nodes
        assert r["experts_on_my_node"] == [
            e for e in range(NUM_EXPERTS) if expected_nodes[e] == my_node
        ]


def bad_topology_job(ctx):
    try:
        ctx.topology()
    except TopologyError as e:
        return str(e)
    return None


def test_invalid_devices_per_node_rejected_on_all_ranks(cluster8):
    messages = cluster8.run(bad_topology_job, layout=ParallelLayout(devices_per_node=3, ep=8))
    assert all(m == messages[0] for m in messages)
    assert "world size 8 is not a multiple of devices per node 3" in messages[0]


def test_layout_errors_name_the_numbers():
    """Uneven tilings need other world sizes than 8, so they use the pure check (the function
    the collective path calls after gathering every EP group)."""
    # 12 ranks, EP=6, 4 devices per node: group 0..5 puts 4 ranks on node 0 and 2 on node 1.
    groups = [tuple(range(0, 6)), tuple(range(6, 12))]
    with pytest.raises(TopologyError) as e:
        layout_ep_groups(groups, world_size=12, devices_per_node=4)
    msg = str(e.value)
    assert "node 0: 4, node 1: 2" in msg
    assert (
        "expert-model-parallel size 6" in msg and "= 6 must be a multiple or a divisor of 4" in msg
    )
    assert "--expert-model-parallel-size" in msg

    # Expert-TP 3 with 4 devices per node: EP group {0,3,6,9} lands on nodes 0,0,1,2.
    with pytest.raises(TopologyError, match="expert-tensor-parallel size 3"):
        layout_ep_groups([(0, 3, 6, 9), (1, 4, 7, 10), (2, 5, 8, 11)], 12, 4, 3)

    with pytest.raises(TopologyError, match="not a multiple of devices per node 5"):
        layout_ep_groups([tuple(range(8))], world_size=8, devices_per_node=5)

    # Ranks not placed node-major: host names change inside a node's block of ranks.
    hosts = ["a", "b", "a", "b", "c", "d", "c", "d"]
    with pytest.raises(TopologyError, match="does not place ranks node-major"):
        layout_ep_groups([tuple(range(8))], 8, 2, hostnames=hosts)
    # One host simulating several nodes is fine.
    ok = layout_ep_groups([tuple(range(8))], 8, 2, hostnames=["h"] * 8)
    assert ok[0].num_nodes == 4 and ok[0].ranks_per_node == 2


def test_devices_per_node_sources(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    with pytest.raises(TopologyError, match="LOCAL_WORLD_SIZE"):
        resolve_devices_per_node(None)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert resolve_devices_per_node(None) == 8
    assert resolve_devices_per_node(4) == 4  # explicit override wins (simulation)
    with pytest.raises(TopologyError, match="at least 1"):
        resolve_devices_per_node(0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "eight")
    with pytest.raises(TopologyError, match="not an integer"):
        resolve_devices_per_node(None)
