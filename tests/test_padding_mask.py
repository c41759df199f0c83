"""Megatron's padding mask is True on padding (``compute_routing_scores_for_aux_loss``,
``z_loss_func`` and ``_apply_expert_bias`` take ``~padding_mask`` as the valid tokens, whatever
their docstrings say). The plugin's routers read it the same way: a micro-batch with padding
routes and balances like the same micro-batch with the padding cut off, as Megatron's own
TopKRouter does.

Each case routes [S, B] tokens whose last positions are padding, once with the mask and once
on the valid positions alone (no mask), and compares what the balance statistics see."""

from __future__ import annotations

import pytest
import torch

from megatron_locmoe.sim.cluster import ParallelLayout

TWO_NODES = ParallelLayout(devices_per_node=1, ep=2)  # node 0 hosts experts 0-3: locality on
S, B, VALID = 6, 2, 4  # positions VALID.. of every sequence are padding


def _padding_SB() -> torch.Tensor:
    pad_SB = torch.zeros(S, B, dtype=torch.bool)
    pad_SB[VALID:] = True
    return pad_SB


def _tracked() -> dict[str, float]:
    """The metrics tracker's entries this step (layer 1), by name."""
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    return {n: float(m.values[0]) for n, m in get_moe_metrics_tracker().metrics.items()}


def _route_twice(router, x_SBH: torch.Tensor) -> tuple[dict, dict, tuple, tuple]:
    """(metrics with the mask, metrics on the valid positions only, outputs of each)."""
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    tracker = get_moe_metrics_tracker()
    tracker.clear()
    masked = router(x_SBH.clone().requires_grad_(True), _padding_SB())
    with_mask = _tracked()
    tracker.clear()
    cut = router(x_SBH[:VALID].clone().requires_grad_(True))
    return with_mask, _tracked(), masked, cut


def padded_balance_job(ctx, router_type: str) -> tuple[dict, dict, bool]:
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megatron_locmoe.config import LocMoEConfig
    from megatron_locmoe.routers import router_builder
    from megatron_locmoe.sim.testing import moe_config

    ctx.topology()
    tc = moe_config(
        ep=2,
        num_moe_experts=8,
        moe_router_topk=2,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=0.01,
    )
    lm = LocMoEConfig(router_type=router_type)
    router = router_builder(lm)(config=tc, pg_collection=get_default_pg_collection())
    router.set_layer_number(1)
    router.train()
    torch.manual_seed(0)
    x_SBH = torch.randn(S, B, tc.hidden_size)
    with_mask, cut, _, _ = _route_twice(router, x_SBH)
    return with_mask, cut, bool(getattr(router, "locality_on", True))


@pytest.mark.parametrize("router_type", ["megatron", "locmoe"])
def test_padding_is_left_out_of_the_balance_statistics(cluster2, router_type):
    """Megatron's router (the reference: its aux loss) and LocMoE's (its locality loss, the
    plugin's own average over the valid tokens) see a padded micro-batch as its valid part.
    With the mask read the other way round, LocMoE's locality KL averages the padded rows
    (zeroed by Megatron's aux-loss scores) and differs."""
    for with_mask, cut, locality_on in cluster2.run(
        padded_balance_job, router_type, layout=TWO_NODES
    ):
        assert locality_on
        losses = [n for n in with_mask if n.endswith("loss")]
        assert "load_balancing_loss" in losses
        if router_type == "locmoe":
            assert "locality_loss" in losses and cut["locality_loss"] > 0
        for name in losses:
            assert with_mask[name] == pytest.approx(cut[name], rel=1e-5, abs=1e-8), name


def padded_hash_job(ctx) -> tuple:
    from megatron.core.transformer.moe.moe_utils import (
        compute_routing_scores_for_aux_loss,
        get_default_pg_collection,
    )

    from megatron_locmoe.config import LocMoEConfig
    from megatron_locmoe.routers import router_builder
    from megatron_locmoe.sim.testing import moe_config

    ctx.topology()
    tc = moe_config(ep=1, num_moe_experts=8, moe_router_topk=2)
    router = router_builder(LocMoEConfig(router_type="hash"), vocab_size=64)(
        config=tc, pg_collection=get_default_pg_collection()
    )
    router.set_layer_number(1)
    torch.manual_seed(0)
    ids_BS = torch.randint(0, 64, (B, S))
    router.set_token_ids(ids_BS)
    pad_SB = _padding_SB()
    probs_TE, map_TE = router(torch.randn(S, B, tc.hidden_size), pad_SB)
    # Megatron's reading of the same mask: the rows its aux-loss routing map keeps
    megatron_map_TE, _ = compute_routing_scores_for_aux_loss(
        torch.randn(S * B, 8), 2, "softmax", padding_mask=pad_SB.reshape(-1)
    )
    return map_TE.sum(-1), probs_TE.sum(-1), megatron_map_TE.sum(-1)


def test_the_hash_router_keeps_padding_out_as_megatron_reads_the_mask(cluster_factory):
    """The hash router routes the valid tokens to their k experts and none of the padding:
    the rows Megatron's aux-loss routing map keeps for the same mask."""
    layout = ParallelLayout(devices_per_node=1, ep=1)
    ((experts_T, probs_T, megatron_T),) = cluster_factory(1).run(padded_hash_job, layout=layout)
    valid_T = ~_padding_SB().reshape(-1)
    assert experts_T.tolist() == megatron_T.tolist()
    assert experts_T[valid_T].eq(2).all() and experts_T[~valid_T].eq(0).all()
    assert probs_T[valid_T].allclose(torch.ones(())) and probs_T[~valid_T].eq(0).all()


def padded_switch_drops_job(ctx) -> tuple[float, torch.Tensor]:
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megatron_locmoe.config import LocMoEConfig
    from megatron_locmoe.routers import router_builder
    from megatron_locmoe.sim.testing import moe_config

    ctx.topology()
    # capacity ceil(12 tokens / 4 experts x 0.5) = 2 per expert: at least 4 of 12 dropped
    tc = moe_config(ep=1, num_moe_experts=4, moe_router_topk=1, moe_expert_capacity_factor=0.5)
    router = router_builder(LocMoEConfig(router_type="switch"))(
        config=tc, pg_collection=get_default_pg_collection()
    )
    router.set_layer_number(1)
    router.eval()
    torch.manual_seed(0)
    with_mask, _, (probs_TE, map_TE), _ = _route_twice(router, torch.randn(S, B, tc.hidden_size))
    return with_mask["tokens_dropped"], (map_TE & (probs_TE > 0)).any(-1)


def test_the_switch_router_counts_the_valid_tokens_it_dropped(cluster_factory):
    """tokens_dropped counts the valid tokens that lost their expert to the capacity, not the
    padding (Megatron drops by capacity whatever the mask); read inverted, the mask made it
    count the padding rows, or (before) the padding count minus every kept token."""
    layout = ParallelLayout(devices_per_node=1, ep=1)
    ((dropped, kept_T),) = cluster_factory(1).run(padded_switch_drops_job, layout=layout)
    valid_T = ~_padding_SB().reshape(-1)
    lost_valid, lost_padding = int((~kept_T[valid_T]).sum()), int((~kept_T[~valid_T]).sum())
    assert lost_valid != lost_padding  # the case tells the two readings apart
    assert dropped == lost_valid
