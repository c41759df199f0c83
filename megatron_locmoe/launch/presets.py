"""Run presets: one YAML file in ``configs/`` per complete run, checked before anything starts.

A preset names the device kind (``cuda``, ``npu`` or ``cpu``), the cluster shape it was laid
out for (nodes x devices per node, plus the other node counts it fits), the environment, the
training entry and the Megatron flags (Megatron's own and the plugin's ``--moe-router-type`` /
``--locmoe-*``). A ``sweep`` section turns it into several runs of the same model, one per
entry (e.g. one per router). ``megatron_locmoe.launch`` turns a preset into commands.

Why everything is checked here, on the login node: a typo in a flag, or a node count that does
not tile the parallel layout, otherwise surfaces only after the job has waited in the queue and
started on every node. Two checks:

- :func:`check_layout`: the parallel sizes against nodes x devices per node, with a message
  that names the numbers that clash and the node counts that would fit;
- :func:`parse_with_megatron`: the generated flags through Megatron's own parser and
  ``validate_args`` with the plugin flags (the adaptor's patches), with WORLD_SIZE and
  LOCAL_WORLD_SIZE set to the preset's cluster, exactly as rank 0 will parse them.

Ascend mode (``device: npu``) additionally refuses settings that need CUDA-only code
(:func:`cuda_only_settings`): Transformer Engine, apex fusions, grouped GEMM, FP8, CUDA graphs.

A preset may ``extends: NAME`` another: the other's keys are its defaults and its Megatron
flags come first (one written here overrides, ``null`` drops it); its ``sweep`` and
``schedule`` only when this preset has neither (the same runs on another model or cluster). A ``schedule`` section says how a driver that runs the sweep entries at
several cluster shapes uses each (``analysis/sweep.py``: :class:`ScheduleEntry`).

Flag values: ``true`` is a bare flag, ``false`` / ``null`` drop the flag, a list gives several
values. The placeholders ``{preset}``, ``{run}``, ``{runs}`` and ``{nodes}`` in string values
become the preset name, the run name (the sweep entry, else the preset name), the runs folder
and the plan's node count (e.g. ``moe-router-num-groups: "{nodes}"``: one group per node).
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml

DEVICES = ("cuda", "npu", "cpu")
"""Device kinds a preset can target; the collective backend follows (nccl / hccl / gloo)."""

DATA_RECIPES = ("pydoc", "pydoc-domains", "realtext")
"""``prepare_data`` values: ``pydoc`` is the offline corpus of megatron_locmoe.sim.data;
``pydoc-domains`` the same corpus split into one domain per node
(``data.build_domain_datasets``: ``--data-path DIR/domain0 ... DIR/domain<nodes-1>``, plus
``DIR/all_counts.npy``), node k's ranks reading the k-th, as a domain-sharded loader would
(CPU presets: the simulated cluster's loop); ``realtext`` the real multi-domain corpus
(``python -m megatron_locmoe.data.corpus --out DIR``, docs/corpus.md) in the one directory
the data flags name, built there when a dataset they name is missing (it needs the package
registries: on a machine without them, carry the corpus in first)."""

_REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
_SCALAR_KEYS = ("description", "device", "nodes", "devices_per_node", "entry", "prepare_data")
_KEYS = {*_SCALAR_KEYS, "node_counts", "env", "megatron", "sweep", "schedule", "extends"}
_MERGED_KEYS = ("megatron", "env")
"""Mappings an ``extends`` merges key by key (the rest: the extending preset's value wins)."""
SETTINGS = ("domains", "control")
"""A schedule entry's data setting: one corpus domain per node, or the same mixture on every
node (the driver names the data for each)."""
DEFAULT_ENTRY = "megatron_locmoe.pretrain_gpt"


class PresetError(ValueError):
    """A preset, an override or a cluster shape that cannot work; the message says what to
    change."""


@dataclass(frozen=True)
class ScheduleEntry:
    """How the locality sweep runs one sweep entry: not the run (the entry's flags are), but
    its table label, data setting, the layouts it runs at and its priority there."""

    label: str
    setting: str = "domains"
    """One of SETTINGS: each node its own corpus domain, or every node the mixture."""
    layouts: tuple[str, ...] | None = None
    """The layouts (``NODESxRANKS``) it runs at; None: every layout."""
    priority: int | dict[str, int] = 1
    """1 first (the main question); per layout as a mapping, ``other`` for the rest."""

    KEYS = ("label", "setting", "layouts", "priority")

    def runs_at(self, layout: str) -> bool:
        return self.layouts is None or layout in self.layouts

    def priority_at(self, layout: str) -> int:
        if isinstance(self.priority, int):
            return self.priority
        return self.priority.get(layout, self.priority.get("other", 1))


def _schedule_entry(run: str, raw, where: str) -> ScheduleEntry:
    """One ``schedule`` entry, its keys and values checked."""
    what = f"{where}: schedule.{run}"
    if not isinstance(raw, dict):
        raise PresetError(f"{what} is a mapping of {', '.join(ScheduleEntry.KEYS)}")
    unknown = set(raw) - set(ScheduleEntry.KEYS)
    if unknown:
        raise PresetError(
            f"{what}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; a schedule entry "
            f"has {', '.join(ScheduleEntry.KEYS)}"
        )
    if not isinstance(raw.get("label"), str) or not raw["label"]:
        raise PresetError(f"{what}: give its table label (label: TEXT)")
    setting = raw.get("setting", "domains")
    if setting not in SETTINGS:
        raise PresetError(f"{what}: setting {setting!r}; use one of {', '.join(SETTINGS)}")
    layouts = raw.get("layouts")
    if layouts is not None and (
        not isinstance(layouts, list) or not all(isinstance(x, str) for x in layouts)
    ):
        raise PresetError(f"{what}: layouts is a list of layout names, e.g. [8x1, 16x1]")
    priority = raw.get("priority", 1)
    values = priority.values() if isinstance(priority, dict) else [priority]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values) or (
        isinstance(priority, dict) and not all(isinstance(k, str) for k in priority)
    ):
        raise PresetError(
            f"{what}: priority is a positive integer, or a mapping of layout (or other) to one"
        )
    return ScheduleEntry(
        raw["label"], setting, tuple(layouts) if layouts is not None else None, priority
    )


@dataclass
class Preset:
    """One run (or one sweep of runs) as read from a YAML file."""

    name: str
    device: str
    nodes: int
    devices_per_node: int
    megatron: dict[str, Any]
    """Megatron flag name (no leading dashes) -> value, in command-line order."""
    description: str = ""
    node_counts: tuple[int, ...] = ()
    """Node counts the preset is meant for (checked by the tests); ``nodes`` is the default."""
    entry: str = DEFAULT_ENTRY
    """Module run by torchrun (``-m``), or a path to Megatron-LM's pretrain_gpt.py."""
    prepare_data: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    sweep: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Run name -> flags that override ``megatron`` for that run; empty: one run."""
    schedule: dict[str, ScheduleEntry] = field(default_factory=dict)
    """Sweep entry -> how a multi-shape driver (the locality sweep) runs it."""
    path: Path | None = None

    def runs(self, only: list[str] | None = None) -> list[tuple[str, dict[str, Any]]]:
        """(run name, Megatron flags) of every run, sweep entries in file order."""
        if not self.sweep:
            if only and only != [self.name]:
                raise PresetError(f"preset {self.name} has no sweep; drop --runs")
            return [(self.name, dict(self.megatron))]
        names = list(self.sweep)
        if only:
            unknown = [r for r in only if r not in self.sweep]
            if unknown:
                raise PresetError(
                    f"preset {self.name} has no run {', '.join(unknown)}: its sweep runs are "
                    f"{', '.join(names)}"
                )
            names = [n for n in names if n in only]
        return [(n, {**self.megatron, **self.sweep[n]}) for n in names]


# --------------------------------------------------------------------------------------------
# Loading and overrides
# --------------------------------------------------------------------------------------------


def preset_dirs() -> list[Path]:
    """Where preset names are looked up: ./configs, then the checkout's configs/."""
    dirs = [Path.cwd() / "configs", _REPO_CONFIGS]
    return list(dict.fromkeys(d.resolve() for d in dirs if d.is_dir()))


def available_presets() -> list[str]:
    return sorted({p.stem for d in preset_dirs() for p in d.glob("*.yaml")})


def resolve_preset_path(name_or_path: str) -> Path:
    """A YAML path as given, or ``NAME`` / ``NAME.yaml`` looked up in :func:`preset_dirs`."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    stem = path.name.removesuffix(".yaml")
    for d in preset_dirs():
        if (d / f"{stem}.yaml").is_file():
            return d / f"{stem}.yaml"
    raise PresetError(
        f"unknown preset {name_or_path!r}: use one of {', '.join(available_presets())} "
        "(the files in configs/), or give the path of a YAML file"
    )


def load_preset(name_or_path: str) -> Preset:
    path = resolve_preset_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise PresetError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise PresetError(f"{path}: a preset is a mapping of keys ({', '.join(sorted(_KEYS))})")
    return preset_from_dict(path.stem, raw, path)


def _extended(raw: dict, where: str, seen: tuple[str, ...] = ()) -> dict:
    """``raw`` with the preset it ``extends`` as defaults: that preset's keys, its Megatron
    flags first (in its order) then this one's; ``sweep`` and ``schedule`` are this one's if it
    has either, else the other's."""
    base_name = raw["extends"]
    if not isinstance(base_name, str):
        raise PresetError(f"{where}: extends names one preset, e.g. extends: demo")
    if base_name in seen:
        raise PresetError(f"{where}: extends {base_name} again ({' -> '.join(seen)}): a cycle")
    path = resolve_preset_path(base_name)
    base = yaml.safe_load(path.read_text())
    if not isinstance(base, dict):
        raise PresetError(f"{path}: a preset is a mapping of keys ({', '.join(sorted(_KEYS))})")
    if "extends" in base:
        base = _extended(base, str(path), (*seen, base_name))
    runs = ("sweep", "schedule")
    own_runs = any(k in raw for k in runs)
    merged = {k: v for k, v in base.items() if k != "extends" and not (own_runs and k in runs)}
    merged.update({k: v for k, v in raw.items() if k not in _MERGED_KEYS and k != "extends"})
    for key in _MERGED_KEYS:  # flag by flag, variable by variable
        merged[key] = {**(base.get(key) or {}), **(raw.get(key) or {})}
    return merged


def preset_from_dict(name: str, raw: dict, path: Path | None = None) -> Preset:
    where = str(path or name)
    unknown = set(raw) - _KEYS
    if unknown:
        raise PresetError(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))}; a preset has "
            f"{', '.join(sorted(_KEYS))}"
        )
    if "extends" in raw:
        raw = _extended(raw, where, (name,))
    for key in ("device", "nodes", "devices_per_node", "megatron"):
        if key not in raw:
            raise PresetError(f"{where}: missing key {key!r}")
    preset = Preset(
        name=name,
        device=raw["device"],
        nodes=raw["nodes"],
        devices_per_node=raw["devices_per_node"],
        megatron=dict(raw["megatron"] or {}),
        description=str(raw.get("description", "")).strip(),
        node_counts=tuple(raw.get("node_counts") or (raw["nodes"],)),
        entry=raw.get("entry") or DEFAULT_ENTRY,
        prepare_data=raw.get("prepare_data"),
        env={k: str(v) for k, v in (raw.get("env") or {}).items()},
        sweep={k: dict(v or {}) for k, v in (raw.get("sweep") or {}).items()},
        path=path,
    )
    schedule = raw.get("schedule") or {}
    if not isinstance(schedule, dict):
        raise PresetError(f"{where}: schedule is a mapping of sweep entry -> its schedule")
    unscheduled = [k for k in schedule if k not in preset.sweep]
    if unscheduled:
        raise PresetError(
            f"{where}: schedule names {', '.join(map(str, unscheduled))}, which the sweep does "
            f"not have (its entries: {', '.join(preset.sweep) or 'none'})"
        )
    preset.schedule = {k: _schedule_entry(k, v, where) for k, v in schedule.items()}
    check_preset(preset, where)
    return preset


