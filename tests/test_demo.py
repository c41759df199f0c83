"""The demo's job runs on the simulated 2-node x 4-rank cluster and counts node-local
assignments consistently with the topology."""

from megatron_locmoe.demo import routing_locality_job
from megatron_locmoe.simcluster import ParallelLayout


def test_demo_job_counts_node_local_assignments(cluster8):
    rows = cluster8.run(
        routing_locality_job,
        tokens=32,
        num_experts=16,
        topk=2,
        layout=ParallelLayout(devices_per_node=4, ep=8),
    )
    assert [r["node"] for r in rows] == [0, 0, 0, 0, 1, 1, 1, 1]
    for r in rows:
        assert r["assignments"] == 32 * 2
        assert 0 < r["node_local"] < r["assignments"]
        assert r["grad_norm"] > 0
