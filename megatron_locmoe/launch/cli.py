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
``RUNS/PRESET/summary.json``; every run's output is kept in ``RUNS/PRESET/RUN/node<R>.log``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import json
import os
import re
import runpy
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_locmoe.launch.presets import (
    Preset,
    PresetError,
    apply_override,
    available_presets,
    check_layout,
    cpu_twin,
    cuda_only_flags,
    cuda_only_settings,
    flag_value,
    load_preset,
    megatron_argv,
    parse_with_megatron,
)

DEFAULT_MASTER_PORT = 29500
TORCHRUN = ("-m", "torch.distributed.run")

NOT_CUDA = {"npu": "Ascend NPUs", "cpu": "the CPU loop"}
"""The devices whose runs are checked for CUDA-only settings (presets.CUDA_ONLY)."""

CUDA_ENV = {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}
"""Megatron's usual setting: one hardware queue keeps communication kernels in issue order
(needed for its TP/SP communication overlap; harmless otherwise). Also set for the CPU loop,
whose flags Megatron's validate_args checks with the pre-Blackwell rule (1 with TP / CP > 1);
nothing on the CPU reads it."""

ASCEND_ENV = {
    **CUDA_ENV,
    "HCCL_CONNECT_TIMEOUT": "1200",
    "HCCL_EXEC_TIMEOUT": "1800",
    "HCCL_BUFFSIZE": "200",
    "TORCH_COMPILE_DISABLE": "1",
}
"""Ascend defaults (a preset's ``env`` overrides them). CUDA_DEVICE_MAX_CONNECTIONS: Megatron's
validate_args asserts it is 1 for TP / CP > 1 on devices older than Blackwell, NPUs included
(nothing on the NPU reads it otherwise). HCCL_CONNECT_TIMEOUT (s, HCCL's
default 120): link set-up among hundreds of NPUs at start-up can take longer.
HCCL_EXEC_TIMEOUT (s): how long a rank waits inside a collective, long enough for the first
steps' graph compilation. HCCL_BUFFSIZE (MB per communicator, HCCL's default 200): must hold
one All-to-All chunk; the presets state their payload. TORCH_COMPILE_DISABLE: Megatron's
``@jit_fuser`` is torch.compile, which has no NPU backend in this stack; eager is the same
math."""

LOG_LINE = re.compile(
    r"iteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration \(ms\): ([\d.]+)"
    r".*?lm loss: ([\d.Ee+-]+)"
)
"""One line of Megatron's training log (logged by the last rank)."""


# --------------------------------------------------------------------------------------------
# The plan: what runs where
# --------------------------------------------------------------------------------------------


@dataclass
class NodeCommand:
    """What one node runs: the variables the launcher sets on top of the node's environment
    and the command."""

    node_rank: int
    env: dict[str, str]
    argv: list[str]

    def shell(self) -> str:
        """The command as one copy-pasteable shell line (``env K=V ... CMD``)."""
        return shlex.join(["env", *(f"{k}={v}" for k, v in self.env.items()), *self.argv])


@dataclass
class RunPlan:
    """One training of the preset (the preset itself, or one sweep entry)."""

    name: str
    flags: list[str]
    """The Megatron flags, checked by Megatron's parser unless --no-check."""
    log_dir: Path
    commands: list[NodeCommand] = field(default_factory=list)
    """One per node in the plan (cuda / npu)."""
    args: Any = None
    """Megatron's validated namespace (None with --no-check)."""
    cpu_loop: Any = None
    """(TrainSettings, ParallelLayout) that stand for the flags (device cpu; see train_settings)."""

    @property
    def tokens_per_iteration(self) -> int | None:
        gbs, seq = (
            flag_value(self.flags, "--global-batch-size"),
            flag_value(self.flags, "--seq-length"),
        )
        return int(gbs) * int(seq) if gbs and seq else None


@dataclass
class Plan:
    """A checked preset on a cluster shape: its runs, each with one command per node."""

    preset: Preset
    nodes: int
    devices_per_node: int
    node_ranks: list[int]
    master_addr: str | None
    master_port: int
    runs: list[RunPlan]
    runs_dir: Path
    data_prefix: str | None = None
    """Where prepare_data builds the offline corpus when it is missing."""
    domain_prefixes: list[str] = field(default_factory=list)
    """With prepare_data pydoc-domains: node k's corpus (DIR/domain<k>), built when missing."""
    corpus_prefixes: list[str] = field(default_factory=list)
    """With prepare_data realtext: the real-text corpus's datasets the runs read (one
    directory), the corpus built there when one is missing."""

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node


@dataclass
class Options:
    """The launcher's command line (see ``--help``)."""

    config: str
    nodes: int | None = None
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int = DEFAULT_MASTER_PORT
    devices_per_node: int | None = None
    rdzv_id: str | None = None
    entry: str | None = None
    sets: list[str] = field(default_factory=list)
    runs: list[str] | None = None
    runs_dir: str = "runs"
    dry_run: bool = False
    cpu_twin: bool = False
    check: bool = True
    extra: list[str] = field(default_factory=list)
    python: str = sys.executable


