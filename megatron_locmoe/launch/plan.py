"""The plan: a preset checked against the cluster, and what runs where.

:func:`build_plan` reads the preset (:mod:`megatron_locmoe.launch.presets`), applies the command
line's overrides and checks everything before anything starts: the layout arithmetic, flags and
settings that need CUDA-only code on other devices, the data step's prefixes (an override that
names no dataset, one prefix per node, one corpus directory) and the whole command through
Megatron's parser. A :class:`Plan` holds one :class:`RunPlan` per training (the preset, or each
sweep entry): one torchrun :class:`NodeCommand` per node (cuda / npu), or the CPU loop's settings
(cpu: :mod:`megatron_locmoe.launch.cpu_settings`). The launcher's ``execute`` runs it
(:mod:`~megatron_locmoe.launch.data_step`, :mod:`~megatron_locmoe.launch.torchrun`,
:mod:`~megatron_locmoe.launch.cpu`).

The simulated cluster's modules (numpy, torch) and Megatron are imported inside the functions
that use them: the launcher loads none of them for ``--help`` or a ``--no-check`` dry run.
"""

from __future__ import annotations

import itertools
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_locmoe.launch.cpu_settings import train_settings
from megatron_locmoe.launch.presets import (
    Preset,
    PresetError,
    apply_override,
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

    def command_line(self) -> str:
        """The launcher's command line for these options (those not at their defaults), as a
        user types it: what a run's manifest records."""
        argv = ["--config", self.config]
        for name, default in (
            ("nodes", None),
            ("node_rank", None),
            ("master_addr", None),
            ("master_port", DEFAULT_MASTER_PORT),
            ("devices_per_node", None),
            ("rdzv_id", None),
            ("entry", None),
        ):
            value = getattr(self, name)
            if value != default:
                argv += [f"--{name.replace('_', '-')}", str(value)]
        for item in self.sets:
            argv += ["--set", item]
        if self.runs is not None:
            argv += ["--runs", ",".join(self.runs)]
        if self.runs_dir != "runs":
            argv += ["--runs-dir", self.runs_dir]
        argv += ["--cpu-twin"] * self.cpu_twin + ["--no-check"] * (not self.check)
        if self.extra:
            argv += ["--", *self.extra]
        return shlex.join(["python", "-m", "megatron_locmoe.launch", *argv])


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
    command: str = ""
    """The launcher's command line that made the plan (``Options.command_line``)."""

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node


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
    plan.command = opts.command_line()
    entry = _entry_argv(preset.entry, preset.device) if preset.device != "cpu" else []
    for run, flags in preset.runs(opts.runs):
        subst = {"preset": preset.name, "run": run, "runs": str(runs_dir), "nodes": str(nodes)}
        argv = megatron_argv(flags, subst) + list(opts.extra)
        what = f"preset {preset.name}" + (f", run {run}" if preset.sweep else "")
        check_layout(preset, run, argv, nodes, dpn)
        rp = RunPlan(run, argv, runs_dir / preset.name / run)
        if preset.device != "cpu":  # cpu trains in this process (run_cpu)
            for r in plan.node_ranks:
                env = node_env(plan, r)
                rp.commands.append(NodeCommand(r, env, torchrun_argv(opts, plan, r, entry, argv)))
        where = NOT_CUDA.get(preset.device)
        if where:
            _refuse_cuda_only(what, where, "flags", cuda_only_flags(argv, preset.device))
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
                _refuse_cuda_only(
                    what, where, "settings", cuda_only_settings(rp.args, preset.device)
                )
        if preset.device == "cpu":  # refuses what the CPU loop cannot do, now
            per_node = bool(plan.domain_prefixes)  # node k reads the k-th prefix
            rp.cpu_loop = train_settings(rp.args, run, dpn, rp.log_dir, per_node)
        plan.runs.append(rp)
    return plan


def _refuse_cuda_only(what: str, where: str, kind: str, bad: list[str]) -> None:
    """Refuse the run when some of its flags or settings (``kind``) need CUDA-only code."""
    if bad:
        raise PresetError(
            f"{what} runs on {where}, but these {kind} need CUDA-only code: " + "; ".join(bad)
        )


# --------------------------------------------------------------------------------------------
# One command per node
# --------------------------------------------------------------------------------------------


def _entry_argv(entry: str, device: str) -> list[str]:
    """What torchrun starts on every rank for ``entry`` (a module, or a pretrain_gpt.py)."""
    if device == "npu":
        return ["-m", "megatron_locmoe.launch", "--worker", entry]
    if not entry.endswith(".py"):
        return ["-m", entry]
    from megatron_locmoe.patch_megatron_lm import MARKER  # only for a pretrain_gpt.py entry

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


# --------------------------------------------------------------------------------------------
# The data step's prefixes in the flags
# --------------------------------------------------------------------------------------------


def _check_data_override(prefix: str, own: str | None, what: str) -> None:
    """The data step builds the offline corpus at the preset's own --data-path only: an
    override naming no dataset is a typo, not a place to build the default corpus and train on
    it under another name."""
    if str(prefix) == str(own) or has_dataset(prefix):
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
    """Files the plan's data step (:func:`~megatron_locmoe.launch.data_step.prepare_data`)
    writes before training starts: the parse-time checks of files the flags name wait for them
    rather than refuse the plan."""
    from megatron_locmoe.sim.data import dataset_files  # numpy: see the module's docstring

    if plan.domain_prefixes:
        return corpus_files(plan.domain_prefixes)
    if plan.corpus_prefixes:
        return corpus_files(plan.corpus_prefixes)
    return dataset_files(plan.data_prefix) if plan.data_prefix else []


def corpus_files(prefixes: list[str]) -> list[str]:
    """The files of a corpus directory that the runs read: every prefix's dataset (.bin, .idx)
    and the directory's ``all_counts.npy`` (the hash router's token counts)."""
    from megatron_locmoe.sim.data import dataset_files  # numpy: see the module's docstring

    root = str(Path(prefixes[0]).parent)
    return [f for p in prefixes for f in dataset_files(p)] + [f"{root}/all_counts.npy"]


def has_dataset(prefix: str) -> bool:
    """Whether the indexed dataset ``prefix`` (its .bin and .idx) is there."""
    from megatron_locmoe.sim.data import dataset_files  # numpy: see the module's docstring

    return all(Path(f).exists() for f in dataset_files(prefix))
