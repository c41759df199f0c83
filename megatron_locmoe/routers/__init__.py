"""Router registry: name -> Megatron-Core router class, chosen by the layer spec.

``router_builder(config)`` returns what MoESubmodules.router expects: a callable taking
(config=, pg_collection=, is_mtp_layer=) and returning the router, with the LocMoE settings
bound.
"""

from __future__ import annotations

from functools import partial

from megatron_locmoe.config import ConfigError, LocMoEConfig
from megatron_locmoe.routers.hash import HashRouter, attach_token_ids
from megatron_locmoe.routers.locmoe import LocMoERouter
from megatron_locmoe.routers.locmoe_plus import LocMoEPlusRouter
from megatron_locmoe.routers.switch import MegatronRouter, SwitchRouter

ROUTERS = {
    cls.name: cls
    for cls in (MegatronRouter, LocMoERouter, LocMoEPlusRouter, HashRouter, SwitchRouter)
}
"""The one list of routers: ``--moe-router-type`` takes its keys (the first is the default)."""


def router_builder(locmoe, vocab_size: int | None = None, token_counts=None):
    """MoESubmodules.router for the router type of ``locmoe`` (a LocMoEConfig, or the spec's
    Resolution, handed on as it is); hash: vocabulary size and, for the frequency-balanced
    map, the corpus token counts."""
    cfg = getattr(locmoe, "config", locmoe)
    if isinstance(locmoe, LocMoEConfig):
        cfg.validate()  # the router type at least; the model's settings when the router is built
    cls = ROUTERS[cfg.router_type]
    if cls is HashRouter:
        if vocab_size is None:
            raise ConfigError("the hash router maps token ids: give it the vocabulary size")
        return partial(cls, locmoe=locmoe, vocab_size=vocab_size, token_counts=token_counts)
    return partial(cls, locmoe=locmoe)


__all__ = [
    "ROUTERS",
    "HashRouter",
    "LocMoEPlusRouter",
    "LocMoERouter",
    "MegatronRouter",
    "SwitchRouter",
    "attach_token_ids",
    "router_builder",
]
