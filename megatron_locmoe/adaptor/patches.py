"""Every patch the plugin registers: the device shims where Megatron hard-codes CUDA, and the
training side (flags, validation, config, spec) on every device.

``apply()`` installs the patches that fit this process's device; ``python -m
megatron_locmoe.adaptor --list`` prints them.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import queue
from collections.abc import Callable

from megatron_locmoe.adaptor.registry import (
    REGISTRY,
    Patch,
    installed_megatron,
    resolve,
    untested_megatron_note,
)
from megatron_locmoe.adaptor.shims import (
    accelerator_shim,
    causal_mask_factory,
    device_literal_factory,
    eager_original,
    host_get_rng_state,
    host_set_rng_state,
    maybe_move_tensor_to_cpu,
    no_cuda_arch,
    pos_emb_on_this_cp_rank,
    recording_write_errors,
    tied_embedding_setup_on_host,
    torch_norm_with_sequence_parallel,
)
from megatron_locmoe.device import DeviceChoice

logger = logging.getLogger(__name__)

# ---- replacements of Megatron's training-side functions -------------------------------------


def _with_locmoe_args(device: DeviceChoice) -> Callable:
    """``add_megatron_arguments`` that also adds the LocMoE flags."""
    original = resolve("megatron.training.arguments.add_megatron_arguments")

    @functools.wraps(original)
    def add_megatron_arguments(parser):
        # the adaptor sits below the modules it serves (they import Megatron, which it patches first)
        from megatron_locmoe.arguments import add_locmoe_args, mend_help_strings

        parser = original(parser)
        mend_help_strings(parser)
        return add_locmoe_args(parser)

    return add_megatron_arguments


def _validating_locmoe_args(device: DeviceChoice) -> Callable:
    """``validate_args`` that also validates the LocMoE flags against Megatron's."""
    original = resolve("megatron.training.arguments.validate_args")

    @functools.wraps(original)
    def validate_args(args, defaults={}):  # noqa: B006 - Megatron's signature
        args = original(args, defaults) or args
        # the adaptor sits below the modules it serves (they import Megatron, which it patches first)
        from megatron_locmoe.arguments import validate_locmoe_args

        validate_locmoe_args(args)
        return args

    return validate_args


def _config_with_locmoe(target: str) -> Callable:
    """``core_transformer_config_from_args`` that attaches ``config.locmoe`` (LocMoEConfig)."""
    original = resolve(target)

    @functools.wraps(original)
    def core_transformer_config_from_args(args, config_class=None):
        # the adaptor sits below the modules it serves (they import Megatron, which it patches first)
        from megatron_locmoe.arguments import locmoe_config_from_args

        config = original(args, config_class)
        if hasattr(args, "moe_router_type"):
            config.locmoe = locmoe_config_from_args(args)
        return config

    return core_transformer_config_from_args


def _gpt_config_with_plugin_spec(device: DeviceChoice) -> Callable:
    """``gpt_config_from_args`` whose GPTModelConfig uses the plugin's spec and hook."""
    original = resolve("megatron.training.argument_utils.gpt_config_from_args")

    @functools.wraps(original)
    def gpt_config_from_args(args, *a, **k):
        # the adaptor sits below the modules it serves (they import Megatron, which it patches first)
        from megatron_locmoe.spec import configure_gpt_model_config

        return configure_gpt_model_config(original(args, *a, **k))

    return gpt_config_from_args


def _compile_helpers_once_built(device: DeviceChoice) -> Callable[[], None]:
    """``compile_helpers`` that skips ``make`` when the prebuilt extension imports."""
    original = resolve("megatron.core.datasets.utils.compile_helpers")

    @functools.wraps(original)
    def compile_helpers() -> None:
        try:
            importlib.import_module("megatron.core.datasets.helpers_cpp")
        except ImportError:
            original()

    return compile_helpers


# ---- the registrations ---------------------------------------------------------------------

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
    "megatron.core.pipeline_parallel.p2p_communication": (
        "P2PCommunicator allocates the tensors it receives from the neighbouring pipeline "
        "stages (and their shapes) on torch.cuda.current_device() and calls "
        "torch.cuda.synchronize() after batched isend/irecv."
    ),
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": (
        "save_state_dict_async_finalize all-reduces its write-failure flag from a tensor on "
        "torch.cuda.current_device() (every torch_dist save). Not adapted: the fully-parallel "
        "wrappers and exchange_utils (device='cuda' literals), unused by the default strategy."
    ),
    "megatron.core.models.common.embeddings.rotary_pos_embedding": (
        "RotaryEmbedding.get_emb (RoPE, and mRoPE's __init__) moves inv_freq to "
        "torch.cuda.current_device() at the first forward: RoPE could not run on the CPU."
    ),
    "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding": (
        "YarnRotaryEmbedding.get_emb moves inv_freq_extra / inv_freq_inter to "
        "torch.cuda.current_device() (already in __init__, which fills its cos/sin cache)."
    ),
}

for _module, _why in _ACCELERATOR_CALLS.items():
    REGISTRY.register(Patch(target=f"{_module}.torch.cuda", why=_why, make=accelerator_shim))

