"""The whole check of the plugin's settings: the rules that need the router registry or the
dispatcher, on top of the settings' own (``LocMoEConfig.check_values``).

One floor above the registry (``megatron_locmoe.routers``) and the dispatcher, so that the
config stays a floor of its own: the argument check, the layer spec, the resolution of a layer
built on its own and the CPU trainer (through the spec) all call ``validate``.
"""

from __future__ import annotations

from megatron_locmoe.config import ConfigError, LocMoEConfig
from megatron_locmoe.dispatch.dispatcher import unsupported_settings
from megatron_locmoe.routers import check_router_settings, router_class


def validate(locmoe: LocMoEConfig, transformer_config=None) -> LocMoEConfig:
    """Raise ConfigError for an invalid setting, a setting the chosen router does not read, or
    (with ``transformer_config``: a TransformerConfig or Megatron's parsed arguments with
    ``num_moe_experts``) a model the router or the dispatcher cannot run; returns ``locmoe``."""
    router_class(locmoe.router_type)  # a known name before anything is read of it
    locmoe.check_values(transformer_config)
    tc = transformer_config
    if tc is not None and locmoe.dispatcher == "hierarchical":
        refused = unsupported_settings(tc)
        if refused:
            raise ConfigError("; ".join(r.as_flag() for r in refused))
    check_router_settings(locmoe, tc)
    if tc is not None:
        check_megatron_hash_layers(locmoe, tc)
    return locmoe


def check_megatron_hash_layers(locmoe: LocMoEConfig, tc) -> None:
    """Megatron-LM dev's ``--moe-n-hash-layers N`` routes the first N MoE layers by a token-id
    table inside TopKRouter's routing; a plugin router routes by its own rule and would drop
    it without a word: refused, with the routers that do route by token ids."""
    layers = getattr(tc, "moe_n_hash_layers", 0) or 0
    if layers > 0 and router_class(locmoe.router_type).is_plugin_router:
        raise ConfigError(
            f"--moe-n-hash-layers {layers} asks Megatron's TopKRouter to route the first "
            f"{layers} layers by token id; the {locmoe.router_type} router does its own routing "
            "and would ignore it: drop --moe-n-hash-layers, or use --moe-router-type megatron "
            "(Megatron's hash layers) or --moe-router-type hash (the plugin's Hash Layers in "
            "every MoE layer)"
        )


def changes_megatron(locmoe: LocMoEConfig, moe_grouped_gemm: bool) -> bool:
    """True when the plugin changes anything (default settings keep stock Megatron): the one
    test the layer spec and the argument checks share."""
    return (
        router_class(locmoe.router_type).is_plugin_router
        or locmoe.dispatcher == "hierarchical"
        or locmoe.wants_grouped_experts(moe_grouped_gemm)
        or locmoe.virtual_cluster is not None
        or locmoe.attention != "megatron"
        or locmoe.max_outgoing_fraction is not None
    )
