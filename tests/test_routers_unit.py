"""Router math on small tensors: the capacity bound against SciPy, the aux and locality losses
against hand-written formulas (values and float64 gradcheck), capacity enforcement, the hash
maps on a real token stream, and the config's error messages."""

from __future__ import annotations

import collections
import math
import pathlib
import re
import sysconfig

import pytest
import torch
from megatron.core.transformer.moe.moe_utils import switch_load_balancing_loss_func
from scipy import special

from megatron_locmoe import capacity
from megatron_locmoe.config import ConfigError, LocMoEConfig
from megatron_locmoe.routers.base import drop_to_capacity
from megatron_locmoe.routers.hash import balanced_hash_table, frequency_balanced_hash_table
from megatron_locmoe.routers.locmoe import locality_kl
from megatron_locmoe.sim.testing import moe_config
from megatron_locmoe.validation import validate

# ---- capacity bound -----------------------------------------------------------------------


@pytest.mark.parametrize("d", [64, 512, 2048, 4096, 7168])
@pytest.mark.parametrize("n", [4, 8, 16, 256])
@pytest.mark.parametrize("delta", [0.0, 0.01, 0.03, 0.05, 0.1, 0.3])
def test_ec_min_matches_scipy(d, n, delta):
    tail = special.betaincc(0.5, (d - 1) / 2, delta * delta)
    expected = 1.0 / (n * tail)
    assert capacity.ec_min(d, n, delta) == pytest.approx(expected, rel=1e-9)
    # the paper's closed form is a lower estimate; erfc is close for large d
    assert capacity.ec_min_exp(d, n, delta) <= capacity.ec_min(d, n, delta) * (1 + 1e-12)
    if d >= 2048 and delta <= 0.1:  # an asymptotic form: 7% off at delta=0.3, 1e84 tokens
        assert capacity.ec_min_erfc(d, n, delta) == pytest.approx(expected, rel=0.02)


def test_ec_min_paper_numbers():
    # docs/design.md 1.3: d=4096, n=8 gives ~2.3 tokens at delta=0.03 and ~9e8 at delta=0.1
    assert capacity.ec_min(4096, 8, 0.03) == pytest.approx(2.279, abs=1e-3)
    assert 8e8 < capacity.ec_min(4096, 8, 0.1) < 1e9
    assert capacity.ec_min(4096, 8, 0.0) == pytest.approx(1 / 8)


def test_floor_capacity_rounds_up():
    # the floor decides a fractional capacity: 0.5 * 36 * 1 / 8 = 2.25 tokens -> 3
    assert capacity.floor_capacity(0.5, 36, 1, 8) == 3
    assert capacity.floor_capacity(0.5, 32, 1, 8) == 2
    assert capacity.floor_capacity(1.0, 36, 2, 8) == 9


def bound_capacity_job(ctx, num_tokens: int, ec_min: float) -> int:
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megatron_locmoe.routers import router_builder

    ctx.topology()
    tc = moe_config(ep=2, num_moe_experts=8, moe_router_topk=1, moe_expert_capacity_factor=1.0)
    lm = LocMoEConfig(router_type="locmoe", capacity_mode="bound", capacity_floor_factor=0.5)
    router = router_builder(lm)(config=tc, pg_collection=get_default_pg_collection())
    router.capacity_ec_min.fill_(ec_min)  # as estimated, below the floor
    return router.capacity_for(num_tokens)


def test_the_floor_decides_a_fractional_capacity_in_the_router(cluster2):
    """The router's capacity where the floor decides: ec_min 0.5 token asks for 1; the floor
    0.5 x 36 tokens x top-1 / 8 experts = 2.25 rounds up to 3 (the ceiling, factor 1.0: 5)."""
    from megatron_locmoe.sim.cluster import ParallelLayout

    layout = ParallelLayout(devices_per_node=1, ep=2)
    assert cluster2.run(bound_capacity_job, 36, 0.5, layout=layout) == [3, 3]
    assert cluster2.run(bound_capacity_job, 32, 0.5, layout=layout) == [2, 2]  # 2.0 exactly