def check_preset(preset: Preset, where: str | None = None) -> None:
    """Types and choices of the preset's own keys (the flags are Megatron's to check)."""
    where = where or preset.name
    if preset.device not in DEVICES:
        raise PresetError(f"{where}: device {preset.device!r}; use one of {', '.join(DEVICES)}")
    for key in ("nodes", "devices_per_node"):
        value = getattr(preset, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PresetError(f"{where}: {key} must be a positive integer, not {value!r}")
    if preset.prepare_data is not None and preset.prepare_data not in DATA_RECIPES:
        raise PresetError(
            f"{where}: prepare_data {preset.prepare_data!r}; use one of {', '.join(DATA_RECIPES)}"
        )
    if preset.prepare_data == "pydoc-domains" and preset.device != "cpu":
        raise PresetError(
            f"{where}: prepare_data pydoc-domains gives each node its own corpus, which only "
            "the CPU loop reads that way (pretrain_gpt would blend them): use pydoc"
        )
    for key in preset.megatron:
        if not isinstance(key, str) or key.startswith("-"):
            raise PresetError(f"{where}: write Megatron flags without dashes, e.g. num-layers")


def apply_override(preset: Preset, item: str) -> Preset:
    """A copy of ``preset`` with one ``KEY=VALUE`` override (``--set`` on the command line).

    ``KEY`` is a preset key (``nodes``, ``devices_per_node``, ``device``, ``entry``,
    ``prepare_data``), ``env.NAME``, ``sweep.RUN.FLAG`` (one run's flag), or else a Megatron
    flag (dashes optional) for every run: the command line wins over a value the preset gives
    a sweep run of its own (before 2026-12-08 that run kept its own, and the override was
    silently not applied to it). ``VALUE`` is read as YAML: ``true`` gives a bare flag,
    ``false`` / ``null`` remove the flag or variable.
    """
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise PresetError(f"--set {item!r}: write KEY=VALUE, e.g. --set train-iters=100")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    new = copy.deepcopy(preset)
    if key in _SCALAR_KEYS:
        if key in ("nodes", "devices_per_node") and not isinstance(value, int):
            raise PresetError(f"--set {item!r}: {key} takes an integer")
        setattr(new, key, value if key != "description" else str(value))
        check_preset(new)
    elif key.startswith("env."):
        name = key[len("env.") :]
        if value is None or value is False:
            new.env.pop(name, None)
        else:
            new.env[name] = str(value)
    elif key.startswith("sweep."):
        run, _, flag = key[len("sweep.") :].partition(".")
        if run not in new.sweep or not flag:
            runs = ", ".join(new.sweep) or "none"
            raise PresetError(f"--set {item!r}: write sweep.RUN.FLAG=VALUE; runs: {runs}")
        new.sweep[run][flag.lstrip("-")] = value
    else:
        flag = key.lstrip("-")
        new.megatron[flag] = value
        for entry in new.sweep.values():  # every run: the command line wins over the preset
            if flag in entry:
                entry[flag] = value
    return new


def add_set_option(parser, help: str) -> None:
    """``--set KEY=VALUE``, repeatable, into ``sets``: the overrides ``apply_override`` reads
    (the launcher's and the demo's option)."""
    parser.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help=help
    )


