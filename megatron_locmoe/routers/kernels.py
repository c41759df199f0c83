"""Triton kernels for the LocMoE and LocMoE+ routers with the paper's fixed GrAP gate: one
launch forward dropless (two with tensor/context parallelism, two with a capacity), one backward.

Why hand-written: at training shapes the router's arithmetic is tens of microseconds of memory
traffic (read the tokens once, write their gradient once), while Megatron's TopKRouter and the
op-by-op LocMoE path launch tens of kernels per call from Python, and even the
torch.compile'd graph (``fused.route_with_losses``) spends most of its time in its wrapper
launching them (docs/performance.md has the numbers). Here:

- ``_route_fwd``: per program, a strip of tokens (~4 strips per SM): GrAP (block means of the
  bf16 tokens, fp32 accumulation; with ``AFFINITY``, LocMoE+'s cosine: the token's norm in
  the same pass), softmax, top-k by repeated arg-max (lowest index on ties), then probs /
  routing map / scores and the strip's per-expert sums (softmax mass, routed count, routed
  with prob > 0) into its own row of the workspace; the last program to finish (an atomic
  ticket; the sums themselves use no atomics, so results are deterministic) then runs the
  finalize, or only sums the rows when a capacity or a token-count all-reduce comes first;
- ``_drop`` (with a capacity; one program per expert): the capacity-th highest priority of
  the expert's routed tokens, built bit by bit over the priorities' order-preserving 32-bit
  keys (32 counting passes over the expert's [T] row, held in registers up to 16K tokens;
  on the H200 faster than a radix select through ``tl.histogram``), then one pass in token
  order that keeps the tokens above it and the first of the ties (lowest index, as a stable
  sort), zeroes the dropped entries of probs and map and counts what was kept and dropped;
  its last program runs the finalize and counts the router's routing step;
- ``_finalize`` (that one program): sums the rows in program order, then Megatron's
  Switch-form aux loss, the locality KL, the attached loss, the per-expert coefficient
  d(attached loss)/d(score) for the backward (the same for every token), and the router
  metrics, which it adds straight into the metrics tracker's storage (and the aux loss into
  Megatron's ``load_balancing_loss`` entry), as ``metrics.record_vector`` / Megatron's
  ``record`` would; with TP/CP it is launched again on its own after the token counts'
  all-reduce;
- ``_route_bwd``: dscore = g_probs on the (kept) map + g_loss * coef, softmax backward, and dx
  written once as (dlogit * temperature) times the gate's block row (with ``AFFINITY``, the
  cosine's gradient: minus its projection on the token). g_loss is Megatron's
  ``MoEAuxLossAutoScaler.main_loss_backward_scale``, what the scaler would give the attached
  loss, so no scaler node is needed.

The kernels are launched through ``launch.FastLaunch`` (Triton's per-call binding would cost
about as much host time as the card spends at 8K tokens).

Only the paper's gate takes this path (fixed block weights, no bias or learnable
temperature, no LocMoE+ threshold, no padding mask, E <= MAX_EXPERTS); ``LocMoERouter`` sends
everything else, and the steps that re-estimate the capacity, to the compiled or reference
path. ``tests/test_router_kernels.py`` runs the
kernels in Triton's interpreter on the CPU (or on the GPU) against ``fused.route_with_losses``;
test_fused_router.py compares the routers on them with the reference path,
tests/test_training_cpu.py trains with them; benchmarks/router_bench.py times and checks them
on the GPU, benchmarks/router_kernel_tiles.py re-tunes their tiles.
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from megatron_locmoe import metrics
from megatron_locmoe.metrics import ROUTER_METRICS
from megatron_locmoe.routers.fast_launch import FastLaunch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - the CUDA wheels of torch bring triton
    HAVE_TRITON = False

INTERPRETED = HAVE_TRITON and os.environ.get("TRITON_INTERPRET") == "1"
"""Triton's interpreter (numpy, on the CPU) was on when this module was imported: the tests'
way to run the kernels without a GPU."""


MAX_EXPERTS = 1024
"""Beyond this a token's expert row no longer fits a tile (the compiled graph takes over)."""

DISABLED = os.environ.get("LOCMOE_TRITON_ROUTER", "1") == "0"
"""LOCMOE_TRITON_ROUTER=0 sends the fixed gate to the compiled graph instead (diagnostics)."""


def gate_applies(locmoe, num_experts: int) -> bool:
    """Whether the kernels cover these (resolved) settings: the paper's gate (fixed block
    weights, no bias, a fixed temperature), LocMoE+'s plain top-k (no threshold), at most
    MAX_EXPERTS experts."""
    return (
        locmoe.grap_mode != "learnable"
        and not locmoe.grap_bias
        and not locmoe.grap_learnable_temperature
        and not locmoe.plus_affinity_threshold
        and num_experts <= MAX_EXPERTS
    )


def available(device: torch.device) -> bool:
    """Whether the kernels can run on ``device``: CUDA with triton, or the interpreter on CPU."""
    if not HAVE_TRITON or DISABLED:
        return False
    return device.type == "cuda" or (INTERPRETED and device.type == "cpu")


NUM_STATS = 3  # per expert: softmax mass, routed count, routed with prob > 0 (kernels: "3 * E")
NUM_METRICS = len(ROUTER_METRICS)  # the finalize writes them in that order
SUMMARY = 2 + NUM_METRICS
"""The workspace's tail: attached loss, aux loss, the metric vector."""


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


