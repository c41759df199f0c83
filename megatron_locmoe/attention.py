"""Core attentions for the local spec (any device, any backend): context-parallel, and SDPA.

Megatron's local ``DotProductAttention`` refuses ``context_parallel_size > 1`` (only TE's
attention has CP), so without Transformer Engine (CPU, NPU) CP could not build. Here each CP
rank keeps its queries, all-gathers keys and values over the CP group (the gradient is
reduce-scattered back: ``all_gather_v``'s backward), puts them in sequence order, and runs
Megatron's own attention math with the causal mask of its load-balanced split.

Megatron's split (``get_batch_on_this_cp_rank``, and RoPE's ``get_pos_emb_on_this_cp_rank``)
cuts a sequence of S tokens into 2 x cp chunks of C = S / (2 cp) and gives CP rank r the chunks
r and 2 cp - 1 - r, in that order: with cp = 2, rank 0 holds positions [0, C) + [3C, 4C), rank 1
[C, 2C) + [2C, 3C). Shapes below: s = S / cp local tokens, b batch, n heads, d head size.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from megatron_locmoe.config import ConfigError, sdpa_attention_unsupported
from megatron_locmoe.dispatch.collectives import all_gather_v, reorder_chunks


def cp_chunk_order(cp_size: int) -> list[int]:
    """Where sequence chunk j sits among the gathered chunks: rank r sends (r, 2 cp - 1 - r),
    so the gathered list is [0, 2cp-1, 1, 2cp-2, ...]; ``order[j]`` is chunk j's index there."""
    return [2 * j if j < cp_size else 2 * (2 * cp_size - 1 - j) + 1 for j in range(2 * cp_size)]


