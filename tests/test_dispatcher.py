"""The hierarchical dispatcher against Megatron's flat alltoall dispatcher, on 8 gloo ranks.

Every case builds one real Megatron MoELayer (TopKRouter, SequentialMLP), runs forward+backward
with Megatron's MoEAlltoAllTokenDispatcher, swaps in the hierarchical one
(``use_hierarchical_dispatcher``) and runs again with the same weights and input. Checked:
- what every expert receives (rows, probs, tokens per expert): bitwise equal and in the same
  order, and equal to an expectation built here from the gathered inputs and routing maps;
- outputs and gradients: bitwise without dedup; with dedup the expert inputs, router and expert
  grads stay bitwise, while the output and the input grad differ only by float32 summation order
  (node-side pre-reduction), checked to 1e-5 relative;
- conservation: each top-k assignment (recomputed here from the router weights) arrives exactly
  once or was dropped by capacity;
- accounting: per-rank and group copies/bytes per link equal a per-token count over the routing
  maps and the node map; dedup removes exactly sum(k_node - 1) inter-node copies.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from megatron_locmoe.sim.cluster import ParallelLayout
from megatron_locmoe.sim.testing import build_moe_layer, moe_config

SEQ, BATCH = 12, 2


# --------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------


def _capture(layer) -> dict:
    """Record the router's output and what the experts receive (instance-level wrappers)."""
    seen: dict = {}
    experts_forward, router_forward = layer.experts.forward, layer.router.forward

    def experts(x, tokens_per_expert, probs, **kwargs):
        seen["input"] = x.detach().clone()
        seen["tokens_per_expert"] = tokens_per_expert.clone()
        seen["probs"] = probs.detach().clone()
        return experts_forward(x, tokens_per_expert, probs, **kwargs)

    def router(*args, **kwargs):
        probs, routing_map = router_forward(*args, **kwargs)
        seen["router_probs"], seen["map"] = probs.detach().clone(), routing_map.clone()
        return probs, routing_map

    layer.experts.forward, layer.router.forward = experts, router
    return seen


def _step(layer, x, grad_out, seen, device) -> dict:
    """Forward + backward on ``device``; everything returned is copied to the CPU."""
    layer.zero_grad(set_to_none=True)
    x = x.clone().to(device).requires_grad_(True)
    out, _ = layer(x)
    out.backward(grad_out.to(device))
    return {
        "out": out.detach().cpu(),
        "x_grad": x.grad.cpu(),
        "router_grad": layer.router.weight.grad.cpu(),
        "expert_grads": [p.grad.cpu() for p in layer.experts.parameters()],
        **{k: v.cpu() for k, v in seen.items()},
    }


def _inputs(ctx, config, skew: bool, uneven: bool):
    """Router weights replicated; experts, input and output grad random per rank.

    ``skew``: rank 0 routes everything to expert 0 (and 1), nobody routes to the last expert.
    ``uneven``: rank 3 has a shorter sequence."""
    H, E = config.hidden_size, config.num_moe_experts
    gen = torch.Generator().manual_seed(100 + ctx.rank)
    seq = 5 if (uneven and ctx.rank == 3) else SEQ
    x = torch.randn(seq, BATCH, H, generator=gen)
    router_w = torch.Generator().manual_seed(7)
    weight = torch.randn(E, H, generator=router_w) * 0.5
    if skew:
        weight = torch.zeros(E, H)
        weight[:, :E] = 3 * torch.eye(E)
        weight += 0.1 * torch.randn(E, H, generator=router_w)
        x[..., E - 1] = -5.0  # the last expert never wins
        if ctx.rank == 0:
            x[..., 0], x[..., 1] = 20.0, 10.0
    return x, torch.randn_like(x), weight, gen


