"""The one registry of every change the plugin makes to Megatron-Core, applied once.

Each patch is named by the dotted path it replaces, says why, and records the Megatron-Core
versions it was checked on (MindSpeed's patch-manager idea). ``apply()`` installs the patches
that fit this process's device; ``python -m megatron_locmoe.adaptor --list`` prints them.

Device adaptation. Megatron-Core's MoE path calls ``torch.cuda`` directly (streams, events,
``current_device()`` for allocations). On CUDA nothing is patched. On CPU (simulated clusters,
tests) and on Ascend NPU, the affected Megatron modules get their *own view* of ``torch`` whose
``cuda`` attribute is a device shim (no-op streams on CPU, ``torch.npu`` on NPU). ``torch``
itself is never modified: a patch whose dotted path runs through the ``torch`` package (e.g.
``megatron.core.transformer.moe.router.torch.cuda``) replaces the name ``torch`` in that one
module only, so user code and other libraries still see the real ``torch.cuda``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
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
"""Megatron-Core versions every patch below was read against and tested on."""

_MISSING = object()


# --------------------------------------------------------------------------------------------
# Device shims
# --------------------------------------------------------------------------------------------


class _HostStream:
    """A stream on the CPU: work is already ordered, so waiting and recording do nothing."""

    def wait_stream(self, stream: Any) -> None:
        return None

    def wait_event(self, event: Any) -> None:
        return None

    def record_event(self, event: Any = None) -> _HostEvent:
        return event if event is not None else _HostEvent()

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True


class _HostEvent:
    """An event on the CPU: always complete."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        return None

    def wait(self, stream: Any = None) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True


_HOST_STREAM = _HostStream()


