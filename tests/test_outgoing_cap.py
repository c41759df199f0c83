"""FasterMoE's cap on the tokens that leave the node (--locmoe-max-outgoing-fraction, the
megatron router; routers/outgoing_cap.py).

Against a plain-Python reference of the rule on random scores and node maps (top-1/2/4, softmax
before or after the top-k, sigmoid with expert bias, group-limited routing, several F): the
same experts for every token and the same gate values, at most floor(F x T) tokens with a
remote expert, and Megatron's own routing bit for bit where the budget covers every token that
wants one. Megatron's router with the cap keeps the uncapped aux loss, on every virtual rank's
node. On the simulated cluster (4 nodes x 2 ranks, EP 8, two-hop dispatcher with dedup, domain
data) the cap at 0.14 keeps the node-local share and the inter-node bytes within the bounds the
budget sets, where the uncapped router does not; the virtual cluster 4x2 trains the same run.
Every refusal at parse time names its fix.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

import tests.test_virtual_cluster_cpu as vc
from megatron_locmoe.config import ConfigError, LocMoEConfig
from megatron_locmoe.routers import outgoing_cap
from megatron_locmoe.sim.trainer import train_job
from megatron_locmoe.validation import validate
from tests.test_arguments import VIRTUAL_BASE, megatron_args  # noqa: F401 (a fixture)
from tests.test_virtual_cluster_cpu import corpus  # noqa: F401 (fixtures)

# ---- the rule against a plain-Python reference -----------------------------------------------


def _topk(row: np.ndarray, k: int, allowed: np.ndarray, groups: int | None, group_topk: int | None):
    """The k best experts of one token among ``allowed`` (group-limited: inside the
    ``group_topk`` groups whose best k / group_topk allowed scores sum highest)."""
    vals = np.where(allowed, row, -np.inf)
    if groups:
        per_group = np.sort(vals.reshape(groups, -1), axis=1)[:, ::-1][:, : k // group_topk]
        chosen = np.argsort(-per_group.sum(1), kind="stable")[:group_topk]
        in_group = np.zeros(groups, bool)
        in_group[chosen] = True
        vals = np.where(np.repeat(in_group, len(row) // groups), vals, -np.inf)
    top = [int(e) for e in np.argsort(-vals, kind="stable")[:k]]
    assert all(np.isfinite(vals[top]))
    return top


def reference_capped_topk(scores, k, is_local, fraction, groups=None, group_topk=None):
    """The rule, token by token: [T] lists of experts (best first)."""
    T, E = scores.shape
    everywhere = np.ones(E, bool)
    free = [_topk(scores[t], k, everywhere, groups, group_topk) for t in range(T)]
    wants = [t for t in range(T) if any(not is_local[e] for e in free[t])]
    best_remote = {t: max(scores[t, e] for e in free[t] if not is_local[e]) for t in wants}
    ranked = sorted(wants, key=lambda t: (-best_remote[t], t))
    keep = set(ranked[: math.floor(fraction * T)])
    return [
        free[t]
        if t not in wants or t in keep
        else _topk(scores[t], k, is_local, groups, group_topk)
        for t in range(T)
    ]


class _Node(torch.nn.Module):
    """What OutgoingCap reads of its router: the node's experts."""

    def __init__(self, expert_is_local):
        super().__init__()
        self.register_buffer("expert_is_local", expert_is_local)


def _selection_scores(logits, pre_softmax, score_function, expert_bias):
    """The scores Megatron's top-k ranks (moe_utils.topk_routing_with_score_function)."""
    if score_function == "sigmoid":
        return torch.sigmoid(logits.float()) + expert_bias
    return torch.softmax(logits, -1, dtype=torch.float32) if pre_softmax else logits