if HAVE_TRITON:
    # each metric's slot in ROUTER_METRICS, so the finalize files them by name
    SLOT_LOCALITY: tl.constexpr = tl.constexpr(ROUTER_METRICS.index(metrics.LOCALITY_LOSS))
    SLOT_NODE_LOCAL: tl.constexpr = tl.constexpr(ROUTER_METRICS.index(metrics.NODE_LOCAL_FRACTION))
    SLOT_LOAD_CV: tl.constexpr = tl.constexpr(ROUTER_METRICS.index(metrics.LOAD_CV))
    SLOT_DROPPED: tl.constexpr = tl.constexpr(ROUTER_METRICS.index(metrics.TOKENS_DROPPED))
    SLOT_CAPACITY: tl.constexpr = tl.constexpr(ROUTER_METRICS.index(metrics.EXPERT_CAPACITY))
    SLOT_DELTA: tl.constexpr = tl.constexpr(ROUTER_METRICS.index(metrics.CAPACITY_DELTA))
    SLOT_EC_MIN: tl.constexpr = tl.constexpr(ROUTER_METRICS.index(metrics.CAPACITY_EC_MIN))
    SLOT_EXPERT_CHOICE: tl.constexpr = tl.constexpr(ROUTER_METRICS.index(metrics.EXPERT_CHOICE))

    @triton.jit
    def _route_fwd(
        x_ptr, w_ptr, logt_ptr, probs_ptr, map_ptr, scores_ptr, ws_ptr, ticket_ptr,
        aff_ptr, inv_norm_ptr, prio_ptr,
        T, tokens_per_program, num_parts, local_ptr, delta_ptr, ecmin_ptr, block_ptr, lb_ptr,
        aux_factor, locality_coeff, locality_eps, loss_scale, column, block_stride, lb_scale,
        H: tl.constexpr, E: tl.constexpr, C: tl.constexpr, K: tl.constexpr,
        BT: tl.constexpr, BE: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr,
        RECORD: tl.constexpr, RECORD_LB: tl.constexpr, FINALIZE: tl.constexpr,
        AFFINITY: tl.constexpr, PRIORITY: tl.constexpr,
    ):  # fmt: skip
        """The program that finishes last (a ticket counter, zero on entry and reset by that
        program) runs the finalize itself (FINALIZE), else only sums the rows into the
        statistics: one launch for the whole dropless forward. AFFINITY: the gate is
        cos(x, w) (LocMoE+), saved with 1/|x| for the backward. PRIORITY: the drop's
        priorities (the affinity, else the probability) are written [E, T], -inf off the map."""
        pid = tl.program_id(0)
        e = tl.arange(0, BE)
        emask = e < E
        c = tl.arange(0, BC)
        temperature = tl.exp(tl.load(logt_ptr).to(tl.float32))
        if AFFINITY:
            w_norm = _row_norms(w_ptr, E, C, BE, BC)
        mass = tl.zeros((BE,), tl.float32)
        routed = tl.zeros((BE,), tl.float32)
        real = tl.zeros((BE,), tl.float32)
        start = pid * tokens_per_program
        for t0 in range(start, start + tokens_per_program, BT):
            t = t0 + tl.arange(0, BT)
            tmask = (t < T) & (t < start + tokens_per_program)
            row = t.to(tl.int64) * H
            raw = tl.zeros((BT, BE), tl.float32)
            xsq = tl.zeros((BT,), tl.float32)
            for c0 in tl.static_range(0, C, BC):
                cc = c0 + c
                cmask = cc < C
                offs = row[:, None, None] + (e[None, :, None] * C + cc[None, None, :])
                m3 = tmask[:, None, None] & emask[None, :, None] & cmask[None, None, :]
                xv = tl.load(x_ptr + offs, mask=m3, other=0.0).to(tl.float32)
                wv = tl.load(
                    w_ptr + e[:, None] * C + cc[None, :],
                    mask=emask[:, None] & cmask[None, :],
                    other=0.0,
                )
                raw += tl.sum(xv * wv[None, :, :], axis=2)
                if AFFINITY:
                    xsq += tl.sum(tl.sum(xv * xv, axis=2), axis=1)
            out = t.to(tl.int64)[:, None] * E + e[None, :]
            m2 = tmask[:, None] & emask[None, :]
            gate = raw
            if AFFINITY:  # cos(x_t, w_i) = x.w / (max(|x|, 1e-30) |w|), as fused.grap_affinity
                inv_norm = 1.0 / tl.maximum(tl.sqrt(xsq), 1e-30)
                gate = raw * inv_norm[:, None] / w_norm[None, :]
                tl.store(aff_ptr + out, gate, mask=m2)
                tl.store(inv_norm_ptr + t, inv_norm, mask=tmask)
            logits = tl.where(emask[None, :], gate * temperature, -float("inf"))
            ex = tl.exp(logits - tl.max(logits, axis=1)[:, None])
            scores = ex / tl.sum(ex, axis=1)[:, None]
            # top-k: K rounds of arg-max (lowest index on ties), each pick masked out
            avail = tl.where(emask[None, :], scores, -1.0)
            chosen = tl.zeros((BT, BE), tl.int1)
            for _ in tl.static_range(K):
                idx = tl.argmax(avail, axis=1, tie_break_left=True)  # one (value, index) pass
                hit = e[None, :] == idx[:, None]
                chosen = chosen | hit
                avail = tl.where(hit, -2.0, avail)
            tl.store(scores_ptr + out, scores, mask=m2)
            tl.store(probs_ptr + out, tl.where(chosen, scores, 0.0), mask=m2)
            tl.store(map_ptr + out, chosen, mask=m2)
            if PRIORITY:
                priority = gate if AFFINITY else scores
                by_expert = e.to(tl.int64)[None, :] * T + t[:, None]
                tl.store(prio_ptr + by_expert, tl.where(chosen, priority, -float("inf")), mask=m2)
            valid = tmask[:, None]
            mass += tl.sum(tl.where(valid, scores, 0.0), axis=0)
            routed += tl.sum(tl.where(valid & chosen, 1.0, 0.0), axis=0)
            real += tl.sum(tl.where(valid & chosen & (scores > 0), 1.0, 0.0), axis=0)
        base = ws_ptr + pid * (3 * E)  # NUM_STATS rows
        tl.store(base + e, mass, mask=emask)
        tl.store(base + E + e, routed, mask=emask)
        tl.store(base + 2 * E + e, real, mask=emask)
        # every thread's row stores precede the ticket (barrier, then a release); the last
        # program's acquire makes all rows visible to it
        tl.debug_barrier()
        ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu")
        if ticket == num_parts - 1:
            if FINALIZE:
                _finalize(
                    ws_ptr, local_ptr, delta_ptr, ecmin_ptr, block_ptr, lb_ptr,
                    num_parts, T, aux_factor, locality_coeff, locality_eps, loss_scale,
                    column, block_stride, lb_scale, 0.0, 0.0,
                    E, BE, BP, False, False, RECORD, RECORD_LB,
                )  # fmt: skip
            else:
                _sum_partials(ws_ptr, num_parts, E, BE, BP)
            tl.store(ticket_ptr, 0)  # ready for the next launch

    @triton.jit
    def _row_norms(w_ptr, E: tl.constexpr, C: tl.constexpr, BE: tl.constexpr, BC: tl.constexpr):
        """|w_i| of the gate's [E, C] block rows, [BE] (1 on padded lanes: no 0 / 0)."""
        e = tl.arange(0, BE)
        c = tl.arange(0, BC)
        wsq = tl.zeros((BE,), tl.float32)
        for c0 in tl.static_range(0, C, BC):
            cc = c0 + c
            wv = tl.load(
                w_ptr + e[:, None] * C + cc[None, :],
                mask=(e < E)[:, None] & (cc < C)[None, :],
                other=0.0,
            )
            wsq += tl.sum(wv * wv, axis=1)
        return tl.where(e < E, tl.sqrt(wsq), 1.0)

    @triton.jit
    def _sum_partials(ws_ptr, num_parts, E: tl.constexpr, BE: tl.constexpr, BP: tl.constexpr):
        """The programs' statistics rows summed in program order into the statistics;
        returns (softmax mass, routed count, routed with prob > 0), [BE] each."""
        stats_ptr = ws_ptr + num_parts * (3 * E)
        e = tl.arange(0, BE)
        emask = e < E
        mass = tl.zeros((BE,), tl.float32)
        routed = tl.zeros((BE,), tl.float32)
        real = tl.zeros((BE,), tl.float32)
        p = tl.arange(0, BP)
        for p0 in range(0, num_parts, BP):
            rows = p0 + p
            m2 = (rows < num_parts)[:, None] & emask[None, :]
            offs = rows[:, None] * (3 * E) + e[None, :]
            # .cg: L2, not L1 (rows written by other programs of the same launch)
            mass += tl.sum(_load_cg(ws_ptr + offs, m2), axis=0)
            routed += tl.sum(_load_cg(ws_ptr + offs + E, m2), axis=0)
            real += tl.sum(_load_cg(ws_ptr + offs + 2 * E, m2), axis=0)
        tl.store(stats_ptr + e, mass, mask=emask)
        tl.store(stats_ptr + E + e, routed, mask=emask)
        tl.store(stats_ptr + 2 * E + e, real, mask=emask)
        return mass, routed, real

    @triton.jit
    def _order_key(v):
        """fp32 -> int32 with the floats' order as signed integers (-0.0 counted as +0.0)."""
        bits = (v + 0.0).to(tl.int32, bitcast=True)
        return bits ^ ((bits >> 31) & 0x7FFFFFFF)

    @triton.jit
    def _count_at_least(v, key, threshold):
        """How many routed entries (v > -inf) of a strip have key >= threshold."""
        return tl.sum(((v > -float("inf")) & (key >= threshold)).to(tl.int32), axis=0)

    @triton.jit
    def _count_row_at_least(
        v, key, threshold, row_ptr, T, BT: tl.constexpr, WHOLE_ROW: tl.constexpr
    ):
        """``_count_at_least`` over an expert's whole row: its first strip (``v``, ``key``),
        then, unless WHOLE_ROW (the strip is the row), the rest streamed in strips of BT."""
        count = _count_at_least(v, key, threshold)
        if not WHOLE_ROW:
            t = tl.arange(0, BT)
            for t0 in range(BT, T, BT):
                tt = t0 + t
                vs = tl.load(row_ptr + tt, mask=tt < T, other=-float("inf"))
                count += _count_at_least(vs, _order_key(vs), threshold)
        return count

    @triton.jit
    def _drop(
        prio_ptr, probs_ptr, map_ptr, scores_ptr, ws_ptr, ticket_ptr, step_ptr, T, capacity,
        num_parts, local_ptr, delta_ptr, ecmin_ptr, block_ptr, lb_ptr,
        aux_factor, locality_coeff, locality_eps, loss_scale, column, block_stride, lb_scale,
        capacity_value, expert_choice,
        E: tl.constexpr, BE: tl.constexpr, BP: tl.constexpr, BT: tl.constexpr,
        WHOLE_ROW: tl.constexpr, RECORD: tl.constexpr, RECORD_LB: tl.constexpr,
        COUNT_STEP: tl.constexpr,
    ):  # fmt: skip
        """Program i keeps expert i's ``capacity`` tokens of highest priority (ties: lowest
        token index), zeroes the rest's probs and map entries and writes the kept-with-prob>0
        and dropped counts into the statistics; the last program finalizes (and with
        COUNT_STEP adds one to the router's int64 step counter). The threshold is
        the capacity-th highest key, built bit by bit from the top (32 counting passes);
        WHOLE_ROW: the expert's row (BT >= T values) is read once and kept in registers,
        else every pass streams it in strips of BT."""
        i = tl.program_id(0)
        row_ptr = prio_ptr + i.to(tl.int64) * T
        t = tl.arange(0, BT)
        v = tl.load(row_ptr + t, mask=t < T, other=-float("inf"))
        key = _order_key(v)
        n = _count_row_at_least(v, key, -2147483647 - 1, row_ptr, T, BT, WHOLE_ROW)
        # greedy over the bits of the unsigned key u = key + 2^31: the largest u with at
        # least ``capacity`` routed keys >= it is the capacity-th highest
        prefix = tl.zeros((), tl.int64)
        if n > capacity:
            for b in tl.static_range(32):
                trial = prefix | (1 << (31 - b))
                threshold = (trial - 2147483648).to(tl.int32)
                count = _count_row_at_least(v, key, threshold, row_ptr, T, BT, WHOLE_ROW)
                prefix = tl.where(count >= capacity, trial, prefix)
        tau = (prefix - 2147483648).to(tl.int32)
        keep_all = n <= capacity
        # the ties at tau kept, lowest token index first: capacity - (keys above tau); tau + 1
        # cannot overflow (tau is a routed finite or +inf key, or the lowest with no drop)
        need = capacity - _count_row_at_least(v, key, tau + 1, row_ptr, T, BT, WHOLE_ROW)
        ties = tl.zeros((), tl.int32)
        kept = tl.zeros((), tl.int32)
        real = tl.zeros((), tl.int32)
        for t0 in range(0, T, BT):
            tt = t0 + t
            if not WHOLE_ROW:
                v = tl.load(row_ptr + tt, mask=tt < T, other=-float("inf"))
                key = _order_key(v)
            routed = v > -float("inf")
            tie = routed & (key == tau)
            tie_rank = ties + tl.cumsum(tie.to(tl.int32), axis=0)  # 1-based, in token order
            keep = routed & (keep_all | (key > tau) | (tie & (tie_rank <= need)))
            ties += tl.sum(tie.to(tl.int32), axis=0)
            at = tt.to(tl.int64) * E + i
            dropped = routed & ~keep
            tl.store(probs_ptr + at, tl.zeros((BT,), tl.float32), mask=dropped)
            tl.store(map_ptr + at, tl.zeros((BT,), tl.int1), mask=dropped)
            s = tl.load(scores_ptr + at, mask=keep, other=0.0)
            kept += tl.sum(keep.to(tl.int32), axis=0)
            real += tl.sum((keep & (s > 0)).to(tl.int32), axis=0)
        stats_ptr = ws_ptr + num_parts * (3 * E)
        tl.store(stats_ptr + 2 * E + i, real.to(tl.float32))
        tl.store(stats_ptr + 4 * E + i, (n - kept).to(tl.float32))  # after coef: the drops
        tl.debug_barrier()
        ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu")
        if ticket == E - 1:
            _finalize(
                ws_ptr, local_ptr, delta_ptr, ecmin_ptr, block_ptr, lb_ptr,
                num_parts, T, aux_factor, locality_coeff, locality_eps, loss_scale,
                column, block_stride, lb_scale, capacity_value, expert_choice,
                E, BE, BP, True, True, RECORD, RECORD_LB,
            )  # fmt: skip
            if COUNT_STEP:
                tl.store(step_ptr, tl.load(step_ptr) + 1)
            tl.store(ticket_ptr, 0)

    @triton.jit
    def _finalize(
        ws_ptr, local_ptr, delta_ptr, ecmin_ptr, block_ptr, lb_ptr,
        num_parts, T, aux_factor, locality_coeff, locality_eps, loss_scale,
        column, block_stride, lb_scale, capacity_value, expert_choice,
        E: tl.constexpr, BE: tl.constexpr, BP: tl.constexpr, FROM_STATS: tl.constexpr,
        CAPACITY: tl.constexpr, RECORD: tl.constexpr, RECORD_LB: tl.constexpr,
    ):  # fmt: skip
        """Workspace [partials P x 3E | stats 3E | coef E | drops E | out 2 + metrics]: sums the
        partials into stats (unless FROM_STATS: summed already, token counts all-reduced or a
        drop applied), writes coef and out = [attached loss, aux loss, metrics]; with RECORD,
        adds the metrics to column ``column`` of the tracker's [metrics, layers] block (and,
        RECORD_LB, aux * lb_scale to Megatron's load_balancing_loss entry), as
        metrics.record_vector and Megatron's router would. CAPACITY: the drops, the capacity
        and the expert-choice flag enter the metrics. Called by ``_route_fwd``'s or ``_drop``'s
        last program, or launched on its own (one program) after the all-reduce with TP/CP."""
        stats_ptr = ws_ptr + num_parts * (3 * E)
        coef_ptr = stats_ptr + 3 * E
        drops_ptr = coef_ptr + E
        out_ptr = drops_ptr + E
        e = tl.arange(0, BE)
        emask = e < E
        if FROM_STATS:
            mass = tl.load(stats_ptr + e, mask=emask, other=0.0)
            routed = tl.load(stats_ptr + E + e, mask=emask, other=0.0)
            real = tl.load(stats_ptr + 2 * E + e, mask=emask, other=0.0)
        else:
            mass, routed, real = _sum_partials(ws_ptr, num_parts, E, BE, BP)
        # aux = alpha E / (k T_total^2) * sum_e (sum_t score) * count  (aux_factor has it all)
        aux = tl.sum(mass * routed, axis=0) * aux_factor
        # locality: KL(mean score || D_l), D_l = (1-eps)/L on the L local experts, eps/(E-L) off
        local = tl.load(local_ptr + e, mask=emask, other=0) != 0
        num_local = tl.sum(tl.where(local, 1.0, 0.0), axis=0)
        d_l = tl.where(local, (1.0 - locality_eps) / num_local, locality_eps / (E - num_local))
        d_c = mass / T
        log_ratio = tl.log(tl.maximum(d_c, 1e-30)) - tl.log(d_l)
        locality_on = locality_coeff != 0.0  # else D_l may be undefined (L = 0 or E)
        kl = tl.where(locality_on, tl.sum(tl.where(emask, d_c * log_ratio, 0.0), axis=0), 0.0)
        attached = (aux + locality_coeff * kl) * loss_scale
        # d(attached)/d(score[t, e]), the same for every token t
        dkl = (log_ratio + tl.where(d_c > 1e-30, 1.0, 0.0)) / T
        coef = (aux_factor * routed + tl.where(locality_on, locality_coeff * dkl, 0.0)) * loss_scale
        tl.store(coef_ptr + e, coef, mask=emask)
        total_real = tl.sum(real, axis=0)
        local_real = tl.sum(tl.where(local, real, 0.0), axis=0)
        node_local = tl.where(total_real > 0, local_real / tl.maximum(total_real, 1.0), 1.0)
        mean_load = total_real / E
        dev = tl.where(emask, real - mean_load, 0.0)
        cv = tl.sqrt(tl.sum(dev * dev, axis=0) / E) / tl.maximum(mean_load, 1e-30)
        delta = tl.maximum(tl.load(delta_ptr), 0.0).to(tl.float32)
        ec_min = tl.load(ecmin_ptr).to(tl.float32)  # inf when the bound exceeds any capacity
        # logged capped at the batch's capacity (metrics.CAPACITY_EC_MIN), as fused.py does
        ec_min = tl.where(capacity_value > 0, tl.minimum(ec_min, capacity_value), ec_min)
        tl.store(out_ptr + 0, attached)
        tl.store(out_ptr + 1, aux)
        # the metrics, each in its ROUTER_METRICS slot
        metric_ptr = out_ptr + 2
        tl.store(metric_ptr + SLOT_LOCALITY, kl)
        tl.store(metric_ptr + SLOT_NODE_LOCAL, node_local)
        tl.store(metric_ptr + SLOT_LOAD_CV, cv)
        dropped = 0.0
        if CAPACITY:
            dropped = tl.sum(tl.load(drops_ptr + e, mask=emask, other=0.0), axis=0)
        tl.store(metric_ptr + SLOT_DROPPED, dropped)
        tl.store(metric_ptr + SLOT_CAPACITY, capacity_value)
        tl.store(metric_ptr + SLOT_DELTA, delta)
        tl.store(metric_ptr + SLOT_EC_MIN, ec_min)
        tl.store(metric_ptr + SLOT_EXPERT_CHOICE, expert_choice)
        if RECORD:  # the tracker's [metrics, layers] block, row = slot
            cell = block_ptr + column
            _accumulate(cell + SLOT_LOCALITY * block_stride, kl)
            _accumulate(cell + SLOT_NODE_LOCAL * block_stride, node_local)
            _accumulate(cell + SLOT_LOAD_CV * block_stride, cv)
            _accumulate(cell + SLOT_DELTA * block_stride, delta)
            _accumulate(cell + SLOT_EC_MIN * block_stride, ec_min)
            if CAPACITY:
                _accumulate(cell + SLOT_DROPPED * block_stride, dropped)
                _accumulate(cell + SLOT_CAPACITY * block_stride, capacity_value)
                _accumulate(cell + SLOT_EXPERT_CHOICE * block_stride, expert_choice)
        if RECORD_LB:
            tl.store(lb_ptr + column, tl.load(lb_ptr + column) + aux * lb_scale)

    @triton.jit
    def _accumulate(ptr, value):
        tl.store(ptr, tl.load(ptr) + value)

    @triton.jit
    def _load_cg(ptrs, mask):
        return tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")

    @triton.jit
    def _route_bwd(
        gprobs_ptr, gloss_ptr, scores_ptr, map_ptr, ws_ptr, coef_offset, w_ptr, logt_ptr, dx_ptr,
        x_ptr, aff_ptr, inv_norm_ptr,
        T, H: tl.constexpr, E: tl.constexpr, C: tl.constexpr,
        BT: tl.constexpr, BE: tl.constexpr, BC: tl.constexpr,
        HAS_GPROBS: tl.constexpr, HAS_GLOSS: tl.constexpr, AFFINITY: tl.constexpr,
    ):  # fmt: skip
        """dx of the gate: dgate (block rows) for W x; for the cosine,
        dgate_i w_i / (|x| |w_i|) - (sum_i dgate_i cos_i) x / |x|^2."""
        pid = tl.program_id(0)
        t = pid * BT + tl.arange(0, BT)
        tmask = t < T
        e = tl.arange(0, BE)
        emask = e < E
        m2 = tmask[:, None] & emask[None, :]
        out = t.to(tl.int64)[:, None] * E + e[None, :]
        scores = tl.load(scores_ptr + out, mask=m2, other=0.0)
        dscore = tl.zeros((BT, BE), tl.float32)
        if HAS_GPROBS:
            chosen = tl.load(map_ptr + out, mask=m2, other=0) != 0
            dscore += tl.where(chosen, tl.load(gprobs_ptr + out, mask=m2, other=0.0), 0.0)
        if HAS_GLOSS:
            coef = tl.load(ws_ptr + coef_offset + e, mask=emask, other=0.0)
            dscore += tl.load(gloss_ptr).to(tl.float32) * coef[None, :]
        dlogit = scores * (dscore - tl.sum(dscore * scores, axis=1)[:, None])
        draw = dlogit * tl.exp(tl.load(logt_ptr).to(tl.float32))  # d(gate)
        row = t.to(tl.int64) * H
        c = tl.arange(0, BC)
        if AFFINITY:
            inv_norm = tl.load(inv_norm_ptr + t, mask=tmask, other=0.0)
            cos = tl.load(aff_ptr + out, mask=m2, other=0.0)
            along_x = tl.sum(draw * cos, axis=1) * inv_norm * inv_norm  # [BT]
            draw = draw * inv_norm[:, None] / _row_norms(w_ptr, E, C, BE, BC)[None, :]
        for c0 in tl.static_range(0, C, BC):
            cc = c0 + c
            cmask = cc < C
            wv = tl.load(
                w_ptr + e[:, None] * C + cc[None, :],
                mask=emask[:, None] & cmask[None, :],
                other=0.0,
            )
            offs = row[:, None, None] + (e[None, :, None] * C + cc[None, None, :])
            m3 = tmask[:, None, None] & emask[None, :, None] & cmask[None, None, :]
            dx = draw[:, :, None] * wv[None, :, :]
            if AFFINITY:
                xv = tl.load(x_ptr + offs, mask=m3, other=0.0).to(tl.float32)
                dx -= along_x[:, None, None] * xv
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=m3)

    _launch_fwd = FastLaunch(_route_fwd, INTERPRETED)
    _launch_drop = FastLaunch(_drop, INTERPRETED)
    _launch_bwd = FastLaunch(_route_bwd, INTERPRETED)
    _launch_finalize = FastLaunch(_finalize, INTERPRETED)  # also a device function of _route_fwd


