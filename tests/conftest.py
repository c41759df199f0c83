"""Shared fixtures: simulated clusters are started once per test session and reused."""

from __future__ import annotations

import pytest

from megatron_locmoe.simcluster import SimCluster

_CLUSTERS: dict[int, SimCluster] = {}


@pytest.fixture(scope="session")
def cluster_factory():
    """``cluster_factory(n)``: a started n-rank gloo cluster, shared by the whole session."""

    def get(world_size: int) -> SimCluster:
        cluster = _CLUSTERS.get(world_size)
        if cluster is None:
            cluster = _CLUSTERS[world_size] = SimCluster(world_size).__enter__()
        return cluster

    yield get
    for cluster in _CLUSTERS.values():
        cluster.__exit__(None, None, None)
    _CLUSTERS.clear()


@pytest.fixture(scope="session")
def cluster8(cluster_factory) -> SimCluster:
    return cluster_factory(8)