# --------------------------------------------------------------------------------------------
# Flags -> argv
# --------------------------------------------------------------------------------------------


def _text(value: Any, subst: dict[str, str]) -> str:
    text = repr(value) if isinstance(value, float) else str(value)
    for k, v in subst.items():
        text = text.replace("{" + k + "}", v)
    return text


def megatron_argv(flags: dict[str, Any], subst: dict[str, str] | None = None) -> list[str]:
    """``--flag value`` tokens in the mapping's order (see the module docstring for values)."""
    subst = subst or {}
    argv: list[str] = []
    for key, value in flags.items():
        if value is None or value is False:
            continue
        flag = f"--{key}"
        if value is True:
            argv.append(flag)
        elif isinstance(value, list | tuple):
            argv += [flag, *(_text(v, subst) for v in value)]
        else:
            argv += [flag, _text(value, subst)]
    return argv


def flag_value(argv: list[str], flag: str) -> str | None:
    """The value of the last ``flag`` in ``argv`` (argparse: the last occurrence wins)."""
    value = None
    for i, tok in enumerate(argv):
        if tok == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif tok.startswith(flag + "="):
            value = tok.split("=", 1)[1]
    return value


# --------------------------------------------------------------------------------------------
# Parallel layout against the cluster
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """The parallel sizes and batch sizes of one run's Megatron flags."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int = 1
    micro_batch: int = 1
    global_batch: int | None = None
    num_experts: int | None = None

    @classmethod
    def from_argv(cls, argv: list[str]) -> Layout:
        def num(flag, default):
            value = flag_value(argv, flag)
            try:
                return int(value) if value is not None else default
            except ValueError:
                raise PresetError(f"{flag} {value!r} is not an integer") from None

        tp = num("--tensor-model-parallel-size", 1)
        return cls(
            tp=tp,
            pp=num("--pipeline-model-parallel-size", 1),
            cp=num("--context-parallel-size", 1),
            ep=num("--expert-model-parallel-size", 1),
            etp=num("--expert-tensor-parallel-size", tp),
            micro_batch=num("--micro-batch-size", 1),
            global_batch=num("--global-batch-size", None),
            num_experts=num("--num-experts", None),
        )

    def problems(self, nodes: int, devices_per_node: int) -> list[str]:
        """Why ``nodes`` x ``devices_per_node`` devices cannot run this layout (empty: fits)."""
        world = nodes * devices_per_node
        shape = f"{nodes} node(s) x {devices_per_node} = {world} devices"
        out = []
        model = self.tp * self.pp * self.cp
        if world % model:
            out.append(
                f"{shape} is not a multiple of TP {self.tp} x PP {self.pp} x CP {self.cp} = {model}"
            )
        expert = self.ep * self.etp * self.pp
        if world % expert:
            out.append(
                f"{shape} is not a multiple of EP {self.ep} x expert-TP {self.etp} x PP "
                f"{self.pp} = {expert}"
            )
        if self.num_experts is not None and self.num_experts % self.ep:
            out.append(f"{self.num_experts} experts do not split over EP {self.ep}")
        if not out and self.global_batch is not None:
            dp = world // model
            if self.global_batch % (self.micro_batch * dp):
                out.append(
                    f"global batch {self.global_batch} is not a multiple of micro batch "
                    f"{self.micro_batch} x data-parallel size {dp} (= {shape} / {model})"
                )
        return out

    def fitting_node_counts(self, devices_per_node: int, up_to: int = 64) -> list[int]:
        return [n for n in range(1, up_to + 1) if not self.problems(n, devices_per_node)]


def check_layout(preset: Preset, run: str, argv: list[str], nodes: int, dpn: int) -> None:
    """Raise PresetError naming the clash and the node counts that fit."""
    layout = Layout.from_argv(argv)
    problems = layout.problems(nodes, dpn)
    if problems:
        fits = layout.fitting_node_counts(dpn)
        hint = f"use --nodes {' / '.join(map(str, fits[:8]))}" if fits else "no node count fits"
        raise PresetError(
            f"preset {preset.name} (run {run}) does not fit {nodes} node(s) x {dpn} devices: "
            + "; ".join(problems)
            + f". With {dpn} devices per node {hint} (the preset is laid out for "
            f"{', '.join(map(str, preset.node_counts))} node(s)), or change the layout, e.g. "
            "--set expert-model-parallel-size=N / global-batch-size=N."
        )


# --------------------------------------------------------------------------------------------
# CPU twins: a preset's parallel layout and routing, trained on the simulated cluster
# --------------------------------------------------------------------------------------------

TWIN_BASE = "cpu-sim"
"""The preset whose model, data and training flags every CPU twin takes."""
TWIN_WORLD = 8
"""Ranks of a twin (fewer when the preset itself has fewer): 2 simulated nodes x 4 or 4 x 2."""
TWIN_LAYOUT_FLAGS = (
    "tensor-model-parallel-size",
    "sequence-parallel",
    "pipeline-model-parallel-size",
    "num-virtual-stages-per-pipeline-rank",
    "context-parallel-size",
    "expert-tensor-parallel-size",
)
TWIN_ROUTING_FLAGS = (
    "num-experts",
    "moe-expert-capacity-factor",
    "moe-token-drop-policy",
    "moe-token-dispatcher-type",
    "moe-aux-loss-coeff",
    "moe-z-loss-coeff",
    "moe-pad-expert-input-to-capacity",
)
TWIN_ROUTING_PREFIXES = ("moe-router-", "locmoe-")
TWIN_NOT_KEPT = (
    "moe-router-fusion",  # CUDA kernels; the next three are implementation choices the
    "locmoe-experts",  # CPU loop makes itself, and the simulated node size
    "locmoe-fused-router",
    "locmoe-devices-per-node",
)


def _twin_keeps(flag: str) -> bool:
    """Whether a twin keeps ``flag`` of its preset: the parallel layout and the routing."""
    if flag in TWIN_NOT_KEPT:
        return False
    return (
        flag in TWIN_LAYOUT_FLAGS
        or flag in TWIN_ROUTING_FLAGS
        or flag.startswith(TWIN_ROUTING_PREFIXES)
    )


def cpu_twin(preset: Preset) -> Preset:
    """The reduced CPU twin of ``preset`` (``launch --cpu-twin``): its TP / SP / PP / VP / CP /
    expert-TP sizes, router and routing flags on the simulated cluster, everything else
    (model, data, optimizer) from :data:`TWIN_BASE`. The cluster shrinks to
    :data:`TWIN_WORLD` ranks and EP to what one pipeline stage of it holds, keeping the
    structure that matters for locality: an EP group that crosses nodes spans 2 of them (one
    inside a node stays inside one node), TP groups inside a node. The sweep keeps its runs,
    each with its kept flags. One rule for every preset, so a twin cannot drift from it."""
    base = load_preset(TWIN_BASE)
    argv = megatron_argv(preset.megatron)
    layout = Layout.from_argv(argv)
    world = min(TWIN_WORLD, preset.nodes * preset.devices_per_node)
    model = layout.tp * layout.pp * layout.cp
    stage = world // layout.pp
    ep = max(1, min(layout.ep, stage // layout.etp))
    span = -(-layout.ep * layout.etp // preset.devices_per_node)  # nodes an EP group covers
    if min(span, 2) > 1:
        devices_per_node = ep * layout.etp // 2
    else:
        devices_per_node = min(preset.devices_per_node, world)
    if (
        world % model
        or stage % (ep * layout.etp)
        or world % devices_per_node
        or devices_per_node % layout.tp
    ):
        raise PresetError(
            f"preset {preset.name} has no CPU twin on {world} ranks: TP {layout.tp} x PP "
            f"{layout.pp} x CP {layout.cp}, EP {ep} x expert-TP {layout.etp} with "
            f"{devices_per_node} ranks per node do not tile it"
        )
    chunks = layout.pp * int(flag_value(argv, "--num-virtual-stages-per-pipeline-rank") or 1)
    flags = {k: v for k, v in base.megatron.items() if not _twin_keeps(k)}
    flags.pop("expert-model-parallel-size", None)
    flags.update({k: v for k, v in preset.megatron.items() if _twin_keeps(k)})
    layers = flags["num-layers"]
    micro = flags["micro-batch-size"]
    flags.update(
        {
            "num-layers": -(-layers // chunks) * chunks,
            "expert-model-parallel-size": ep,
            # as many micro-batches per step as stages, so the pipeline schedule has work
            "global-batch-size": micro * (world // model) * layout.pp,
        }
    )
    env = dict(base.env)
    nodes = world // devices_per_node
    sweep = {
        run: {k: v for k, v in entry.items() if _twin_keeps(k)}
        for run, entry in preset.sweep.items()
    }
    return Preset(
        name=f"{preset.name}-cpu-twin",
        device="cpu",
        nodes=nodes,
        devices_per_node=devices_per_node,
        megatron=flags,
        description=f"CPU twin of {preset.name}: {nodes} simulated nodes x {devices_per_node} "
        f"CPU ranks, its layout and routing on {TWIN_BASE}'s model",
        node_counts=(nodes,),
        prepare_data=base.prepare_data,
        env=env,
        sweep=sweep,
        path=preset.path,
    )


# --------------------------------------------------------------------------------------------
# Megatron's own parser
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _environ(**values: str):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


DEVICE_ARCH = {"cuda": 9, "npu": 0, "cpu": 0}
"""What the check answers when Megatron's validate_args asks the GPU's architecture
(``get_device_arch_version()``, for TP / CP > 1): Hopper for cuda (the cuda presets are H100
clusters), 0 (not a CUDA architecture) for npu and cpu. The launcher runs on login nodes
without a GPU, where the real query fails."""


def _failed_check(error: BaseException) -> str:
    """An exception's message, or for a bare ``assert`` (Megatron has many) the failing line
    and where it is, so the user sees which check failed."""
    message = str(error).strip()
    if message:
        return message
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return type(error).__name__
    frame = frames[-1]
    where = f"{os.path.basename(frame.filename)}:{frame.lineno}"
    return f"{type(error).__name__} at {where}: {(frame.line or '').strip()}"


def parse_with_megatron(
    argv: list[str],
    world_size: int,
    devices_per_node: int,
    what: str = "the generated command",
    env: dict[str, str] | None = None,
    device: str = "cuda",
    files_to_come: Sequence[str] = (),
):
    """Megatron's ``parse_args`` + ``validate_args`` (plugin flags included) on ``argv``, and
    for the GPU and NPU the TransformerConfig the flags make (``core_transformer_config_from_args``).

    Runs as rank 0 of ``world_size`` ranks with torchrun's LOCAL_WORLD_SIZE and the run's
    environment ``env``, in this process: the adaptor's argument patches are applied for the
    call (CPU device choice: only the parser patches matter here) and reverted afterwards
    unless they were already applied; the GPU-architecture query answers for ``device``
    (:data:`DEVICE_ARCH`); ``files_to_come`` are written by a step before training (the
    launcher's data step), so the checks of the files the flags name pass them over. Returns
    the validated namespace; raises PresetError with Megatron's message.
    """
    from megatron_locmoe import adaptor
    from megatron_locmoe.arguments import (
        ARGS_DEFAULTS,
        check_data_args,
        files_written_before_training,
    )
    from megatron_locmoe.device import DeviceChoice
    from megatron_locmoe.sim.data import CorpusError

    registry = adaptor.REGISTRY
    applied_here = registry.device is None
    if applied_here:
        registry.apply(DeviceChoice("cpu", "gloo"))
    from megatron.training import arguments

    saved_argv, saved_arch = sys.argv, arguments.get_device_arch_version
    out, err = io.StringIO(), io.StringIO()
    ranks = dict(
        WORLD_SIZE=str(world_size),
        RANK="0",
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE=str(devices_per_node),
    )
    try:
        with (
            _environ(**{**(env or {}), **ranks}),
            files_written_before_training(files_to_come),
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
        ):
            sys.argv = ["pretrain_gpt.py", *argv]
            arguments.get_device_arch_version = lambda: DEVICE_ARCH[device]
            try:
                args = arguments.parse_args()
            except SystemExit:
                lines = [ln for ln in err.getvalue().strip().splitlines() if ln.strip()]
                msg = lines[-1] if lines else "argument error"
                raise PresetError(f"Megatron's parser rejects {what}: {msg}") from None
            try:
                args = arguments.validate_args(args, dict(ARGS_DEFAULTS))
                check_data_args(args)  # before any process starts
                if device != "cpu":  # (the CPU loop builds it when planned, with its fixes)
                    # the TransformerConfig's own checks, which pretrain_gpt meets only once
                    # every rank has started (top-1 softmax routing: --moe-router-pre-softmax)
                    arguments.core_transformer_config_from_args(args)
                return args
            except CorpusError as e:
                raise PresetError(f"{what}: {e}") from None
            except RuntimeError as e:
                if "NVIDIA" in str(e) or "CUDA" in str(e):
                    raise PresetError(
                        f"Megatron's validate_args queries the GPU for {what} (e.g. for "
                        "--moe-grouped-gemm) and none is visible here: run the launcher on a "
                        "GPU node, or skip the check with --no-check"
                    ) from None
                raise PresetError(f"Megatron's validation rejects {what}: {e}") from None
            except (AssertionError, ValueError, TypeError) as e:
                raise PresetError(
                    f"Megatron's validation rejects {what} on {world_size} devices "
                    f"({devices_per_node} per node): {_failed_check(e)}"
                ) from None
    finally:
        sys.argv, arguments.get_device_arch_version = saved_argv, saved_arch
        if applied_here:
            registry.revert()


class CudaOnly(NamedTuple):
    """A Megatron setting that needs CUDA-only code (TE, apex, CUDA kernels)."""

    attr: str
    is_cuda_only: Callable[[object], bool]
    fix: str
    """What to do instead, as an imperative."""
    flags: tuple[str, ...] = ()
    """Flags that set it whatever their value, refused before parsing (some make Megatron's
    validate_args query the CUDA device)."""
    runs_on_cpu: bool = False
    """The CPU loop runs it all the same (only Ascend refuses it)."""


CUDA_ONLY = (
    CudaOnly(
        "transformer_impl",
        lambda v: v != "local",
        "use --transformer-impl local (Transformer Engine is CUDA-only)",
    ),
    CudaOnly(
        "moe_grouped_gemm",
        bool,
        "drop --moe-grouped-gemm (TE's grouped GEMM, the grouped_gemm package or "
        "torch._grouped_mm: CUDA kernels)",
        ("--moe-grouped-gemm",),
    ),
    CudaOnly(
        "locmoe_experts",
        lambda v: v == "grouped",
        "use --locmoe-experts loop (torch._grouped_mm has CUDA and CPU kernels only)",
        runs_on_cpu=True,
    ),
    CudaOnly(
        "fp8",
        lambda v: v is not None,
        "drop --fp8-format (FP8 runs through Transformer Engine)",
        ("--fp8-format",),
    ),
    CudaOnly(
        "fp4", lambda v: v is not None, "drop --fp4-format (Transformer Engine)", ("--fp4-format",)
    ),
    CudaOnly(
        "masked_softmax_fusion",
        bool,
        "use --no-masked-softmax-fusion (Megatron's fused softmax is a CUDA kernel)",
    ),
    CudaOnly(
        "gradient_accumulation_fusion",
        bool,
        "use --no-gradient-accumulation-fusion (apex's fused_weight_gradient_mlp_cuda)",
    ),
    CudaOnly(
        "no_persist_layer_norm",
        lambda v: not v,
        "use --no-persist-layer-norm (apex's persistent LayerNorm kernel)",
    ),
    CudaOnly("apply_rope_fusion", bool, "use --no-rope-fusion (TE / apex fused RoPE)"),
    CudaOnly(
        "moe_permute_fusion",
        bool,
        "drop --moe-permute-fusion (TE's fused permute)",
        ("--moe-permute-fusion",),
    ),
    CudaOnly(
        "moe_router_fusion",
        bool,
        "drop --moe-router-fusion (TE's fused router)",
        ("--moe-router-fusion",),
    ),
    CudaOnly(
        "tp_comm_overlap", bool, "drop --tp-comm-overlap (TE userbuffers)", ("--tp-comm-overlap",)
    ),
    CudaOnly(
        "use_flash_attn",
        bool,
        "drop --use-flash-attn (the flash-attn CUDA package)",
        ("--use-flash-attn",),
    ),
    CudaOnly(
        "cuda_graph_impl",
        lambda v: v != "none",
        "use --cuda-graph-impl none (CUDA graphs)",
        ("--enable-cuda-graph", "--external-cuda-graph"),
    ),
    CudaOnly(
        "moe_token_dispatcher_type",
        lambda v: v == "flex",
        "use --moe-token-dispatcher-type alltoall (flex = DeepEP / HybridEP, CUDA-only)",
    ),
    CudaOnly(
        "cross_entropy_fusion_impl",
        lambda v: v == "te",
        "use --cross-entropy-fusion-impl native (the te implementation is CUDA-only)",
    ),
)
"""Checked on the parsed namespace, so that CUDA-only *defaults* are caught too, not only flags
written in the preset; the ``flags`` also before parsing."""

CUDA_ONLY_FLAGS = {flag: row.fix for row in CUDA_ONLY for flag in row.flags}
"""Flag -> what to do instead, for the flags refused before parsing."""


def _refused_on(device: str) -> list[CudaOnly]:
    return [row for row in CUDA_ONLY if not (device == "cpu" and row.runs_on_cpu)]


def cuda_only_flags(argv: list[str], device: str = "npu") -> list[str]:
    """The CUDA-only flags written in ``argv`` that ``device`` (npu, cpu) cannot run, each with
    what to do instead."""
    written = {tok.split("=", 1)[0] for tok in argv if tok.startswith("--")}
    return [
        f"{flag}: {row.fix}" for row in _refused_on(device) for flag in row.flags if flag in written
    ]


def cuda_only_settings(args, device: str = "npu") -> list[str]:
    """What to change so that the parsed Megatron arguments run on ``device`` (npu: Ascend
    NPUs; cpu: the CPU loop); empty: fine."""
    bad = []
    for row in _refused_on(device):
        if hasattr(args, row.attr) and row.is_cuda_only(getattr(args, row.attr)):
            bad.append(f"{row.attr}={getattr(args, row.attr)!r}: {row.fix}")
    return bad
