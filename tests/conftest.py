"""Shared fixtures: simulated clusters are started once per test session and reused.

``LOCMOE_TEST_DEVICE=cuda`` runs the same multi-rank tests one process per GPU on NCCL (the
device machine); the default is CPU ranks on gloo, with Triton's interpreter on, so the
router's Triton kernels run (in numpy) where there is no GPU.
"""

from __future__ import annotations

import os

if os.environ.get("LOCMOE_TEST_DEVICE", "cpu") == "cpu":
    # before anything imports triton: triton.jit reads it when a kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from megatron_locmoe.sim.cluster import SimCluster  # noqa: E402

_CLUSTERS: dict[int, SimCluster] = {}


@pytest.fixture(scope="session")
def cluster_factory():
    """``cluster_factory(n)``: a started n-rank gloo cluster, shared by the whole session."""

    def get(world_size: int) -> SimCluster:
        cluster = _CLUSTERS.get(world_size)
        if cluster is None:
            device = os.environ.get("LOCMOE_TEST_DEVICE", "cpu")
            cluster = _CLUSTERS[world_size] = SimCluster(world_size, device=device).__enter__()
        return cluster

    yield get
    for cluster in _CLUSTERS.values():
        cluster.__exit__(None, None, None)
    _CLUSTERS.clear()


@pytest.fixture(scope="session")
def cluster8(cluster_factory) -> SimCluster:
    return cluster_factory(8)


@pytest.fixture(scope="session")
def cluster2(cluster_factory) -> SimCluster:
    return cluster_factory(2)
