"""The alpha-beta cost model: arithmetic on hand-computed cases, monotone in bytes and
bandwidth, byte counts read the way the dispatcher writes them, clear errors."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from megatron_locmoe.analysis import costmodel as cm
from megatron_locmoe.analysis.errors import InputError
from megatron_locmoe.analysis.runlog import load_runs
from megatron_locmoe.analysis.synthetic import synthetic_run
from megatron_locmoe.dispatch.traffic import source_counts, traffic_from_counts

# a made-up cluster with round numbers: 4 devices per node, 100 GB/s + 1 us inside, 10 GB/s +
# 10 us between nodes, 100 TFLOP/s experts
TOY = cm.Cluster(
    name="toy",
    description="round numbers",
    devices_per_node=4,
    intra=cm.Link(bandwidth_GBps=100.0, latency_us=1.0),
    inter=cm.Link(bandwidth_GBps=10.0, latency_us=10.0),
    expert_tflops=100.0,
    sources=(),
    assumptions=(),
)
WORK = cm.Workload(
    name="toy",
    tokens_per_device=1000,
    hidden_size=1000,
    ffn_hidden_size=2000,
    num_moe_layers=1,
    num_experts=8,
    bytes_per_element=2,
    gated_linear_unit=False,
)


def _stats(**kw) -> cm.RoutingStats:
    base = dict(
        name="r",
        topk=1,
        assignments_per_token=1.0,
        node_local_fraction=0.75,
        intra_copies_per_token=0.75,
        inter_copies_per_token=0.5,
        flat_inter_copies_per_token=0.5,
        nodes=2,
        devices_per_node=4,
        num_experts=8,
    )
    base.update(kw)
    return cm.RoutingStats(**base)


def test_alltoall_seconds_by_hand():
    t_intra, t_inter, lat = cm.alltoall_seconds(1e9, 1e8, TOY, nodes=2, scheme="hierarchical")
    assert t_intra == pytest.approx(0.01) and t_inter == pytest.approx(0.01)
    assert lat == pytest.approx((3 * 1 + 1 * 10) * 1e-6)  # 3 node peers, 1 rail peer
    _, _, lat_flat = cm.alltoall_seconds(1e9, 1e8, TOY, nodes=2, scheme="flat")
    assert lat_flat == pytest.approx((3 * 1 + 4 * 10) * 1e-6)  # every device of the other node
    assert cm.alltoall_seconds(0, 0, TOY, 2, "flat") == (0.0, 0.0, 0.0)  # nothing sent, no latency


def test_estimate_by_hand():
    e = cm.estimate(_stats(), TOY, nodes=2, workload=WORK)
    # one All-to-All: intra 1000 tokens x 0.75 copies x 2000 B = 1.5 MB -> 15 us at 100 GB/s;
    # inter 1000 x 0.5 x 2000 B = 1 MB -> 100 us at 10 GB/s; latency 3 x 1 + 1 x 10 = 13 us
    assert e.intra_bytes == pytest.approx(4 * 1.5e6) and e.inter_bytes == pytest.approx(4 * 1e6)
    assert e.t_comm == pytest.approx(4 * (13e-6 + 100e-6))
    # experts: 3 (fwd+bwd) x 2 x 1000 tokens x 1000 x 2000 x 2 matrices = 2.4e10 FLOP at 1e14
    assert e.t_expert == pytest.approx(2.4e-4)
    assert e.t_moe == pytest.approx(2.4e-4 + 4.52e-4)
    assert e.comm_share == pytest.approx(4.52e-4 / 6.92e-4)
    half = cm.estimate(_stats(), TOY, 2, replace(WORK, overlap=0.5))
    assert half.t_moe == pytest.approx(2.4e-4 + 4.52e-4 - 2.26e-4)  # half the comm hidden
    full = cm.estimate(_stats(), TOY, 2, replace(WORK, overlap=1.0))
    assert full.t_moe == pytest.approx(4.52e-4)  # never hides more than the compute
    gated = cm.estimate(_stats(), TOY, 2, replace(WORK, gated_linear_unit=True))
    assert gated.t_expert == pytest.approx(1.5 * 2.4e-4)


def test_step_time_reduction_and_share_needed_by_hand():
    assert cm.step_time_reduction(0.2, 0.5) == pytest.approx(0.1)
    assert cm.step_time_reduction(0.3, 1.0) == pytest.approx(0.0)
    assert cm.step_time_reduction(0.3, 1.5) == pytest.approx(-0.15)  # more traffic: slower
    assert cm.share_needed(0.1, 0.5) == pytest.approx(0.2)
    assert cm.share_needed(0.1, 1.0) is None


def test_monotone_in_bytes_and_bandwidth():
    times = [
        cm.estimate(_stats(inter_copies_per_token=c), TOY, 2, WORK).t_moe
        for c in (0.0, 0.1, 0.3, 0.5, 0.9)
    ]
    assert times == sorted(times) and times[0] < times[-1]
    intra = [
        cm.estimate(
            _stats(intra_copies_per_token=c, inter_copies_per_token=0.0), TOY, 2, WORK
        ).t_moe
        for c in (0.0, 0.5, 1.0, 2.0)
    ]
    assert intra == sorted(intra) and intra[0] < intra[-1]
    by_elem = [
        cm.estimate(_stats(), TOY, 2, replace(WORK, bytes_per_element=b)).t_moe for b in (1, 2, 4)
    ]
    assert by_elem == sorted(by_elem) and by_elem[0] < by_elem[-1]
    for link in ("inter", "intra"):
        bw = [
            cm.estimate(
                _stats(),
                replace(TOY, **{link: replace(getattr(TOY, link), bandwidth_GBps=b)}),
                2,
                WORK,
            ).t_moe
            for b in (1.0, 5.0, 10.0, 50.0, 500.0)
        ]
        assert bw == sorted(bw, reverse=True) and bw[0] > bw[-1], link


def test_locality_gain_extrapolation_by_hand():
    s = _stats()  # p = 0.75 at 2 nodes: gain (0.75 - 0.5) / 0.5 = 0.5
    assert s.locality_gain == pytest.approx(0.5)
    p, intra, inter = s.copies_at(4, 4, 8)  # u = 2/8: p = 0.25 + 0.5 x 0.75
    assert p == pytest.approx(0.625)
    assert inter == pytest.approx(0.375) and intra == pytest.approx(0.75)  # a (1 - 1/G)
    p, _, inter = s.copies_at(16, 4, 8)  # 8 of 16 nodes host one expert: 0.5 x (1/8 + 0.5 x 7/8)
    assert p == pytest.approx(0.5 * (0.125 + 0.5 * 0.875)) and inter == pytest.approx(1 - p)
    p, intra, inter = s.copies_at(4, 4, 8, scheme="flat")
    assert intra == pytest.approx(0.625 * 0.75) and inter == pytest.approx(0.375)
    # the run's own nodes and experts: measured copies; a bigger node rescales intra only
    assert s.copies_at(2, 4, 8) == (0.75, 0.75, 0.5)
    p, intra, inter = s.copies_at(2, 8, 8)
    assert (p, inter) == (0.75, 0.5) and intra == pytest.approx(0.75 * (7 / 8) / (3 / 4))
    blind = _stats(node_local_fraction=0.5)
    assert blind.locality_gain == 0.0
    assert blind.copies_at(8, 8, 16)[0] == pytest.approx(2 / 16)  # stays locality-blind


def test_copy_bytes_match_the_dispatcher_accounting():
    """Bytes / copy_bytes = copies, exactly, for flat, hierarchical and dedup counts."""
    N, L, E, H, pb = 2, 4, 16, 64 * 4, 4
    gen = torch.Generator().manual_seed(0)
    routing = [torch.rand(32, E, generator=gen).topk(2, dim=1).indices for _ in range(N * L)]
    counts = torch.stack(
        [
            source_counts(torch.zeros(32, E, dtype=torch.bool).scatter(1, r, True), N, L)
            for r in routing
        ]
    )
    for dedup in (False, True):
        plan = traffic_from_counts(counts, N, L, E, dedup, H, pb)
        for t in plan["hier"]:
            if dedup:
                assert t.inter_node_bytes == t.inter_node_copies * cm.copy_bytes(H, pb, E // N)
                assert t.intra_node_bytes == t.intra_node_copies * cm.copy_bytes(
                    H, pb, E // (N * L)
                )
            else:
                assert t.inter_node_bytes == t.inter_node_copies * cm.copy_bytes(H, pb)
        for t in plan["flat"]:
            assert t.inter_node_bytes == t.inter_node_copies * cm.copy_bytes(H, pb)


_fake_run = synthetic_run  # the cost model's tests read what the demo would write


def test_routing_stats_from_a_run(tmp_path):
    _fake_run(tmp_path, "a", 1, False, inter_copies=0.4, intra_copies=0.45, dropped=0.1)
    _fake_run(tmp_path, "b", 2, True, inter_copies=0.7, intra_copies=1.2, local=0.55)
    a, b = (cm.RoutingStats.from_run(r) for r in load_runs([tmp_path]))
    assert a.inter_copies_per_token == pytest.approx(0.4)
    assert a.intra_copies_per_token == pytest.approx(0.45)
    assert a.assignments_per_token == pytest.approx(0.9)
    assert a.node_local_fraction == pytest.approx(0.6)
    assert b.dedup and b.inter_copies_per_token == pytest.approx(0.7)
    assert b.intra_copies_per_token == pytest.approx(1.2)
    assert b.flat_inter_copies_per_token == pytest.approx(0.7)


def test_cli_prints_per_router_estimates(tmp_path, capsys):
    _fake_run(tmp_path, "hash", 1, False, inter_copies=0.5, intra_copies=0.375, local=0.5)
    _fake_run(tmp_path, "locmoe-top1", 1, False, inter_copies=0.2, intra_copies=0.6, local=0.8)
    cm.main(["--cluster", "ascend-910a", "--nodes", "2", "--traffic", str(tmp_path)])
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert {"hash", "locmoe-top1"} <= set(rows)
    speedup = float(rows["locmoe-top1"].split("|")[-2])
    assert speedup > 1.0  # fewer inter-node copies, same compute
    cm.main(["--reproduce", str(tmp_path), "--baselines", "hash", "--equal-fanout", ""])
    out = capsys.readouterr().out
    assert "1.15x" in out and "18.1% (paper)" in out and "Loss parity" in out


def test_cli_refuses_a_bad_node_count_or_baseline(tmp_path):
    _fake_run(tmp_path, "hash", 1, False, inter_copies=0.5, intra_copies=0.375, local=0.5)
    base = ["--cluster", "ascend-910a", "--traffic", str(tmp_path)]
    with pytest.raises(InputError, match="--nodes 0: the EP group spans at least 1 node"):
        cm.main([*base, "--nodes", "0"])
    with pytest.raises(InputError, match="--baseline switch is none of the runs given \\(hash\\)"):
        cm.main([*base, "--baseline", "switch"])
    (tmp_path / "hash" / "run.json").write_text("{}")  # a record without the sizes
    with pytest.raises(InputError, match="has no .* in its run.json"):
        cm.main(base)


def test_presets_cite_sources():
    for c in cm.CLUSTERS.values():
        assert c.sources and c.assumptions, c.name
        assert c.inter.bandwidth_GBps < c.intra.bandwidth_GBps
    assert cm.CLUSTERS["h100-dgx"].intra.bandwidth_GBps == 450.0  # 900 GB/s bidirectional
    assert cm.CLUSTERS["h100-dgx"].inter.bandwidth_GBps == 50.0  # 400 Gb/s per GPU
    assert cm.CLUSTERS["ascend-910a"].inter.bandwidth_GBps == 12.5  # 100 GbE
    assert cm.CLUSTERS["ascend-910b"].inter.bandwidth_GBps == 25.0  # 200 GbE


def test_bad_input_is_refused(tmp_path):
    with pytest.raises(ValueError, match="bandwidth"):
        cm.Link(bandwidth_GBps=0.0, latency_us=1.0)
    with pytest.raises(ValueError, match="overlap"):
        replace(WORK, overlap=1.5)
    with pytest.raises(ValueError, match="tokens_per_device"):
        replace(WORK, tokens_per_device=0)
    with pytest.raises(ValueError, match="outside"):
        _stats(node_local_fraction=1.2)
    with pytest.raises(ValueError, match="scheme"):
        _stats().copies_at(2, 4, 8, scheme="ring")
    with pytest.raises(ValueError, match="nodes"):
        cm.estimate(_stats(), TOY, 0, WORK)
    with pytest.raises(ValueError, match="share"):
        cm.step_time_reduction(1.0, 0.5)
    bare = _fake_run(tmp_path, "bare", 1, False, 0.5, 0.5)
    rec = json.loads((bare / "run.json").read_text())
    del rec["hidden_element_bytes"]
    (bare / "run.json").write_text(json.dumps(rec))
    with pytest.raises(ValueError, match="hidden_element_bytes"):
        cm.RoutingStats.from_run(load_runs([bare])[0])
    # a run name the user typed: InputError (one error line from the tool), with the fix
    with pytest.raises(InputError, match="no run named 'locmoe-top1' among.*pick --locmoe"):
        cm.reproduction_table([_stats(name="x")], "locmoe-top1", ["hash"])
    with pytest.raises(InputError, match=r"no runs named \['nope'\].*pick --locmoe"):
        cm.measured_table(load_runs([bare]), ["nope"])
    assert math.isfinite(cm.estimate(_stats(), TOY, 2, WORK).t_moe)


def _sweep_row(run, nodes, node_local, setting="domains"):
    """A locality-sweep results row (megatron_locmoe.analysis.sweep) of a top-1 run, 1 rank per node."""
    copy = cm.copy_bytes(64 * 4, 4)
    return {
        "run": run, "setting": setting, "nodes": nodes, "ranks_per_node": 1, "topk": 1,
        "num_experts": 16, "hidden_size": 64, "hidden_element_bytes": 4,
        "prob_element_bytes": 4, "dedup": False, "dropped": 0.25, "node_local": node_local,
        "intra_bytes_per_token": 0.0, "inter_bytes_per_token": 0.75 * (1 - node_local) * copy,
        "flat_inter_bytes_per_token": 0.75 * (1 - node_local) * copy,
    }  # fmt: skip


def test_sweep_rows_give_the_statistic_measured_at_each_node_count():
    """from_sweep_row turns bytes back into copies; the sweep table takes each node count's
    own measurement (8 nodes: 0.5 local, 16 nodes: 0.3), never one carried over."""
    s = cm.RoutingStats.from_sweep_row(_sweep_row("locmoe", 8, 0.5))
    assert s.assignments_per_token == pytest.approx(0.75)
    assert s.inter_copies_per_token == pytest.approx(0.75 * 0.5)
    assert (s.nodes, s.devices_per_node, s.num_experts) == (8, 1, 16)
    rows = [
        _sweep_row("hash", 8, 0.125),
        _sweep_row("locmoe", 8, 0.5),
        _sweep_row("hash", 16, 0.0625),
        _sweep_row("locmoe", 16, 0.3),
    ]
    table = cm.sweep_reproduction_table(rows, "locmoe", ["hash"])
    lines = [line for line in table.splitlines() if "locmoe vs hash" in line]
    assert len(lines) == 3  # 8, 16 and 32 nodes (EP 16 over 16 of them)
    assert "0.125 -> 0.500" in lines[0] and "EP 16 over 8 nodes" in lines[0]
    assert all("0.062 -> 0.300" in line and "over 16 nodes" in line for line in lines[1:])
    with pytest.raises(ValueError, match="no control runs"):
        cm.sweep_reproduction_table(rows, "locmoe", ["hash"], setting="control")


def test_node_limited_copies_by_hand():
    """DeepEP's two-hop copies for 8 experts on n nodes of 8 GPUs x 4 experts: one rail copy
    per remote node, one NVLink copy per target GPU other than the forwarding one."""
    two = 8 * (1 - math.comb(28, 2) / math.comb(32, 2))  # 2 of a node's 32 experts: 1.903 GPUs
    assert cm.devices_hit(2, 32, 8) == pytest.approx(two) == pytest.approx(2 - 3 / 31)
    eight = 8 * (1 - math.comb(28, 8) / math.comb(32, 8))
    assert cm.devices_hit(8, 32, 8) == pytest.approx(eight)
    s = cm.node_limited_stats("v3", 8, 4, 0.5, nodes=8, devices_per_node=8, num_experts=256)
    assert s.inter_copies_per_token == pytest.approx(3.5)  # 4 nodes, own one half the time
    assert s.intra_copies_per_token == pytest.approx(4 * two * 7 / 8)
    assert s.node_local_fraction == pytest.approx(1 / 8)  # locality-blind
    assert s.copies_at(8, 8, 256) == (s.node_local_fraction, s.intra_copies_per_token, 3.5)
    # one dispatch or combine of the check = estimate's per-All-to-All time (4 per layer-step)
    work = cm.Workload("w", 4096, 7168, 2048, 1, 256, bytes_per_element=2)
    one = cm.alltoall_pass(s, cm.CLUSTERS["h100-dgx"], 8, 4096, 7168 * 2, 256)
    assert 4 * one.seconds == cm.estimate(s, cm.CLUSTERS["h100-dgx"], 8, work).t_comm
    with pytest.raises(ValueError):
        cm.node_limited_stats("x", 8, 3, 0.5, 8, 8, 256)  # 8 experts do not split over 3 nodes


def test_check_against_fusco_and_deepep():
    """The published check's numbers (docs/performance.md): fails when the model, the h100-dgx
    preset or the recorded measurements change."""
    from megatron_locmoe.analysis import published

    f = published.FUSCO
    assert (f.nodes, f.devices_per_node, f.hidden_size, f.topk, f.num_experts) == (
        8, 8, 7168, 8, 256
    )  # fmt: skip
    assert [c.measured_ms for c in f.cases] == [30.7, 24.7, 24.7]
    assert f.sources and f.assumptions and cm.measurement_cluster(f).name == "h100-dgx"
    rows = {r.case: r for r in cm.check_published(f)}
    # deepseek-v3: 2 x (49 us latency + 4096 x 3.5 x 14336 B / 50 GB/s)
    v3, one, own = rows["deepseek-v3"], rows["one-node"], rows["one-node-own"]
    assert v3.predicted == pytest.approx(2 * (49e-6 + 4096 * 3.5 * 14336 / 50e9))
    assert v3.predicted * 1e3 == pytest.approx(8.319, abs=1e-3)
    assert one.predicted * 1e3 == pytest.approx(2.153, abs=1e-3)
    assert own.predicted * 1e3 == pytest.approx(1.315, abs=1e-3)
    assert v3.error == pytest.approx(-0.729, abs=1e-3)
    assert one.error == pytest.approx(-0.913, abs=1e-3)
    assert one.predicted / v3.predicted == pytest.approx(0.259, abs=1e-3)  # measured 0.805
    gbps, rest = cm.marginal_costs(f, "deepseek-v3", "one-node")
    assert (gbps, rest) == (pytest.approx(30.88, abs=0.01), pytest.approx(3.338, abs=1e-3))
    (deepep,) = cm.check_published(published.DEEPEP_EP64)  # bandwidths as DeepEP counts them
    assert deepep.measured_GBps == (51.0, 50.0)
    d, c = deepep.predicted_GBps
    assert (d, c) == (pytest.approx(55.85, abs=0.01), pytest.approx(56.47, abs=0.01))
    assert d / 51.0 - 1 == pytest.approx(0.095, abs=1e-3)
    assert c / 50.0 - 1 == pytest.approx(0.129, abs=1e-3)


def test_cli_check(capsys):
    cm.main(["--check", "fusco"])
    out = capsys.readouterr().out
    assert "| deepseek-v3 " in out and "-73%" in out and "measured cut 20%" in out
    with pytest.raises(InputError, match="known measurements: fusco, deepep"):
        cm.main(["--check", "nccl"])
