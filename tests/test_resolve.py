"""``--moe-router-type locmoe`` alone: every ``auto`` setting resolves as documented (node map,
device, Transformer Engine, Megatron's other flags), the start-up summary names what was
chosen and why, and a real GPT model built through the plugin's spec on simulated clusters
gets the resolved dispatcher and experts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from megatron_locmoe.config import LocMoEConfig
from megatron_locmoe.resolve import resolve, summary_fields, summary_text
from megatron_locmoe.sim.cluster import ParallelLayout
from megatron_locmoe.sim.testing import moe_config
from megatron_locmoe.validation import validate


def nodes(n: int, per_node: int = 2):
    """The parts of a Topology the resolution reads."""
    return SimpleNamespace(
        spans_nodes=n > 1, num_nodes=n, ranks_per_node=per_node, ep_size=n * per_node
    )


def locmoe_tc(**overrides):
    return moe_config(ep=1, num_moe_experts=8, hidden_size=16, moe_router_topk=1, **overrides)


@pytest.mark.parametrize(
    "router, topology, tc, expected, why",
    [
        ("locmoe", nodes(2), {}, "hierarchical", "spans 2 nodes"),
        ("hash", nodes(4, 1), {}, "hierarchical", "spans 4 nodes"),
        ("locmoe", nodes(1, 4), {}, "alltoall", "inside one node"),
        ("locmoe", None, {}, "alltoall", "unknown node map"),
        ("megatron", nodes(2), {}, "alltoall", "--moe-router-type megatron"),
        (
            "locmoe",
            nodes(2),
            dict(
                moe_permute_fusion=False,
                moe_shared_expert_overlap=False,
                moe_token_dispatcher_type="allgather",
            ),
            "alltoall",
            "moe_token_dispatcher_type='allgather'",
        ),
    ],
)
def test_auto_dispatcher(router, topology, tc, expected, why):
    r = resolve(LocMoEConfig(router_type=router), locmoe_tc(**tc), topology, "cpu")
    assert r.config.dispatcher == expected
    assert why in r.reasons["dispatcher"]


def test_auto_dispatcher_keeps_flat_where_the_two_hop_one_cannot_run():
    tc = SimpleNamespace(**vars(locmoe_tc()))
    tc.moe_permute_fusion = True  # TE's fused permute (a TransformerConfig here needs TE)
    r = resolve(LocMoEConfig(router_type="locmoe"), tc, nodes(2), "cuda")
    assert r.config.dispatcher == "alltoall"
    assert "moe_permute_fusion=True" in r.reasons["dispatcher"]
    # explicit values are kept as given (their own checks refuse the bad combinations)
    r = resolve(LocMoEConfig(router_type="locmoe", dispatcher="hierarchical"), tc, nodes(1), "cpu")
    assert r.config.dispatcher == "hierarchical" and r.reasons["dispatcher"] == "as given"


@pytest.mark.parametrize(
    "asked, device, router_fusion, expected",
    [
        ("auto", "cuda", False, "on"),
        ("auto", "cpu", False, "off"),
        ("auto", "npu", False, "off"),
        ("off", "cuda", False, "off"),
        ("on", "cpu", False, "on"),
        ("off", "cpu", True, "on"),  # --moe-router-fusion: the locmoe router's own fused path
        (True, "cpu", False, "on"),  # the old boolean spelling
    ],
)
def test_auto_fused_router(asked, device, router_fusion, expected):
    tc = SimpleNamespace(**vars(locmoe_tc()))
    tc.moe_router_fusion = router_fusion
    r = resolve(LocMoEConfig(router_type="locmoe", fused_router=asked), tc, nodes(2), device)
    assert r.config.fused_router == expected


@pytest.mark.parametrize(
    "router, cf, expected",
    [("locmoe", 1.0, "bound"), ("locmoe", None, "none"), ("switch", 1.0, "none")],
)
def test_auto_capacity(router, cf, expected):
    r = resolve(LocMoEConfig(router_type=router), locmoe_tc(moe_expert_capacity_factor=cf))
    assert r.config.capacity_mode == expected
    # the resolved settings validate against the same model
    validate(r.config, locmoe_tc(moe_expert_capacity_factor=cf))


def test_a_routers_capabilities_decide_its_auto_settings(monkeypatch):
    """The auto rules ask the router class what it has (no router name is spelled in them):
    a router registered with LocMoE's capacity bound and fused path gets them too."""
    from megatron_locmoe import routers
    from megatron_locmoe.routers.switch import SwitchRouter

    class BoundedSwitch(SwitchRouter):
        name = "bounded_switch"
        has_capacity_bound = has_fused_path = True

    monkeypatch.setitem(routers.ROUTERS, BoundedSwitch.name, BoundedSwitch)
    lm = LocMoEConfig.__new__(LocMoEConfig)  # router_type outside the Literal: no validation
    lm.__dict__.update(vars(LocMoEConfig()), router_type=BoundedSwitch.name)
    tc = locmoe_tc(moe_expert_capacity_factor=1.0)
    r = resolve(lm, tc, device_type="cuda")
    assert (r.config.capacity_mode, r.config.fused_router) == ("bound", "on")
    assert BoundedSwitch.capacity_bound_applies(lm, tc)
    plain = resolve(LocMoEConfig(router_type="switch"), tc, device_type="cuda")
    assert (plain.config.capacity_mode, plain.config.fused_router) == ("none", "auto")


