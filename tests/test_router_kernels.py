"""The router's Triton kernels (forward, drop, finalize, backward) equal the graphs they
replace, ``fused.route_with_losses`` (dropless) and ``fused.capacity_route_with_losses`` (a
capacity, LocMoE's W x gate or LocMoE+'s affinity): probs, routing map, attached and aux
losses, the metric vector, the metrics added to the tracker and the input gradient, over shapes
with non-power-of-two chunks and expert counts, top-1 to top-4, fp32 and bf16 tokens, eval
mode, locality off, per-token loss scaling, partial gradients, and drops with exact ties.

On the CPU they run in Triton's interpreter (conftest turns it on); with
LOCMOE_TEST_DEVICE=cuda on the GPU. Router-level equality on 2 ranks (with TP) is in
test_fused_router.py.
"""

from __future__ import annotations

import os

import pytest
import torch
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from megatron_locmoe.metrics import CAPACITY_EC_MIN, ROUTER_METRICS, TOKENS_DROPPED
from megatron_locmoe.routers import fused, kernels

DEVICE = torch.device("cuda" if os.environ.get("LOCMOE_TEST_DEVICE") == "cuda" else "cpu")
# no silent skip: without triton (or the interpreter on the CPU) these tests fail; only
# LOCMOE_TRITON_ROUTER=0, which turns the kernels off everywhere, skips them
pytestmark = pytest.mark.skipif(kernels.DISABLED, reason="LOCMOE_TRITON_ROUTER=0")


def test_kernels_run_on_this_device():
    assert kernels.available(DEVICE), f"no triton for {DEVICE} (the CPU needs TRITON_INTERPRET=1)"


CASES = {
    # T, H, E, k, dtype, extra
    "top2_fp32": (37, 64, 8, 2, torch.float32, {}),
    "top1_bf16": (20, 112, 16, 1, torch.bfloat16, {}),
    "chunk28_top3": (9, 224, 8, 3, torch.float32, {}),  # C = 28: masked chunk tail
    "six_experts_top4": (13, 96, 6, 4, torch.float32, {}),  # E not a power of two
    "many_strips": (301, 32, 4, 1, torch.float32, {}),  # > 4 strips and a ragged last one
    "eval": (17, 64, 8, 2, torch.float32, dict(with_losses=False)),
    "no_locality": (17, 64, 8, 2, torch.float32, dict(locality_coeff=0.0)),
    "per_token_scale": (17, 64, 8, 2, torch.float32, dict(loss_scale=34.0)),
    "loss_grad_only": (17, 64, 8, 2, torch.float32, dict(probs_grad=False)),  # g_probs = 0
    "probs_grad_only": (17, 64, 8, 2, torch.float32, dict(loss_grad=False)),
    # a transposed probs gradient, as Megatron's alltoall permutation hands it back
    "noncontiguous_grad": (17, 64, 8, 2, torch.float32, dict(transposed_grad=True)),
    # tokens 4 bytes off 16-byte alignment, after top2_fp32 compiled the aligned variant at
    # the same shape: FastLaunch must not reuse it (on the GPU)
    "misaligned_tokens": (37, 64, 8, 2, torch.float32, dict(misaligned=True)),
    # a capacity: LocMoE's bound (drop by probability), LocMoE+ (affinity gate, drop by it)
    "bound_top1": (64, 64, 8, 1, torch.float32, dict(capacity=5)),
    "bound_top2_bf16": (37, 112, 8, 2, torch.bfloat16, dict(capacity=6)),
    "plus_top1": (64, 64, 8, 1, torch.float32, dict(capacity=5, affinity=True)),
    "plus_top1_bf16": (64, 64, 8, 1, torch.bfloat16, dict(capacity=4, affinity=True)),
    "plus_six_experts_top2": (29, 96, 6, 2, torch.float32, dict(capacity=4, affinity=True)),
    # every token twice: exact ties, the lower token index kept (a stable sort's order)
    "plus_ties": (40, 64, 8, 1, torch.float32, dict(capacity=3, affinity=True, twins=True)),
    "bound_ties_top2": (40, 64, 8, 2, torch.float32, dict(capacity=5, twins=True)),
    "plus_capacity_1": (33, 64, 8, 1, torch.float32, dict(capacity=1, affinity=True)),
    "plus_no_drop": (17, 64, 8, 1, torch.float32, dict(capacity=17, affinity=True)),
    "plus_eval": (33, 64, 8, 1, torch.float32, dict(capacity=3, affinity=True, with_losses=False)),
    # a row of 1024 tokens in registers (700 used), ties throughout
    "plus_long_row": (700, 32, 4, 1, torch.float32, dict(capacity=150, affinity=True, twins=True)),
    # the drop streaming its rows in strips (as beyond 16K tokens): ties across strips
    "plus_streamed": (
        700,
        32,
        4,
        1,
        torch.float32,
        dict(capacity=151, affinity=True, twins=True, rows=256),
    ),  # an odd capacity splits a pair of twins: one kept, one dropped
    "bound_streamed_top2": (300, 64, 8, 2, torch.float32, dict(capacity=41, twins=True, rows=64)),
    # top-3 of 4 experts: negative affinities among the routed, so their order counts
    "plus_negative_affinities": (64, 64, 4, 3, torch.float32, dict(capacity=44, affinity=True)),
    # tiny tokens: probs within 1e-4 of 1/E, which share their high bits, so the drop's
    # threshold is decided in its low digits
    "bound_close_probs": (200, 64, 8, 1, torch.float32, dict(capacity=17, x_scale=1e-4)),
    "plus_close_affinities_top2": (
        150,
        64,
        8,
        2,
        torch.float32,
        dict(capacity=23, affinity=True, x_scale=1e-3),
    ),
}