def _entry_argv(entry: str, device: str) -> list[str]:
    """What torchrun starts on every rank for ``entry`` (a module, or a pretrain_gpt.py)."""
    if device == "npu":
        return ["-m", "megatron_locmoe.launch", "--worker", entry]
    if not entry.endswith(".py"):
        return ["-m", entry]
    from megatron_locmoe.patch_megatron_lm import MARKER

    script = Path(entry)
    if not script.is_file():
        raise PresetError(
            f"entry {entry} does not exist on this node: give the path of Megatron-LM's "
            "pretrain_gpt.py (or a module such as megatron_locmoe.pretrain_gpt)"
        )
    if MARKER in script.read_text():
        return [entry]
    return ["-m", "megatron_locmoe.run", entry]  # unpatched: the adaptor is applied first


def node_env(plan: Plan, node_rank: int) -> dict[str, str]:
    """The variables the launcher sets for ``node_rank`` (on top of that node's environment)."""
    preset = plan.preset
    env: dict[str, str] = {}
    if preset.device in ("cuda", "cpu"):
        env.update(CUDA_ENV)
    elif preset.device == "npu":
        env.update(ASCEND_ENV)
        env["ASCEND_RT_VISIBLE_DEVICES"] = ",".join(map(str, range(plan.devices_per_node)))
    env.update(preset.env)
    env.update(
        NNODES=str(plan.nodes),
        NODE_RANK=str(node_rank),
        NPROC_PER_NODE=str(plan.devices_per_node),
        PYTHONUNBUFFERED="1",
    )
    if plan.nodes > 1:
        env["MASTER_ADDR"] = plan.master_addr or ""
        env["MASTER_PORT"] = str(plan.master_port)
    return env


def torchrun_argv(opts: Options, plan: Plan, node_rank: int, entry: list[str], flags) -> list:
    argv = [opts.python, *TORCHRUN, f"--nproc-per-node={plan.devices_per_node}"]
    if plan.nodes == 1:
        argv += ["--standalone", "--nnodes=1"]
    elif opts.rdzv_id:
        argv += [
            f"--nnodes={plan.nodes}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={plan.master_addr}:{plan.master_port}",
            f"--rdzv-id={opts.rdzv_id}",
        ]
    else:
        argv += [
            f"--nnodes={plan.nodes}",
            f"--node-rank={node_rank}",
            f"--master-addr={plan.master_addr}",
            f"--master-port={plan.master_port}",
        ]
    return argv + entry + flags


def build_plan(opts: Options, preset: Preset | None = None) -> Plan:
    """Read the preset (or take ``preset``, already read), apply the overrides, check
    everything; raise PresetError."""
    preset = preset if preset is not None else load_preset(opts.config)
    if opts.cpu_twin:
        preset = cpu_twin(preset)
    own_data = preset.megatron.get("data-path")  # where the data step may build the corpus
    for item in opts.sets:
        preset = apply_override(preset, item)
    if opts.entry:
        preset.entry = opts.entry
    nodes = opts.nodes or preset.nodes
    dpn = opts.devices_per_node or preset.devices_per_node
    if nodes < 1 or dpn < 1:
        raise PresetError("--nodes and --devices-per-node must be positive")
    if opts.node_rank is not None and not 0 <= opts.node_rank < nodes:
        raise PresetError(f"--node-rank {opts.node_rank} is outside 0..{nodes - 1}")
    master = opts.master_addr
    if preset.device != "cpu" and nodes > 1 and not master:
        raise PresetError(
            f"preset {preset.name} runs on {nodes} nodes: give --master-addr (the address of "
            "node 0, reachable from every node; or set MASTER_ADDR) and start the launcher on "
            f"every node with --node-rank 0..{nodes - 1} (launch/slurm.sbatch does both)"
        )
    runs_dir = Path(opts.runs_dir)
    node_ranks = [opts.node_rank] if opts.node_rank is not None else list(range(nodes))
    plan = Plan(preset, nodes, dpn, node_ranks, master, opts.master_port, [], runs_dir)
    entry = _entry_argv(preset.entry, preset.device) if preset.device != "cpu" else []
    for run, flags in preset.runs(opts.runs):
        subst = {"preset": preset.name, "run": run, "runs": str(runs_dir)}
        argv = megatron_argv(flags, subst) + list(opts.extra)
        what = f"preset {preset.name}" + (f", run {run}" if preset.sweep else "")
        check_layout(preset, run, argv, nodes, dpn)
        rp = RunPlan(run, argv, runs_dir / preset.name / run)
        if preset.device != "cpu":  # cpu trains in this process (run_cpu)
            for r in plan.node_ranks:
                env = node_env(plan, r)
                rp.commands.append(NodeCommand(r, env, torchrun_argv(opts, plan, r, entry, argv)))
        where = NOT_CUDA.get(preset.device)
        bad_flags = cuda_only_flags(argv, preset.device) if where else []
        if bad_flags:
            raise PresetError(
                f"{what} runs on {where}, but these flags need CUDA-only code: "
                + "; ".join(bad_flags)
            )
        if preset.prepare_data == "pydoc-domains":
            plan.domain_prefixes = _domain_prefixes(argv, nodes, what)
        elif preset.prepare_data == "realtext":
            plan.corpus_prefixes = sorted({*plan.corpus_prefixes, *_corpus_prefixes(argv, what)})
        elif preset.prepare_data:
            plan.data_prefix = flag_value(argv, "--data-path")
            if not plan.data_prefix:
                raise PresetError(f"{what}: prepare_data needs --data-path PREFIX in the flags")
            _check_data_override(plan.data_prefix, own_data, what)
        if opts.check or preset.device == "cpu":  # the CPU loop is built from the namespace
            env = node_env(plan, plan.node_ranks[0])
            rp.args = parse_with_megatron(
                argv, nodes * dpn, dpn, what, env, preset.device, _data_step_files(plan)
            )
            if where:
                bad = cuda_only_settings(rp.args, preset.device)
                if bad:
                    raise PresetError(
                        f"{what} runs on {where}, but these settings need CUDA-only code: "
                        + "; ".join(bad)
                    )
        if preset.device == "cpu":  # refuses what the CPU loop cannot do, now
            per_node = bool(plan.domain_prefixes)  # node k reads the k-th prefix
            rp.cpu_loop = train_settings(rp.args, run, dpn, rp.log_dir, per_node)
        plan.runs.append(rp)
    return plan


