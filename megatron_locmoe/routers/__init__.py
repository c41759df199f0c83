"""Router registry: name -> Megatron-Core router class, chosen by the layer spec.

``router_builder(settings)`` returns what MoESubmodules.router expects: a callable taking
(config=, pg_collection=, is_mtp_layer=) and returning the router, built from a Resolution
(checked settings, no ``auto`` left). What a router is and does (plugin router or Megatron's,
token ids, label, the settings it reads) is asked of its class
(``routers.base.PluginRouterMixin``'s capabilities), never of its name.
"""

from __future__ import annotations

import dataclasses
from functools import partial

from megatron_locmoe.config import ROUTER_SETTINGS, ConfigError, LocMoEConfig, Resolution
from megatron_locmoe.device import choose_device
from megatron_locmoe.routers.hash import HashRouter, attach_token_ids
from megatron_locmoe.routers.locmoe import LocMoERouter
from megatron_locmoe.routers.locmoe_plus import LocMoEPlusRouter
from megatron_locmoe.routers.switch import MegatronRouter, SwitchRouter

ROUTERS = {
    cls.name: cls
    for cls in (MegatronRouter, LocMoERouter, LocMoEPlusRouter, HashRouter, SwitchRouter)
}
"""The one list of routers: ``--moe-router-type`` takes its keys (the first is the default)."""


def router_names() -> tuple[str, ...]:
    """The router types (``--moe-router-type``'s choices)."""
    return tuple(ROUTERS)


def router_class(router_type: str) -> type:
    """The router class ``router_type`` names; ConfigError for an unknown name."""
    cls = ROUTERS.get(router_type)
    if cls is None:
        raise ConfigError(
            f"router type {router_type!r} is unknown; use one of {', '.join(router_names())}"
        )
    return cls


def check_router_settings(locmoe: LocMoEConfig, tc=None) -> None:
    """The router's own rules: its name is known; no setting that only other routers read is
    changed (config.ROUTER_SETTINGS; unchanged: the default, or what this router's resolution
    makes of it, e.g. capacity_mode none for switch, so a resolved config checks too); with the
    model ``tc`` (a TransformerConfig or Megatron's parsed arguments), its ``check_model``."""
    cls = router_class(locmoe.router_type)
    defaults = LocMoEConfig(router_type=cls.name)
    settled = {
        name: value for name, (value, _) in cls.resolve_settings(defaults, None, None).items()
    }
    for name, capability in ROUTER_SETTINGS.items():
        value = getattr(locmoe, name)
        if cls.reads_setting(name) or value in (getattr(defaults, name), settled.get(name)):
            continue
        having = " or ".join(n for n, c in ROUTERS.items() if getattr(c, capability))
        flag = "--locmoe-" + name.replace("_", "-")
        raise ConfigError(
            f"{name} is a {having} router option; the {cls.name} router does not read it "
            f"({flag} {value}): use --moe-router-type {having} or drop {flag}"
        )
    if tc is not None:
        cls.check_model(locmoe, tc)


def settle_router(locmoe: LocMoEConfig, tc) -> Resolution:
    """The Resolution of a router built on its own (no layer spec around it): its settings
    checked against the model ``tc`` and its own ``auto`` settings decided for this process's
    device. The spec's resolution (``megatron_locmoe.resolve``) decides the same settings the
    same way (it asks the router class) and the dispatcher's and experts' besides."""
    cls = router_class(locmoe.router_type)
    locmoe.check_values(tc)
    check_router_settings(locmoe, tc)
    choices = cls.resolve_settings(locmoe, tc, choose_device().type)
    config = dataclasses.replace(locmoe, **{name: value for name, (value, _) in choices.items()})
    return Resolution(config, {name: why for name, (_, why) in choices.items()})


def build_router(cls, config, pg_collection=None, is_mtp_layer=False, *, locmoe, **extra):
    """``cls`` built from ``locmoe``: a Resolution as it is; a LocMoEConfig settled for the
    model ``config`` first (``settle_router``)."""
    if not isinstance(locmoe, Resolution):
        locmoe = settle_router(locmoe, config)
    return cls(
        config=config,
        pg_collection=pg_collection,
        is_mtp_layer=is_mtp_layer,
        locmoe=locmoe,
        **extra,
    )


def router_builder(locmoe, vocab_size: int | None = None, token_counts=None):
    """MoESubmodules.router for the router type of ``locmoe`` (the spec's Resolution, handed on
    as it is, or a LocMoEConfig for a router built on its own, settled when it is built); the
    router class's ``builder_args`` name what else it takes: the hash router the vocabulary
    size and, for the frequency-balanced map, the corpus token counts."""
    cfg = getattr(locmoe, "config", locmoe)
    cls = router_class(cfg.router_type)
    given = {"vocab_size": vocab_size, "token_counts": token_counts}
    extra = {name: given[name] for name in cls.builder_args}
    if "vocab_size" in extra and vocab_size is None:
        raise ConfigError(f"the {cls.name} router maps token ids: give it the vocabulary size")
    if isinstance(locmoe, Resolution):
        return partial(cls, locmoe=locmoe, **extra)
    locmoe.check_values()  # what can be checked without the model; the rest when it is built
    check_router_settings(locmoe)
    return partial(build_router, cls, locmoe=locmoe, **extra)


__all__ = [
    "ROUTERS",
    "HashRouter",
    "LocMoEPlusRouter",
    "LocMoERouter",
    "MegatronRouter",
    "SwitchRouter",
    "attach_token_ids",
    "check_router_settings",
    "router_builder",
    "router_class",
    "router_names",
    "settle_router",
]