def _gate_values(logits, chosen, pre_softmax, score_function):
    """Reference gate values of the chosen experts, as Megatron computes them from the choice."""
    picked = logits.gather(1, chosen)
    if score_function == "sigmoid":
        s = torch.sigmoid(logits.float()).gather(1, chosen)
        return s / (s.sum(-1, keepdim=True) + 1e-20) if chosen.shape[1] > 1 else s
    if pre_softmax:
        return torch.softmax(logits, -1, dtype=torch.float32).gather(1, chosen)
    return torch.softmax(picked, -1, dtype=torch.float32)


RULES = {  # name: (k, pre_softmax, score_function, groups, group_topk)
    "top1": (1, True, "softmax", None, None),
    "top2": (2, False, "softmax", None, None),
    "top2_pre_softmax": (2, True, "softmax", None, None),
    "top4": (4, False, "softmax", None, None),
    "top4_sigmoid_bias": (4, False, "sigmoid", None, None),
    "top4_node_limited": (4, False, "softmax", 4, 2),  # groups = nodes, 2 nodes per token
}


def _route(logits, rule, is_local, fraction, expert_bias=None):
    k, pre, score_function, groups, group_topk = RULES[rule]
    kwargs = dict(
        use_pre_softmax=pre,
        num_groups=groups,
        group_topk=group_topk,
        score_function=score_function,
        expert_bias=expert_bias,
    )
    plain = topk_routing_with_score_function(logits, k, **kwargs)
    if fraction is None:
        return plain, plain
    node = _Node(is_local)  # the cap holds its router weakly
    cap = outgoing_cap.OutgoingCap(node, fraction)
    return topk_routing_with_score_function(logits, k, router_replay=cap, **kwargs), plain


@pytest.mark.parametrize("fraction", [0.0625, 0.14, 0.5, 1.0])
@pytest.mark.parametrize("rule", list(RULES))
def test_the_cap_routes_as_the_reference(rule, fraction):
    """64 tokens, 16 experts on 4 nodes (this rank on node 1): the experts of every token and
    their gate values as the reference's; at most floor(F x 64) tokens with a remote expert."""
    k, pre, score_function, groups, group_topk = RULES[rule]
    gen = torch.Generator().manual_seed(list(RULES).index(rule) * 1000 + int(fraction * 100))
    T, E = 64, 16
    for trial in range(3):
        logits = torch.randn(T, E, generator=gen) * (1 + trial)
        bias = torch.randn(E, generator=gen) * 0.1 if score_function == "sigmoid" else None
        is_local = torch.zeros(E, dtype=torch.bool)
        is_local[4:8] = True
        (probs, routing_map), _ = _route(logits, rule, is_local, fraction, bias)
        scores = _selection_scores(logits, pre, score_function, bias).double().numpy()
        expected = reference_capped_topk(scores, k, is_local.numpy(), fraction, groups, group_topk)
        for t in range(T):
            assert set(routing_map[t].nonzero().flatten().tolist()) == set(expected[t]), t
        chosen = torch.tensor(expected)
        values = _gate_values(logits, chosen, pre, score_function)
        torch.testing.assert_close(probs.gather(1, chosen), values, rtol=1e-6, atol=0)
        assert (probs > 0).sum() == T * k
        remote_tokens = int((routing_map & ~is_local).any(-1).sum())
        assert remote_tokens <= math.floor(fraction * T)


@pytest.mark.parametrize("rule", list(RULES))
def test_a_budget_that_covers_every_remote_token_is_megatrons_routing_bitwise(rule):
    """Where the budget covers every token that wants a remote expert (F = wanting / T, below
    1, so the masked path runs) and at F = 1: Megatron's probs and map, bit for bit."""
    k, pre, score_function, groups, group_topk = RULES[rule]
    gen = torch.Generator().manual_seed(7)
    T, E = 64, 16
    logits = torch.randn(T, E, generator=gen)
    logits[:40, 4:8] += 4.0  # most tokens want only their node's experts
    bias = torch.randn(E, generator=gen) * 0.1 if score_function == "sigmoid" else None
    is_local = torch.zeros(E, dtype=torch.bool)
    is_local[4:8] = True
    (_, plain_map), _ = _route(logits, rule, is_local, None, bias)
    wanting = int((plain_map & ~is_local).any(-1).sum())
    assert 0 < wanting < T
    for fraction in (wanting / T, 1.0):
        (probs, routing_map), (plain_probs, plain_map) = _route(
            logits, rule, is_local, fraction, bias
        )
        assert torch.equal(routing_map, plain_map) and torch.equal(probs, plain_probs)
    # one token fewer in the budget moves exactly one token home
    (_, routing_map), _ = _route(logits, rule, is_local, (wanting - 1) / T, bias)
    assert int((routing_map & ~is_local).any(-1).sum()) == wanting - 1
    assert int((routing_map != plain_map).any(-1).sum()) == 1


