"""What Megatron-Core's CUDA calls mean on the CPU and on Ascend NPUs.

Megatron-Core's MoE path calls ``torch.cuda`` directly (streams, events, ``current_device()``
for allocations). On CUDA nothing is replaced. On the CPU (simulated clusters, tests) and on
NPU, the affected Megatron modules see a device shim in place of ``torch.cuda`` (no-op streams
on the CPU, ``torch.npu`` on NPU), and a few functions that hard-code CUDA get device-agnostic
versions. ``patches.py`` says where each one goes.
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Callable
from typing import Any

import torch

from megatron_locmoe.adaptor.registry import resolve
from megatron_locmoe.device import DeviceChoice


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


def accelerator_shim(device: DeviceChoice) -> Any:
    """What ``torch.cuda`` must mean inside Megatron on this device."""
    if device.type == "cpu":
        return HostCudaShim()
    if device.type == "npu":
        return torch.npu  # registered by torch_npu; same API surface as torch.cuda
    return torch.cuda


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


def eager_original(target: str) -> Callable[[DeviceChoice], Callable]:
    """A ``make`` that returns the uncompiled function behind a ``@jit_fuser`` target."""

    def make(device: DeviceChoice) -> Callable:
        obj = resolve(target)
        return getattr(obj, "_torchdynamo_orig_callable", obj)

    return make


def host_get_rng_state(device="cuda", clone=False, graph_safe=False) -> torch.Tensor:
    """``random._get_cuda_rng_state`` on the CPU: the host generator's state."""
    return torch.get_rng_state()


def host_set_rng_state(new_state: torch.Tensor, device=-1, graph_safe=False) -> None:
    """``random._set_cuda_rng_state`` on the CPU: set the host generator's state."""
    torch.set_rng_state(new_state)


def causal_mask_factory(device: DeviceChoice) -> Callable[[int], torch.Tensor]:
    """``transformer.utils.get_default_causal_mask`` on this process's device (cached).

    An index-less device ("npu") means the current device, as Megatron's "cuda" literal does,
    so every rank gets its mask on its own accelerator."""
    target = torch.device(device.type)

    @functools.lru_cache(maxsize=32)
    def get_default_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, device=target), diagonal=1).bool()

    return get_default_causal_mask


def no_cuda_arch() -> int:
    """Not a CUDA architecture: 0 is below every arch Megatron tests for (8 Ampere, 9 Hopper,
    10 Blackwell), so its pre-Blackwell rules (CUDA_DEVICE_MAX_CONNECTIONS=1 with TP/CP > 1)
    apply, as the launcher sets them."""
    return 0


def device_literal_factory(name: str) -> Callable[[DeviceChoice], Callable]:
    """A ``make`` for ``torch.<name>`` (a factory such as ``zeros``) inside one Megatron module
    that reads the literal ``device="cuda"`` as this process's device, as a CUDA process reads
    it as its current device; other devices pass through."""

    def make(device: DeviceChoice) -> Callable:
        factory = getattr(torch, name)
        target = torch.device(device.type)

        @functools.wraps(factory)
        def on_this_device(*args: Any, device: Any = None, **kwargs: Any) -> torch.Tensor:
            if device == "cuda":
                device = target
            return factory(*args, device=device, **kwargs)

        return on_this_device

    return make


_TIED_SETUP = (
    "megatron.core.models.common.language_module.language_module.LanguageModule"
    ".setup_embeddings_and_output_layer"
)


def tied_embedding_setup_on_host(device: DeviceChoice) -> Callable:
    """``LanguageModule.setup_embeddings_and_output_layer`` without its ``weight.data.cuda()``.

    The original runs with ``init_model_with_meta_device`` set for the call, which skips only
    its final copy-to-GPU and all-reduce; that all-reduce (the first stage's embedding into the
    last stage's zeroed copy over the embedding group) then runs here on the CPU weight."""
    import torch.distributed as dist

    original = resolve(_TIED_SETUP)

    @functools.wraps(original)
    def setup_embeddings_and_output_layer(self) -> None:
        config = self.config
        on_meta = config.init_model_with_meta_device
        config.init_model_with_meta_device = True
        try:
            original(self)
        finally:
            config.init_model_with_meta_device = on_meta
        tied = self.share_embeddings_and_output_weights or getattr(config, "mtp_num_layers", 0)
        if (
            tied
            and config.pipeline_model_parallel_size > 1
            and not on_meta
            and dist.is_initialized()
            and self._is_in_embd_group()
        ):
            dist.all_reduce(self.shared_embedding_or_output_weight().data, group=self.embd_group)

    return setup_embeddings_and_output_layer