for _name, _fn in (
    ("_get_cuda_rng_state", host_get_rng_state),
    ("_set_cuda_rng_state", host_set_rng_state),
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

REGISTRY.register(
    Patch(
        target="megatron.core.pipeline_parallel.schedules.torch.zeros",
        why=(
            "every forward-backward schedule (no pipelining, 1F1B, interleaved) counts the "
            "micro-batches' tokens in torch.zeros([], device='cuda') (a literal): allocated on "
            "this process's device instead."
        ),
        make=device_literal_factory("zeros"),
    )
)

REGISTRY.register(
    Patch(
        target=(
            "megatron.core.models.common.language_module.language_module.LanguageModule"
            ".setup_embeddings_and_output_layer"
        ),
        why=(
            "with pipeline parallelism and tied embeddings it copies the embedding to the GPU "
            "(weight.data.cuda()) before all-reducing it over the embedding group; on the CPU "
            "the same all-reduce runs on the weight where it lives."
        ),
        make=tied_embedding_setup_on_host,
        devices=frozenset({"cpu"}),
    )
)

REGISTRY.register(
    Patch(
        target="megatron.core.transformer.torch_norm.WrappedTorchNorm.__new__",
        why=(
            "the torch norms of the local spec assert sequence_parallel off, and Megatron "
            "requires sequence parallelism for MoE with TP > 1: without TE (CPU, NPU) TP + "
            "EP could not build. The norm is built as without it and its weights marked "
            "sequence_parallel, so their gradients are summed over the TP group."
        ),
        make=torch_norm_with_sequence_parallel,
    )
)

REGISTRY.register(
    Patch(
        target="megatron.training.arguments.get_device_arch_version",
        why=(
            "validate_args reads torch.cuda.get_device_properties('cuda:0').major whenever "
            "TP or CP > 1: no CUDA device on a CPU rank, and NPU properties (through "
            "transfer_to_npu) need not have .major. Bound by name in arguments."
        ),
        make=lambda device: no_cuda_arch,
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


# RoPE and YaRN under CP: each module binds the name at import, so it is replaced in all three
_ROPE_CP_SPLIT = {
    "megatron.core.models.common.embeddings.rope_utils": "defines it",
    "megatron.core.models.common.embeddings.rotary_pos_embedding": (
        "RotaryEmbedding.forward and MultimodalRotaryEmbedding.forward call it"
    ),
    "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding": (
        "YarnRotaryEmbedding.forward calls it, also from __init__ (its cos/sin cache)"
    ),
}
for _module, _where in _ROPE_CP_SPLIT.items():
    REGISTRY.register(
        Patch(
            target=f"{_module}.get_pos_emb_on_this_cp_rank",
            why=(
                "with context parallelism > 1 the rotary embedding keeps this CP rank's rows "
                "through an index made with torch.tensor(pin_memory=True).cuda(), which fails "
                "without CUDA: the same rows are selected on the embedding's device. "
                f"Bound by name here: {_where}."
            ),
            make=lambda device: pos_emb_on_this_cp_rank,
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
            make=eager_original(_target),
            devices=frozenset({"cpu"}),
        )
    )


# The CPU loop saves synchronously (sim.checkpoint.save): the write runs in the rank itself, so
# the queue it reports through needs no process. Megatron's default is a multiprocessing
# Manager's queue, a server process per rank (~670 MB, forked state) that outlived its rank when
# a scheduler signalled every process, and died on that signal before a final save could use it.
REGISTRY.register(
    Patch(
        target="megatron.core.dist_checkpointing.strategies.filesystem_async._results_queue",
        why=(
            "the write-results queue of torch_dist saves, created on first use as a "
            "multiprocessing Manager (a server process per rank); a synchronous save writes in "
            "the rank itself, so a thread-safe queue.Queue serves, and no process is left behind "
            "or killed by a signal meant for the rank (async saves are refused on the CPU)."
        ),
        make=lambda device: queue.Queue(),
        devices=frozenset({"cpu"}),
    )
)


_WRITE = "megatron.core.dist_checkpointing.strategies.filesystem_async.FileSystemWriterAsync"
REGISTRY.register(
    Patch(
        target=f"{_WRITE}.write_preloaded_data",
        why=(
            "a failed shard write (disk full, quota, permissions) reaches the caller only as "
            "'Worker failure ... error: <class 'OSError'>'; the same write, its OS error also "
            "kept with the file's path (shims.WRITE_ERRORS), so the CPU loop's save names it."
        ),
        make=recording_write_errors(f"{_WRITE}.write_preloaded_data"),
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


_noted_version: list[str] = []


def _note_untested_megatron() -> None:
    """Log once per process which untested Megatron-Core the plugin was applied to."""
    version, line = installed_megatron()
    _noted_version.append(version)
    note = untested_megatron_note(version, line)
    if note is not None:
        logger.warning(note)


def apply(device: DeviceChoice | None = None) -> list[str]:
    """Apply the plugin's Megatron patches for this process's device and install the metrics
    tracker that reports the plugin's metrics (idempotent)."""
    applied = REGISTRY.apply(device)
    if not _noted_version:
        _note_untested_megatron()
    # the adaptor sits below the modules it serves (they import Megatron, which it patches first)
    from megatron_locmoe.metrics import install_metrics_tracker

    install_metrics_tracker()
    return applied


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print every registered patch")
    args = parser.parse_args(argv)
    del args  # --list is the only action
    print(REGISTRY.describe())