def test_resolution_is_idempotent_and_leaves_no_auto():
    tc = locmoe_tc(moe_expert_capacity_factor=1.25)
    first = resolve(LocMoEConfig(router_type="locmoe"), tc, nodes(2), "cuda").config
    assert "auto" not in (first.dispatcher, first.fused_router, first.experts, first.capacity_mode)
    assert resolve(first, tc, nodes(2), "cuda").config == first


def test_summary_names_every_choice_and_why():
    tc = locmoe_tc(moe_expert_capacity_factor=1.25)
    r = resolve(LocMoEConfig(router_type="locmoe", locality_loss_coeff=0.1), tc, nodes(2), "cuda")
    text = summary_text(r, tc, nodes(2))
    for line in (
        "router: locmoe",
        "gate: GrAP fixed",
        "balance_loss: switch form, alpha 0.01",
        "locality_loss: mu 0.1",
        "capacity: LocMoE's lower bound",
        "dispatcher: hierarchical  [auto: expert parallelism spans 2 nodes",
        "node_map: 2 nodes x 2 EP ranks (EP 4, 4 experts per node)",
        "fused_router: on  [auto: CUDA: the Triton kernels with the capacity drop",
        "expert_impl: GroupedSequentialMLP (torch._grouped_mm)",
    ):
        assert line in text, (line, text)
    assert "no effect" not in text
    one_node = summary_text(
        resolve(LocMoEConfig(router_type="locmoe"), tc, nodes(1, 4)), tc, nodes(1, 4)
    )
    assert "sits inside one node" in one_node
    fields = summary_fields(r, tc, nodes(2))
    assert fields["why"]["capacity_mode"].startswith("auto: --moe-expert-capacity-factor 1.25")


def resolved_model_job(ctx, router_type: str, tc_overrides: dict):
    """A GPTModel through the plugin's spec with only the router type given."""
    import contextlib
    import io

    from megatron.core.models.gpt import GPTModel

    from megatron_locmoe.dispatch.dispatcher import HierarchicalAlltoAllTokenDispatcher
    from megatron_locmoe.experts import GroupedSequentialMLP
    from megatron_locmoe.layer import LocMoELayer
    from megatron_locmoe.spec import locmoe_block_spec

    config = moe_config(
        ep=ctx.layout.ep,
        num_layers=1,
        num_moe_experts=8,
        hidden_size=32,
        moe_router_topk=1,
        **tc_overrides,
    )
    config.locmoe = LocMoEConfig(router_type=router_type, devices_per_node=ctx.devices_per_node)
    model_config = SimpleNamespace(transformer=config, vocab_size=64, should_pad_vocab=False)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        block = locmoe_block_spec(model_config)
    model = GPTModel(
        config=config, transformer_layer_spec=block, vocab_size=64, max_sequence_length=8
    )
    layers = [m for m in model.modules() if isinstance(m, LocMoELayer)]
    if not layers:
        return dict(plugin_layers=0, printed=printed.getvalue())
    (layer,) = layers
    return dict(
        plugin_layers=1,
        hierarchical=isinstance(layer.token_dispatcher, HierarchicalAlltoAllTokenDispatcher),
        grouped=isinstance(layer.experts, GroupedSequentialMLP),
        capacity_mode=layer.router.locmoe.capacity_mode,
        fused_router=layer.router.locmoe.fused_router,
        printed=printed.getvalue(),
    )


@pytest.mark.parametrize(
    "devices_per_node, ep, hierarchical", [(2, 4, True), (4, 4, False), (1, 2, True)]
)
def test_locmoe_alone_builds_the_whole_method(cluster_factory, devices_per_node, ep, hierarchical):
    cluster = cluster_factory(4)
    layout = ParallelLayout(devices_per_node=devices_per_node, ep=ep)
    results = cluster.run(
        resolved_model_job, "locmoe", dict(moe_expert_capacity_factor=1.5), layout=layout
    )
    for rank, r in enumerate(results):
        assert r["hierarchical"] is hierarchical
        assert r["grouped"] and r["capacity_mode"] == "bound" and r["fused_router"] == "off"
        # the summary: once, on global rank 0
        assert ("LocMoE plugin:" in r["printed"]) is (rank == 0), r["printed"]
    assert ("sits inside one node" in results[0]["printed"]) is (not hierarchical)


def test_megatron_router_keeps_stock_megatron(cluster_factory):
    from megatron_locmoe.spec import plugin_active

    assert not plugin_active(LocMoEConfig(), locmoe_tc())
    cluster = cluster_factory(4)
    (r, *_) = cluster.run(
        resolved_model_job, "megatron", {}, layout=ParallelLayout(devices_per_node=2, ep=4)
    )
    assert r == dict(plugin_layers=0, printed="")


def test_summary_says_which_fused_path_cuda_takes(monkeypatch):
    from megatron_locmoe.routers import kernels

    tc = locmoe_tc()
    why = lambda: resolve(LocMoEConfig(router_type="locmoe"), tc, nodes(2), "cuda").reasons  # noqa: E731
    monkeypatch.setattr(kernels, "HAVE_TRITON", True)
    monkeypatch.setattr(kernels, "DISABLED", False)
    assert why()["fused_router"] == "auto: CUDA: the Triton kernels"
    monkeypatch.setattr(kernels, "DISABLED", True)
    assert "LOCMOE_TRITON_ROUTER=0" in why()["fused_router"]
    monkeypatch.setattr(kernels, "HAVE_TRITON", False)
    assert "triton is not installed" in why()["fused_router"]