_TORCH_NORM_NEW = "megatron.core.transformer.torch_norm.WrappedTorchNorm.__new__"


def torch_norm_with_sequence_parallel(device: DeviceChoice) -> Callable:
    """``WrappedTorchNorm.__new__`` that accepts sequence parallelism (the original asserts it
    off). A norm is per token, so on a sequence shard it is the same math; only its weights'
    gradients, partial sums over each TP rank's tokens, need a sum over the TP group, which
    Megatron's finalize_model_grads (and the CPU loop) gives params marked sequence_parallel,
    as TE's and Megatron's fused norms mark them."""
    import copy

    original = resolve(_TORCH_NORM_NEW)

    def __new__(cls, config, hidden_size, *args, **kwargs):
        if not config.sequence_parallel:
            return original(cls, config, hidden_size, *args, **kwargs)
        plain = copy.copy(config)
        plain.sequence_parallel = False
        norm = original(cls, plain, hidden_size, *args, **kwargs)
        for p in norm.parameters():
            p.sequence_parallel = True
        return norm

    return __new__


def pos_emb_on_this_cp_rank(pos_emb: torch.Tensor, seq_dim: int, cp_group) -> torch.Tensor:
    """``rope_utils.get_pos_emb_on_this_cp_rank`` on the embedding's own device.

    Megatron's builds its chunk index in pinned host memory and copies it with ``.cuda()``,
    which fails without CUDA; RoPE (and YaRN) under context parallelism must keep the rows of
    exactly the positions that ``get_batch_on_this_cp_rank`` gave this rank's tokens, so the
    rows come from the plugin's one statement of that split, ``attention.cp_positions``."""
    # the shims are applied before Megatron's modules load; attention imports them
    from megatron_locmoe.attention import cp_positions

    if cp_group is None:
        raise ValueError("cp_group must be provided to get positional embedding per CP rank")
    cp_size, cp_rank = cp_group.size(), cp_group.rank()
    seq_len = pos_emb.shape[seq_dim]
    if seq_len % (2 * cp_size):
        raise ValueError(
            f"a rotary embedding of {seq_len} positions does not split into 2 x CP "
            f"{cp_size} equal chunks: make the sequence length a multiple of {2 * cp_size}"
        )
    rows = cp_positions(seq_len // cp_size, cp_size, cp_rank, pos_emb.device)
    return pos_emb.index_select(seq_dim, rows)


WRITE_ERRORS: list[OSError] = []
"""OS errors of this process's torch_dist file writes, each with the file's path, oldest first
(Megatron's writer reports only the error's class: ``Worker failure ... <class 'OSError'>``).
Whoever saves clears it first and reads it when the save fails (``sim.checkpoint.save``)."""


def recording_write_errors(target: str) -> Callable[[DeviceChoice], Callable]:
    """A ``make`` for FileSystemWriterAsync.write_preloaded_data: the same write, and an error
    it returns (as ``(worker, error)``: an OSError, or torch's zip writer's RuntimeError, which
    hides the OS error's text) also kept in ``WRITE_ERRORS`` with the file's path."""

    def make(device: DeviceChoice) -> Callable:
        original = resolve(target)

        def write_preloaded_data(transform_list, *args, **kwargs):
            out = original(transform_list, *args, **kwargs)
            error = out[1] if isinstance(out, tuple) and len(out) == 2 else None
            if isinstance(error, Exception):  # OSError, or torch's writer's RuntimeError
                bucket = kwargs.get("write_bucket")
                where = getattr(error, "filename", None) or (bucket[0] if bucket else None)
                if isinstance(error, OSError):
                    WRITE_ERRORS.append(OSError(error.errno, error.strerror, where))
                else:
                    text = (str(error).strip().splitlines() or [type(error).__name__])[-1]
                    WRITE_ERRORS.append(OSError(None, text.strip(), where))
            return out

        return staticmethod(write_preloaded_data)

    return make
