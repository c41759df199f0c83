"""Context-parallel core attention for the local spec (any device, any backend).

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

import copy
import dataclasses
import functools

import torch
from megatron.core import parallel_state
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

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


def with_context_parallel_attention(block_spec, config):
    """A copy of a decoder block spec whose local DotProductAttention is the CP one, when
    ``config`` has CP > 1 (TE's own attention has CP and is left alone); else unchanged."""
    if config.context_parallel_size == 1:
        return block_spec
    layer_specs = []
    for layer_spec in block_spec.layer_specs:
        attn = getattr(layer_spec.submodules, "self_attention", None)
        sub = getattr(attn, "submodules", None)
        if getattr(sub, "core_attention", None) is DotProductAttention:
            sub = dataclasses.replace(sub, core_attention=ContextParallelDotProductAttention)
            attn = dataclasses.replace(attn, submodules=sub)
            layer_spec = dataclasses.replace(
                layer_spec,
                submodules=dataclasses.replace(layer_spec.submodules, self_attention=attn),
            )
        layer_specs.append(layer_spec)
    return dataclasses.replace(block_spec, layer_specs=layer_specs)