def cp_positions(local_len: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """Sequence positions [s] of this CP rank's ``local_len`` tokens (chunks r, 2 cp - 1 - r)."""
    c = local_len // 2
    chunk = torch.arange(c, device=device)
    return torch.cat([cp_rank * c + chunk, (2 * cp_size - 1 - cp_rank) * c + chunk])


@functools.lru_cache(maxsize=8)
def cp_causal_mask(local_len: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """[1, 1, s, S] bool, True where query i may not see key k (Megatron's convention): the
    key lies after the query in the sequence; keys in sequence order. Built once per shape,
    not per layer and micro-batch (read only)."""
    q_pos_s = cp_positions(local_len, cp_size, cp_rank, device)
    k_pos_S = torch.arange(local_len * cp_size, device=device)
    return (k_pos_S[None, :] > q_pos_s[:, None]).view(1, 1, local_len, -1)


def gather_sequence(x_sbh: torch.Tensor, cp_group) -> torch.Tensor:
    """[s, ...] on every CP rank -> [S, ...] in sequence order (differentiable: the backward
    sums every rank's gradient of this rank's chunks, a reduce-scatter)."""
    cp_size = cp_group.size()
    s = x_sbh.shape[0]
    if s % 2:
        raise ValueError(f"{s} local tokens do not split into 2 chunks per CP rank")
    gathered = all_gather_v(x_sbh, cp_group, [s] * cp_size)
    return reorder_chunks(gathered, [s // 2] * (2 * cp_size), cp_chunk_order(cp_size))


class ContextParallelDotProductAttention(DotProductAttention):
    """Megatron's local DotProductAttention over a context-parallel split sequence.

    Queries stay local ([s, b, n, d]); keys and values are gathered to [S, b, n_kv, d] in
    sequence order; the causal mask is this rank's rows of the full sequence's. An attention
    mask from the data ([b, 1, s, S]: Megatron's CP split cuts the query dimension of the
    dataset's mask and keeps the keys in sequence order) is used as given, as the parent does.
    Every ``cp_comm_type`` gathers (the math is the same as TE's p2p / a2a)."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, *args, **kwargs):
        # the parent asserts CP 1; it reads nothing else from the CP size
        single = copy.copy(config)
        single.context_parallel_size = 1
        super().__init__(single, layer_number, attn_mask_type, attention_type, *args, **kwargs)
        self.config = config
        if self.scale_mask_softmax.window_size is not None:
            raise ValueError("sliding-window attention with context parallelism needs TE")
        # always pass an explicit mask: no fused upper-triangular kernel, no square default mask
        self.scale_mask_softmax.attn_mask_type = AttnMaskType.arbitrary
        cp_group = getattr(kwargs.get("pg_collection"), "cp", None)
        self.cp_group = (
            cp_group if cp_group is not None else (parallel_state.get_context_parallel_group())
        )

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, **kwargs):
        cp_size = self.cp_group.size()
        if cp_size == 1:
            kv = (key, value)
        else:
            kv_sbnd = gather_sequence(torch.cat([key, value], dim=-1), self.cp_group)
            kv = kv_sbnd.split([key.shape[-1], value.shape[-1]], dim=-1)
        mask_type = attn_mask_type or self.attn_mask_type
        if attention_mask is None and mask_type == AttnMaskType.causal:
            attention_mask = cp_causal_mask(
                query.shape[0], cp_size, self.cp_group.rank(), query.device
            )
        return super().forward(
            query,
            kv[0].contiguous(),
            kv[1].contiguous(),
            attention_mask,
            attn_mask_type=mask_type,
            **kwargs,
        )


class SDPAttention(DotProductAttention):
    """Megatron's local core attention computed by ``torch.nn.functional.
    scaled_dot_product_attention``: the same function of query, key and value (scale, causal
    mask, grouped-query heads, attention dropout under Megatron's RNG tracker), without the
    [b, n, s, s] scores in memory where the device has a fused kernel (flash, cuDNN or
    memory-efficient attention on CUDA; the math fallback elsewhere).

    A causal layer masks by position, as TE's attention does with a causal mask type: the mask
    the data loader passes is the causal one unless --reset-attention-mask, which the plugin's
    arguments refuse with this attention. A layer of another mask type uses the mask it is given
    (Megatron's convention: True = masked)."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, *args, **kwargs):
        refused = sdpa_attention_unsupported(config)
        if refused:
            raise ConfigError(
                f"--locmoe-attention sdpa does not run with {', '.join(refused)}: "
                "drop --locmoe-attention sdpa"
            )
        super().__init__(config, layer_number, attn_mask_type, attention_type, *args, **kwargs)
        # the parent divides its scale by the layer number for query-key layer scaling and
        # multiplies the scores by it again in the softmax: the net scale is the unscaled one
        layer_scaling = self.layer_number if config.apply_query_key_layer_scaling else 1
        self.sdpa_scale = self.softmax_scale * layer_scaling

    def forward(
        self,
        query,
        key,
        value,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
        **kwargs,
    ):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError(
                "--locmoe-attention sdpa takes neither packed sequences nor an attention bias "
                "(as Megatron's local attention): use --transformer-impl transformer_engine"
            )
        sq, b = query.shape[:2]
        causal = (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal
        if causal and key.shape[0] != sq:
            raise ValueError(
                f"causal SDPA attention over {sq} queries and {key.shape[0]} keys (a KV cache): "
                "--locmoe-attention sdpa is for training; use Megatron's attention to infer"
            )
        mask = None if causal or attention_mask is None else ~attention_mask
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, n, s, d]
        dropout = self.attention_dropout.p if self.training else 0.0
        rng = (
            tensor_parallel.get_cuda_rng_tracker().fork()
            if dropout and not self.config.sequence_parallel
            else contextlib.nullcontext()
        )
        with rng:
            context = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=dropout,
                is_causal=causal,
                scale=self.sdpa_scale,
                enable_gqa=q.shape[1] != k.shape[1],
            )
        # [b, n, sq, d] -> [sq, b, n * d]
        return context.permute(2, 0, 1, 3).reshape(sq, b, -1)


def _with_core_attention(block_spec, attention_class):
    """A copy of a decoder block spec whose local DotProductAttention is ``attention_class``."""
    layer_specs = []
    for layer_spec in block_spec.layer_specs:
        attn = getattr(layer_spec.submodules, "self_attention", None)
        sub = getattr(attn, "submodules", None)
        if getattr(sub, "core_attention", None) is DotProductAttention:
            sub = dataclasses.replace(sub, core_attention=attention_class)
            attn = dataclasses.replace(attn, submodules=sub)
            layer_spec = dataclasses.replace(
                layer_spec,
                submodules=dataclasses.replace(layer_spec.submodules, self_attention=attn),
            )
        layer_specs.append(layer_spec)
    return dataclasses.replace(block_spec, layer_specs=layer_specs)


def with_local_core_attention(block_spec, config, attention: str = "megatron"):
    """A copy of a decoder block spec with the local spec's core attention the run needs: the
    CP one when ``config`` has CP > 1, SDPA with ``attention == "sdpa"`` (TE's own attention,
    which has both, is left alone); else unchanged."""
    if config.context_parallel_size > 1:
        return _with_core_attention(block_spec, ContextParallelDotProductAttention)
    if attention == "sdpa":
        return _with_core_attention(block_spec, SDPAttention)
    return block_spec