def _check_data_override(prefix: str, own: str | None, what: str) -> None:
    """The data step builds the offline corpus at the preset's own --data-path only: an
    override naming no dataset is a typo, not a place to build the default corpus and train on
    it under another name."""
    from megatron_locmoe.sim.data import dataset_files

    if str(prefix) == str(own) or all(Path(f).exists() for f in dataset_files(prefix)):
        return
    raise PresetError(
        f"{what}: --data-path {prefix} names no dataset ({prefix}.bin or its index is missing); "
        f"the data step builds the offline corpus only at the preset's own {own}: fix the path, "
        f"build it first (python -m megatron_locmoe.sim.data --out {prefix}) or drop the override"
    )


def _domain_prefixes(argv: list[str], nodes: int, what: str) -> list[str]:
    """The per-node prefixes --data-path names for the pydoc-domains data step: DIR/domain0 ..
    DIR/domain<nodes-1>, in node order."""
    prefixes = _flag_values(argv, "--data-path")
    root = Path(prefixes[0]).parent if prefixes else Path("data/domains")
    want = [str(root / f"domain{k}") for k in range(nodes)]
    if [str(Path(p)) for p in prefixes] != want:
        raise PresetError(
            f"{what}: prepare_data pydoc-domains writes one corpus per node: give "
            f"--data-path {' '.join(want)} (one prefix per node, in node order)"
        )
    return want


CORPUS_FLAGS = (
    "--data-path",
    "--train-data-path",
    "--valid-data-path",
    "--test-data-path",
    "--locmoe-domain-data-path",
    "--locmoe-domain-valid-data-path",
)
"""Data flags whose prefixes the realtext data step provides."""


def _flag_values(argv: list[str], flag: str) -> list[str]:
    """The values of the last ``flag`` in ``argv`` (nargs='+': up to the next flag)."""
    if flag not in argv:
        return []
    tokens = argv[len(argv) - argv[::-1].index(flag) :]
    return list(itertools.takewhile(lambda t: not t.startswith("--"), tokens))


