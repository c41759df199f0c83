"""The simulated cluster fails fast and together: one rank's exception stops its peers (which
wait for it in a collective) within seconds, with that exception first; a dead rank is named;
the cluster runs the next job afterwards."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
import torch.distributed as dist

from megatron_locmoe.sim.cluster import ClusterJobError, ParallelLayout

LAYOUT = ParallelLayout(devices_per_node=2, ep=1)


def one_rank_raises_job(ctx):
    if ctx.rank == 2:
        raise RuntimeError("shard 2 is truncated")
    dist.all_reduce(torch.ones(1))  # the peers wait here for rank 2
    return ctx.rank


def one_rank_dies_job(ctx):
    if ctx.rank == 1:
        os._exit(3)
    dist.all_reduce(torch.ones(1))
    return ctx.rank


def one_rank_is_killed_job(ctx):
    if ctx.rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.all_reduce(torch.ones(1))
    return ctx.rank


def healthy_job(ctx):
    t = torch.ones(1) * ctx.rank
    dist.all_reduce(t)
    return float(t)


@pytest.mark.slow
def test_one_failing_rank_stops_the_others_fast(cluster_factory):
    cluster = cluster_factory(4)
    with pytest.raises(ClusterJobError) as e:
        cluster.run(one_rank_raises_job, layout=LAYOUT)
    message = str(e.value)
    assert message.index("shard 2 is truncated") < message.index("were stopped"), message
    assert "ranks [0, 1, 3] had not answered" in message, message
    assert "failed on rank 2" in message.splitlines()[0]
    assert "no answer within" not in message  # stopped after the grace, not the job timeout
    assert e.value.headline == "rank 2: RuntimeError: shard 2 is truncated"
    assert cluster.run(healthy_job, layout=LAYOUT) == [6.0] * 4  # restarted, usable


@pytest.mark.slow
def test_a_dead_rank_is_named(cluster_factory):
    cluster = cluster_factory(4)
    with pytest.raises(ClusterJobError) as e:
        cluster.run(one_rank_dies_job, layout=LAYOUT)
    first = str(e.value).splitlines()[0]
    assert "ranks [1] died (rank 1: exit code 3)" in first, str(e.value)
    assert e.value.headline == "ranks [1] died (rank 1: exit code 3)"
    with pytest.raises(ClusterJobError) as e:
        cluster.run(one_rank_is_killed_job, layout=LAYOUT)
    assert e.value.headline == "ranks [1] died (rank 1: killed by SIGKILL)", str(e.value)
    assert cluster.run(healthy_job, layout=LAYOUT) == [6.0] * 4


_CHILDREN = []


def start_child_job(ctx):
    """A rank starts a process of its own, as Megatron's checkpoint writer starts a Manager."""
    import multiprocessing

    child = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(600,))
    child.start()
    _CHILDREN.append(child)  # keep it referenced: it lives until the rank goes
    return child.pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie waiting for its parent counts as gone
        return f.read().split(")")[-1].split()[0] != "Z"


@pytest.mark.parametrize("how", ["killed", "closed"])
@pytest.mark.slow
def test_ranks_take_what_they_started_with_them(cluster_factory, how):
    cluster = cluster_factory(2)
    pids = cluster.run(start_child_job, layout=LAYOUT)
    assert all(_alive(p) for p in pids)
    if how == "killed":  # as after a hung job or at the driver's exit
        cluster._kill()
    else:
        cluster.close()
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids), f"orphaned rank children: {pids}"


def resume_point_job(ctx, roots):
    from megatron_locmoe.sim import checkpoint

    return checkpoint.agreed_iteration(roots[ctx.rank])


def test_ranks_resume_from_one_checkpoint_or_none(cluster_factory, tmp_path):
    """Every rank reads the tracker file; ranks that see different iterations (a save still in
    progress, per-node directories) all stop with both values instead of training apart."""
    cluster = cluster_factory(2)
    roots = []
    for rank, text in enumerate(("20", "10")):
        root = tmp_path / f"node{rank}"
        root.mkdir()
        (root / "latest_checkpointed_iteration.txt").write_text(text)
        roots.append(str(root))
    with pytest.raises(ClusterJobError, match="between iteration 10 and iteration 20"):
        cluster.run(resume_point_job, roots, layout=LAYOUT)
    assert cluster.run(resume_point_job, [roots[0], roots[0]], layout=LAYOUT) == [20, 20]
    empty = [str(tmp_path / "none")] * 2
    assert cluster.run(resume_point_job, empty, layout=LAYOUT) == [None, None]
    with pytest.raises(ClusterJobError, match="between nothing and iteration 20"):
        cluster.run(resume_point_job, [roots[0], empty[0]], layout=LAYOUT)


def load_job(ctx, root):
    from megatron_locmoe.sim import checkpoint

    return checkpoint.load(None, None, root)  # refused before the model is touched


def test_a_tracker_without_its_iteration_is_refused(cluster_factory, tmp_path):
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("5")
    with pytest.raises(ClusterJobError, match="names iteration 5, but .*iter_0000005 is missing"):
        cluster_factory(2).run(load_job, str(tmp_path), layout=LAYOUT)