class HostCudaShim(types.SimpleNamespace):
    """Stands in for ``torch.cuda`` inside Megatron modules when the device is the CPU.

    Streams and events become no-ops (CPU work is synchronous); ``current_device()`` names the
    CPU so Megatron's allocations land there; the device RNG is the host RNG (so Megatron's
    RNG tracker forks it). Anything else falls through to ``torch.cuda``.
    """

    def __init__(self) -> None:
        super().__init__(
            Stream=lambda *a, **k: _HostStream(),
            Event=_HostEvent,
            current_stream=lambda *a, **k: _HOST_STREAM,
            default_stream=lambda *a, **k: _HOST_STREAM,
            stream=lambda s=None: contextlib.nullcontext(),
            current_device=lambda: "cpu",
            synchronize=lambda *a, **k: None,
            is_current_stream_capturing=lambda: False,
            is_available=lambda: False,
            get_rng_state=lambda *a, **k: torch.get_rng_state(),
            set_rng_state=lambda state, *a, **k: torch.set_rng_state(state),
            manual_seed=torch.manual_seed,
            manual_seed_all=torch.manual_seed,
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


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


def accelerator_shim(device: DeviceChoice) -> Any:
    """What ``torch.cuda`` must mean inside Megatron on this device."""
    if device.type == "cpu":
        return HostCudaShim()
    if device.type == "npu":
        return torch.npu  # registered by torch_npu; same API surface as torch.cuda
    return torch.cuda


# --------------------------------------------------------------------------------------------
# Replacement functions
# --------------------------------------------------------------------------------------------


def maybe_move_tensor_to_cpu(tensor: Any, as_numpy: bool = False, record_stream: bool = False):
    """Device-agnostic ``moe_utils.maybe_move_tensor_to_cpu``.

    Megatron's version only moves CUDA tensors and honours ``as_numpy`` only for them, so on the
    CPU the alltoall dispatcher's split sizes stay tensors and ``all_to_all_single`` rejects
    them; on NPU (``is_cuda`` is False) nothing moves at all.
    """
    if not torch.is_tensor(tensor):
        return tensor
    if tensor.device.type != "cpu":
        cpu_tensor = tensor.to("cpu", non_blocking=True)
        if record_stream:
            tensor.record_stream(torch.accelerator.current_stream(tensor.device))
        tensor = cpu_tensor
    return tensor.numpy() if as_numpy else tensor


def _eager_original(target: str) -> Callable[[DeviceChoice], Callable]:
    """A ``make`` that returns the uncompiled function behind a ``@jit_fuser`` target."""

    def make(device: DeviceChoice) -> Callable:
        obj = _resolve(target)
        return getattr(obj, "_torchdynamo_orig_callable", obj)

    return make


def _host_get_rng_state(device="cuda", clone=False, graph_safe=False) -> torch.Tensor:
    """``random._get_cuda_rng_state`` on the CPU: the host generator's state."""
    return torch.get_rng_state()


def _host_set_rng_state(new_state: torch.Tensor, device=-1, graph_safe=False) -> None:
    """``random._set_cuda_rng_state`` on the CPU: set the host generator's state."""
    torch.set_rng_state(new_state)


def _resolve(target: str) -> Any:
    module, attrs = _split_module(target)
    obj: Any = module
    for name in attrs:
        obj = getattr(obj, name)
    return obj


def _with_locmoe_args(device: DeviceChoice) -> Callable:
    """``add_megatron_arguments`` that also adds the LocMoE flags."""
    original = _resolve("megatron.training.arguments.add_megatron_arguments")

    @functools.wraps(original)
    def add_megatron_arguments(parser):
        from megatron_locmoe.arguments import add_locmoe_args, mend_help_strings

        parser = original(parser)
        mend_help_strings(parser)
        return add_locmoe_args(parser)

    return add_megatron_arguments


def _validating_locmoe_args(device: DeviceChoice) -> Callable:
    """``validate_args`` that also validates the LocMoE flags against Megatron's."""
    original = _resolve("megatron.training.arguments.validate_args")

    @functools.wraps(original)
    def validate_args(args, defaults={}):  # noqa: B006 - Megatron's signature
        args = original(args, defaults) or args
        from megatron_locmoe.arguments import validate_locmoe_args

        validate_locmoe_args(args)
        return args

    return validate_args


def _config_with_locmoe(target: str) -> Callable:
    """``core_transformer_config_from_args`` that attaches ``config.locmoe`` (LocMoEConfig)."""
    original = _resolve(target)

    @functools.wraps(original)
    def core_transformer_config_from_args(args, config_class=None):
        from megatron_locmoe.arguments import locmoe_config_from_args

        config = original(args, config_class)
        if hasattr(args, "moe_router_type"):
            config.locmoe = locmoe_config_from_args(args)
        return config

    return core_transformer_config_from_args


def _gpt_config_with_plugin_spec(device: DeviceChoice) -> Callable:
    """``gpt_config_from_args`` whose GPTModelConfig uses the plugin's spec and hook."""
    original = _resolve("megatron.training.argument_utils.gpt_config_from_args")

    @functools.wraps(original)
    def gpt_config_from_args(args, *a, **k):
        from megatron_locmoe.spec import configure_gpt_model_config

        return configure_gpt_model_config(original(args, *a, **k))

    return gpt_config_from_args


def _compile_helpers_once_built(device: DeviceChoice) -> Callable[[], None]:
    """``compile_helpers`` that skips ``make`` when the prebuilt extension imports."""
    original = _resolve("megatron.core.datasets.utils.compile_helpers")

    @functools.wraps(original)
    def compile_helpers() -> None:
        try:
            importlib.import_module("megatron.core.datasets.helpers_cpp")
        except ImportError:
            original()

    return compile_helpers


def causal_mask_factory(device: DeviceChoice) -> Callable[[int], torch.Tensor]:
    """``transformer.utils.get_default_causal_mask`` on this process's device (cached).

    An index-less device ("npu") means the current device, as Megatron's "cuda" literal does,
    so every rank gets its mask on its own accelerator."""
    target = torch.device(device.type)

    @functools.lru_cache(maxsize=32)
    def get_default_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, device=target), diagonal=1).bool()

    return get_default_causal_mask


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------


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


REGISTRY = PatchRegistry()