def test_the_gradient_reaches_the_logits_of_the_chosen_experts():
    """The masked selection is on the autograd graph as Megatron's own (masked_fill)."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(32, 16, generator=gen).requires_grad_(True)
    is_local = torch.zeros(16, dtype=torch.bool)
    is_local[:4] = True
    (probs, routing_map), _ = _route(logits, "top2", is_local, 0.125)
    (probs * torch.arange(16.0)).sum().backward()
    assert torch.equal(logits.grad != 0, routing_map)


def test_the_budget_is_floor_of_f_times_t_as_written():
    assert outgoing_cap.outgoing_budget(0.29, 100) == 29  # float: 28.999999999999996
    assert outgoing_cap.outgoing_budget(0.14, 64) == 8
    assert outgoing_cap.outgoing_budget(0.14, 7) == 0
    assert outgoing_cap.outgoing_budget(1.0, 64) == 64


# ---- Megatron's router with the cap, on every virtual rank -----------------------------------


def router_job(ctx, fraction, ranks):
    """Megatron's router (top-2, aux loss) with and without the cap on the virtual cluster 4x2
    (16 experts, 4 per node), the same weights and tokens, entered as each of ``ranks``: the aux
    loss, the routing and the count of tokens with a remote expert per rank."""
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megatron_locmoe.routers import router_builder
    from megatron_locmoe.sim.testing import moe_config

    ctx.topology()
    torch.manual_seed(0)
    tc = moe_config(
        ep=1,
        num_moe_experts=16,
        moe_router_topk=2,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=0.01,
    )
    out = []
    routers = {}
    for name, f in (("plain", None), ("capped", fraction)):
        lm = LocMoEConfig(router_type="megatron", virtual_cluster="4x2", max_outgoing_fraction=f)
        routers[name] = router_builder(lm)(config=tc, pg_collection=get_default_pg_collection())
        routers[name].set_layer_number(1)
    routers["capped"].load_state_dict(routers["plain"].state_dict())
    x = torch.randn(50, 1, tc.hidden_size)
    for rank in ranks:
        seen = {}
        for name, router in routers.items():
            router.enter_virtual_rank(rank)
            get_moe_metrics_tracker().clear()
            inp = x.clone().requires_grad_(True)
            probs, routing_map = router(inp)
            probs.sum().backward()
            tracked = get_moe_metrics_tracker().metrics
            seen[name] = dict(
                aux=float(tracked["load_balancing_loss"].values[0]),
                map=routing_map.clone(),
                remote=int((routing_map & ~router.expert_is_local).any(-1).sum()),
                local=router.expert_is_local.nonzero().flatten().tolist(),
                grad=inp.grad.clone(),
            )
        out.append(seen)
    return out


def test_megatrons_router_with_the_cap_keeps_the_aux_loss_on_every_virtual_rank(cluster1):
    """The aux loss (on the unmasked scores) equals the uncapped router's on every virtual rank;
    the routing differs where the cap binds, and each rank's count of tokens with a remote
    expert stays within floor(0.14 x 50) = 7 against its own node."""
    ranks = [0, 3, 6]
    results = cluster1.run(router_job, 0.14, ranks, layout=vc.ONE, timeout_s=vc.JOB_TIMEOUT_S)[0]
    for rank, seen in zip(ranks, results, strict=True):
        plain, capped = seen["plain"], seen["capped"]
        assert (
            capped["local"] == plain["local"] == list(range(4 * (rank // 2), 4 * (rank // 2) + 4))
        )
        assert capped["aux"] == plain["aux"] > 0
        assert plain["remote"] > 7 >= capped["remote"]
        assert not torch.equal(capped["map"], plain["map"])


# ---- training on the simulated cluster and on the virtual cluster ----------------------------

FRACTION = 0.14


def cap_settings(corpus, fraction, virtual: bool, **kw):  # noqa: F811
    """Megatron's router, top-2 with the aux loss (16 experts, 4 per node), domain data: the
    virtual-vs-real comparison's settings (tests/test_virtual_cluster_cpu.py)."""
    model = dict(moe_router_topk=2, moe_router_pre_softmax=False)
    s = vc._settings(corpus, "megatron", "domains", virtual, model=model, **kw)
    return replace(s, locmoe=replace(s.locmoe, max_outgoing_fraction=fraction))