def _run(route, x, g_TE, with_probs_grad, loss_grad):
    x = x.detach().requires_grad_(True)  # a new leaf on the same storage (alignment kept)
    probs, routing_map, attached, aux, vector = route(x)
    loss = (probs * (g_TE if with_probs_grad else 0)).sum()
    if attached.requires_grad:  # the reference: the graph's attached loss, by hand
        loss = loss + loss_grad * attached
    loss.backward()
    return probs.detach(), routing_map, float(attached), float(aux), vector, x.grad.float()


@pytest.mark.parametrize("case", list(CASES))
def test_kernels_equal_compiled_graph(case, monkeypatch):
    T, H, E, k, dtype, extra = CASES[case]
    extra = dict(extra)
    if "rows" in extra:  # the drop streams rows longer than this, in strips (drop_tiles)
        monkeypatch.setattr(kernels, "DROP_WHOLE_ROW", extra.pop("rows"))
        monkeypatch.setattr(kernels, "DROP_STRIP", 64)
        monkeypatch.setattr(kernels, "drop_tiles", kernels.drop_tiles.__wrapped__)
    with_losses = extra.pop("with_losses", True)
    loss_scale = extra.pop("loss_scale", 1.0)
    with_probs_grad = extra.pop("probs_grad", True)
    loss_grad = 1.7 if extra.pop("loss_grad", True) else 0.0
    capacity = extra.pop("capacity", None)
    affinity = extra.pop("affinity", False)
    gen = torch.Generator().manual_seed(sum(map(ord, case)))
    x = torch.randn(T, H, generator=gen) * extra.pop("x_scale", 2.0)
    if extra.pop("twins", False):
        x[1::2] = x[0::2][: T // 2]
    x = x.to(dtype).to(DEVICE)
    g_TE = torch.randn(T, E, generator=gen).to(DEVICE)
    if extra.pop("misaligned", False):
        buffer = torch.empty(T * H + 1, dtype=dtype, device=DEVICE)
        x = buffer[1:].view(T, H).copy_(x)
        assert x.data_ptr() % 16
    if extra.pop("transposed_grad", False):
        g_TE = g_TE.t().contiguous().t()  # same values, column-major
        assert not g_TE.is_contiguous()
    weight = torch.full((E, H // E), E / H, device=DEVICE)
    log_t = torch.tensor(0.3, device=DEVICE)
    local = torch.arange(E, device=DEVICE) < E // 2
    delta = torch.tensor(0.2, dtype=torch.float64, device=DEVICE)
    # an unbounded capacity bound: logged as the capacity on both paths (inf without one)
    ec_min = torch.tensor(float("inf"), dtype=torch.float64, device=DEVICE)
    spec = fused.LossSpec(
        topk=k,
        aux_coeff=0.01,
        aux_scale=0.5,
        locality_coeff=extra.pop("locality_coeff", 0.1),
        locality_eps=0.05,
    )

    expert_choice = capacity is not None and capacity < T
    capacity_tensor = torch.tensor(capacity or 0, device=DEVICE)

    def reference(xr):
        if capacity is None:
            probs, routing_map, _, attached, aux, vector = fused.route_with_losses(
                xr, weight, log_t, None, local, delta, ec_min, spec, None, with_losses
            )
        else:
            probs, routing_map, attached, aux, vector = fused.capacity_route_with_losses(
                xr, weight, log_t, None, local, delta, ec_min, capacity_tensor, spec, None,
                with_losses, affinity, 0.0, expert_choice,
            )  # fmt: skip
        return probs, routing_map, attached * loss_scale, aux, vector

    ticket = torch.zeros((), dtype=torch.int32, device=DEVICE)  # a router's, reused
    # the tracker's [metrics, layers] block and Megatron's load_balancing_loss, layer column 1
    block = torch.zeros(len(ROUTER_METRICS), 2, device=DEVICE)
    lb_values = torch.zeros(2, device=DEVICE) if with_losses else None
    slots = kernels.TrackerSlots(block, lb_values, 1)
    drop = None if capacity is None else kernels.Capacity(capacity, expert_choice)
    # the router's routing step, which the drop counts
    step = None if drop is None else torch.tensor(41, dtype=torch.long, device=DEVICE)

    def kernel(xr):
        probs, routing_map, ws = kernels.route(
            xr, weight, log_t, local, delta, ec_min, spec, None, with_losses, loss_scale,
            slots, ticket, affinity, drop, step,
        )  # fmt: skip
        assert int(ticket) == 0, "the finishing program must reset the ticket"
        assert step is None or int(step) == 42, "the drop counts the routing step once"
        return (probs, routing_map, *kernels.summary(ws))

    ref = _run(reference, x, g_TE, with_probs_grad, loss_grad)
    # the kernels take the attached loss's gradient from Megatron's aux-loss scaler
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(loss_grad, device=DEVICE))
    try:
        got = _run(kernel, x, g_TE, with_probs_grad, loss_grad)
    finally:
        MoEAuxLossAutoScaler.main_loss_backward_scale = None
    assert torch.equal(ref[1], got[1]), "routing maps differ"
    assert (ref[0] - got[0]).abs().max() < 1e-6
    assert got[2] == pytest.approx(ref[2], rel=1e-5, abs=1e-8)
    assert got[3] == pytest.approx(ref[3], rel=1e-5, abs=1e-8)
    assert torch.allclose(got[4], ref[4], rtol=1e-5, atol=1e-7), (got[4], ref[4])
    slot = ROUTER_METRICS.index(CAPACITY_EC_MIN)
    # logged capped at the capacity (inf without one): metrics.CAPACITY_EC_MIN
    logged = float("inf") if capacity is None else float(capacity)
    assert got[4][slot] == ref[4][slot] == logged
    # what the finalize added to the tracker: the metric vector in column 1, nothing in 0
    ec_row = torch.arange(len(ROUTER_METRICS), device=DEVICE) == slot
    assert torch.allclose(block[~ec_row, 1], ref[4][~ec_row], rtol=1e-5, atol=1e-7)
    assert block[slot, 1] == logged and not block[:, 0].any()
    if with_losses:  # the aux loss over alpha, as the router's _record_aux_loss writes it
        assert float(lb_values[1]) == pytest.approx(ref[3] / spec.aux_coeff, rel=1e-5)
        assert float(lb_values[0]) == 0.0
    if capacity is not None:
        dropped = ref[4][ROUTER_METRICS.index(TOKENS_DROPPED)]
        assert (capacity < T * k / E) == bool(dropped > 0), "the case must drop iff it can"
    scale = ref[5].abs().max()
    assert float(scale) > 0  # the gradient was exercised
    tol = 1e-5 if dtype == torch.float32 else 2**-7  # bf16: dx rounds to one ulp either way
    assert float((ref[5] - got[5]).abs().max() / scale) <= tol


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs: LOCMOE_TEST_DEVICE=cuda")
def test_kernels_replay_in_cuda_graph():
    """Forward and backward captured once replay what eager calls give for new token values
    written into the captured input (nothing is baked in on the host at capture), add their
    metrics to the tracker block once per replay, and leave the ticket zero: what Megatron's
    CUDA graphs (``--cuda-graph-modules moe_router``) need from the router."""
    T, H, E, k = 96, 128, 8, 2
    weight = torch.full((E, H // E), E / H, device=DEVICE)
    log_t = torch.tensor(0.3, device=DEVICE)
    local = torch.arange(E, device=DEVICE) < E // 2
    delta = torch.tensor(0.2, dtype=torch.float64, device=DEVICE)
    ec_min = torch.tensor(5.0, dtype=torch.float64, device=DEVICE)
    spec = fused.LossSpec(topk=k, aux_coeff=0.01, aux_scale=1.0, locality_coeff=0.1,
                          locality_eps=0.05)  # fmt: skip
    ticket = torch.zeros((), dtype=torch.int32, device=DEVICE)
    gen = torch.Generator().manual_seed(11)
    inputs = [(torch.randn(T, H, generator=gen) * 2).to(DEVICE) for _ in range(3)]
    g_TE = torch.randn(T, E, generator=gen).to(DEVICE)
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.7, device=DEVICE))

    def step(x, block, lb):
        probs, routing_map, ws = kernels.route(
            x, weight, log_t, local, delta, ec_min, spec, None, True, 1.0,
            kernels.TrackerSlots(block, lb, 0), ticket,
        )  # fmt: skip
        (probs * g_TE).sum().backward()
        grad, x.grad = x.grad, None
        return probs.detach(), routing_map, grad

    def fresh():
        return torch.zeros(len(ROUTER_METRICS), 1, device=DEVICE), torch.zeros(1, device=DEVICE)

    try:
        eager = []
        for values in inputs[1:]:
            block, lb = fresh()
            eager.append((step(values.clone().requires_grad_(True), block, lb), block, lb))
        x = inputs[0].clone().requires_grad_(True)
        block, lb = fresh()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # compile and warm up outside the capture
                step(x, block, lb)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step(x, block, lb)
        for (want, want_block, want_lb), values in zip(eager, inputs[1:], strict=True):
            with torch.no_grad():
                x.copy_(values)
            block.zero_(), lb.zero_()
            graph.replay()
            graph.replay()  # two micro-batches: the metrics add up, the outputs are the same
            torch.cuda.synchronize()
            assert int(ticket) == 0
            assert torch.equal(captured[1], want[1]), "routing maps differ"
            assert (captured[0] - want[0]).abs().max() < 1e-6
            assert float((captured[2] - want[2]).abs().max() / want[2].abs().max()) < 1e-5
            assert torch.allclose(block, 2 * want_block, rtol=1e-5, atol=1e-7), (block, want_block)
            assert torch.allclose(lb, 2 * want_lb, rtol=1e-5) and float(want_lb) > 0
    finally:
        MoEAuxLossAutoScaler.main_loss_backward_scale = None