_ACCELERATOR_CALLS = {
    "megatron.core.transformer.moe.token_dispatcher": (
        "MoEAlltoAllTokenDispatcher creates torch.cuda.Stream() in __init__ and uses "
        "current_stream/stream/record_event for its device-to-host copies of split sizes."
    ),
    "megatron.core.transformer.moe.router": (
        "Router.gating moves the CPU-allocated gate weight to torch.cuda.current_device(); "
        "TopKRouter allocates its expert-bias and aux-loss buffers there."
    ),
    "megatron.core.tensor_parallel.mappings": (
        "the all-gather, reduce-scatter and uneven all-to-all used by every stock dispatcher "
        "allocate their outputs on torch.cuda.current_device()."
    ),
    "megatron.core.tensor_parallel.random": (
        "the RNG tracker (model_parallel_cuda_manual_seed, CudaRNGStatesTracker.add/fork, used "
        "by attention dropout) seeds and reads torch.cuda's generator."
    ),
    "megatron.core.utils": (
        "GlobalMemoryBuffer.get_tensor (the sequence-parallel all-gather buffer) allocates on "
        "torch.cuda.current_device()."
    ),
    "megatron.core.tensor_parallel.layers": (
        "sequence-parallel linear layers allocate their all-gather buffers on "
        "torch.cuda.current_device()."
    ),
    "megatron.core.dist_checkpointing.strategies.filesystem_async": (
        "FileSystemWriterAsync.preload_tensors (every torch_dist save, sync or async) calls "
        "torch.cuda.synchronize() after staging tensors to the host."
    ),
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": (
        "save_state_dict_async_finalize all-reduces its write-failure flag from a tensor on "
        "torch.cuda.current_device() (every torch_dist save). Not adapted: the fully-parallel "
        "wrappers and exchange_utils (device='cuda' literals), unused by the default strategy."
    ),
}

for _module, _why in _ACCELERATOR_CALLS.items():
    REGISTRY.register(Patch(target=f"{_module}.torch.cuda", why=_why, make=accelerator_shim))

for _name, _fn in (
    ("_get_cuda_rng_state", _host_get_rng_state),
    ("_set_cuda_rng_state", _host_set_rng_state),
):
    REGISTRY.register(
        Patch(
            target=f"megatron.core.tensor_parallel.random.{_name}",
            why=(
                "reads/writes torch.cuda.default_generators through torch.cuda._lazy_call, "
                "bound at import; on the CPU the tracker forks the host generator instead."
            ),
            make=lambda device, fn=_fn: fn,
            devices=frozenset({"cpu"}),
        )
    )

REGISTRY.register(
    Patch(
        target="megatron.core.fusions.fused_softmax.get_default_causal_mask",
        why=(
            "transformer.utils.get_default_causal_mask builds the causal mask with "
            "device='cuda' (a literal), used by the local attention softmax when no mask is "
            "given. Bound by name in fused_softmax, so it is replaced there."
        ),
        make=causal_mask_factory,
    )
)


def _no_cuda_arch() -> int:
    """Not a CUDA architecture: 0 is below every arch Megatron tests for (8 Ampere, 9 Hopper,
    10 Blackwell), so its pre-Blackwell rules (CUDA_DEVICE_MAX_CONNECTIONS=1 with TP/CP > 1)
    apply, as the launcher sets them."""
    return 0


REGISTRY.register(
    Patch(
        target="megatron.training.arguments.get_device_arch_version",
        why=(
            "validate_args reads torch.cuda.get_device_properties('cuda:0').major whenever "
            "TP or CP > 1: no CUDA device on a CPU rank, and NPU properties (through "
            "transfer_to_npu) need not have .major. Bound by name in arguments."
        ),
        make=lambda device: _no_cuda_arch,
    )
)