def _gather(obj, group) -> list:
    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _count_traffic(maps, N, L, nle, hidden_bytes, prob_bytes):
    """Per-token count of every rank's sends; written independently of the dispatcher."""
    ep, W = N * L, L * nle
    zero = {"intra": 0, "inter": 0, "intra_bytes": 0, "inter_bytes": 0}
    flat = [dict(zero) for _ in range(ep)]
    hier = [dict(zero) for _ in range(ep)]
    dedup = [dict(zero) for _ in range(ep)]
    saved_by_dedup = 0
    per_copy = 2 * hidden_bytes + prob_bytes
    row_rank = 2 * hidden_bytes + 2 * nle * prob_bytes
    row_node = 2 * hidden_bytes + 2 * W * prob_bytes

    def add(table, rank, link, n, nbytes):
        table[rank][link] += n
        table[rank][link + "_bytes"] += n * nbytes

    for s, routing_map in enumerate(maps):
        a, i = divmod(s, L)
        for row in routing_map.tolist():
            experts = [e for e, on in enumerate(row) if on]
            dest_ranks = sorted({e // nle for e in experts})
            for e in experts:
                d = e // nle
                b, j = divmod(d, L)
                if b != a:
                    add(flat, s, "inter", 1, per_copy)
                    add(hier, a * L + j, "inter", 1, per_copy)  # forwarded by rail (a, j)
                elif d != s:
                    add(flat, s, "intra", 1, per_copy)
                if j != i:
                    add(hier, s, "intra", 1, per_copy)  # hop 1 to (a, j)
            for d in dest_ranks:
                b, j = divmod(d, L)
                if b == a and d != s:
                    add(dedup, s, "intra", 1, row_rank)  # hop 1
                if b != a and j != i:
                    add(dedup, b * L + i, "intra", 1, row_rank)  # hop 3 by rail receiver (b, i)
            for b in sorted({d // L for d in dest_ranks} - {a}):
                add(dedup, s, "inter", 1, row_node)  # hop 2: once per remote node
                saved_by_dedup += sum(1 for e in experts if e // W == b) - 1
    return flat, hier, dedup, saved_by_dedup


def _traffic_dict(t) -> dict:
    return {
        "intra": t.intra_node_copies,
        "inter": t.inter_node_copies,
        "intra_bytes": t.intra_node_bytes,
        "inter_bytes": t.inter_node_bytes,
    }


def _run_case(ctx, topo, *, topk, dedup, capacity=None, experts=8, skew=False, uneven=False):
    from megatron.core import parallel_state

    from megatron_locmoe.dispatch.dispatcher import use_hierarchical_dispatcher

    ep, tp = ctx.layout.ep, ctx.layout.tp
    etp = ctx.layout.etp or tp
    extra = {}
    if capacity is not None:
        extra["moe_expert_capacity_factor"] = 1.0
        extra["moe_pad_expert_input_to_capacity"] = capacity == "pad"
    config = moe_config(
        ep=ep,
        tp=tp,
        expert_tensor_parallel_size=etp,
        num_moe_experts=experts,
        moe_router_topk=topk,
        **extra,
    )
    layer = build_moe_layer(config)
    x, grad_out, router_weight, gen = _inputs(ctx, config, skew, uneven)
    layer.router.weight.data.copy_(router_weight)
    for p in layer.experts.parameters():
        p.data.normal_(0, 0.3, generator=gen)
    layer.to(ctx.device)
    seen = _capture(layer)

    # Megatron's expert-TP all-gather uses a list all_gather, which gloo cannot do with uneven
    # sizes: with expert-TP > 1 the flat reference only runs with drop-and-pad (equal sizes);
    # otherwise the hierarchical dispatcher is checked against the gathered expectation below.
    flat_reference = etp == 1 or capacity == "pad"
    flat = _step(layer, x, grad_out, seen, ctx.device) if flat_reference else None
    flat_kind = type(layer.token_dispatcher).__name__
    dispatcher = use_hierarchical_dispatcher(layer, topo, dedup=dedup)
    hier = _step(layer, x, grad_out, seen, ctx.device)
    traffic = dispatcher.last_traffic

    res: dict = {
        "backend": dist.get_backend(),
        "device": str(ctx.device),
        "flat_kind": flat_kind,
        "scheme": traffic.scheme,
        "case": dict(
            topk=topk, dedup=dedup, capacity=capacity, experts=experts, skew=skew, uneven=uneven
        ),
    }
    res["out_norm"] = hier["out"].norm().item()
    res["flat_reference"] = flat_reference
    if flat_reference:
        # 1. experts receive the same rows, probs and counts, bitwise and in order
        res["same_expert_input"] = all(
            torch.equal(flat[k], hier[k]) for k in ("input", "probs", "tokens_per_expert")
        )
        res["same_routing"] = torch.equal(flat["map"], hier["map"])
        # 2. outputs and grads
        res["bitwise"] = {
            k: torch.equal(flat[k], hier[k]) for k in ("out", "x_grad", "router_grad")
        }
        res["bitwise"]["expert_grads"] = all(
            torch.equal(f, h)
            for f, h in zip(flat["expert_grads"], hier["expert_grads"], strict=True)
        )
        res["rel_diff"] = {
            k: ((flat[k] - hier[k]).abs().max() / flat[k].abs().max().clamp_min(1e-30)).item()
            for k in ("out", "x_grad")
        }

    # 3. expectation from the gathered inputs and maps: sources in [tp][ep] order per expert
    tp_ep = parallel_state.get_expert_tensor_and_model_parallel_group()
    xs = x.view(-1, x.shape[-1])
    everyone = _gather((xs, hier["map"], hier["router_probs"]), tp_ep)  # index ep_r * tp + tp_r
    sources = [everyone[e * etp + t] for t in range(etp) for e in range(ep)]
    rows, probs, counts = [], [], []
    for expert in layer.local_expert_indices:
        n = 0
        for xs_s, map_s, probs_s in sources:
            rows.append(xs_s[map_s[:, expert]])
            probs.append(probs_s[map_s[:, expert], expert])
            n += int(map_s[:, expert].sum())
        counts.append(n)
    res["expected_expert_input"] = (
        torch.equal(torch.cat(rows), hier["input"])
        and torch.equal(torch.cat(probs), hier["probs"])
        and counts == hier["tokens_per_expert"].tolist()
    )

    # 4. conservation against an independent top-k of the router logits
    logits = xs @ router_weight.T
    pre = torch.zeros_like(hier["map"]).scatter(1, logits.topk(topk, dim=1).indices, True)
    post = hier["map"]
    res["conservation"] = {
        "assigned": int(pre.sum()),
        "arrived_here": int(hier["tokens_per_expert"].sum()),
        "dispatched": int(post.sum()),
        "dropped": int((pre & ~post).sum()),
        "padded": int((post & ~pre).sum()),
        "post_subset_of_pre": bool((post <= pre).all()) or capacity == "pad",
    }

    # 5. accounting, counted per token over this EP group's maps
    my_slice = [
        everyone[e * etp + parallel_state.get_expert_tensor_parallel_rank()][1] for e in range(ep)
    ]
    nle = experts // ep
    f, h, d, saved = _count_traffic(
        my_slice, topo.num_nodes, topo.ranks_per_node, nle, x.shape[-1] * 4, 4
    )
    me = topo.ep_rank
    expected = d if traffic.scheme == "hierarchical+dedup" else h
    res["traffic"] = {
        "rank": _traffic_dict(traffic.rank),
        "flat_rank": _traffic_dict(traffic.flat_rank),
        "expected_rank": expected[me] if traffic.scheme != "flat" else f[me],
        "expected_flat_rank": f[me],
    }
    if traffic.group is not None:
        total = {k: sum(r[k] for r in expected) for k in expected[0]}
        res["traffic"].update(
            group=_traffic_dict(traffic.group),
            flat_group=_traffic_dict(traffic.flat_group),
            expected_group=total,
            expected_flat_group={k: sum(r[k] for r in f) for k in f[0]},
            saved_by_dedup=saved,
        )
    return res


def dispatcher_cases(ctx, cases: list[dict]) -> list[dict]:
    """Run many configurations in one job (the cluster and the topology are reused)."""
    topo = ctx.topology()
    return [_run_case(ctx, topo, **case) for case in cases]


def unsupported_settings(ctx) -> list[str]:
    from megatron_locmoe.dispatch.dispatcher import use_hierarchical_dispatcher

    topo = ctx.topology()
    messages = []
    for override in (
        {"moe_permute_fusion": True},
        {"moe_token_dispatcher_type": "flex"},
        {"overlap_moe_expert_parallel_comm": True},
    ):
        layer = build_moe_layer(moe_config(ep=ctx.layout.ep))
        for k, v in override.items():
            setattr(layer.config, k, v)
        try:
            use_hierarchical_dispatcher(layer, topo)
        except ValueError as err:
            messages.append(str(err))
    return messages


# --------------------------------------------------------------------------------------------
# Driver side
# --------------------------------------------------------------------------------------------


def _check(results: list[list[dict]], etp: int = 1) -> None:
    """``results[rank][case]``; raise with the case on the first failed property."""
    for rank, per_case in enumerate(results):
        for r in per_case:
            where = f"rank {rank}, case {r['case']}, scheme {r['scheme']}"
            assert r["flat_kind"] == "MoEAlltoAllTokenDispatcher", where
            assert r["out_norm"] > 0, where
            assert r["expected_expert_input"], f"{where}: expert input != expectation"
            dedup = r["scheme"] == "hierarchical+dedup"
            if r["flat_reference"]:
                assert r["same_routing"], where
                assert r["same_expert_input"], f"{where}: experts receive different tokens"
                assert r["bitwise"]["router_grad"], f"{where}: router grad differs"
                assert r["bitwise"]["expert_grads"], f"{where}: expert grads differ"
                if not dedup:  # no node-side pre-reduction: everything bitwise
                    assert r["bitwise"]["out"], f"{where}: {r['rel_diff']}"
                    assert r["bitwise"]["x_grad"], f"{where}: {r['rel_diff']}"
                for k, v in r["rel_diff"].items():  # with dedup: float32 summation order only
                    assert v < 1e-5, f"{where}: {k} differs by {v:.2e} (relative)"
            c = r["conservation"]
            if r["case"]["capacity"] != "pad":
                assert c["post_subset_of_pre"], where
                assert c["dispatched"] + c["dropped"] == c["assigned"], f"{where}: {c}"
            if r["case"]["capacity"] is None:
                assert c["dropped"] == 0, where
            t = r["traffic"]
            assert t["rank"] == t["expected_rank"], f"{where}: {t}"
            assert t["flat_rank"] == t["expected_flat_rank"], f"{where}: {t}"
            if "group" in t:
                assert t["group"] == t["expected_group"], f"{where}: {t}"
                assert t["flat_group"] == t["expected_flat_group"], f"{where}: {t}"
                if dedup:
                    # dedup removes exactly sum over (token, remote node) of (k_node - 1) copies
                    assert t["group"]["inter"] == t["flat_group"]["inter"] - t["saved_by_dedup"]
                else:
                    assert t["group"]["inter"] == t["flat_group"]["inter"]
    # every assignment arrives exactly once (on each of the expert-TP ranks of its expert)
    for case_idx in range(len(results[0])):
        arrived = sum(per_case[case_idx]["conservation"]["arrived_here"] for per_case in results)
        dispatched = sum(per_case[case_idx]["conservation"]["dispatched"] for per_case in results)
        assert arrived == etp * dispatched, f"case {results[0][case_idx]['case']}: {arrived}"


CASES_2x4 = [
    dict(topk=1, dedup=False),
    dict(topk=1, dedup=True),
    dict(topk=4, dedup=False),
    dict(topk=4, dedup=True),
    dict(topk=2, dedup=True, experts=16),
    dict(topk=4, dedup=False, experts=16),
    dict(topk=2, dedup=False, capacity="drop"),
    dict(topk=4, dedup=True, capacity="drop", experts=16),
    dict(topk=2, dedup=False, capacity="pad"),
    dict(topk=4, dedup=True, capacity="pad", experts=16),
    dict(topk=1, dedup=True, capacity="pad"),
    dict(topk=1, dedup=False, skew=True, uneven=True),
    dict(topk=2, dedup=True, skew=True, uneven=True),
    dict(topk=4, dedup=True, uneven=True, experts=16),
]


def test_equivalence_2x4(cluster8):
    """2 nodes x 4: top-1/2/4, 1 or 2 experts per rank, capacity drop and drop+pad, dedup on and
    off, a rank that sends nothing off its node, an expert nobody routes to, uneven T."""
    results = cluster8.run(
        dispatcher_cases, cases=CASES_2x4, layout=ParallelLayout(devices_per_node=4, ep=8)
    )
    _check(results)
    for i in (11, 12):  # rank 0 sends nothing off its node, rank 7 receives nothing
        assert results[0][i]["traffic"]["flat_rank"]["inter"] == 0
        assert results[7][i]["conservation"]["arrived_here"] == 0
    assert results[0][3]["traffic"]["saved_by_dedup"] > 0  # top-4 over 2 nodes: dedup saves


@pytest.mark.parametrize("devices_per_node", [8, 2, 1])
def test_equivalence_other_layouts(cluster8, devices_per_node):
    """1x8 (EP inside one node: flat fallback), 4x2 and 8x1."""
    cases = [dict(topk=1, dedup=False), dict(topk=4, dedup=False), dict(topk=4, dedup=True)]
    if devices_per_node == 2:
        cases.append(dict(topk=2, dedup=True, capacity="drop", experts=16))
    results = cluster8.run(
        dispatcher_cases,
        cases=cases,
        layout=ParallelLayout(devices_per_node=devices_per_node, ep=8),
    )
    _check(results)
    schemes = {r["scheme"] for r in results[0]}
    if devices_per_node == 8:
        assert schemes == {"flat"}
        assert all(r["traffic"]["rank"]["inter"] == 0 for per in results for r in per)
    else:
        assert schemes == {"hierarchical", "hierarchical+dedup"}


@pytest.mark.parametrize("devices_per_node", [1, 2])
def test_equivalence_two_ranks(cluster2, devices_per_node):
    """2 nodes x 1 rank (every hop a real cross-node hop: hop 1 is empty, hop 2 is the rail)
    and 1 node x 2 (flat fallback); the layouts the 2-GPU NCCL run uses."""
    cases = [
        dict(topk=1, dedup=False),
        dict(topk=2, dedup=False),
        dict(topk=4, dedup=True),
        dict(topk=2, dedup=True, capacity="drop"),
        dict(topk=2, dedup=False, capacity="pad"),
    ]
    results = cluster2.run(
        dispatcher_cases,
        cases=cases,
        layout=ParallelLayout(devices_per_node=devices_per_node, ep=2),
    )
    _check(results)
    expected = {"flat"} if devices_per_node == 2 else {"hierarchical", "hierarchical+dedup"}
    assert {r["scheme"] for r in results[0]} == expected
    # LOCMOE_TEST_DEVICE=cuda runs this on two GPUs over NCCL (the device machine)
    backend = {"cpu": "gloo", "cuda": "nccl"}[os.environ.get("LOCMOE_TEST_DEVICE", "cpu")]
    assert {(r["backend"], r["device"].split(":")[0]) for per in results for r in per} == {
        (backend, "cpu" if backend == "gloo" else "cuda")
    }


def test_equivalence_tensor_parallel(cluster8):
    """2x4 with TP=2 + sequence parallel: expert-TP 2 (EP=4, EP group spans 2 ranks per node)
    and expert-TP 1 (EP=8)."""
    cases = [
        dict(topk=2, dedup=False),
        dict(topk=4, dedup=True, experts=16),
        dict(topk=2, dedup=False, capacity="pad"),
    ]
    results = cluster8.run(
        dispatcher_cases, cases=cases, layout=ParallelLayout(devices_per_node=4, ep=4, tp=2, etp=2)
    )
    _check(results, etp=2)
    results = cluster8.run(
        dispatcher_cases,
        cases=cases[:2],
        layout=ParallelLayout(devices_per_node=4, ep=8, tp=2, etp=1),
    )
    _check(results)


def test_unsupported_settings_raise(cluster8):
    messages = cluster8.run(unsupported_settings, layout=ParallelLayout(devices_per_node=4, ep=8))
    for m in messages:
        assert len(m) == 3
        assert "moe_permute_fusion" in m[0] and "set it to False" in m[0]
        assert "moe_token_dispatcher_type='flex'" in m[1] and "set it to 'alltoall'" in m[1]
        assert "overlap_moe_expert_parallel_comm" in m[2]