class Tiles(NamedTuple):
    """A kernel's launch shape: BT tokens x BE experts x BC chunk values per tile, warps per
    program and (forward) strips per SM."""

    BT: int
    BE: int
    BC: int
    num_warps: int
    strips_per_sm: int = 4


def forward_tiles(E: int, C: int) -> Tiles:
    """Chunks of up to 1K values per token, ~4K-value tiles and two warps; ~4 token strips per
    SM (enough in flight, and few partial rows for the finalize to sum). Chosen by sweeps
    (benchmarks/router_kernel_tiles.py): smaller tiles and two warps win at large E, because
    the top-k's arg-max reductions then cross fewer warps."""
    BE = _next_pow2(E)
    BC = min(_next_pow2(C), max(8, 1024 // BE))
    return Tiles(max(1, min(16, 4096 // (BE * BC))), BE, BC, 2)


@functools.cache
def backward_tiles(E: int, C: int) -> Tiles:
    """Whole (padded) chunks up to 64 values, ~4K-value tiles (same sweep)."""
    BE = _next_pow2(E)
    BC = min(_next_pow2(C), 64)
    return Tiles(max(1, min(16, 4096 // (BE * BC))), BE, BC, 4)


class ForwardPlan(NamedTuple):
    """The forward's launch geometry for T tokens: tiles, tokens per program, programs (one
    statistics row each), the finalize's row block and the workspace's layout."""

    tiles: Tiles
    per_program: int
    num_parts: int
    BP: int
    ws_numel: int
    coef_offset: int


@functools.cache
def forward_plan(T: int, E: int, C: int, num_sms: int) -> ForwardPlan:
    """Cached: the per-call arithmetic costs host time the router does not have (benchmarks
    that patch forward_tiles clear the cache)."""
    tiles = forward_tiles(E, C)
    per_program = math.ceil(math.ceil(T / (tiles.strips_per_sm * num_sms)) / tiles.BT) * tiles.BT
    per_program = max(tiles.BT, per_program)
    num_parts = max(1, math.ceil(T / per_program))
    coef_offset = (num_parts + 1) * NUM_STATS * E
    BP = max(1, min(64, 4096 // tiles.BE))
    ws_numel = coef_offset + 2 * E + SUMMARY  # coef, the drops, the summary
    return ForwardPlan(tiles, per_program, num_parts, BP, ws_numel, coef_offset)


DROP_WHOLE_ROW = 16384
"""Up to this many tokens the drop keeps an expert's priorities in registers (one read)."""
DROP_STRIP = 1024
"""Beyond, the strip of an expert's priorities each of the drop's passes streams."""


@functools.cache
def drop_tiles(T: int) -> Tiles:
    """The drop's strip: the whole row (next power of two, 4 warps up to 4K values, 8 beyond),
    else strips of DROP_STRIP streamed per pass (BE, BC unused)."""
    if T <= DROP_WHOLE_ROW:
        BT = _next_pow2(T)
        return Tiles(BT=BT, BE=0, BC=0, num_warps=4 if BT <= 4096 else 8)
    return Tiles(BT=DROP_STRIP, BE=0, BC=0, num_warps=4)


@functools.cache
def _one(device: torch.device) -> torch.Tensor:
    return torch.ones((), device=device)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


class TrackerSlots(NamedTuple):
    """Where the finalize kernel adds this layer's metrics: the [metrics, layers] block behind the
    router metrics' tracker entries, Megatron's load_balancing_loss values (None when the
    layer records no aux loss, as in eval or with alpha 0) and the 0-based layer column."""

    block: torch.Tensor
    lb_values: torch.Tensor | None
    column: int


class Capacity(NamedTuple):
    """A capacity drop for the kernels: each expert keeps its ``value`` tokens of highest
    priority (the affinity with LocMoE+'s gate, else the probability); ``expert_choice`` is
    the metric's flag (the capacity binds below the ceiling)."""

    value: int
    expert_choice: bool


class LocMoERouteFunction(torch.autograd.Function):
    """x [T, H] -> probs [T, E] fp32, routing_map [T, E] bool, and the workspace whose tail
    (``summary``) holds the attached loss, the aux loss and the metric vector.

    The attached loss (alpha * aux + mu * KL, times Megatron's per-token factor) is not an
    output: the backward adds its gradient itself, scaled by
    ``MoEAuxLossAutoScaler.main_loss_backward_scale`` exactly as Megatron's scaler would have
    (the scaler gives an attached loss the gradient 1 * that scale whenever the probs get a
    gradient), which saves the scaler's autograd node and its kernels."""

    @staticmethod
    def forward(
        ctx, x_TH, weight_EC, log_temperature, expert_is_local_E, delta, ec_min,
        topk, aux_factor, locality_coeff, locality_eps, loss_scale, tp_cp_group, slots,
        lb_scale, ticket, affinity, capacity, step,
    ):  # fmt: skip
        T, H = x_TH.shape
        E, C = weight_EC.shape
        dev = x_TH.device
        plan = forward_plan(T, E, C, _num_sms(dev.index or 0) if dev.type == "cuda" else 1)
        BT, BE, BC, warps, _ = plan.tiles
        num_parts = plan.num_parts
        probs = torch.empty(T, E, device=dev, dtype=torch.float32)
        scores = torch.empty_like(probs)
        routing_map = torch.empty(T, E, device=dev, dtype=torch.bool)
        ws = torch.empty(plan.ws_numel, device=dev)
        if ticket is None:
            ticket = torch.zeros((), device=dev, dtype=torch.int32)
        # LocMoE+'s cosine and 1/|x| (for the backward), the drop's priorities [E, T]
        aff = torch.empty_like(probs) if affinity else ws
        inv_norm = torch.empty(T, device=dev) if affinity else ws
        prio = torch.empty(E, T, device=dev) if capacity is not None else ws
        reduce_counts = tp_cp_group is not None and aux_factor  # group given only if > 1 rank
        block = slots.block if slots is not None else ws
        lb = slots.lb_values if slots is not None and slots.lb_values is not None else ws
        record = slots is not None
        record_lb = record and slots.lb_values is not None
        finalize = (delta, ec_min, block, lb, aux_factor, locality_coeff, locality_eps,
                    loss_scale, slots.column if record else 0, block.stride(0), lb_scale)  # fmt: skip
        BP = plan.BP
        # the forward finalizes in its last program; with TP/CP the metrics and the loss wait
        # for the token counts' all-reduce, with a capacity for the drop
        finalize_here = not reduce_counts and capacity is None
        _launch_fwd(
            (num_parts,), x_TH, weight_EC, log_temperature, probs, routing_map, scores, ws,
            ticket, aff, inv_norm, prio, T, plan.per_program, num_parts, expert_is_local_E,
            *finalize,
            H=H, E=E, C=C, K=topk, BT=BT, BE=BE, BC=BC, BP=BP,
            RECORD=record and finalize_here, RECORD_LB=record_lb and finalize_here,
            FINALIZE=finalize_here, AFFINITY=affinity, PRIORITY=capacity is not None,
            num_warps=warps,
        )  # fmt: skip
        if reduce_counts:
            stats = ws[num_parts * NUM_STATS * E :]
            dist.all_reduce(stats[E : 2 * E], group=tp_cp_group)
        if capacity is not None:  # the drop's last program finalizes
            drop = drop_tiles(T)
            _launch_drop(
                (E,), prio, probs, routing_map, scores, ws, ticket,
                step if step is not None else ticket, T, capacity.value,
                num_parts, expert_is_local_E, *finalize, float(capacity.value),
                float(capacity.expert_choice),
                E=E, BE=BE, BP=BP, BT=drop.BT, WHOLE_ROW=T <= DROP_WHOLE_ROW, RECORD=record,
                RECORD_LB=record_lb, COUNT_STEP=step is not None, num_warps=drop.num_warps,
            )  # fmt: skip
        elif reduce_counts:
            _launch_finalize(
                (1,), ws, expert_is_local_E, *finalize[:4], num_parts, T, *finalize[4:], 0.0, 0.0,
                E=E, BE=BE, BP=BP, FROM_STATS=True, CAPACITY=False, RECORD=record,
                RECORD_LB=record_lb, num_warps=4,
            )  # fmt: skip
        saved = (x_TH, aff, inv_norm) if affinity else ()
        ctx.save_for_backward(scores, routing_map, ws, weight_EC, log_temperature, *saved)
        ctx.coef_offset = plan.coef_offset
        ctx.x_dtype = x_TH.dtype
        ctx.with_loss = bool(aux_factor or locality_coeff)
        ctx.affinity = affinity
        ctx.mark_non_differentiable(routing_map, ws)
        ctx.set_materialize_grads(False)  # no zero [T, E] gradients for the map and workspace
        return probs, routing_map, ws

    @staticmethod
    def backward(ctx, g_probs, _g_map, _g_ws):
        scores, routing_map, ws, weight_EC, log_temperature, *saved = ctx.saved_tensors
        T, E = scores.shape
        C = weight_EC.shape[1]
        BT, BE, BC, warps, _ = backward_tiles(E, C)
        dx = torch.empty(T, E * C, device=scores.device, dtype=ctx.x_dtype)
        g_loss = None
        if ctx.with_loss:
            g_loss = MoEAuxLossAutoScaler.main_loss_backward_scale
            if g_loss is None:  # what the scaler would create: 1
                g_loss = _one(scores.device)
            elif g_loss.device != scores.device:
                g_loss = g_loss.to(scores.device)
        x_TH, aff, inv_norm = saved if ctx.affinity else (ws, ws, ws)
        _launch_bwd(
            (-(-T // BT),), g_probs.contiguous() if g_probs is not None else scores,
            g_loss if g_loss is not None else ws,
            scores, routing_map, ws, ctx.coef_offset, weight_EC, log_temperature, dx,
            x_TH, aff, inv_norm, T,
            H=E * C, E=E, C=C, BT=BT, BE=BE, BC=BC,
            HAS_GPROBS=g_probs is not None, HAS_GLOSS=g_loss is not None,
            AFFINITY=ctx.affinity, num_warps=warps,
        )  # fmt: skip
        return (dx,) + (None,) * 17


def summary(ws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(attached loss, aux loss, metric vector [ROUTER_METRICS]) from a forward's workspace."""
    tail = ws[-SUMMARY:]
    return tail[0], tail[1], tail[2:]


def route(
    x_TH, weight_EC, log_temperature, expert_is_local_E, delta, ec_min, spec, tp_cp_group,
    with_losses: bool, loss_scale: float = 1.0, slots: TrackerSlots | None = None,
    ticket: torch.Tensor | None = None, affinity: bool = False, capacity: Capacity | None = None,
    step: torch.Tensor | None = None,
):  # fmt: skip
    """The kernels' version of ``fused.route_with_losses`` for the fixed gate (with
    ``capacity``, of ``fused.capacity_route_with_losses``; ``affinity``: LocMoE+'s cosine gate,
    whose affinity also ranks the drop): (probs, routing_map, workspace); the attached loss
    reaches the gradient by itself (see ``LocMoERouteFunction``) and ``slots`` receive the
    metrics. ``loss_scale`` multiplies the attached loss (Megatron's per-token-loss factor).
    ``ticket``: a zero int32 scalar the forward may use and leaves zero (a router keeps one;
    its launches are stream-ordered), else a fresh one per call. ``step``: an int64 counter
    the drop adds one to (the router's routing step; only with ``capacity``)."""
    if step is not None and capacity is None:
        raise ValueError("the step counter is counted by the drop: pass a capacity with it")
    T = x_TH.shape[0]
    # ProcessGroup.size(), not dist.get_world_size: that one runs much more Python per call
    group_size = 1 if tp_cp_group is None else tp_cp_group.size()
    E = weight_EC.shape[0]
    aux_factor = locality_coeff = 0.0
    if with_losses:
        if spec.aux_coeff:
            total = T * group_size
            aux_factor = spec.aux_scale * E * spec.aux_coeff / (spec.topk * total * total)
        locality_coeff = spec.locality_coeff
    return LocMoERouteFunction.apply(
        x_TH.contiguous(), weight_EC.contiguous(), log_temperature, expert_is_local_E,
        delta, ec_min, spec.topk, aux_factor, locality_coeff, spec.locality_eps, loss_scale,
        tp_cp_group if group_size > 1 else None, slots,
        1.0 / spec.aux_coeff if spec.aux_coeff else 0.0, ticket, affinity, capacity, step,
    )  # fmt: skip
