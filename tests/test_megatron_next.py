"""The calls Megatron-LM's next versions make into the plugin's routers, made here with
stand-ins on the installed megatron-core, so that a router that stops accepting one fails in
CI without a Megatron-LM source tree (tools/megatron_source_check.sh runs the suite against
one; docs/megatron_versions.md).

Megatron-LM dev (d48bd6be) builds a router with ``layer_number=``, calls it as
``router(hidden, padding_mask, input_ids, packed_seq_params)`` (MoELayer.route) and
TopKRouter.forward calls ``self.routing(logits, padding_mask=, input_ids=,
packed_seq_params=)``; 0.19.2 and main (d98e8a64) make the two-argument calls."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import megatron_locmoe.routers.base as base
from megatron_locmoe.config import ConfigError, LocMoEConfig
from megatron_locmoe.dispatch.dispatcher import unsupported_settings
from megatron_locmoe.sim.cluster import ParallelLayout
from megatron_locmoe.sim.testing import moe_config
from megatron_locmoe.validation import validate
from tests.test_arguments import megatron_args  # noqa: F401 (fixture)

SOLO = ParallelLayout(devices_per_node=1, ep=1)
S, B, V = 4, 2, 64

ROUTER_MODEL = {  # router type -> the model settings it takes
    "megatron": dict(moe_router_topk=2),
    "locmoe": dict(moe_router_topk=2),
    "locmoe_plus": dict(moe_router_topk=2, moe_expert_capacity_factor=1.1),
    "hash": dict(moe_router_topk=2),
    "switch": dict(moe_router_topk=1, moe_expert_capacity_factor=1.0),
}


def dev_route(router, hidden_SBH, padding_mask=None, input_ids=None, packed_seq_params=None):
    """Megatron-LM dev's MoELayer.route: every argument positional, None or not."""
    return router(hidden_SBH, padding_mask, input_ids, packed_seq_params)


def signature_job(ctx, router_type: str) -> dict:
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megatron_locmoe.routers import router_builder
    from megatron_locmoe.routers.switch import _MeasuredTopKRouter
    from megatron_locmoe.sim.testing import moe_config

    ctx.topology()
    tc = moe_config(ep=1, num_layers=4, num_moe_experts=8, **ROUTER_MODEL[router_type])
    builder = router_builder(LocMoEConfig(router_type=router_type), vocab_size=V)
    # dev's MoELayer.__init__: router(config=, pg_collection=, is_mtp_layer=, layer_number=)
    router = builder(
        config=tc, pg_collection=get_default_pg_collection(), is_mtp_layer=False, layer_number=3
    )
    seen = {"layer_number": router.layer_number}
    router.eval()
    torch.manual_seed(0)
    x_SBH = torch.randn(S, B, tc.hidden_size)
    ids_BS = torch.randint(0, V, (B, S))
    other_BS = (ids_BS + 1) % V
    if router.needs_token_ids:
        router.set_token_ids(ids_BS)  # attach_token_ids' hook: what 0.19.2 and main get
    _, plain_TE = router(x_SBH)  # 0.19.2's MoELayer.route: router(hidden, padding_mask)
    if router.needs_token_ids:
        router.set_token_ids(other_BS)  # the argument wins over the hook's ids
    _, positional_TE = dev_route(router, x_SBH, None, ids_BS, None)
    _, keywords_TE = router(x_SBH, padding_mask=None, input_ids=ids_BS, packed_seq_params=None)
    pad_SB = torch.zeros(S, B, dtype=torch.bool)
    pad_SB[-1] = True
    _, padded_TE = dev_route(router, x_SBH, pad_SB, ids_BS, None)
    seen["positional"] = torch.equal(plain_TE, positional_TE)
    seen["keywords"] = torch.equal(plain_TE, keywords_TE)
    seen["padded_shape"] = tuple(padded_TE.shape)
    if router.needs_token_ids:
        router.set_token_ids(None)  # no hook: the argument alone routes
        seen["argument_only"] = torch.equal(plain_TE, dev_route(router, x_SBH, None, ids_BS)[1])
    if isinstance(router, _MeasuredTopKRouter):  # megatron, switch: routing() overridden
        logits_SBE = torch.randn(S, B, tc.num_moe_experts)
        _, routed_TE = router.routing(logits_SBE, padding_mask=None)
        # dev's TopKRouter.forward: self.routing(logits, padding_mask=, input_ids=, ...)
        _, dev_TE = router.routing(
            logits_SBE, padding_mask=None, input_ids=ids_BS, packed_seq_params=None
        )
        seen["routing"] = torch.equal(routed_TE, dev_TE)
    return seen


@pytest.mark.parametrize("router_type", list(ROUTER_MODEL))
def test_routers_take_megatron_devs_calls(cluster_factory, router_type):
    """Built with layer_number (kept), called with dev's four positional arguments and with
    them as keywords, every router routes as with 0.19.2's call; the hash router routes by
    the input_ids argument when given (over its hook's ids, and without the hook); routers
    that override routing() take dev's keywords."""
    ((seen,),) = [cluster_factory(1).run(signature_job, router_type, layout=SOLO)]
    assert seen["layer_number"] == 3
    assert seen["positional"] and seen["keywords"]
    assert seen["padded_shape"] == (S * B, 8)
    if router_type == "hash":
        assert seen["argument_only"]
    if router_type in ("megatron", "switch"):
        assert seen["routing"]


