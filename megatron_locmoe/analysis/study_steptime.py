"""The study's modeled step time (issue 32): what an arm's measured routing would cost per
training step on a real cluster of the virtual cluster's layout.

From each study record (``analysis.study``) the model takes what the virtual cluster measured
exactly: the inter- and intra-node bytes per token and MoE layer of the two-hop dispatcher with
one copy per token and node (dispatch + combine), and the tokens received per rank (max / mean).
The compute comes from the same study: one run of the reference arm alone on the card (the
virtual cluster computes every rank's share, so one device's compute is that run's seconds per
step over the virtual ranks; the virtual cluster costs no measurable time, docs/virtual_cluster.md).

Per device and step, with T tokens per device, L MoE layers, B the measured bytes per token and
layer, r the received max / mean:

* All-to-All: 4 passes per layer (dispatch and combine, forward and backward), each of T B / 2
  bytes per link class; the busiest receiver gets r times the mean, so each pass takes
  ``latency + max(r T B_intra / 2 / BW_intra, r T B_inter / 2 / BW_inter)`` (costmodel's
  ``alltoall_seconds``), nothing hidden under compute (Megatron's All-to-All dispatcher does
  not overlap without its EP-overlap schedule);
* compute: the measured per-device time, its expert part (the share of the model's FLOPs in
  the experts, from the run's shapes) stretched by r, since the busiest rank's experts bound
  the step;
* not modeled, the same for every arm: the data-parallel gradient reduction, pipeline bubbles.

``--target-mfu`` prints the same table with the compute scaled to that model-FLOP utilisation
(the measured MFU of this unfused local-spec model is low, which hides communication).

    python -m megatron_locmoe.analysis.study_steptime \\
        benchmarks/results/study/gpu-8x8-control/*.json --cluster h100-dgx --target-mfu 0.35
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

from megatron_locmoe.analysis.costmodel import CLUSTERS, Cluster, alltoall_seconds
from megatron_locmoe.analysis.errors import InputError, run_tool
from megatron_locmoe.analysis.study import Arm, command_value, load_records, log_speed, pool


@dataclass(frozen=True)
class Shapes:
    """What the step-time model reads from a run's ``pretrain_gpt`` command."""

    nodes: int
    devices_per_node: int
    tokens_per_device: int
    """Tokens one device routes per step (global batch x sequence length / virtual ranks)."""
    moe_layers: int
    expert_flop_share: float

    @classmethod
    def from_command(cls, command: str) -> Shapes:
        def need(flag: str) -> str:
            value = command_value(command, flag)
            if value is None:
                raise InputError(
                    f"the run's command has no {flag}: the step-time model reads the layout and "
                    "the model's shapes from it (records written by 'study collect')"
                )
            return value

        layout = need("--locmoe-virtual-cluster")
        try:
            nodes, per_node = (int(x) for x in layout.lower().split("x"))
        except ValueError:
            raise InputError(f"--locmoe-virtual-cluster {layout}: expected NODESxGPUS") from None
        ranks = nodes * per_node
        seq = int(need("--seq-length"))
        tokens = int(need("--global-batch-size")) * seq
        if tokens % ranks:
            raise InputError(f"{tokens} tokens a step do not split over {ranks} virtual ranks")
        hidden = int(need("--hidden-size"))
        heads = int(need("--num-attention-heads"))
        groups = int(command_value(command, "--num-query-groups") or heads)
        kv = hidden * groups // heads
        ffn = int(need("--moe-ffn-hidden-size"))
        topk = int(need("--moe-router-topk"))
        experts = int(need("--num-experts"))
        vocab = int(need("--vocab-size"))
        mats = 3 if " --swiglu" in f" {command}" else 2
        # forward FLOPs per token and layer (training triples every term alike)
        attention = 2 * hidden * (hidden + 2 * kv) + 2 * hidden * hidden + 4 * seq * hidden
        expert = topk * 2 * hidden * ffn * mats
        router = 2 * hidden * experts
        layers = int(need("--num-layers"))
        total = layers * (attention + expert + router) + 2 * hidden * vocab
        return cls(nodes, per_node, tokens // ranks, layers, layers * expert / total)


@dataclass(frozen=True)
class StepTime:
    """One arm's modeled step on one device (seconds)."""

    arm: Arm
    compute: float
    """The measured per-device compute, the experts at the mean load."""
    imbalance: float
    """The busiest rank's extra expert compute."""
    comm: float
    """All-to-All time (4 passes per layer, at the busiest receiver)."""

    @property
    def step(self) -> float:
        return self.compute + self.imbalance + self.comm

    def with_compute_scaled(self, factor: float) -> StepTime:
        """The same step with the compute (and so its imbalance) times ``factor`` (e.g. the
        measured MFU over a target MFU); the All-to-All unchanged."""
        return replace(self, compute=self.compute * factor, imbalance=self.imbalance * factor)


def _mean_of(records: list[dict], key: str, metric: str) -> float:
    values = [r[key].get(metric) for r in records]
    if any(v is None for v in values):
        names = [r["name"] for r in records if r[key].get(metric) is None]
        raise InputError(f"{', '.join(names)}: no {metric}; the step time needs it per run")
    return sum(values) / len(values)


def reference_compute(
    records: list[dict], shapes: Shapes, arm: str, log: str | Path | None = None
) -> tuple[float, float | None, dict]:
    """(one device's compute seconds per step, the run's MFU or None, a record-like dict
    naming where it came from) from the ``arm`` run that had the card alone (the fastest such
    run where several did), or from ``log``: the Megatron log of a run of the same command
    alone on the card (one that stopped before its evaluation has no record, but its steps
    were timed)."""
    ranks = shapes.nodes * shapes.devices_per_node
    if log is not None:
        seconds, tflops = log_speed(log)
        if seconds is None:
            raise InputError(
                f"{log}: no timed iterations (Megatron's 'elapsed time per iteration')"
            )
        peak = records[0]["speed"].get("peak_tflops")
        mfu = None if tflops is None or not peak else tflops / peak
        ref = {
            "name": str(log),
            "versions": records[0].get("versions", {}),
            "speed": {"seconds_per_step": seconds, "mfu": mfu},
        }
        return seconds / ranks, mfu, ref
    alone = [
        r
        for r in records
        if r["arm"] == arm
        and r["speed"].get("card_shared_by") == 1
        and r["speed"].get("seconds_per_step")
    ]
    if not alone:
        raise InputError(
            f"no '{arm}' run had the card alone (speed.card_shared_by 1): the compute time must "
            f"be measured without other runs beside it; run 'gpu_study.sh run PRESET \"{arm}:1\"' "
            "and collect it, or name another arm with --compute-from"
        )
    best = min(alone, key=lambda r: r["speed"]["seconds_per_step"])
    return best["speed"]["seconds_per_step"] / ranks, best["speed"].get("mfu"), best


def step_times(
    records: list[dict],
    cluster: Cluster,
    *,
    compute_from: str = "megatron",
    compute_log: str | Path | None = None,
) -> tuple[list[StepTime], dict]:
    """Every arm's modeled step (seeds pooled: bytes and load means) for one setting's records,
    and the reference record the compute came from."""
    settings = {r["setting"] for r in records}
    if len(settings) != 1:
        raise InputError(f"records of {sorted(settings)}: give one setting's records at a time")
    shapes = {Shapes.from_command(r["command"]) for r in records}
    if len(shapes) != 1:
        raise InputError("the records' commands differ in layout or model shapes")
    (shape,) = shapes
    if shape.devices_per_node != cluster.devices_per_node:
        raise InputError(
            f"the runs' nodes have {shape.devices_per_node} devices, cluster {cluster.name} "
            f"{cluster.devices_per_node}: choose a cluster of the runs' node size"
        )
    compute, _, ref = reference_compute(records, shape, compute_from, compute_log)
    by_arm: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_arm[r["arm"]].append(r)
    out = []
    for arm in pool(records):
        runs = by_arm[arm.arm]
        inter = _mean_of(runs, "per_token", "dedup_inter_node_bytes")
        intra = _mean_of(runs, "per_token", "dedup_intra_node_bytes")
        load = _mean_of(runs, "routing", "received_tokens_max_over_mean")
        half = shape.tokens_per_device * load / 2  # one pass's tokens at the busiest receiver
        t_intra, t_inter, latency = alltoall_seconds(
            half * intra, half * inter, cluster, shape.nodes, "hierarchical"
        )
        comm = 4 * shape.moe_layers * (latency + max(t_intra, t_inter))
        extra = compute * shape.expert_flop_share * (load - 1.0)
        out.append(StepTime(arm, compute, extra, comm))
    return out, ref


def steptime_table(
    records: list[dict],
    cluster: Cluster,
    *,
    compute_from: str = "megatron",
    compute_log: str | Path | None = None,
    target_mfu: float | None = None,
) -> str:
    """The Markdown table: per arm, held-out loss, bytes, load, the modeled All-to-All and step
    time at the measured compute (and at ``target_mfu``), and the step against ``compute_from``."""
    measured, ref = step_times(records, cluster, compute_from=compute_from, compute_log=compute_log)
    columns = [("measured compute", measured)]
    mfu = ref["speed"].get("mfu")
    if target_mfu is not None:
        if not mfu:
            raise InputError(f"{ref['name']}: no MFU recorded; --target-mfu needs it")
        scaled = [s.with_compute_scaled(mfu / target_mfu) for s in measured]
        columns.append((f"compute at {target_mfu:.0%} MFU", scaled))
    base = {name: next(s for s in col if s.arm.arm == compute_from) for name, col in columns}
    head = "| arm | seeds | held-out loss | inter-node B / token / layer | max/mean load |"
    rule = "|---|---|---|---|---|"
    for name, _ in columns:
        head += f" All-to-All ms ({name}) | step ms | vs {compute_from} |"
        rule += "---|---|---|"
    lines = [
        f"{cluster.name}, {records[0]['setting']}: compute from {ref['name']} alone on "
        f"{ref['versions'].get('card', 'the card')} ({ref['speed']['seconds_per_step']:.3f} s a "
        f"step, MFU {mfu if mfu is None else format(mfu, '.1%')})",
        "",
        head,
        rule,
    ]
    for s in sorted(measured, key=lambda s: s.arm.bytes or 0.0):
        a = s.arm
        std = "" if a.loss_std is None else f" ± {a.loss_std:.4f}"
        row = f"| {a.arm} | {len(a.seeds)} | {a.loss:.4f}{std} | {a.bytes:,.0f} | {a.load:.2f} |"
        for name, col in columns:
            t = next(x for x in col if x.arm.arm == a.arm)
            row += f" {t.comm * 1e3:.2f} | {t.step * 1e3:.1f} | {t.step / base[name].step:.3f}x |"
        lines.append(row)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m megatron_locmoe.analysis.study_steptime",
        description="modeled step time per arm from study records (see the module doc)",
    )
    p.add_argument("records", nargs="+", help="one setting's study records (JSON)")
    p.add_argument("--cluster", choices=sorted(CLUSTERS), default="h100-dgx")
    p.add_argument("--compute-from", default="megatron", help="the arm run alone for compute")
    p.add_argument(
        "--compute-log",
        default=None,
        help="the Megatron log (node0.log) of a run of the compute arm alone on the card, "
        "when that run has no record (stopped before its evaluation)",
    )
    p.add_argument("--target-mfu", type=float, default=None, help="also at this MFU (0..1)")
    a = p.parse_args(argv)
    if a.target_mfu is not None and not 0.0 < a.target_mfu <= 1.0:
        p.error(f"--target-mfu {a.target_mfu}: give a fraction in (0, 1]")
    print(
        steptime_table(
            load_records(a.records),
            CLUSTERS[a.cluster],
            compute_from=a.compute_from,
            compute_log=a.compute_log,
            target_mfu=a.target_mfu,
        )
    )


if __name__ == "__main__":
    raise SystemExit(run_tool(main))