@pytest.fixture(scope="module")
def cap_runs(cluster8, cluster1, corpus, tmp_path_factory):  # noqa: F811 (corpus)
    """From one start: the real cluster uncapped and capped at 0.14, the virtual one capped."""
    start = str(tmp_path_factory.mktemp("start_cap"))
    first = cap_settings(corpus, None, False, steps=1, save_interval=1, save_dir=start)
    cluster8.run(train_job, first, layout=vc.REAL, timeout_s=vc.JOB_TIMEOUT_S)
    runs = {
        "plain": vc._real(cluster8, cap_settings(corpus, None, False, init_weights_dir=start)),
        "capped": vc._real(cluster8, cap_settings(corpus, FRACTION, False, init_weights_dir=start)),
    }
    runs["virtual"] = cluster1.run(
        train_job,
        cap_settings(corpus, FRACTION, True, init_weights_dir=start),
        layout=vc.ONE,
        timeout_s=vc.JOB_TIMEOUT_S,
    )[0]
    return runs


@pytest.mark.slow  # 8-rank cluster trainings
def test_the_cap_bounds_node_local_share_and_inter_node_bytes_in_training(
    cap_runs, record_property
):
    """T = 64 tokens per rank and micro-batch, budget floor(0.14 x 64) = 8: at most 8 tokens
    with a remote expert, so the node-local share of the assignments is at least 1 - 8/64 and
    each rank sends at most 8 x min(k, nodes - 1) = 16 rows over its rail (dedup: one per token
    and remote node, each 2 x H x 4 bytes + probs and mask of the node's 4 experts)."""
    plain, capped = cap_runs["plain"]["metrics"], cap_runs["capped"]["metrics"]
    for name in ("node_local_fraction", "dedup_inter_node_bytes", "flat_inter_node_bytes"):
        record_property(f"uncapped {name}", plain[name])
        record_property(f"capped {name}", capped[name])
    T, budget, k, nodes, H = 64, 8, 2, 4, 32
    share_bound = 1 - budget / T
    dedup_bound = budget * min(k, nodes - 1) * (2 * H * 4 + 2 * 4 * 4)
    flat_bound = budget * k * (2 * H * 4 + 4)
    assert capped["node_local_fraction"] >= share_bound - 1e-6
    assert capped["dedup_inter_node_bytes"] <= dedup_bound
    assert capped["flat_inter_node_bytes"] <= flat_bound
    # the uncapped router is outside every bound: the cap is what keeps the run inside
    assert plain["node_local_fraction"] < share_bound
    assert plain["dedup_inter_node_bytes"] > dedup_bound
    assert plain["flat_inter_node_bytes"] > flat_bound


@pytest.mark.slow  # 8-rank cluster trainings
def test_the_virtual_cluster_trains_the_capped_run_of_the_real_cluster(cap_runs, record_property):
    vc.assert_same_run(cap_runs["virtual"], cap_runs["capped"], record_property)


# ---- refused at parse time, with the fix -----------------------------------------------------