def collapsed_routing_metrics_job(ctx, router_type: str, fused_router: bool) -> list[dict]:
    """The metrics a router records when every token lies along gate row 0 (the fixed GrAP
    gate's chunk 0): all pick expert 0, delta = 1 and LocMoE's bound is infinite."""
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megatron_locmoe.routers import router_builder

    ctx.topology()
    tc = moe_config(ep=2, num_moe_experts=8, moe_router_topk=1, moe_expert_capacity_factor=1.0)
    lm = LocMoEConfig(router_type=router_type, capacity_mode="bound", fused_router=fused_router)
    router = router_builder(lm)(config=tc, pg_collection=get_default_pg_collection())
    router.set_layer_number(1)
    x = torch.zeros(12, 1, tc.hidden_size)
    x[..., : tc.hidden_size // 8] = 1.0
    seen = []
    for _ in range(2):  # the estimating call, then one with the kept estimate
        get_moe_metrics_tracker().clear()
        _, routing_map = router(x.requires_grad_(True))
        seen.append({n: float(m.values[0]) for n, m in get_moe_metrics_tracker().metrics.items()})
        seen[-1]["per_expert"] = routing_map.sum(0).tolist()
        seen[-1]["bound"] = float(router.capacity_ec_min)
    return seen


@pytest.mark.parametrize("router_type", ["locmoe", "locmoe_plus"])
def test_the_capacity_bound_is_logged_finite_when_every_token_picks_one_expert(
    cluster2, router_type
):
    """capacity_ec_min logged inf (JSON 'Infinity', an inf layer average) when every token
    picked one expert; now capped at the batch's capacity (the ceiling: the bound asks more),
    on the reference and the fused path, while the router keeps the uncapped bound."""
    from megatron_locmoe.sim.cluster import ParallelLayout

    layout = ParallelLayout(devices_per_node=1, ep=2)
    for fused in (False, True):
        for rank in cluster2.run(collapsed_routing_metrics_job, router_type, fused, layout=layout):
            for seen in rank:
                assert seen["per_expert"][0] == seen["expert_capacity"] == 2  # ceil(12 / 8)
                assert seen["capacity_delta"] == 1.0 and seen["bound"] == math.inf
                assert all(
                    math.isfinite(v) for k, v in seen.items() if k != "per_expert" and k != "bound"
                )
                assert seen["capacity_ec_min"] == seen["expert_capacity"]


def test_clamp_capacity():
    assert capacity.clamp_capacity(2.3, floor=10, ceiling=100) == 10
    assert capacity.clamp_capacity(57.2, floor=10, ceiling=100) == 58
    assert capacity.clamp_capacity(9e8, floor=10, ceiling=100) == 100
    assert capacity.clamp_capacity(math.inf, floor=10, ceiling=100) == 100
    with pytest.raises(ValueError, match="floor 11 is above the ceiling 10"):
        capacity.clamp_capacity(1.0, floor=11, ceiling=10)


def test_estimate_delta_is_the_percentile():
    cos = torch.linspace(0, 1, 101)
    assert capacity.estimate_delta(cos, 0.05) == pytest.approx(0.05)
    assert capacity.estimate_delta(torch.tensor([-0.2, -0.1]), 0.5) == 0.0  # clipped
    assert capacity.estimate_delta(torch.tensor([]), 0.5) == 0.0


# ---- losses -----------------------------------------------------------------------------


def _switch_reference(scores_TE, routing_map_TE, alpha, k):
    T, E = scores_TE.shape
    f = routing_map_TE.double().sum(0) / (T * k)
    P = scores_TE.mean(0)
    return alpha * E * (f * P).sum()


@pytest.mark.parametrize("k", [1, 2])
def test_aux_loss_equals_switch_formula_and_gradcheck(k):
    torch.manual_seed(0)
    logits = torch.randn(12, 6, dtype=torch.float64, requires_grad=True)
    scores = torch.softmax(logits, -1)
    routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter(
        1, scores.topk(k).indices, True
    )
    ours = switch_load_balancing_loss_func(scores, routing_map.sum(0), 12, k, 6, 0.01)
    assert ours.item() == pytest.approx(
        _switch_reference(scores, routing_map, 0.01, k).item(), rel=1e-12
    )

    def loss(lg):
        s = torch.softmax(lg, -1)
        return switch_load_balancing_loss_func(s, routing_map.sum(0), 12, k, 6, 0.01)

    assert torch.autograd.gradcheck(loss, (logits,))


def test_locality_kl_equals_hand_formula_and_gradcheck():
    torch.manual_seed(1)
    E, eps = 8, 1e-3
    local = torch.tensor([True, True, False, False, False, False, True, False])
    logits = torch.randn(20, E, dtype=torch.float64, requires_grad=True)
    d_c = torch.softmax(logits, -1).mean(0)
    L = 3
    d_l = [(1 - eps) / L if loc else eps / (E - L) for loc in local.tolist()]
    hand = sum(c * math.log(c / l_) for c, l_ in zip(d_c.tolist(), d_l, strict=True))
    assert locality_kl(d_c, local, eps).item() == pytest.approx(hand, rel=1e-12)
    assert torch.autograd.gradcheck(
        lambda lg: locality_kl(torch.softmax(lg, -1).mean(0), local, eps), (logits,)
    )
    # fully local routing has the smallest KL
    all_local = torch.tensor([1 / 3, 1 / 3, 0, 0, 0, 0, 1 / 3, 0], dtype=torch.float64)
    assert locality_kl(all_local, local, eps) < locality_kl(d_c.detach(), local, eps)


def test_drop_to_capacity_drops_lowest_probability_overflow():
    probs = torch.tensor([[0.9, 0.0], [0.2, 0.0], [0.5, 0.0], [0.0, 0.7], [0.4, 0.0]])
    routing_map = probs > 0
    kept_probs, kept, dropped = drop_to_capacity(probs, routing_map, capacity=2)
    assert kept[:, 0].tolist() == [True, False, True, False, False]  # 0.9 and 0.5 stay
    assert kept[:, 1].tolist() == [False, False, False, True, False]
    assert int(dropped) == 2
    assert torch.equal(kept_probs, probs * kept)
    same = drop_to_capacity(probs, routing_map, capacity=5)
    assert int(same[2]) == 0 and torch.equal(same[1], routing_map)


# ---- hash maps on a real token stream ------------------------------------------------------


@pytest.fixture(scope="module")
def python_source_ids():
    """Word-level ids of real text: the first 60 modules of Python's standard library."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    text = "\n".join(f.read_text(errors="ignore") for f in sorted(root.glob("*.py"))[:60])
    words = re.findall(r"\w+|[^\w\s]", text)
    vocab = {w: i + 1 for i, (w, _) in enumerate(collections.Counter(words).most_common(4095))}
    return torch.tensor([vocab.get(w, 0) for w in words])


def _max_over_mean(table, ids, E):
    load = torch.bincount(table[ids], minlength=E).double()
    return (load.max() / load.mean()).item()


@pytest.mark.parametrize("E", [8, 16])
def test_hash_maps_balance(python_source_ids, E):
    ids = python_source_ids
    V = 4096
    table = balanced_hash_table(V, E, seed=3)
    assert torch.bincount(table, minlength=E).tolist() == [V // E] * E  # equal ids per expert
    assert torch.equal(table, balanced_hash_table(V, E, seed=3))  # deterministic
    half = ids.numel() // 2
    counts = torch.bincount(ids[:half], minlength=V)
    freq = frequency_balanced_hash_table(counts, E, seed=3)
    # Stated tolerance: on held-out text (the second half) the heaviest expert carries at most
    # 1.5x the mean load (measured 1.17 for E=8, 1.38 for E=16); an id-balanced random map
    # is far worse on Zipfian text (measured 2.0-3.7).
    assert _max_over_mean(freq, ids[:half], E) < 1.01
    assert _max_over_mean(freq, ids[half:], E) < 1.5
    assert _max_over_mean(table, ids[half:], E) > _max_over_mean(freq, ids[half:], E)


# ---- config validation --------------------------------------------------------------------


@pytest.mark.parametrize(
    "locmoe, overrides, message",
    [
        (dict(router_type="gshard"), {}, "router type 'gshard' is unknown"),
        (dict(router_type="locmoe"), dict(moe_router_topk=9), "--moe-router-topk 9 is larger than"),
        (dict(router_type="locmoe"), dict(hidden_size=20), "hidden size 20 into 8 equal chunks"),
        (dict(locality_loss_coeff=-0.1), {}, "locality_loss_coeff=-0.1 is negative"),
        (dict(aux_loss_coeff=-1.0), {}, "aux_loss_coeff=-1.0 is negative"),
        (dict(capacity_percentile=1.5), {}, "capacity_percentile=1.5 must lie in (0, 1)"),
        (dict(capacity_percentile=0.0), {}, "capacity_percentile=0.0 must lie in (0, 1)"),
        (dict(locality_smoothing=0.0), {}, "locality_smoothing=0.0 must lie in (0, 1)"),
        (dict(grap_temperature=0.0), {}, "grap_temperature=0.0 must be positive"),
        (dict(capacity_reestimate_interval=-2), {}, "capacity_reestimate_interval=-2"),
        (dict(router_type="locmoe", node_target_share=1.0), {}, "node_target_share=1.0 must"),
        (dict(router_type="locmoe", node_bias_rate=0.0), {}, "node_bias_rate=0.0 must be"),
        (
            dict(router_type="hash", node_target_share=0.5),
            {},
            "a megatron or locmoe or locmoe_plus router",
        ),
        (
            dict(router_type="hash", node_margin=0.5),
            {},
            "a megatron or locmoe or locmoe_plus router",
        ),
        (dict(router_type="locmoe", node_margin=-0.5), {}, "node_margin=-0.5 is negative"),
        (
            dict(router_type="locmoe", node_bias_mode="selection"),
            {},
            "--locmoe-node-target-share is 0 (no bias)",
        ),
        (
            dict(router_type="locmoe", rank_balance_loss_coeff=0.01),
            {},
            "the EP group has one rank",
        ),
        (dict(rank_balance_loss_coeff=-1.0), {}, "rank_balance_loss_coeff=-1.0 is negative"),
        (dict(node_fill_mass=0.0), {}, "node_fill_mass=0.0 must lie in (0, 1]"),
        (
            dict(router_type="megatron", node_margin=0.3, max_outgoing_fraction=0.14),
            {},
            "both choose the experts in Megatron's top-k hook",
        ),
        (
            dict(router_type="megatron", node_fill_mass=0.9),
            dict(moe_router_num_groups=2, moe_router_group_topk=1),
            "limits them too",
        ),
        (
            dict(router_type="megatron", node_target_share=0.5),
            {},
            "add --locmoe-node-bias-mode selection (not logits",
        ),
        (
            dict(router_type="megatron", node_bias_mode="selection"),
            {},
            "--locmoe-node-target-share is 0 (no bias): set a target share or drop them",
        ),
        (
            dict(
                router_type="megatron",
                node_target_share=0.5,
                node_bias_mode="selection",
                max_outgoing_fraction=0.14,
            ),
            {},
            "both choose the experts in Megatron's top-k hook",
        ),
        (
            dict(router_type="megatron", node_margin=0.3),
            dict(moe_router_load_balancing_type="sinkhorn", moe_router_topk=1),
            "works in Megatron's top-k, which --moe-router-load-balancing-type sinkhorn",
        ),
        (
            dict(
                router_type="locmoe",
                node_target_share=0.5,
                node_bias_mode="learned",
                node_bias_rate=0.2,
            ),
            {},
            "trains it with the optimizer",
        ),
        (
            dict(router_type="locmoe", node_fill_mass=0.9),
            dict(moe_router_topk=1, moe_router_pre_softmax=True),
            "every token has one node",
        ),
        # LocMoE+: its own settings, and the model settings it cannot run with
        (dict(router_type="locmoe_plus"), {}, "set --moe-expert-capacity-factor (the paper's"),
        (
            dict(router_type="locmoe_plus", capacity_mode="none"),
            dict(moe_expert_capacity_factor=1.1),
            "switches off LocMoE+'s adaptive capacity",
        ),
        (
            dict(router_type="locmoe_plus"),
            dict(moe_expert_capacity_factor=1.1, moe_router_topk=9),
            "--moe-router-topk 9 is larger than the number of experts 8",
        ),
        (
            dict(router_type="locmoe_plus", capacity_floor_factor=1.5),
            dict(moe_expert_capacity_factor=1.1),
            "floor factor 1.5 is above the ceiling --moe-expert-capacity-factor 1.1",
        ),
        (
            dict(router_type="locmoe_plus", capacity_reestimate_interval=-1),
            dict(moe_expert_capacity_factor=1.1),
            "capacity_reestimate_interval=-1 is negative",
        ),
        (
            dict(router_type="locmoe_plus", plus_capacity_multiplier=0.5),
            dict(moe_expert_capacity_factor=1.1),
            "plus_capacity_multiplier=0.5 asks less than the bound",
        ),
        (
            dict(router_type="locmoe_plus", plus_affinity_threshold=1.5),
            dict(moe_expert_capacity_factor=1.1),
            "plus_affinity_threshold=1.5 must lie in [0, 1]",
        ),
        (
            dict(router_type="locmoe_plus"),
            dict(moe_expert_capacity_factor=1.1, moe_router_topk_scaling_factor=2.0),
            "the locmoe_plus gate value is the softmax",
        ),
        (
            dict(router_type="locmoe_plus"),
            dict(moe_expert_capacity_factor=1.1, hidden_size=20),
            "hidden size 20 into 8 equal chunks",
        ),
        (
            dict(router_type="locmoe_plus"),
            dict(
                moe_expert_capacity_factor=1.1,
                cuda_graph_impl="transformer_engine",
                cuda_graph_modules=["attn", "moe_router"],
            ),
            "replays would keep the first capacity",
        ),
        (
            dict(router_type="locmoe", plus_capacity_multiplier=3.0),
            {},
            "plus_capacity_multiplier is a locmoe_plus router option; the locmoe router",
        ),
        (
            dict(router_type="locmoe", capacity_mode="bound", capacity_floor_factor=2.0),
            dict(moe_expert_capacity_factor=1.0),
            "floor factor 2.0 is above the ceiling",
        ),
        (dict(router_type="locmoe", capacity_mode="bound"), {}, "set --moe-expert-capacity-factor"),
        (
            dict(router_type="locmoe", capacity_mode="none"),
            dict(moe_expert_capacity_factor=1.0),
            "--locmoe-capacity-mode is none",
        ),
        (
            dict(router_type="locmoe", capacity_mode="auto", capacity_floor_factor=2.0),
            dict(moe_expert_capacity_factor=1.0),
            "floor factor 2.0 is above the ceiling",
        ),
        (dict(fused_router="fast"), {}, "fused_router='fast'"),
        (dict(locality_loss_coeff=float("nan")), {}, "locality_loss_coeff=nan is not a finite"),
        (dict(grap_temperature=float("inf")), {}, "grap_temperature=inf is not a finite"),
        (dict(router_type="locmoe"), dict(moe_router_topk=0), "--moe-router-topk 0: every"),
        (dict(router_type="switch"), dict(moe_router_topk=2), "the switch router is top-1"),
        (
            dict(router_type="switch"),
            dict(moe_router_topk=1, moe_router_pre_softmax=True),
            "drops overflow at a capacity factor",
        ),
        (dict(router_type="hash"), dict(moe_expert_capacity_factor=1.0), "hash router is dropless"),
        (dict(router_type="hash"), dict(moe_router_fusion=True), "drop --moe-router-fusion"),
        (
            dict(router_type="locmoe"),
            dict(moe_router_num_groups=2, moe_router_group_topk=1),
            "group-limited routing",
        ),
        (
            dict(router_type="locmoe_plus", plus_affinity_threshold=0.5),
            dict(moe_router_topk=2, moe_expert_capacity_factor=1.1),
            "the softmax over the chosen k: add --moe-router-pre-softmax",
        ),
    ],
)
def test_config_errors_name_value_and_fix(locmoe, overrides, message):
    tc = moe_config(ep=1, **overrides)
    with pytest.raises(ConfigError) as e:
        validate(LocMoEConfig(**locmoe), tc)
    assert message in str(e.value)


@pytest.mark.parametrize(
    "locmoe, message",
    [
        (dict(hash_seed=2.5), "hash_seed=2.5 has type float, the field takes int"),
        (dict(hash_seed="3"), "hash_seed='3' has type str, the field takes int"),
        (dict(hash_seed=True), "hash_seed=True has type bool, the field takes int"),
        (dict(capacity_reestimate_interval=1.5), "takes int or None"),
        (dict(grap_bias="no"), "grap_bias='no' has type str, the field takes bool"),
        (dict(grap_learnable_temperature=1), "the field takes bool"),
        (dict(locality_loss_coeff="0.1"), "locality_loss_coeff='0.1' has type str"),
        (dict(aux_loss_coeff=True), "aux_loss_coeff=True has type bool, the field takes float"),
        (dict(hash_token_counts=3), "hash_token_counts=3 has type int, the field takes str"),
    ],
)
def test_config_type_errors_name_field_and_value(locmoe, message):
    """A wrong type is refused with the field and the value: before, 2.5 passed as an int,
    "no" as a bool (truthy: on) and a string mu raised a bare TypeError at the first compare."""
    with pytest.raises(ConfigError) as e:
        validate(LocMoEConfig(**locmoe))
    assert message in str(e.value)


def test_config_types_accept_what_they_did():
    """An int where a float is expected, NumPy scalars, None for optional ints and bools for
    fused_router (mapped to on/off) still pass."""
    import numpy as np

    validate(LocMoEConfig("locmoe", aux_loss_coeff=0, locality_loss_coeff=np.float32(0.1)))
    validate(LocMoEConfig("hash", hash_seed=np.int64(7), capacity_reestimate_interval=None))
    assert validate(LocMoEConfig("locmoe", fused_router=True)).fused_router == "on"


def test_valid_configs_pass():
    validate(LocMoEConfig(router_type="locmoe"), moe_config(ep=1))
    validate(
        LocMoEConfig(router_type="locmoe", capacity_mode="bound"),
        moe_config(ep=1, moe_expert_capacity_factor=1.25),
    )
    validate(LocMoEConfig(router_type="megatron"), moe_config(ep=1, moe_router_topk=8))
    validate(
        LocMoEConfig(router_type="locmoe_plus", plus_affinity_threshold=0.5),
        moe_config(
            ep=1, moe_expert_capacity_factor=1.1, moe_router_topk=2, moe_router_pre_softmax=True
        ),
    )


def fused_path_choice_job(ctx):
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megatron_locmoe.routers import router_builder

    ctx.topology()
    choices = []
    for fusion, fused_router in ((False, False), (True, False), (False, True)):
        tc = moe_config(ep=2, moe_router_fusion=fusion)
        lm = LocMoEConfig(router_type="locmoe", fused_router=fused_router)
        router = router_builder(lm)(config=tc, pg_collection=get_default_pg_collection())
        choices.append(router._fused_applies(None))
    return choices


def test_moe_router_fusion_takes_the_locmoe_fused_path(cluster2):
    """Megatron's --moe-router-fusion (TE's fused top-k, which has no GrAP gate) gives the
    locmoe router its own fused path; without either flag it routes op by op."""
    from megatron_locmoe.sim.cluster import ParallelLayout

    results = cluster2.run(fused_path_choice_job, layout=ParallelLayout(devices_per_node=1, ep=2))
    assert results == [[False, True, True]] * 2


def gate_values_job(ctx):
    """The locmoe router's top-2 gate values with and without --moe-router-pre-softmax, on
    the reference and the fused path, dropless and with a capacity, against the hand formula:
    the softmax over all experts (pre) or over each token's chosen two (post)."""
    from megatron.core.transformer.moe.moe_utils import (
        MoEAuxLossAutoScaler,
        get_default_pg_collection,
    )

    from megatron_locmoe.routers import router_builder

    ctx.topology()
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    x = torch.randn(16, 2, 32, generator=torch.Generator().manual_seed(ctx.rank)) * 4
    out = {}
    for pre in (False, True):
        for fused in ("off", "on"):
            for bound in (False, True):
                tc = moe_config(
                    ep=2,
                    num_moe_experts=8,
                    hidden_size=32,
                    moe_router_topk=2,
                    moe_router_pre_softmax=pre,
                    moe_expert_capacity_factor=1.0 if bound else None,
                )
                lm = LocMoEConfig(
                    router_type="locmoe",
                    fused_router=fused,
                    capacity_mode="bound" if bound else "none",
                    capacity_floor_factor=1.0,  # every capacity at the ceiling: drops happen
                )
                router = router_builder(lm)(config=tc, pg_collection=get_default_pg_collection())
                router.set_layer_number(1)
                probs, routing_map = router(x)
                logits = router.reference_gate(x)[1].detach()
                if not pre:
                    logits = logits.masked_fill(~routing_map, -torch.inf)
                want = torch.where(routing_map, torch.softmax(logits, -1), 0.0)
                kept = routing_map.sum(-1) == 2  # a token with a dropped expert keeps the rest
                out[pre, fused, bound] = dict(
                    diff=float((probs.detach() - want).abs().max()) if not bound else None,
                    kept_diff=float((probs.detach() - want)[kept].abs().max()),
                    sums=probs.detach()[kept].sum(-1),
                    map=routing_map,
                    fused_path=router._fused_applies(None),
                    dropped=bool((~kept).any()),
                )
    return out


