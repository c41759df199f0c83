"""The one registry of every change the plugin makes to Megatron-Core, applied once.

Each patch is named by the dotted path it replaces, says why, and records the Megatron-Core
versions it was checked on (MindSpeed's patch-manager idea). A patch whose dotted path runs
through the ``torch`` package (e.g. ``megatron.core.transformer.moe.router.torch.cuda``)
replaces the name ``torch`` in that one module by a ``TorchView``, so ``torch`` itself, user
code and other libraries still see the real ``torch.cuda``.
"""

from __future__ import annotations

import importlib
import logging
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_locmoe.device import DeviceChoice, choose_device

logger = logging.getLogger(__name__)

CHECKED_ON = ("0.19.2",)
"""Megatron-Core versions every patch was read against and tested on."""

TESTED_BRANCHES = {"main": ("0.20.0", "d98e8a64"), "dev": ("0.19.0", "d48bd6be")}
"""Megatron-LM branches the CPU suite passed on, by the version each reports and the commit
tested (tools/megatron_source_check.sh; docs/megatron_versions.md)."""


def installed_megatron() -> tuple[str, str]:
    """(version, line) of the Megatron-Core this process imports: the version without its
    local part (the wheel appends the git hash of the directory it sits in), and ``dev`` where
    Megatron-LM dev's signatures show (its routers are built with layer_number; dev reports
    0.19.0, older than the 0.19.2 release), else ``main`` from 0.20 on, ``release`` below."""
    import inspect

    from megatron.core import package_info
    from megatron.core.transformer.moe.router import TopKRouter
    from packaging.version import Version

    version = Version(package_info.__version__).base_version
    if "layer_number" in inspect.signature(TopKRouter.__init__).parameters:
        return version, "dev"
    return version, "main" if Version(version) >= Version("0.20") else "release"


def untested_megatron_note(version: str, line: str) -> str | None:
    """The start-up line for a Megatron-Core the plugin was not tested on; None for 0.19.2 and
    the versions Megatron-LM main and dev report (those were tested at one commit each)."""
    if line == "release" and version in CHECKED_ON:
        return None
    if line in TESTED_BRANCHES and TESTED_BRANCHES[line][0] == version:
        return None
    tested = "; ".join(f"{b} {v} at {c}" for b, (v, c) in TESTED_BRANCHES.items())
    name = "release" if line == "release" else f"Megatron-LM {line} branch"
    return (
        f"megatron_locmoe: Megatron-Core {version} ({name}) is untested; tested: megatron-core "
        f"{', '.join(CHECKED_ON)} (CI) and Megatron-LM {tested} (docs/megatron_versions.md; "
        "tools/megatron_source_check.sh runs the suite against a source tree)"
    )


_MISSING = object()


class TorchView(types.ModuleType):
    """A module-local view of ``torch`` with some attributes overridden.

    Megatron modules bind ``import torch`` at import time; replacing that one name with a view
    redirects ``torch.cuda`` for that module without touching the real ``torch`` module.
    """

    def __init__(self, overrides: dict[str, Any]) -> None:
        super().__init__("torch")
        self.__dict__.update(torch.__dict__)  # native-speed lookups for everything else
        self.__dict__.update(overrides)
        self.__dict__["_locmoe_overrides"] = dict(overrides)

    def __getattr__(self, name: str) -> Any:  # lazily loaded torch submodules
        return getattr(torch, name)


@dataclass(frozen=True)
class Patch:
    """One replacement of a Megatron object, named by the dotted path it replaces."""

    target: str
    why: str
    make: Callable[[DeviceChoice], Any]
    devices: frozenset[str] = frozenset({"cpu", "npu"})
    checked_on: tuple[str, ...] = CHECKED_ON

    def applies_to(self, device: DeviceChoice) -> bool:
        return device.type in self.devices


@dataclass
class _Applied:
    owner: Any
    attr: str
    original: Any


@dataclass
class PatchRegistry:
    """Registered patches, applied at most once per process, revertible for tests."""

    patches: dict[str, Patch] = field(default_factory=dict)
    applied: dict[str, _Applied] = field(default_factory=dict)
    device: DeviceChoice | None = None

    def register(self, patch: Patch) -> Patch:
        if patch.target in self.patches:
            raise ValueError(f"patch {patch.target!r} is registered twice")
        self.patches[patch.target] = patch
        return patch

    def apply(self, device: DeviceChoice | None = None) -> list[str]:
        """Apply every patch that fits ``device`` (default: the detected one); idempotent."""
        device = device or choose_device()
        if self.device is not None and self.device != device:
            raise RuntimeError(
                f"Megatron patches were applied for device {self.device.type!r}; cannot re-apply "
                f"for {device.type!r} in the same process (call revert() first)."
            )
        self.device = device
        for patch in self.patches.values():
            if patch.target in self.applied or not patch.applies_to(device):
                continue
            self.applied[patch.target] = _install(patch.target, patch.make(device))
            logger.debug("applied patch %s", patch.target)
        return list(self.applied)

    def revert(self) -> None:
        """Undo every applied patch (newest first)."""
        for target in reversed(list(self.applied)):
            rec = self.applied.pop(target)
            if isinstance(rec.owner, TorchView):
                # the module's view loses this override; drop the view when it holds no other
                rec.owner._locmoe_overrides.pop(rec.attr)
                module, name = rec.original
                if rec.owner._locmoe_overrides:
                    setattr(rec.owner, rec.attr, getattr(torch, rec.attr))
                else:
                    setattr(module, name, torch)
            elif rec.original is _MISSING:
                delattr(rec.owner, rec.attr)
            else:
                setattr(rec.owner, rec.attr, rec.original)
        self.device = None

    def describe(self) -> str:
        lines = []
        for p in self.patches.values():
            state = "applied" if p.target in self.applied else "not applied"
            lines.append(
                f"{p.target}\n    devices: {', '.join(sorted(p.devices))}; checked on "
                f"megatron-core {', '.join(p.checked_on)}; {state}\n    why: {p.why}"
            )
        return "\n".join(lines)


def _split_module(target: str) -> tuple[types.ModuleType, list[str]]:
    """Import the longest module prefix of ``target``; return it and the remaining attributes."""
    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            module = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        return module, parts[cut:]
    raise ImportError(f"no importable module in patch target {target!r}")


def _install(target: str, replacement: Any) -> _Applied:
    module, attrs = _split_module(target)
    owner: Any = module
    for i, name in enumerate(attrs[:-1]):
        child = getattr(owner, name)
        if child is torch or isinstance(child, TorchView):
            # The path runs through torch: give this module its own view instead.
            if not (isinstance(owner, types.ModuleType) and i == len(attrs) - 2):
                raise ValueError(
                    f"patch target {target!r}: only <module>.torch.<attr> is supported"
                )
            if child is torch:
                child = TorchView({attrs[-1]: replacement})
                setattr(owner, name, child)
            else:
                child._locmoe_overrides[attrs[-1]] = replacement
                setattr(child, attrs[-1], replacement)
            return _Applied(owner=child, attr=attrs[-1], original=(owner, name))
        owner = child
    original = getattr(owner, attrs[-1], _MISSING)
    setattr(owner, attrs[-1], replacement)
    return _Applied(owner=owner, attr=attrs[-1], original=original)


def resolve(target: str) -> Any:
    """The object at dotted path ``target``."""
    module, attrs = _split_module(target)
    obj: Any = module
    for name in attrs:
        obj = getattr(obj, name)
    return obj


REGISTRY = PatchRegistry()
"""The plugin's patches (``patches.py`` registers them all)."""
