"""Router registry: name -> Megatron-Core router class, chosen by the layer spec.

``router_builder(config)`` returns what MoESubmodules.router expects: a callable taking
(config=, pg_collection=, is_mtp_layer=) and returning the router, with the LocMoE settings
bound.
"""

from __future__ import annotations

from functools import partial

from megatron_locmoe.config import ROUTER_TYPES, ConfigError, LocMoEConfig
from megatron_locmoe.routers.hash import HashRouter, attach_token_ids
from megatron_locmoe.routers.locmoe import LocMoERouter
from megatron_locmoe.routers.switch import MegatronRouter, SwitchRouter

ROUTERS = {
    "megatron": MegatronRouter,
    "locmoe": LocMoERouter,
    "hash": HashRouter,
    "switch": SwitchRouter,
}
assert tuple(ROUTERS) == ROUTER_TYPES


def router_builder(locmoe: LocMoEConfig, vocab_size: int | None = None, token_counts=None):
    """MoESubmodules.router for ``locmoe.router_type`` (hash: vocabulary size and, for the
    frequency-balanced map, the corpus token counts)."""
    locmoe.validate()
    cls = ROUTERS[locmoe.router_type]
    if cls is HashRouter:
        if vocab_size is None:
            raise ConfigError("the hash router maps token ids: give it the vocabulary size")
        return partial(cls, locmoe=locmoe, vocab_size=vocab_size, token_counts=token_counts)
    return partial(cls, locmoe=locmoe)


__all__ = [
    "ROUTERS",
    "HashRouter",
    "LocMoERouter",
    "MegatronRouter",
    "SwitchRouter",
    "attach_token_ids",
    "router_builder",
]
