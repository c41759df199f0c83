"""Uneven, differentiable collectives on any device and backend, and chunk reordering.

Megatron's own helpers allocate on ``torch.cuda.current_device()``; these allocate like their
input, so the dispatcher runs on CUDA, NPU and CPU (gloo) alike.
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist


class _AllToAll(torch.autograd.Function):
    """Uneven ``all_to_all_single`` on any device; backward = the same with swapped splits."""

    @staticmethod
    def forward(ctx, x, group, output_splits: list[int], input_splits: list[int]):
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        return _a2a(x, group, output_splits, input_splits)

    @staticmethod
    def backward(ctx, grad):
        return _a2a(grad, ctx.group, ctx.input_splits, ctx.output_splits), None, None, None


def _a2a(x: torch.Tensor, group, output_splits: list[int], input_splits: list[int]):
    if group is None:  # a group of one rank: the send to oneself
        return x.clone()
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
    return out


def all_to_all(x: torch.Tensor, group, output_splits: list[int], input_splits: list[int]):
    """Differentiable uneven All-to-All of rows ``x [sum(input_splits), ...]`` (lists of ints)."""
    return _AllToAll.apply(x, group, list(output_splits), list(input_splits))


def all_gather_v(x: torch.Tensor, group, sizes: list[int]) -> torch.Tensor:
    """Rows of every rank of ``group`` in rank order, ``[sum(sizes), ...]``; as an All-to-All
    so uneven sizes work on every backend (backward sums the copies = reduce-scatter)."""
    n = len(sizes)
    if n == 1:
        return x
    return all_to_all(torch.cat([x] * n), group, sizes, [x.shape[0]] * n)


def reduce_scatter_v(x: torch.Tensor, group, sizes: list[int], rank: int) -> torch.Tensor:
    """Sum over ``group`` of chunk ``rank`` of ``x [sum(sizes), ...]``, summed in rank order."""
    n = len(sizes)
    if n == 1:
        return x
    parts = all_to_all(x, group, [sizes[rank]] * n, sizes)
    return parts.view(n, sizes[rank], *x.shape[1:]).sum(0)


def reorder_chunks(x: torch.Tensor, sizes: list[int], order: list[int]) -> torch.Tensor:
    """Concatenate the chunks ``x.split(sizes)`` in ``order`` (differentiable)."""
    chunks = torch.split(x, sizes, dim=0)
    return torch.cat([chunks[k] for k in order], dim=0)


def inverse(order: list[int]) -> list[int]:
    """The permutation that undoes ``order``."""
    inv = [0] * len(order)
    for pos, k in enumerate(order):
        inv[k] = pos
    return inv


def offsets(sizes: list[int]) -> list[int]:
    """Start of every chunk: exclusive prefix sums."""
    return [0, *itertools.accumulate(sizes)][:-1]
