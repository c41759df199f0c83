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
    # every cluster's ranks are told to exit first, so that they wind down together: each
    # __exit__ then waits for ranks already on their way (one after another, the session's
    # end waited for each cluster's ranks in turn)
    for cluster in _CLUSTERS.values():
        for jobs, proc in zip(cluster._jobs, cluster._procs, strict=False):
            if proc.is_alive():
                jobs.put(None)
    for cluster in _CLUSTERS.values():
        cluster.__exit__(None, None, None)
    _CLUSTERS.clear()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> str:
    """The offline corpus most trainings read (Python's help topics, ~490k byte tokens, no
    stdlib files) as Megatron's indexed dataset: its prefix, built once per session. Tests only
    read it (the loop keeps its indices in memory); a module that needs other data defines its
    own ``corpus``."""
    from megatron_locmoe.sim import data

    prefix = tmp_path_factory.mktemp("corpus") / "pydoc"
    data.build_indexed_dataset(prefix, max_stdlib_files=0)
    return str(prefix)


@pytest.fixture(scope="session")
def start_cache(tmp_path_factory):
    """``start_cache(key, make)``: ``make(directory)``'s result, computed once per session for
    ``key`` (a start checkpoint written into the new ``directory`` and the reference run from
    it, shared by the modules that compare other layouts against the same reference). Users
    only read the directory."""
    done: dict = {}

    def get(key, make):
        if key not in done:
            done[key] = make(str(tmp_path_factory.mktemp("start")))
        return done[key]

    return get


@pytest.fixture(scope="session")
def demo_out(cluster8, tmp_path_factory):
    """(its directory, demo.main's result): the demo in a reduced size (every router, 5 steps,
    40 stdlib files) on the session's 2 x 4 cluster, run once: test_demo checks its table and
    records, test_report builds reports from its runs."""
    from megatron_locmoe.analysis import demo

    tmp = tmp_path_factory.mktemp("demo")
    result = demo.main(
        [
            "--steps", "5",
            "--out", str(tmp / "runs"),
            "--report", str(tmp / "report.html"),
            "--data-dir", str(tmp / "data"),
            "--max-stdlib-files", "40",
            "--progress", "on",
        ],
        cluster=cluster8,
    )  # fmt: skip
    return tmp, result


@pytest.fixture(scope="session")
def cluster8(cluster_factory) -> SimCluster:
    return cluster_factory(8)


@pytest.fixture(scope="session")
def cluster1(cluster_factory) -> SimCluster:
    return cluster_factory(1)


@pytest.fixture(scope="session")
def cluster2(cluster_factory) -> SimCluster:
    return cluster_factory(2)