def test_layer_number_reaches_topk_router_only_where_it_takes_it(monkeypatch):
    """dev's TopKRouter.__init__ takes layer_number; 0.19.2's and main's do not (a
    TypeError): the plugin hands it on only where the installed Megatron's signature has it."""
    common = {"config": "tc", "pg_collection": "pg", "is_mtp_layer": False}
    monkeypatch.setattr(base, "MEGATRON_ROUTER_INIT", frozenset({"self", *common}))
    assert base.megatron_router_args("tc", "pg", False, 3) == common
    dev = frozenset({"self", *common, "layer_number"})
    monkeypatch.setattr(base, "MEGATRON_ROUTER_INIT", dev)
    assert base.megatron_router_args("tc", "pg", False, 3) == {**common, "layer_number": 3}
    assert base.megatron_router_args("tc", "pg", False, None) == common


def test_megatron_keywords_hands_on_what_the_signature_takes():
    """dev's extra keywords reach a Megatron function only if its signature names them."""
    old = frozenset({"self", "input", "padding_mask"})
    new = old | {"input_ids", "packed_seq_params"}
    given = {"input_ids": 1, "packed_seq_params": None}
    assert base.megatron_keywords(old, **given) == {}
    assert base.megatron_keywords(new, **given) == given


# ---- what the plugin refuses on newer Megatron instead of losing it silently ----------------


def test_batch_invariant_mode_refuses_the_hierarchical_dispatcher(megatron_args):  # noqa: F811
    """main's batch-invariant MoE needs its dispatcher's inverse permutation map, which the
    two-hop schemes do not pass on: refused at parse time, naming the dispatcher to use."""
    parse, _ = megatron_args
    with pytest.raises(ConfigError) as e:
        parse("--locmoe-dispatcher", "hierarchical", "--batch-invariant-mode")
    assert "--batch-invariant-mode" in str(e.value)
    assert "--locmoe-dispatcher alltoall" in str(e.value)
    refused = unsupported_settings(SimpleNamespace(batch_invariant_mode=True))
    assert [r.attr for r in refused] == ["batch_invariant_mode"]
    assert unsupported_settings(SimpleNamespace(batch_invariant_mode=False)) == []


@pytest.mark.parametrize("router_type", list(ROUTER_MODEL))
def test_megatron_hash_layers_are_refused_with_the_plugin_routers(router_type):
    """dev's --moe-n-hash-layers routes inside TopKRouter's routing: Megatron's own router
    (router type megatron) honours it, a plugin router would ignore it and is refused."""
    tc = moe_config(ep=1, num_moe_experts=8, **ROUTER_MODEL[router_type])
    locmoe = LocMoEConfig(router_type=router_type)
    validate(locmoe, tc)  # no hash layers: as before
    tc.moe_n_hash_layers = 2  # a field of dev's TransformerConfig (args on the parse path)
    if router_type == "megatron":
        validate(locmoe, tc)
        return
    with pytest.raises(ConfigError, match=r"--moe-n-hash-layers 2 .* drop --moe-n-hash-layers"):
        validate(locmoe, tc)


def test_megatron_hash_layers_refused_at_parse_time(megatron_args):  # noqa: F811
    """Where Megatron has the flag (dev), the refusal comes at parse time."""
    from megatron.core.transformer import TransformerConfig

    if "moe_n_hash_layers" not in TransformerConfig.__dataclass_fields__:
        pytest.skip("this Megatron has no --moe-n-hash-layers (0.19.2, main)")
    parse, _ = megatron_args
    with pytest.raises(ConfigError, match="--moe-n-hash-layers 1 asks Megatron's TopKRouter"):
        parse("--moe-router-type", "hash", "--moe-n-hash-layers", "1")


# ---- the start-up line that names an untested Megatron ------------------------------------


def test_the_installed_megatron_is_a_tested_one():
    """0.19.2 (the wheel's version carries a local git hash, dropped), main (0.20.0) or dev
    (0.19.0, told apart by its signatures): whichever runs the suite is named tested."""
    from megatron_locmoe.adaptor.registry import installed_megatron, untested_megatron_note

    tested = {("0.19.2", "release"), ("0.20.0", "main"), ("0.19.0", "dev")}
    assert installed_megatron() in tested
    assert untested_megatron_note(*installed_megatron()) is None


@pytest.mark.parametrize(
    "version, line, untested",
    [
        ("0.19.2", "release", False),
        ("0.20.0", "main", False),  # main at d98e8a64 reports 0.20.0
        ("0.19.0", "dev", False),  # dev reports 0.19.0; told apart by its signatures
        ("0.19.0", "release", True),
        ("0.21.0", "main", True),
        ("0.20.0", "dev", True),
    ],
)
def test_untested_megatron_is_named(version, line, untested):
    from megatron_locmoe.adaptor.registry import untested_megatron_note

    note = untested_megatron_note(version, line)
    assert (note is not None) == untested
    if untested:
        assert f"Megatron-Core {version}" in note and "untested" in note
        assert "docs/megatron_versions.md" in note


def test_the_adaptor_logs_an_untested_megatron_once(monkeypatch, caplog):
    """apply() logs the line at its first call in a process, not at every call."""
    from megatron_locmoe import adaptor
    from megatron_locmoe.adaptor import patches
    from megatron_locmoe.device import DeviceChoice

    monkeypatch.setattr(patches, "installed_megatron", lambda: ("0.21.0", "main"))
    monkeypatch.setattr(patches, "_noted_version", [])
    with caplog.at_level("WARNING", logger=patches.logger.name):
        try:
            for _ in range(2):
                adaptor.apply(DeviceChoice("cpu", "gloo"))
        finally:
            adaptor.REGISTRY.revert()
    lines = [r.getMessage() for r in caplog.records if "untested" in r.getMessage()]
    assert len(lines) == 1 and "Megatron-Core 0.21.0 (Megatron-LM main branch)" in lines[0]