REGISTRY.register(
    Patch(
        target="megatron.core.transformer.moe.token_dispatcher.maybe_move_tensor_to_cpu",
        why=(
            "moe_utils.maybe_move_tensor_to_cpu only handles CUDA tensors: on the CPU the split "
            "sizes stay tensors (all_to_all_single raises TypeError), on NPU they never move. "
            "Bound by name in token_dispatcher, so it is replaced there."
        ),
        make=lambda device: maybe_move_tensor_to_cpu,
    )
)


# megatron.core.jit.jit_fuser is torch.compile, bound when megatron.core is imported (before any
# patch can run). On the CPU, inductor would build C++ kernels at the first call of each fused
# function, tens of seconds per process; the eager function is the same math.
_COMPILED_ON_MOE_PATH = ("megatron.core.transformer.moe.router.TopKRouter._apply_expert_bias",)
for _target in _COMPILED_ON_MOE_PATH:
    REGISTRY.register(
        Patch(
            target=_target,
            why="@jit_fuser (torch.compile) on the CPU compiles C++ at first call; run it eagerly.",
            make=_eager_original(_target),
            devices=frozenset({"cpu"}),
        )
    )


# ---- Megatron's training side: flags, validation, config (every device) ----------------------
ALL_DEVICES = frozenset({"cpu", "cuda", "npu"})
REGISTRY.register(
    Patch(
        target="megatron.training.arguments.add_megatron_arguments",
        why=(
            "adds --moe-router-type and the --locmoe-* flags to Megatron's own parser, so every "
            "entry point (pretrain_gpt.py, the plugin's runners) accepts them; looked up at call "
            "time by parse_args. Also escapes the bare '%' in Megatron's help of "
            "--moe-paged-stash-buffer-size-factor-cuda, which makes --help crash."
        ),
        make=_with_locmoe_args,
        devices=ALL_DEVICES,
    )
)
REGISTRY.register(
    Patch(
        target="megatron.training.arguments.validate_args",
        why=(
            "checks the plugin flags against Megatron's (dispatcher, parallel layout, recompute) "
            "at parse time; looked up at call time by parse_and_validate_args."
        ),
        make=_validating_locmoe_args,
        devices=ALL_DEVICES,
    )
)
for _module in ("megatron.training.argument_utils", "megatron.training.arguments"):
    REGISTRY.register(
        Patch(
            target=f"{_module}.core_transformer_config_from_args",
            why=(
                "puts the parsed LocMoEConfig on the TransformerConfig (config.locmoe) for the "
                "layer spec; a TransformerConfig subclass would be replaced for MLA models."
            ),
            make=lambda device, t=f"{_module}.core_transformer_config_from_args": (
                _config_with_locmoe(t)
            ),
            devices=ALL_DEVICES,
        )
    )

REGISTRY.register(
    Patch(
        target="megatron.training.argument_utils.gpt_config_from_args",
        why=(
            "points the GPTModelConfig at megatron_locmoe.spec.locmoe_block_spec and adds the "
            "pre-wrap hook that checks the plugin's layers are in the model; pretrain_gpt.py "
            "binds this name at import, after the adaptor is applied."
        ),
        make=_gpt_config_with_plugin_spec,
        devices=ALL_DEVICES,
    )
)

REGISTRY.register(
    Patch(
        target="megatron.core.datasets.utils.compile_helpers",
        why=(
            "megatron.training runs `make` in the datasets folder at start-up; the wheel ships "
            "the built helpers_cpp extension but no Makefile, so make fails and the job exits. "
            "Build only when the extension does not import (a source checkout)."
        ),
        make=_compile_helpers_once_built,
        devices=ALL_DEVICES,
    )
)


def apply(device: DeviceChoice | None = None) -> list[str]:
    """Apply the plugin's Megatron patches for this process's device and install the metrics
    tracker that reports the plugin's metrics (idempotent)."""
    applied = REGISTRY.apply(device)
    from megatron_locmoe.metrics import install_metrics_tracker

    install_metrics_tracker()
    return applied


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print every registered patch")
    args = parser.parse_args(argv)
    del args  # --list is the only action
    print(REGISTRY.describe())


if __name__ == "__main__":
    main()