def test_locmoe_gate_values_follow_megatrons_pre_softmax_flag(cluster2):
    """Without --moe-router-pre-softmax (Megatron's default at top-k > 1) the chosen experts'
    gate values are the softmax over the chosen k and sum to 1, as Megatron's router's; with it
    the softmax over all experts (the paper's form). The choice of experts is the same; the
    fused path renormalises when dropless and leaves a capacity's drop to the reference path,
    whose drop ranks the values the token keeps."""
    from megatron_locmoe.sim.cluster import ParallelLayout

    for r in cluster2.run(gate_values_job, layout=ParallelLayout(devices_per_node=1, ep=2)):
        for (pre, fused, bound), v in r.items():
            if not bound:
                assert v["diff"] < 1e-6, (pre, fused, v["diff"])
            assert v["kept_diff"] < 1e-6, (pre, fused, bound)
            if pre:
                assert bool((v["sums"] < 1 - 1e-3).all()), "all experts' softmax: k of E < 1"
            else:
                assert torch.allclose(v["sums"], torch.ones_like(v["sums"])), (fused, bound)
            assert v["fused_path"] == (fused == "on" and (pre or not bound)), (pre, fused, bound)
        assert all(
            torch.equal(r[True, f, False]["map"], r[False, f, False]["map"]) for f in ("off", "on")
        )
        assert r[False, "off", True]["dropped"] and r[True, "off", True]["dropped"]