def _is_weight(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _corpus_prefixes(argv: list[str], what: str) -> list[str]:
    """The dataset prefixes the data flags name (blend weights left out), all in one corpus
    directory, for the realtext data step."""
    prefixes = [t for flag in CORPUS_FLAGS for t in _flag_values(argv, flag) if not _is_weight(t)]
    if not prefixes:
        raise PresetError(
            f"{what}: prepare_data realtext needs data flags naming the corpus's datasets, e.g. "
            "--data-path data/realtext/mixture"
        )
    roots = sorted({str(Path(p).parent) for p in prefixes})
    if len(roots) != 1:
        raise PresetError(
            f"{what}: prepare_data realtext builds one corpus directory, but the data flags name "
            f"{', '.join(roots)}: put every dataset under one directory (e.g. data/realtext)"
        )
    return prefixes


def _data_step_files(plan: Plan) -> list[str]:
    """Files the plan's data step (:func:`prepare_data`) writes before training starts: the
    parse-time checks of files the flags name wait for them rather than refuse the plan."""
    from megatron_locmoe.sim.data import dataset_files

    if plan.domain_prefixes:
        root = Path(plan.domain_prefixes[0]).parent
        files = [f for p in plan.domain_prefixes for f in dataset_files(p)]
        return files + [str(root / "all_counts.npy")]
    if plan.corpus_prefixes:
        root = Path(plan.corpus_prefixes[0]).parent
        files = [f for p in plan.corpus_prefixes for f in dataset_files(p)]
        return files + [str(root / "all_counts.npy")]  # the hash router's token counts
    return dataset_files(plan.data_prefix) if plan.data_prefix else []


# --------------------------------------------------------------------------------------------
# CPU: the simulated cluster
# --------------------------------------------------------------------------------------------


def train_settings(args, run: str, devices_per_node: int, log_dir: Path, per_node: bool = False):
    """Megatron's parsed arguments -> (TrainSettings, ParallelLayout) of the CPU loop.

    The CPU loop (megatron_locmoe.sim.trainer) runs expert and pipeline parallelism (with
    virtual stages), in float32, through Megatron's forward-backward schedules (micro-batches
    accumulated up to the global batch), on one indexed dataset with byte tokens (Megatron's GPT
    dataset with the flags' split, masks and cache; training split only: it does not
    evaluate); anything else in the flags is refused here rather than silently ignored. ``--save`` / ``--save-interval`` /
    ``--load`` map to its torch_dist checkpoints; its per-step progress goes to
    ``log_dir/progress.jsonl`` (tokens/s). The model is built from Megatron's own
    TransformerConfig for the flags, and the optimizer and schedule are Megatron's for them
    (:func:`optimizer_settings`), so every model and optimizer flag means what it means to
    pretrain_gpt."""
    from megatron_locmoe.arguments import gpt_dataset_options, locmoe_config_from_args
    from megatron_locmoe.sim.cluster import ParallelLayout
    from megatron_locmoe.sim.data import VOCAB_SIZE
    from megatron_locmoe.sim.trainer import TrainSettings

    world = args.world_size
    refuse = []
    cp = args.context_parallel_size
    if cp > 1 and getattr(args, "window_size", None) is not None:
        refuse.append(f"--window-size with --context-parallel-size {cp}: drop one")
    if args.bf16 or args.fp16:
        refuse.append("--bf16/--fp16: the CPU loop trains in float32, drop it")
    nodes = world // devices_per_node
    if per_node and len(args.data_path or []) != nodes:
        refuse.append(f"give one --data-path prefix per node ({nodes})")
    elif not per_node and (args.mock_data or not args.data_path or len(args.data_path) != 1):
        refuse.append(
            "give one --data-path PREFIX (python -m megatron_locmoe.sim.data --out PREFIX writes it)"
        )
    if args.vocab_size != VOCAB_SIZE:
        refuse.append(f"--vocab-size {args.vocab_size}: the corpus has byte tokens, use 257")
    dp = world // (args.pipeline_model_parallel_size * args.tensor_model_parallel_size * cp)
    if args.global_batch_size % (args.micro_batch_size * dp):
        refuse.append(
            f"--global-batch-size {args.global_batch_size}: not a multiple of micro batch "
            f"{args.micro_batch_size} x data-parallel size {dp}"
        )
    if args.num_experts is None:
        refuse.append("--num-experts is missing: the CPU loop trains an MoE model")
    if args.optimizer != "adam":
        refuse.append(f"--optimizer {args.optimizer}: the CPU loop runs adam (AdamW), use adam")
    if args.train_iters is None:
        refuse.append("--train-samples: the CPU loop counts iterations, give --train-iters")
    if args.decoupled_lr is not None:
        refuse.append("--decoupled-lr: the CPU loop has one learning rate for every parameter")
    if args.exit_duration_in_mins:
        refuse.append(
            "--exit-duration-in-mins: the CPU loop stops by iterations, use --exit-interval"
        )
    shares = [float(v) for v in re.findall(r"[.0-9]+", args.split or "100")]  # as Megatron's
    valid_share = shares[1] if len(shares) > 1 else 0.0
    if args.eval_iters and valid_share > 0:
        refuse.append(
            f"--split {args.split} with --eval-iters {args.eval_iters}: the CPU loop does not "
            "evaluate; use --split 100,0,0 or --eval-iters 0"
        )
    refuse += checkpoint_flag_refusals(args)
    locmoe = locmoe_config_from_args(args)
    if locmoe.devices_per_node not in (None, devices_per_node):
        refuse.append(
            f"--locmoe-devices-per-node {locmoe.devices_per_node} differs from the simulated "
            f"{devices_per_node} per node: drop it"
        )
    if refuse:
        raise PresetError(f"run {run} on the CPU loop: " + "; ".join(refuse))
    from megatron.training.argument_utils import gpt_config_from_args

    from megatron_locmoe.spec import padded_vocab

    # the model is built from Megatron's own configs for these flags, as pretrain_gpt builds it
    gpt = gpt_config_from_args(args)
    gpt_model_options = dict(
        vocab_size=padded_vocab(gpt),
        max_sequence_length=gpt.seq_length,
        share_embeddings_and_output_weights=gpt.share_embeddings_and_output_weights,
        position_embedding_type=gpt.position_embedding_type,
        rotary_percent=gpt.rotary_percent,
        rotary_base=gpt.rotary_base,
        rope_scaling=gpt.rope_scaling,
        seq_len_interpolation_factor=gpt.seq_len_interpolation_factor,
        fp16_lm_cross_entropy=gpt.fp16_lm_cross_entropy,
    )
    wandb_dir = (args.wandb_save_dir or "wandb") if args.wandb_project else None
    settings = TrainSettings(
        data_prefix=args.data_path[0],
        locmoe=locmoe,
        steps=args.train_iters,
        seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size,
        global_batch_size=args.global_batch_size,
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_experts=args.num_experts,
        topk=args.moe_router_topk,
        lr=args.lr,
        seed=args.seed,
        tensorboard_dir=args.tensorboard_dir,
        wandb_dir=wandb_dir,
        run_name=args.wandb_exp_name or run,
        save_interval=args.save_interval or 0,
        exit_interval=args.exit_interval or 0,
        exit_signal_handler=bool(args.exit_signal_handler),
        exit_signal=int(args.exit_signal),
        **checkpoint_settings(args),
        progress_path=str(log_dir / "progress.jsonl"),
        per_layer_logging=args.moe_per_layer_logging,
        check_for_nan_in_loss_and_grad=args.check_for_nan_in_loss_and_grad,
        dataset_options=gpt_dataset_options(args),
        transformer_config=gpt.transformer,
        gpt_model_options=gpt_model_options,
        optimizer=optimizer_settings(args),
        data_prefix_per_node=list(args.data_path) if per_node else None,
    )
    layout = ParallelLayout(
        devices_per_node=devices_per_node,
        ep=args.expert_model_parallel_size,
        etp=args.expert_tensor_parallel_size,
        tp=args.tensor_model_parallel_size,
        pp=args.pipeline_model_parallel_size,
        vp=args.virtual_pipeline_model_parallel_size,
        cp=cp,
    )
    return settings, layout


CHECKPOINT_FLAGS_HONOURED = {
    "save": "--save: torch_dist checkpoints of the CPU loop",
    "save_interval": "--save-interval",
    "load": "--load: resume from its latest (or --ckpt-step) iteration",
    "no_load_optim": "--no-load-optim: fresh Adam state and learning-rate schedule",
    "no_load_rng": "--no-load-rng: the RNGs as seeded, not as saved",
    "finetune": "--finetune: --load's model weights only, from step 1",
    "pretrained_checkpoint": "--pretrained-checkpoint: its weights when --load has none",
    "ckpt_step": "--ckpt-step: that iteration of --load",
    "exit_on_missing_checkpoint": "--exit-on-missing-checkpoint: refused here when --load "
    "holds no checkpoint",
    "ckpt_format": "--ckpt-format torch_dist (the only format the CPU loop writes and reads)",
    "auto_detect_ckpt_format": "--auto-detect-ckpt-format: torch_dist is what it finds",
    "verify_integrity": "--verify-integrity: every load checks every file's checksum",
    "use_dist_ckpt_deprecated": "deprecated in Megatron, no effect",
    "dist_ckpt_format_deprecated": "deprecated in Megatron, no effect",
    "ckpt_fully_parallel_save_deprecated": "deprecated in Megatron, no effect",
    "async_strategy": "only read with --async-save, which is refused",
}
"""Flags of Megatron's checkpointing group the CPU loop honours (the rest are refused unless
they keep Megatron's default: ``checkpoint_flag_refusals``)."""

EXIT_FLAGS_REFUSED = {
    "exit_signal_handler_for_dataloader": "the CPU loop has no data-loader workers",
}


def _megatron_defaults() -> dict[str, tuple[object, str]]:
    """dest -> (default, flag) of every option in Megatron's checkpointing group."""
    import argparse

    from megatron.training.arguments import add_megatron_arguments

    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_megatron_arguments(parser)
    out = {}
    for group in parser._action_groups:
        if group.title == "checkpointing":
            for action in group._group_actions:
                out[action.dest] = (action.default, action.option_strings[0])
    return out


def checkpoint_flag_refusals(args) -> list[str]:
    """Checkpoint and exit flags the CPU loop cannot honour, each with the fix; --load's and
    --finetune's directories checked before any rank starts."""
    refuse = []
    for dest, (default, flag) in _megatron_defaults().items():
        value = getattr(args, dest, default)
        if dest in CHECKPOINT_FLAGS_HONOURED or value == default:
            continue
        shown = flag if isinstance(value, bool) or value is None else f"{flag} {value}"
        refuse.append(f"{shown}: the CPU loop saves torch_dist synchronously; drop it")
    if args.ckpt_format != "torch_dist":
        refuse.append(f"--ckpt-format {args.ckpt_format}: the CPU loop writes torch_dist")
    for dest, why in EXIT_FLAGS_REFUSED.items():
        if getattr(args, dest, False):
            refuse.append(f"--{dest.replace('_', '-')}: {why}; drop it")
    if args.ckpt_step is not None and (args.finetune or args.pretrained_checkpoint):
        refuse.append(
            "--ckpt-step with --finetune / --pretrained-checkpoint: the CPU loop takes the "
            "latest iteration's weights; drop --ckpt-step"
        )
    refuse += _load_dir_refusals(args)
    return refuse


def _load_dir_refusals(args) -> list[str]:
    """--load / --pretrained-checkpoint naming nothing loadable, refused with the fix (--load
    may name an empty or missing --save directory: the usual resume-or-start idiom)."""
    from megatron_locmoe.sim.checkpoint import iteration_dirs, latest_iteration

    out = []
    for flag, where in (
        ("--load", args.load),
        ("--pretrained-checkpoint", args.pretrained_checkpoint),
    ):
        if where is None:
            continue
        try:
            latest = latest_iteration(where)
        except ValueError as e:
            out.append(f"{flag} {where}: {e}")
            continue
        if latest is not None:
            if args.ckpt_step is not None and flag == "--load":
                if args.ckpt_step not in iteration_dirs(where):
                    have = ", ".join(map(str, iteration_dirs(where))) or "none"
                    out.append(
                        f"--ckpt-step {args.ckpt_step}: {where} holds no iteration "
                        f"{args.ckpt_step} (it has: {have})"
                    )
            continue
        same_as_save = args.save is not None and os.path.abspath(where) == os.path.abspath(
            args.save
        )
        if flag == "--pretrained-checkpoint" or args.finetune:
            out.append(f"{flag} {where}: no checkpoint there to take the model weights from")
        elif args.exit_on_missing_checkpoint:
            out.append(
                f"--load {where} holds no checkpoint and --exit-on-missing-checkpoint is set: "
                "point --load at a checkpoint directory, or drop the flag"
            )
        elif not os.path.isdir(where) and not same_as_save:
            out.append(
                f"--load {where}: no such directory; point it at a checkpoint directory (one "
                "with latest_checkpointed_iteration.txt), or drop --load to start from step 1"
            )
    return out


def checkpoint_settings(args) -> dict:
    """TrainSettings' checkpoint fields for Megatron's checkpoint flags (see
    CHECKPOINT_FLAGS_HONOURED): --finetune takes --load's weights only (Megatron: iteration 0,
    no optimizer, no RNG); --pretrained-checkpoint's weights start a run whose --load holds
    none."""
    settings = dict(
        save_dir=args.save,
        load_dir=args.load,
        load_optim=not args.no_load_optim,
        load_rng=not args.no_load_rng,
        load_iteration=args.ckpt_step,
    )
    if args.finetune:
        settings.update(load_dir=None, init_weights_dir=args.load)
    elif args.pretrained_checkpoint:
        settings.update(init_weights_dir=args.pretrained_checkpoint)
    return settings


def optimizer_settings(args):
    """The optimizer and learning-rate schedule Megatron's pretrain() builds from ``args``
    (``get_optimizer_param_scheduler``, iteration-based), for the CPU loop."""
    from megatron_locmoe.sim.trainer import OptimizerSettings

    gbs = args.global_batch_size
    decay_steps = (args.lr_decay_iters or args.train_iters) * gbs
    if args.lr_warmup_fraction is not None:
        warmup_steps = args.lr_warmup_fraction * decay_steps
    else:
        warmup_steps = args.lr_warmup_iters * gbs
    wsd = args.lr_wsd_decay_iters
    scheduler = dict(
        init_lr=args.lr_warmup_init,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.start_weight_decay,
        end_wd=args.end_weight_decay,
        wd_incr_steps=args.train_iters * gbs,
        wd_incr_style=args.weight_decay_incr_style,
        wsd_decay_steps=None if wsd is None else wsd * gbs,
        lr_wsd_decay_style=args.lr_wsd_decay_style,
    )
    return OptimizerSettings(
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        clip_grad=args.clip_grad,
        scheduler=scheduler,
        samples_per_step=gbs,
    )


class RunFailed(RuntimeError):
    """A run of the simulated cluster failed: ``details`` (every rank's traceback, root cause
    first) and the one-line ``headline``."""

    def __init__(self, run: str, details: str, headline: str):
        super().__init__(f"run {run} failed: {headline}")
        self.details = details


def run_cpu(plan: Plan) -> dict[str, dict]:
    """Every run of a cpu preset in one simulated cluster (started once); the results."""
    from megatron_locmoe.sim.checkpoint import latest_iteration
    from megatron_locmoe.sim.cluster import ClusterJobError, SimCluster
    from megatron_locmoe.sim.progress import read_progress, steady_step_seconds
    from megatron_locmoe.sim.trainer import train_job

    results = {}
    print(
        f"[launch] {plan.preset.name}: simulated cluster of {plan.nodes} nodes x "
        f"{plan.devices_per_node} CPU ranks (gloo), starting {plan.world_size} processes",
        flush=True,
    )
    with SimCluster(plan.world_size) as cluster:
        for rp in plan.runs:
            settings, layout = rp.cpu_loop
            rp.log_dir.mkdir(parents=True, exist_ok=True)
            progress = Path(settings.progress_path)
            progress.unlink(missing_ok=True)
            print(
                f"[launch] run {rp.name}: {layout.describe()}, {settings.steps} steps", flush=True
            )
            if settings.load_dir and latest_iteration(settings.load_dir) is None:
                print(  # as Megatron warns; a --load naming nothing at all was refused
                    f"[launch] warning: --load {settings.load_dir} holds no checkpoint yet: "
                    "training from step 1",
                    file=sys.stderr,
                    flush=True,
                )
            try:
                out = cluster.run(train_job, settings, layout=layout)
            except ClusterJobError as e:  # the ranks' tracebacks, then one line (main)
                raise RunFailed(rp.name, str(e), e.headline) from None
            losses, metrics = out[0]["losses"], out[-1]["metrics"]
            first = out[0].get("first_step", 1)
            every = max(1, rp.args.log_interval)
            for step, loss in enumerate(losses, first):
                if step == first or step % every == 0 or step == first + len(losses) - 1:
                    print(f"  {rp.name} step {step:4d}  lm loss {loss:.4f}", flush=True)
            shown = ("node_local_fraction", "inter_node_bytes", "intra_node_bytes", "load_cv")
            print("  " + "  ".join(f"{k} {metrics[k]:.4g}" for k in shown if k in metrics))
            res = {"loss": dict(enumerate(losses, first)), "metrics": metrics}
            steady = steady_step_seconds([p["seconds"] for p in read_progress(progress)])
            if steady:
                res["ms_per_iteration"] = steady * 1000
                if rp.tokens_per_iteration:
                    res["tokens_per_s"] = rp.tokens_per_iteration / steady
            results[rp.name] = res
    return results


# --------------------------------------------------------------------------------------------
# Accelerators: torchrun per node
# --------------------------------------------------------------------------------------------


def check_device_present(plan: Plan) -> None:
    """Fail before torchrun when this node cannot run the preset's device kind."""
    dpn = plan.devices_per_node
    if plan.preset.device == "cuda":
        import torch

        n = torch.cuda.device_count()
        if n < dpn:
            raise PresetError(
                f"preset {plan.preset.name} runs {dpn} CUDA devices per node, this node has {n}: "
                f"pass --devices-per-node {n} with a layout that fits, or run where {dpn} GPUs "
                "are visible"
            )
    elif plan.preset.device == "npu":
        if importlib.util.find_spec("torch_npu") is None:
            raise PresetError(
                f"preset {plan.preset.name} runs on Ascend NPUs but torch_npu is not installed "
                "here: use the Ascend image (docker/ascend.Dockerfile) or pip install the "
                "torch-npu release matching torch and CANN"
            )
        if not (os.environ.get("ASCEND_TOOLKIT_HOME") or os.environ.get("ASCEND_HOME_PATH")):
            raise PresetError(
                "CANN's environment is not loaded: start through launch/ascend.sh (it sources "
                "CANN's set_env.sh) or source /usr/local/Ascend/ascend-toolkit/set_env.sh first"
            )


def prepare_data(plan: Plan) -> None:
    """Build the offline corpus at the run's --data-path if it is missing.

    Every node builds its own copy when it has none (the corpus is deterministic, so copies on
    a shared file system are identical); files are renamed into place, index last."""
    from megatron_locmoe.sim.data import build_indexed_dataset, dataset_files

    if plan.domain_prefixes:
        _prepare_domains(plan.domain_prefixes)
        return
    if plan.corpus_prefixes:
        _prepare_corpus(plan.corpus_prefixes)
        return
    prefix = plan.data_prefix
    if not prefix or all(Path(f).exists() for f in dataset_files(prefix)):
        return
    print(f"[launch] building the offline corpus at {prefix}", flush=True)
    tmp = f"{prefix}.tmp{os.getpid()}"
    build_indexed_dataset(tmp)
    for src, dst in zip(dataset_files(tmp), dataset_files(prefix), strict=True):
        os.replace(src, dst)


def _prepare_domains(prefixes: list[str]) -> None:
    """One corpus domain per node under the prefixes' directory, built (into a scratch
    directory, then renamed into place, indexes last) when any file is missing."""
    from megatron_locmoe.sim.data import build_domain_datasets, dataset_files

    root = Path(prefixes[0]).parent
    files = [Path(f) for p in prefixes for f in dataset_files(p)] + [root / "all_counts.npy"]
    if all(f.exists() for f in files):
        return
    print(f"[launch] building {len(prefixes)} per-node corpus domains in {root}", flush=True)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        build_domain_datasets(tmp, len(prefixes))
        for f in sorted(files, key=lambda f: f.suffix == ".idx"):
            os.replace(Path(tmp) / f.name, f)


def _prepare_corpus(prefixes: list[str], build=None) -> None:
    """The real-text corpus in the prefixes' directory: built by ``megatron_locmoe.data.corpus``
    (``build``: its main, for tests) when a dataset the runs read is missing; a prefix the
    build does not write is refused by name."""
    from megatron_locmoe.sim.data import dataset_files

    root = str(Path(prefixes[0]).parent)

    def missing() -> list[str]:
        files = [f for p in prefixes for f in dataset_files(p)]
        return [f for f in [*files, f"{root}/all_counts.npy"] if not Path(f).exists()]

    if not missing():
        return
    print(f"[launch] building the real-text corpus in {root} (docs/corpus.md)", flush=True)
    if build is None:
        from megatron_locmoe.data.corpus import main as build
    code = build(["--out", root])
    if code:
        raise PresetError(
            f"building the real-text corpus in {root} failed (exit {code}); without the "
            "package registries, build it elsewhere and carry it in (docs/corpus.md)"
        )
    if missing():
        raise PresetError(
            f"the real-text corpus in {root} has no {', '.join(sorted(set(missing())))}: the "
            "data flags name a dataset the corpus does not write (see docs/corpus.md's list)"
        )


def run_logged(cmd: NodeCommand, log_path: Path) -> int:
    """Run one node's command; its output goes to the terminal and to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"[launch] {cmd.shell()}", flush=True)
    env = {**os.environ, **cmd.env}
    with (
        open(log_path, "w") as log,
        subprocess.Popen(
            cmd.argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as proc,
        forwarding_signals(proc),
    ):
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
    return proc.returncode


@contextlib.contextmanager
def forwarding_signals(proc: subprocess.Popen):
    """While ``proc`` (torchrun) runs, SIGINT and SIGTERM sent to the launcher go to it (torchrun
    passes them to its ranks: Megatron's --exit-signal-handler saves on SIGTERM); the launcher
    keeps reading its output until it exits, and returns its exit status."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum, frame):
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def summarize_log(text: str, tokens_per_iteration: int | None) -> dict | None:
    """lm loss per logged iteration and the median steady-state speed (first two logs skipped:
    warm-up), from Megatron's training log; None when the log has no iteration line (only the
    last rank logs them)."""
    points = [(int(i), float(ms), float(loss)) for i, ms, loss in LOG_LINE.findall(text)]
    if not points:
        return None
    steady = [ms for _, ms, _ in points[2:]] or [points[-1][1]]
    ms = statistics.median(steady)
    out = {"loss": {i: loss for i, _, loss in points}, "ms_per_iteration": ms}
    if tokens_per_iteration:
        out["tokens_per_s"] = tokens_per_iteration / (ms / 1000)
    return out


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


# --------------------------------------------------------------------------------------------
# Ascend rank entry
# --------------------------------------------------------------------------------------------


def worker(argv: list[str]) -> None:
    """``--worker ENTRY ARGS``: one Ascend rank. torch_npu first, then the entry.

    ``transfer_to_npu`` must run before Megatron is imported: it redirects ``torch.cuda`` to
    ``torch.npu`` and the ``nccl`` backend name to ``hccl`` for the code that binds them at
    import (megatron.training's initialisation, memory reports, DDP)."""
    if not argv:
        sys.exit("usage: python -m megatron_locmoe.launch --worker ENTRY [ARGS...]")
    if "megatron" in sys.modules:
        sys.exit("megatron_locmoe.launch --worker: Megatron was imported before torch_npu")
    if importlib.util.find_spec("torch_npu") is None:
        sys.exit(
            "megatron_locmoe.launch --worker is the Ascend rank entry and needs torch_npu; "
            "install the torch-npu release matching torch and CANN"
        )
    import torch_npu  # noqa: F401  registers torch.npu and the hccl backend
    from torch_npu.contrib import transfer_to_npu  # noqa: F401

    entry, args = argv[0], argv[1:]
    if entry.endswith(".py"):
        from megatron_locmoe import run

        run.main([entry, *args])  # applies the adaptor (idempotent for a patched script)
    else:
        sys.argv = [entry, *args]
        runpy.run_module(entry, run_name="__main__", alter_sys=True)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


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
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a Megatron flag (num-layers=4, bf16=false), env.NAME, nodes, ...",
    )
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


if __name__ == "__main__":
    sys.exit(main())
