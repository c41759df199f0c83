"""The plugin's MoE layer: Megatron's MoELayer with the chosen router and dispatcher.

The router comes through the spec (``MoESubmodules.router``). The dispatcher does not:
MoELayer.__init__ picks it from a hard-coded list, so this subclass lets Megatron build its
alltoall dispatcher and then swaps in the hierarchical one. Being a MoELayer subclass keeps
Megatron's isinstance checks, recompute and checkpoint keys unchanged.
"""

from __future__ import annotations

import dataclasses
import functools

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.cuda_graphs import is_graph_capturing
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.moe_layer import MoELayer

from megatron_locmoe import metrics
from megatron_locmoe.config import LocMoEConfig
from megatron_locmoe.dispatch.dispatcher import (
    resolve_dedup,
    use_hierarchical_dispatcher,
    use_one_device_permutation,
)
from megatron_locmoe.experts import GroupedSequentialMLP
from megatron_locmoe.resolve import Resolution, settled
from megatron_locmoe.routers import router_builder
from megatron_locmoe.topology import current_topology
from megatron_locmoe.virtual import VirtualCluster, VirtualTraffic


class LocMoELayer(MoELayer):
    """MoELayer whose router, experts and dispatcher follow ``locmoe``, its ``auto`` settings
    resolved for this model, node map and device (``megatron_locmoe.resolve``)."""

    def __init__(
        self,
        config,
        submodules=None,
        layer_number=None,
        pg_collection=None,
        is_mtp_layer=False,
        name=None,
        *,
        locmoe: LocMoEConfig | Resolution,
    ):
        resolution = settled(locmoe, config)
        locmoe = resolution.config
        if submodules is not None:  # the router and experts of the resolved settings
            router = submodules.router
            if isinstance(router, functools.partial) and "locmoe" in router.keywords:
                router = functools.partial(
                    router.func, *router.args, **{**router.keywords, "locmoe": resolution}
                )
            submodules = dataclasses.replace(
                submodules, router=router, experts=experts_builder(submodules.experts, locmoe)
            )
        super().__init__(config, submodules, layer_number, pg_collection, is_mtp_layer, name)
        self.locmoe = locmoe
        cluster = VirtualCluster.from_config(locmoe)
        self._virtual_traffic, self._virtual_rank = None, None
        if cluster is not None:  # one device: the dispatcher is counted, not run
            self._virtual_traffic = VirtualTraffic(
                cluster, config.num_moe_experts, virtual_scheme(locmoe, config, cluster)
            )
            use_one_device_permutation(self)
        elif locmoe.dispatcher == "hierarchical":
            use_hierarchical_dispatcher(self, current_topology(), dedup=locmoe.dedup_setting)

    def enter_virtual_rank(self, rank: int) -> None:
        """Count the next forward's traffic as virtual rank ``rank``'s (``virtual.enter``)."""
        self._virtual_rank = rank

    def route(self, hidden_states, padding_mask=None, *args, **kwargs):
        probs, routing_map = super().route(hidden_states, padding_mask, *args, **kwargs)
        if self._virtual_traffic is not None and metrics.layer_slot(self) is not None:
            if self._virtual_rank is None:  # never silently all rank 0
                raise RuntimeError(
                    f"MoE layer {self.layer_number} on a virtual cluster routed a micro-batch "
                    "without its virtual rank: train with python -m megatron_locmoe.pretrain_gpt "
                    "(its datasets tag each sample with its rank) or the simulated cluster's "
                    "loop, which call megatron_locmoe.virtual.enter(model, rank) per micro-batch"
                )
            self._virtual_traffic.count(
                self,
                self._virtual_rank,
                routing_map,
                hidden_states.shape[-1] * hidden_states.element_size(),
                probs.element_size(),
            )
            self._virtual_rank = None  # each micro-batch enters its own
        return probs, routing_map

    def forward(self, hidden_states, *args, **kwargs):
        output = super().forward(hidden_states, *args, **kwargs)
        # a partial capture (moe_router) returns before dispatch; Megatron's local graphs call
        # the forward once per phase (route, expert_compute, postprocess): count the dispatch's
        if not is_graph_capturing() and "expert_compute" in self.fwd_execution_map:
            self._record_traffic(output[0].device)  # that phase gets hidden_states None
        return output

    def _record_traffic(self, device) -> None:
        """Bytes per hop of this forward, when the dispatcher counted them."""
        traffic = getattr(self.token_dispatcher, "last_traffic", None)
        if traffic is None:
            return
        metrics.record_layer(
            self,
            {
                metrics.INTRA_NODE_BYTES: traffic.rank.intra_node_bytes,
                metrics.INTER_NODE_BYTES: traffic.rank.inter_node_bytes,
                **traffic.schemes,
                metrics.RECEIVED_LOAD: traffic.received_load,
            },
            device,
        )


def virtual_scheme(locmoe: LocMoEConfig, config, cluster: VirtualCluster) -> str:
    """The dispatch scheme the virtual cluster's ranks would run (its ``intra_node_bytes`` /
    ``inter_node_bytes``): the resolved dispatcher on the virtual node map, as a real run's
    ``HierarchicalAlltoAllTokenDispatcher`` picks it; flat with Megatron's All-to-All."""
    if locmoe.dispatcher != "hierarchical" or not cluster.topology(0).spans_nodes:
        return "flat"
    return "dedup" if resolve_dedup(locmoe.dedup_setting, config) else "two_hop"


def experts_builder(stock_experts, locmoe: LocMoEConfig):
    """The spec's experts, or with ``locmoe.experts == "grouped"`` the plugin's grouped ones
    (``auto`` is resolved before: ``megatron_locmoe.resolve``). They replace Megatron's loop,
    TE's TEGroupedMLP or a loop over TE linears alike, with plain local expert weights (same
    shapes and initialisation as the loop's), since torch._grouped_mm reads the weights
    directly."""
    if locmoe.experts != "grouped":
        return stock_experts
    return functools.partial(
        GroupedSequentialMLP,
        submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
    )


def locmoe_mlp_builder(
    stock_moe_mlp, locmoe: LocMoEConfig | Resolution, vocab_size=None, token_counts=None
):
    """Turn Megatron's MoE MlpBuilder (``partial(MoELayer, submodules=MoESubmodules(...))``)
    into the plugin's: LocMoELayer with the router of ``locmoe.router_type``; the layer
    resolves the settings and picks its experts. A new object: Megatron shares one spec across
    all MoE layers, so it is never modified in place."""
    func = getattr(stock_moe_mlp, "func", None)
    if not (isinstance(func, type) and issubclass(func, MoELayer)):
        raise TypeError(f"expected partial(MoELayer, submodules=...), got {stock_moe_mlp!r}")
    stock = stock_moe_mlp.keywords["submodules"]
    submodules = dataclasses.replace(
        stock, router=router_builder(locmoe, vocab_size=vocab_size, token_counts=token_counts)
    )
    return functools.partial(LocMoELayer, submodules=submodules, locmoe=locmoe)
