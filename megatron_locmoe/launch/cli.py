"""``python -m megatron_locmoe.launch --config PRESET``: a preset becomes one torchrun per node.

    python -m megatron_locmoe.launch --config h100-2node --nodes 2 --node-rank 0 \\
        --master-addr 10.0.0.1 [--set KEY=VALUE ...] [--dry-run] [-- MORE MEGATRON FLAGS]

Run it once on every node (``launch/slurm.sbatch`` does that with srun). Before anything
starts it checks the preset against the cluster (layout arithmetic, then the whole command
through Megatron's own parser and ``validate_args`` with the plugin flags; see
:mod:`megatron_locmoe.launch.presets`), so a wrong node count or a typo fails on the login node with
a message saying what to change. ``--dry-run`` prints, for every node (or the one given by
``--node-rank``), the exact environment and command and starts nothing.

Per device kind:

- ``cuda``: ``python -m torch.distributed.run ... -m megatron_locmoe.pretrain_gpt FLAGS``
  (``--entry PATH/pretrain_gpt.py`` runs Megatron-LM's script instead: directly when
  ``megatron-locmoe-patch`` patched it, else through ``megatron_locmoe.run``).
  One node: ``--standalone``; several: static rendezvous on ``--master-addr`` /
  ``--node-rank``, or c10d rendezvous with ``--rdzv-id`` (Slurm).
- ``npu`` (Ascend mode): each rank starts in ``python -m megatron_locmoe.launch --worker
  ENTRY``, which imports ``torch_npu`` and ``torch_npu.contrib.transfer_to_npu`` before
  anything imports Megatron, so ``megatron.training``'s own ``torch.cuda`` calls and its
  ``nccl`` backend name become NPU calls and HCCL (the plugin's device layer then picks
  npu / hccl because torch_npu is loaded; the MoE path is adapted by the adaptor's NPU
  patches). The environment adds ASCEND_RT_VISIBLE_DEVICES and the HCCL timeouts and buffer
  size; ``TORCH_COMPILE_DISABLE=1`` keeps Megatron's ``@jit_fuser`` (torch.compile) functions
  eager; settings that need CUDA-only code (TE, apex, grouped GEMM, FP8, CUDA graphs) are
  refused on the parsed arguments. MindSpeed is not used: it pins its own Megatron versions.
- ``cpu``: Megatron's ``pretrain()`` is not a CPU target, so the launcher trains in this
  process's simulated cluster instead (``megatron_locmoe.sim.cluster.SimCluster``, gloo, nodes
  x devices-per-node ranks) with ``megatron_locmoe.sim.trainer``: the parsed Megatron arguments
  are mapped onto ``TrainSettings`` (Megatron's TransformerConfig and GPT options for the
  flags, router and ``--locmoe-*`` flags, steps, batch, seed, Megatron's optimizer and
  learning-rate schedule, TensorBoard / W&B dirs, ``--save`` / ``--load`` checkpoints); flags
  that loop cannot honour are refused.

A preset with a ``sweep`` runs its entries one after another (e.g. one training per router)
and ends with a table of tokens/s and lm loss per run, also written to
``RUNS/PRESET/summary.json``; every run's output is kept in ``RUNS/PRESET/RUN/node<R>.log``,
and how to repeat it (the command, the Megatron flags, the commit, the versions) in
``RUNS/PRESET/RUN/launch.json`` (:mod:`megatron_locmoe.launch.manifest`).

This module is the command: its options, the dry run's text and the runs in order; the parts
it calls are the package's other modules (listed in :mod:`megatron_locmoe.launch`).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys

from megatron_locmoe.launch.cpu import RunFailed, run_cpu
from megatron_locmoe.launch.data_step import prepare_data
from megatron_locmoe.launch.manifest import write_run_manifest
from megatron_locmoe.launch.plan import DEFAULT_MASTER_PORT, Options, Plan, build_plan
from megatron_locmoe.launch.presets import PresetError, add_set_option, available_presets
from megatron_locmoe.launch.torchrun import (
    check_device_present,
    run_logged,
    summarize_log,
    worker,
)


def parse_options(argv: list[str]) -> Options:
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(
        prog="python -m megatron_locmoe.launch",
        description=__doc__.splitlines()[0],
        epilog="Anything after -- is appended to the Megatron flags (last flag wins). "
        f"Presets: {', '.join(available_presets())}.",
    )
    p.add_argument("--config", required=True, help="preset name (configs/NAME.yaml) or a path")
    p.add_argument("--nodes", type=int, help="number of nodes (default: the preset's)")
    p.add_argument("--node-rank", type=int, help="this node's rank 0..nodes-1")
    p.add_argument(
        "--master-addr",
        default=os.environ.get("MASTER_ADDR"),
        help="node 0's address (multi-node; default $MASTER_ADDR)",
    )
    p.add_argument(
        "--master-port",
        type=int,
        default=int(os.environ.get("MASTER_PORT", DEFAULT_MASTER_PORT)),
        help=f"rendezvous port (default $MASTER_PORT or {DEFAULT_MASTER_PORT})",
    )
    p.add_argument("--devices-per-node", type=int, help="ranks per node (default: the preset's)")
    p.add_argument("--rdzv-id", help="c10d rendezvous id (e.g. $SLURM_JOB_ID) instead of static")
    p.add_argument("--entry", help="module or Megatron-LM pretrain_gpt.py that torchrun starts")
    add_set_option(p, "override a Megatron flag (num-layers=4, bf16=false), env.NAME, nodes, ...")
    p.add_argument("--runs", help="comma-separated sweep runs to do (default: all)")
    p.add_argument("--runs-dir", default="runs", help="logs and summaries (default: runs)")
    p.add_argument("--dry-run", action="store_true", help="print every node's env and command")
    p.add_argument(
        "--cpu-twin",
        action="store_true",
        help="train the preset's reduced CPU twin here: its TP/PP/EP layout and routing on "
        "the simulated cluster, with cpu-sim's tiny model (--set applies to the twin)",
    )
    p.add_argument(
        "--no-check", action="store_true", help="skip Megatron's parser (no Megatron import)"
    )
    a = vars(p.parse_args(argv))  # the dests are Options' fields, but for runs and no_check
    runs, no_check = a.pop("runs"), a.pop("no_check")
    runs = [r.strip() for r in runs.split(",") if r.strip()] if runs else None
    return Options(**a, runs=runs, check=not no_check, extra=extra)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        worker(argv[1:])
        return 0
    opts = parse_options(argv)
    previous = signal.signal(signal.SIGTERM, _terminated)  # before the cluster takes over
    try:
        plan = build_plan(opts)
        if opts.dry_run:
            print(describe(plan, opts))
            return 0
        return execute(plan)
    except KeyboardInterrupt as e:  # the cluster's Interrupted, or a signal before any rank
        status = getattr(e, "exit_status", 128 + getattr(e, "signum", signal.SIGINT))
        text = str(e) or (
            ("terminated" if status == 128 + signal.SIGTERM else "interrupted")
            + " before any rank started"
        )
        print(f"megatron_locmoe.launch: error: {text}", file=sys.stderr)
        return status
    except PresetError as e:
        print(f"megatron_locmoe.launch: error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:  # no launcher traceback: the ranks' say where
        print(e.details, file=sys.stderr)
        print(f"megatron_locmoe.launch: error: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Terminated(KeyboardInterrupt):
    """SIGTERM before the simulated cluster (which handles it from then on) started."""

    signum = signal.SIGTERM


def _terminated(signum, frame):
    raise _Terminated()


# --------------------------------------------------------------------------------------------
# The plan on this node: the dry run's text, or the runs
# --------------------------------------------------------------------------------------------


def execute(plan: Plan) -> int:
    """Run the plan on this node (one node rank), run after run; the exit status."""
    results: dict[str, dict] = {}
    if plan.preset.device == "cpu":
        prepare_data(plan)
        results = run_cpu(plan)
    else:
        if len(plan.node_ranks) != 1:
            raise PresetError(
                f"preset {plan.preset.name} runs on {plan.nodes} nodes: start the launcher on "
                f"every node with --node-rank 0..{plan.nodes - 1} (or use --dry-run to see all)"
            )
        check_device_present(plan)
        prepare_data(plan)
        for rp in plan.runs:
            (cmd,) = rp.commands
            write_run_manifest(plan, rp)
            log_path = rp.log_dir / f"node{cmd.node_rank}.log"
            code = run_logged(cmd, log_path)
            if code != 0:
                print(
                    f"[launch] run {rp.name} failed with exit status {code} (log: {log_path})",
                    file=sys.stderr,
                )
                return code
            summary = summarize_log(log_path.read_text(), rp.tokens_per_iteration)
            if summary:
                results[rp.name] = summary
    if results:
        out = plan.runs_dir / plan.preset.name / "summary.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
        print_summary(results)
        print(f"[launch] summary: {out}")
    return 0


def print_summary(results: dict[str, dict]) -> None:
    """The table of tokens/s (and the ratio to the ``megatron`` run) and first / last loss."""
    base = results.get("megatron", {}).get("tokens_per_s")
    print(f"{'run':>12} {'tokens/s':>10} {'vs megatron':>11} {'first loss':>10} {'last loss':>10}")
    for run, res in results.items():
        losses = res.get("loss", {})
        tps = res.get("tokens_per_s")
        ratio = f"{tps / base:.3f}" if tps and base else "-"
        tps_text = f"{tps:,.0f}" if tps else "-"
        first, last = "-", "-"
        if losses:
            first, last = (f"{losses[k]:.4f}" for k in (min(losses), max(losses)))
        print(f"{run:>12} {tps_text:>10} {ratio:>11} {first:>10} {last:>10}")


def describe(plan: Plan, opts: Options) -> str:
    """The --dry-run text: per run and node, the environment and the exact command."""
    p = plan.preset
    lines = [
        f"# preset {p.name} ({p.path}): {plan.nodes} node(s) x {plan.devices_per_node} "
        f"{p.device} devices = {plan.world_size} ranks",
    ]
    if opts.check:
        lines.append(
            "# every run's flags passed Megatron's parser and validate_args (plugin flags "
            f"included) as rank 0 of {plan.world_size}"
        )
    if plan.data_prefix:
        lines.append(
            f"# before the first run, on each node where {plan.data_prefix}.bin is missing: "
            f"python -m megatron_locmoe.sim.data --out {plan.data_prefix}"
        )
    for i, rp in enumerate(plan.runs, 1):
        lines.append(f"# run {rp.name} ({i} of {len(plan.runs)}), logs in {rp.log_dir}/")
        if p.device == "cpu":
            lines.append(
                "# device cpu: trained in this process's SimCluster with megatron_locmoe.sim.trainer "
                "(Megatron's pretrain() is not a CPU target); the Megatron flags it stands for:"
            )
            settings, layout = rp.cpu_loop
            lines.append(f"#   {layout}")
            lines.append(f"#   {settings}")
            lines.append(shlex.join(rp.flags))
            continue
        for cmd in rp.commands:
            lines.append(f"# node {cmd.node_rank}")
            lines.append(cmd.shell())
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
