"""Layer specs: Megatron's GPT decoder block with the plugin's MoE layers swapped in.

``locmoe_block_spec`` is the callable that Megatron's GPTModelBuilder calls for
``GPTModelConfig.transformer_layer_spec`` (also reachable as
``--spec megatron_locmoe.spec locmoe_block_spec``). Every rank calls it once per model chunk,
after the parallel state exists, so it is where the topology's subgroups are created (a
collective). ``configure_gpt_model_config`` sets it on a model config and adds the pre-wrap
hook that proves the plugin's layers are in the model (Megatron's ``--spec`` import returns
None on an ImportError and would silently train stock layers) and feeds the hash router.
"""

from __future__ import annotations

import dataclasses
import functools

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_locmoe.attention import with_local_core_attention
from megatron_locmoe.config import LocMoEConfig
from megatron_locmoe.graphs import check_local_cuda_graphs, moe_layer_class
from megatron_locmoe.layer import LocMoELayer, locmoe_mlp_builder
from megatron_locmoe.resolve import Resolution, layer_resolution, summary_fields, summary_text
from megatron_locmoe.routers import attach_token_ids
from megatron_locmoe.routers.hash import load_token_counts
from megatron_locmoe.topology import get_topology
from megatron_locmoe.validation import changes_megatron, validate


def plugin_active(locmoe: LocMoEConfig, transformer_config=None) -> bool:
    """True when the plugin changes anything (default settings keep stock Megatron)."""
    return changes_megatron(locmoe, bool(getattr(transformer_config, "moe_grouped_gemm", False)))


def padded_vocab(model_config) -> int:
    """Every id the embedding can see: the vocabulary padded as GPTModelBuilder pads it."""
    from megatron.training.vocab_utils import calculate_padded_vocab_size

    vocab = model_config.vocab_size
    if not getattr(model_config, "should_pad_vocab", False):
        return vocab
    return calculate_padded_vocab_size(
        vocab,
        model_config.make_vocab_size_divisible_by,
        model_config.transformer.tensor_model_parallel_size,
        logging_enabled=False,
    )


def with_locmoe_layers(
    block_spec,
    locmoe: LocMoEConfig | Resolution,
    vocab_size=None,
    token_counts=None,
    layer_class: type | None = None,
):
    """A copy of a decoder block spec whose MoE layers are LocMoELayers (others untouched),
    built as ``layer_class`` when given (``moe_layer_class``) in place of TransformerLayer.

    Megatron reuses one MoE layer spec for every MoE layer, so specs are copied, never
    modified in place."""
    layer_specs = []
    for layer_spec in block_spec.layer_specs:
        mlp = getattr(layer_spec.submodules, "mlp", None)
        if (
            isinstance(mlp, functools.partial)
            and isinstance(mlp.func, type)
            and issubclass(mlp.func, MoELayer)
        ):
            new_mlp = locmoe_mlp_builder(mlp, locmoe, vocab_size, token_counts)
            layer_spec = dataclasses.replace(
                layer_spec, submodules=dataclasses.replace(layer_spec.submodules, mlp=new_mlp)
            )
            if layer_class is not None and layer_spec.module is TransformerLayer:
                layer_spec = dataclasses.replace(layer_spec, module=layer_class)
        layer_specs.append(layer_spec)
    return dataclasses.replace(block_spec, layer_specs=layer_specs)


def locmoe_block_spec(model_config, vp_stage=None):
    """GPTModelConfig.transformer_layer_spec: the stock block spec with the plugin's MoE layers."""
    cfg = model_config.transformer
    locmoe = getattr(cfg, "locmoe", None) or LocMoEConfig()
    block = get_gpt_decoder_block_spec(
        cfg,
        use_transformer_engine=cfg.transformer_impl == "transformer_engine",
        normalization=cfg.normalization,
        qk_l2_norm=cfg.qk_l2_norm,
        vp_stage=vp_stage,
    )
    # local spec: CP > 1, or --locmoe-attention sdpa
    block = with_local_core_attention(block, cfg, locmoe.attention)
    if not plugin_active(locmoe, cfg):
        return block
    check_local_cuda_graphs(cfg)
    # collective on first call; then cached (a virtual cluster is one process: one device)
    topology = get_topology(1 if locmoe.virtual_cluster else locmoe.devices_per_node)
    resolution = layer_resolution(validate(locmoe, cfg), cfg)  # once, for every MoE layer
    announce(resolution, cfg, topology)
    vocab = padded_vocab(model_config)
    return with_locmoe_layers(
        block, resolution, vocab, _token_counts(locmoe, vocab), moe_layer_class(cfg)
    )


_ANNOUNCED: set[str] = set()


def announce(resolution, transformer_config, topology) -> str:
    """Print what the plugin does once per process on global rank 0 (every model chunk calls
    the spec), and put it in the run's TensorBoard text and W&B config where those exist."""
    import torch.distributed as dist

    text = summary_text(resolution, transformer_config, topology)
    if text in _ANNOUNCED or (dist.is_initialized() and dist.get_rank() != 0):
        return text
    _ANNOUNCED.add(text)
    print(text, flush=True)
    try:
        from megatron.training.global_vars import get_tensorboard_writer, get_wandb_writer
    except ImportError:  # megatron.training is optional for megatron-core users
        return text
    writer = get_tensorboard_writer()
    if writer is not None:
        writer.add_text("locmoe", "<pre>" + text + "</pre>")
    wandb = get_wandb_writer()
    if wandb is not None:
        wandb.config.update(
            {"locmoe": summary_fields(resolution, transformer_config, topology)},
            allow_val_change=True,
        )
    return text


def _token_counts(locmoe: LocMoEConfig, vocab_size: int):
    """Corpus token counts for the hash router, padded with zeros to the model's vocabulary."""
    if not locmoe.hash_token_counts:  # only routers that read it take it (validation)
        return None
    import numpy as np
    import torch

    counts = load_token_counts(locmoe.hash_token_counts, vocab_size)
    return torch.from_numpy(np.pad(counts, (0, vocab_size - counts.size)))


def check_and_connect(models: list) -> list:
    """Pre-wrap hook: every MoE layer is the plugin's, and hash routers get the input ids."""
    for model in models:
        moe = [m for m in model.modules() if isinstance(m, MoELayer)]
        stock = [m for m in moe if not isinstance(m, LocMoELayer)]
        if stock:
            raise RuntimeError(
                f"{len(stock)} of {len(moe)} MoE layers are Megatron's own, not the plugin's: "
                "the layer spec did not take effect (a --spec import error is silently ignored "
                "by Megatron); check that megatron_locmoe imports on every rank"
            )
        attach_token_ids(model)
    return models


def configure_gpt_model_config(model_config):
    """Point a GPTModelConfig at the plugin's spec and hook, when the plugin is active."""
    locmoe = getattr(model_config.transformer, "locmoe", None)
    if locmoe is None or not plugin_active(locmoe, model_config.transformer):
        return model_config
    if model_config.transformer_layer_spec not in (None, locmoe_block_spec):
        raise ValueError(
            "--moe-router-type/--locmoe-dispatcher build their own layer spec; remove --spec "
            f"(got {model_config.transformer_layer_spec!r})"
        )
    model_config.transformer_layer_spec = locmoe_block_spec
    if check_and_connect not in model_config.pre_wrap_hooks:
        model_config.pre_wrap_hooks.append(check_and_connect)
    return model_config
