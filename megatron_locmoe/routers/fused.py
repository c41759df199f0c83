"""LocMoE's routing math as one function over the activations, compiled on accelerators.

The reference path (``LocMoERouter`` with ``fused_router=False``) goes through Megatron's
helpers: the gate materialises an fp32 copy of the tokens and their product with the block
weights, then softmax, top-k, a second softmax and top-k for the aux-loss scores, and a dozen
small kernels for the statistics. Here the same quantities come from one pass: the GrAP
reduction reads the bf16 tokens once, and softmax, top-k and the per-expert statistics are
epilogues on [T, E]; under ``torch.compile`` (Inductor) that is a handful of kernels forward
and backward, and the backward writes dx once. With pre-softmax softmax routing the aux-loss
scores are the softmax itself and its routing map is the top-k map, so nothing is computed
twice. Results equal the reference up to float summation order (tests compare both paths).
"""

from __future__ import annotations

import functools

import torch


def grap_softmax_topk(
    x_TH: torch.Tensor,
    weight_EC: torch.Tensor,
    log_temperature: torch.Tensor,
    bias_E: torch.Tensor | None,
    topk: int,
):
    """GrAP gate, softmax and top-k in one pass over the tokens.

    x [T, H] (any float dtype; math in fp32), weight [E, C = H/E] ->
    raw [T, E] (W x), probs [T, E] (top-k softmax probs, zero elsewhere), routing_map [T, E]
    bool, scores [T, E] (the full softmax: the aux-loss scores).
    """
    T, H = x_TH.shape
    E = weight_EC.shape[0]
    raw_TE = (x_TH.reshape(T, E, H // E).float() * weight_EC.float()).sum(-1)
    logits_TE = raw_TE * log_temperature.exp()
    if bias_E is not None:
        logits_TE = logits_TE + bias_E
    scores_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
    top_p_TK, top_i_TK = torch.topk(scores_TE, k=topk, dim=-1)
    probs_TE = torch.zeros_like(scores_TE).scatter(1, top_i_TK, top_p_TK)
    routing_map_TE = torch.zeros_like(scores_TE, dtype=torch.bool).scatter(1, top_i_TK, True)
    return raw_TE, probs_TE, routing_map_TE, scores_TE


@functools.cache
def compiled_grap_softmax_topk():
    """``grap_softmax_topk`` under torch.compile (built once; dynamic in the token count)."""
    return torch.compile(grap_softmax_topk, dynamic=None, fullgraph=True)


def route(x_TH, weight_EC, log_temperature, bias_E, topk: int):
    """The compiled function on an accelerator, the eager one on the CPU (the tests' path, and
    no C++ toolchain needed for Inductor)."""
    fn = grap_softmax_topk if x_TH.device.type == "cpu" else compiled_grap_softmax_topk()
    return fn(x_TH, weight_EC, log_temperature, bias_E, topk)