F = ["--locmoe-max-outgoing-fraction"]
TOP2 = ["--moe-router-topk", "2", "--locmoe-devices-per-node", "2"]  # 4 nodes of 2 experts
REFUSED = [
    (F + ["0"], "max_outgoing_fraction=0.0 must lie in (0, 1]"),
    (F + ["1.5"], "max_outgoing_fraction=1.5 must lie in (0, 1]"),
    (F + ["-0.14"], "drop the flag to route uncapped"),
    (F + ["nan"], "is not a finite number"),
    (
        ["--moe-router-type", "locmoe", *F, "0.14"],
        "max_outgoing_fraction is a megatron router option; the locmoe router does not read it",
    ),
    (
        ["--moe-router-type", "hash", *F, "0.14"],
        "use --moe-router-type megatron or drop --locmoe-max-outgoing-fraction",
    ),
    (
        [*TOP2, *F, "0.14", "--moe-router-load-balancing-type", "sinkhorn"],
        "which --moe-router-load-balancing-type sinkhorn does not run: drop it",
    ),
    ([*TOP2, *F, "0.14", "--moe-enable-routing-replay"], "--moe-enable-routing-replay (the replay"),
    (
        ["--moe-router-topk", "2", "--locmoe-devices-per-node", "1", *F, "0.14"],
        "a node hosts 1 (8 experts over 8 nodes): lower --moe-router-topk to 1 or fewer",
    ),
    (
        [*TOP2, "--moe-router-num-groups", "2", "--moe-router-group-topk", "1", *F, "0.14"],
        "2 groups do not split over 4 nodes; use a multiple of 4 groups",
    ),
]


@pytest.mark.parametrize("extra, message", REFUSED, ids=[m for _, m in REFUSED])
def test_what_cannot_work_is_refused_at_parse_time(megatron_args, extra, message):  # noqa: F811
    parse, _ = megatron_args
    with pytest.raises(ConfigError) as e:
        parse(*extra)
    assert message in str(e.value)


def test_the_cap_parses_for_megatrons_router(megatron_args):  # noqa: F811
    parse, to_config = megatron_args
    config = to_config(parse(*TOP2, *F, "0.14"))
    assert config.locmoe.max_outgoing_fraction == 0.14
    config = to_config(
        parse(*TOP2, "--moe-router-num-groups", "4", "--moe-router-group-topk", "2", *F, "1")
    )
    assert config.locmoe.max_outgoing_fraction == 1.0


def test_the_virtual_cluster_refuses_a_node_with_fewer_than_k_experts(megatron_args, monkeypatch):  # noqa: F811
    """8 experts on the virtual cluster 8x1: one expert per node, top-2 cannot stay home."""
    parse, _ = megatron_args
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ConfigError, match="a node hosts 1 .8 experts over 8 nodes."):
        parse(
            "--moe-router-topk",
            "2",
            "--locmoe-virtual-cluster",
            "8x1",
            *F,
            "0.14",
            base=VIRTUAL_BASE,
        )
    parse(
        "--moe-router-topk", "2", "--locmoe-virtual-cluster", "2x4", *F, "0.14", base=VIRTUAL_BASE
    )


def test_a_node_map_with_fewer_than_k_experts_is_refused_when_the_router_is_built():
    """Where the parse did not know the node map (no LOCAL_WORLD_SIZE), the build checks it."""
    table = torch.zeros(4, 8, dtype=torch.bool)
    table[:, :2] = True
    outgoing_cap.check_node_map(table, 2)
    table[3, 1] = False
    with pytest.raises(ConfigError, match="a node hosts 1: lower --moe-router-topk to 1"):
        outgoing_cap.check_node_map(table, 2)


def test_the_settings_check_refuses_the_cap_for_other_routers():
    validate(LocMoEConfig(max_outgoing_fraction=0.14))
    for router in ("locmoe", "locmoe_plus", "hash", "switch"):
        with pytest.raises(ConfigError, match=f"the {router} router does not read it"):
            validate(LocMoEConfig(router_type=router, max_outgoing_fraction=0.14))
