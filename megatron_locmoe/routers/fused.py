"""LocMoE's routing math, losses and metrics as compiled functions over the activations.

The reference path (``LocMoERouter`` with ``fused_router=False``) goes through Megatron's
helpers: the gate materialises an fp32 copy of the tokens and their product with the block
weights, then softmax, top-k, a second softmax and top-k for the aux-loss scores, the aux loss
through a token-count all-reduce and its own tracker write, the locality loss, and seven metric
records of a few kernels each: about a hundred small launches per layer, forward and backward,
so at training shapes the router is bound by the host, not the card. Here the same quantities
come from one graph: the GrAP reduction reads the bf16 tokens once; softmax, top-k, both losses
(combined into the one scalar Megatron's loss scaler attaches) and the stacked metric vector are
epilogues on [T, E]; under ``torch.compile`` (Inductor) that is a handful of kernels forward
and backward, and the backward writes dx once. With pre-softmax routing the aux-loss scores are
the softmax itself and their routing map is the top-k map, so nothing is computed twice.
Results equal the reference up to float summation order (tests compare both paths).

Compiled on CUDA only; on the CPU (the tests' path) and NPUs every function runs eagerly.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_utils import switch_load_balancing_loss_func
from torch.distributed import _functional_collectives as funcol

from megatron_locmoe.metrics import load_cv, node_local_fraction


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
    return (raw_TE, *softmax_topk(raw_TE, log_temperature, bias_E, topk))


def softmax_topk(gate_TE, log_temperature, bias_E, topk: int):
    """Temperature, optional bias, softmax and top-k of a gate's output: (probs zero off the
    map, routing map, the full softmax as the aux-loss scores), all [T, E]."""
    logits_TE = gate_TE * log_temperature.exp()
    if bias_E is not None:
        logits_TE = logits_TE + bias_E
    scores_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
    top_p_TK, top_i_TK = torch.topk(scores_TE, k=topk, dim=-1)
    probs_TE = torch.zeros_like(scores_TE).scatter(1, top_i_TK, top_p_TK)
    routing_map_TE = torch.zeros_like(scores_TE, dtype=torch.bool).scatter(1, top_i_TK, True)
    return probs_TE, routing_map_TE, scores_TE


def grap_affinity(x_TH: torch.Tensor, weight_EC: torch.Tensor) -> torch.Tensor:
    """cos(x_t, w_i) for the block gate, fp32: [T, H], [E, H/E] -> [T, E] (0 for a zero token)."""
    T, H = x_TH.shape
    E = weight_EC.shape[0]
    x = x_TH.float()
    raw_TE = (x.reshape(T, E, H // E) * weight_EC.float()).sum(-1)
    norms_TE = x.norm(dim=-1, keepdim=True).clamp_min(1e-30) * weight_EC.float().norm(dim=-1)
    return raw_TE / norms_TE


def threshold_choice(probs_TE: torch.Tensor, routing_map_TE: torch.Tensor, threshold: float):
    """Of each token's routed experts, the fewest highest-gate-value ones whose values sum to at
    least ``threshold`` (the first always stays); 0: all of them. Returns (probs, map)."""
    if threshold <= 0:
        return probs_TE, routing_map_TE
    sorted_TE, order_TE = probs_TE.sort(dim=-1, descending=True)  # routed first: probs > 0
    keep_sorted_TE = (sorted_TE.cumsum(-1) - sorted_TE) < threshold
    keep_TE = torch.zeros_like(routing_map_TE).scatter(1, order_TE, keep_sorted_TE)
    keep_TE &= routing_map_TE
    return probs_TE * keep_TE, keep_TE


def affinity_route(x_TH, weight_EC, log_temperature, bias_E, topk: int, threshold: float):
    """Affinity, gate values and token choice in one pass over the tokens (compiled on CUDA):
    (affinity [T, E], probs [T, E] zero off the map, routing map [T, E], aux-loss scores)."""
    affinity_TE = grap_affinity(x_TH, weight_EC)
    probs_TE, routing_map_TE, scores_TE = softmax_topk(affinity_TE, log_temperature, bias_E, topk)
    probs_TE, routing_map_TE = threshold_choice(probs_TE, routing_map_TE, threshold)
    return affinity_TE, probs_TE, routing_map_TE, scores_TE


def locality_kl(mean_probs_E: torch.Tensor, local_E: torch.Tensor, eps: float) -> torch.Tensor:
    """KL(D_c || D_l) with D_l = (1-eps)/L on the L local experts and eps/(E-L) elsewhere."""
    E, L = local_E.numel(), local_E.sum().to(mean_probs_E.dtype)  # L stays on the device
    d_l = torch.where(local_E, (1.0 - eps) / L, eps / (E - L))
    d_c = mean_probs_E
    return torch.sum(d_c * (torch.log(d_c.clamp_min(1e-30)) - torch.log(d_l)))


def router_metric_vector(
    probs_TE: torch.Tensor,
    routing_map_TE: torch.Tensor,
    expert_is_local_E: torch.Tensor,
    dropped: torch.Tensor,
    capacity: int,
    locality_loss: torch.Tensor,
    delta: torch.Tensor,
    ec_min: torch.Tensor,
    expert_choice: bool = False,
) -> torch.Tensor:
    """The plugin's router metrics (``metrics.ROUTER_METRICS`` order) as one fp32 vector, so a
    layer records them with one tracker write."""
    real_TE = routing_map_TE & (probs_TE > 0)  # padding-to-capacity slots carry prob 0
    capacity_ = _scalar(capacity, probs_TE.device)
    ec_min_ = ec_min.detach().double()
    # capped at the batch's capacity (metrics.CAPACITY_EC_MIN): inf above the ceiling -> ceiling
    ec_min_ = torch.where(capacity_ > 0, torch.minimum(ec_min_, capacity_), ec_min_)
    values = (
        locality_loss.detach().double(),
        node_local_fraction(real_TE, expert_is_local_E),
        load_cv(real_TE.sum(0)),
        dropped.double(),
        capacity_,
        delta.detach().double().clamp_min(0.0),
        ec_min_,
        _scalar(expert_choice, probs_TE.device),
    )
    return torch.stack(values).float()


def _scalar(value, device) -> torch.Tensor:
    """A python number or a 0-d tensor as a float64 0-d tensor on ``device``."""
    if torch.is_tensor(value):
        return value.to(torch.float64)
    return torch.full((), float(value), dtype=torch.float64, device=device)


@dataclass(frozen=True)
class LossSpec:
    """What the LocMoE losses need besides tensors; hashable, so compiled graphs specialise on it.

    aux_coeff: alpha of the Switch-form balance loss (0: none). aux_scale: Megatron's divisor
    for repeated MTP layers folded in (1/mtp_num_layers, else 1). locality_coeff / eps: mu and
    the smoothing of D_l (coeff 0: none)."""

    topk: int
    aux_coeff: float
    aux_scale: float
    locality_coeff: float
    locality_eps: float


def routing_losses(
    scores_TE: torch.Tensor,
    map_aux_TE: torch.Tensor,
    expert_is_local_E: torch.Tensor,
    spec: LossSpec,
    tp_cp_group: dist.ProcessGroup | None,
):
    """(attached loss, aux loss for the tracker, locality KL) of one micro-batch.

    The aux loss is Megatron's switch_load_balancing_loss_func (pure torch, so it traces) with
    the token counts summed over the tensor/context-parallel group (a functional all-reduce: traceable, no grad), the
    locality loss mu * KL(mean scores || D_l). Both reach the gradient through one scalar:
    Megatron's MoEAuxLossAutoScaler gives every attached loss the same d/dloss, so their sum
    attached once equals each attached on its own."""
    T, E = scores_TE.shape
    zero = scores_TE.new_zeros(())
    aux = kl = attached = zero
    if spec.aux_coeff:
        tokens_E = map_aux_TE.sum(0)
        group_size = 1 if tp_cp_group is None else tp_cp_group.size()
        if group_size > 1:
            tokens_E = funcol.all_reduce(tokens_E, "sum", tp_cp_group)
        aux = switch_load_balancing_loss_func(
            probs=scores_TE,
            tokens_per_expert=tokens_E,
            total_num_tokens=T * group_size,
            topk=spec.topk,
            num_experts=E,
            moe_aux_loss_coeff=spec.aux_coeff,
        )
        aux = aux * spec.aux_scale
        attached = attached + aux
    if spec.locality_coeff:
        kl = locality_kl(scores_TE.mean(0), expert_is_local_E, spec.locality_eps)
        attached = attached + spec.locality_coeff * kl
    return attached, aux, kl


def route_with_losses(
    x_TH, weight_EC, log_temperature, bias_E, expert_is_local_E, delta, ec_min,
    spec: LossSpec, tp_cp_group, with_losses: bool,
):  # fmt: skip
    """Gate, routing, losses and metrics in one graph (no capacity bound): the router's whole
    forward. Returns (probs, routing_map, raw, attached loss, aux loss, metric vector)."""
    raw_TE, probs_TE, routing_map_TE, scores_TE = grap_softmax_topk(
        x_TH, weight_EC, log_temperature, bias_E, spec.topk
    )
    attached = aux = kl = probs_TE.new_zeros(())
    if with_losses:
        attached, aux, kl = routing_losses(
            scores_TE, routing_map_TE, expert_is_local_E, spec, tp_cp_group
        )
    dropped = routing_map_TE.new_zeros((), dtype=torch.long)
    vec = router_metric_vector(
        probs_TE, routing_map_TE, expert_is_local_E, dropped, 0, kl, delta, ec_min
    )
    return probs_TE, routing_map_TE, raw_TE, attached, aux, vec


def drop_by_rank(probs_TE, routing_map_TE, priority_TE, capacity):
    """Each expert's tokens ranked by ``priority`` (a stable sort per column), the first
    ``capacity`` kept (an int, or a 0-d tensor: no top-k with a data-dependent k, so one
    compiled graph serves every capacity the schedule picks).
    Returns (probs, routing_map, dropped)."""
    T = routing_map_TE.shape[0]
    masked_TE = priority_TE.masked_fill(~routing_map_TE, -torch.inf)
    order_TE = masked_TE.argsort(dim=0, descending=True, stable=True)
    position_T1 = torch.arange(T, device=order_TE.device).unsqueeze(1)
    rank_TE = torch.empty_like(order_TE).scatter_(0, order_TE, position_T1.expand_as(order_TE))
    keep_TE = routing_map_TE & (rank_TE < capacity)
    dropped = routing_map_TE.sum() - keep_TE.sum()
    return probs_TE * keep_TE, keep_TE, dropped


def capacity_route_with_losses(
    x_TH, weight_EC, log_temperature, bias_E, expert_is_local_E, delta, ec_min, capacity,
    spec: LossSpec, tp_cp_group, with_losses: bool, affinity: bool, threshold: float,
    expert_choice: bool,
):  # fmt: skip
    """The capacity path's whole forward in one graph, for steps that do not re-estimate: gate
    and token choice (LocMoE's W x, or LocMoE+'s affinity with ``affinity``), the drop at
    ``capacity`` (a 0-d tensor) ranked by probability (LocMoE) or affinity (LocMoE+), the
    losses over the token-choice assignments and the metric vector of what was kept.
    Returns (probs, routing_map, attached loss, aux loss, metric vector)."""
    if affinity:
        gate_TE, probs_TE, map_TE, scores_TE = affinity_route(
            x_TH, weight_EC, log_temperature, bias_E, spec.topk, threshold
        )
    else:
        gate_TE, probs_TE, map_TE, scores_TE = grap_softmax_topk(
            x_TH, weight_EC, log_temperature, bias_E, spec.topk
        )
    priority_TE = gate_TE if affinity else probs_TE
    kept_TE, kept_map_TE, dropped = drop_by_rank(probs_TE, map_TE, priority_TE, capacity)
    attached = aux = kl = probs_TE.new_zeros(())
    if with_losses:
        attached, aux, kl = routing_losses(scores_TE, map_TE, expert_is_local_E, spec, tp_cp_group)
    vec = router_metric_vector(
        kept_TE, kept_map_TE, expert_is_local_E, dropped, capacity, kl, delta, ec_min,
        expert_choice,
    )  # fmt: skip
    return kept_TE, kept_map_TE, attached, aux, vec


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=None, fullgraph=True)


def run(fn, device: torch.device, *args):
    """``fn`` compiled (built once per function; dynamic in the token count) on CUDA, eager
    elsewhere: on the CPU (no C++ toolchain needed) and on NPUs (Inductor has no NPU backend
    without torch_npu's own compiler stack)."""
    return (_compiled(fn) if device.type == "cuda" else fn)(*args)


def route(x_TH, weight_EC, log_temperature, bias_E, topk: int):
    """``grap_softmax_topk``, compiled on CUDA."""
    return run(grap_softmax_topk, x_TH.device, x_TH, weight_EC, log_temperature, bias_E, topk)
