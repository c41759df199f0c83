"""Megatron's alltoall dispatcher with the EP All-to-All split into intra-node and rail hops.

Why. Megatron's ``MoEAlltoAllTokenDispatcher`` does one All-to-All over the whole expert-parallel
(EP) group, so every GPU talks to every GPU of every node and tokens for node-local experts mix
with inter-node traffic. LocMoE (docs/design.md) wants local tokens to stay on NVLink/HCCS and
inter-node traffic to flow only between *rail peers* (same local index on different nodes), so
all NICs of a node work in parallel. This dispatcher plugs into Megatron's ``MoELayer`` unchanged:
it keeps the six-step sequence ``dispatch_preprocess / token_dispatch / dispatch_postprocess /
combine_preprocess / token_combine / combine_postprocess``. The scheme (``schemes.py``) is chosen
once, at construction; the steps of one forward hand a frozen handle from one to the next,
created by ``dispatch_preprocess`` and consumed by ``combine_postprocess``.

Metadata: one ``all_gather_into_tensor`` over the expert-TP x EP group of per-source counts
(assignments per expert, tokens per destination rank, tokens per destination node), copied to
the host once per step (Megatron's alltoall dispatcher does the same gather and a D2H copy).
The same counts give the forward's exact traffic (``traffic.py``): ``last_traffic``.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe.moe_utils import get_capacity
from megatron.core.transformer.moe.token_dispatcher import (
    MoEAllGatherTokenDispatcher,
    MoEAlltoAllTokenDispatcher,
)

from megatron_locmoe.dispatch.collectives import all_gather_v, reduce_scatter_v, reorder_chunks
from megatron_locmoe.dispatch.schemes import DispatchPlan, Flat, TwoHop, TwoHopDedup
from megatron_locmoe.dispatch.traffic import (
    DispatchTraffic,
    Traffic,
    load_max_over_mean,
    received_tokens,
    scheme_bytes,
    source_counts,
    traffic_from_counts,
)
from megatron_locmoe.topology import Topology

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# What it runs with
# --------------------------------------------------------------------------------------------


class Unsupported(NamedTuple):
    """A setting the dispatcher cannot run with, and the value to use instead."""

    attr: str
    """The TransformerConfig field, also the dest of Megatron's argument."""
    value: object
    use: object
    why: str

    def as_setting(self) -> str:
        return f"{self.attr}={self.value!r} ({self.why}); set it to {self.use!r}"

    def as_flag(self) -> str:
        flag = "--" + self.attr.replace("_", "-")
        if self.use is False:  # a switch
            return f"{flag} ({self.why}) cannot be combined with --locmoe-dispatcher hierarchical: remove it"
        return (
            f"--locmoe-dispatcher hierarchical needs {flag} {self.use}, but {flag} is "
            f"{self.value!r} ({self.why}): use {flag} {self.use}"
        )


_REFUSED = (  # attr, is the value refused, what to use, why
    (
        "moe_token_dispatcher_type",
        lambda v: v is not None and v != "alltoall",
        "alltoall",
        "the hierarchical dispatcher replaces Megatron's alltoall one; flex/DeepEP/HybridEP are "
        "their own hierarchical schemes",
    ),
    ("moe_permute_fusion", bool, False, "TE fused permute inside Megatron's own dispatcher"),
    (
        "overlap_moe_expert_parallel_comm",
        bool,
        False,
        "the 1F1B EP-overlap schedule drives Megatron's own dispatchers",
    ),
    ("moe_shared_expert_overlap", bool, False, "it overlaps inside Megatron's own dispatcher"),
    ("moe_router_padding_for_quantization", bool, False, "fp8/fp4 padding"),
    ("cuda_graph_impl", lambda v: v not in (None, "none"), "none", "split sizes change per step"),
    (
        "batch_invariant_mode",
        bool,
        False,
        "Megatron-LM main's batch-invariant MoE carries an inverse permutation map through its "
        "own dispatcher's permute and unpermute, which the two-hop schemes do not keep; "
        "--locmoe-dispatcher alltoall keeps Megatron's dispatcher and the map",
    ),
)


def unsupported_settings(config) -> list[Unsupported]:
    """The settings of ``config`` (a TransformerConfig or Megatron's parsed arguments: the
    names are the same) the hierarchical dispatcher cannot run with; empty when it can."""
    return [
        Unsupported(attr, getattr(config, attr), use, why)
        for attr, refused, use, why in _REFUSED
        if refused(getattr(config, attr, None))
    ]


def check_supported(config) -> None:
    """Raise ValueError naming every setting the hierarchical dispatcher does not support."""
    problems = unsupported_settings(config)
    if problems:
        raise ValueError(
            "HierarchicalAlltoAllTokenDispatcher does not support: "
            + "; ".join(p.as_setting() for p in problems)
            + "."
        )


def resolve_dedup(dedup: bool | str, config) -> bool:
    """``'auto'`` -> dedup for top-k > 1 (top-1 tokens have one expert per node: nothing to
    dedup, only metadata to add); otherwise the bool given."""
    if dedup == "auto":
        return config.moe_router_topk > 1
    if isinstance(dedup, bool):
        return dedup
    raise ValueError(f"dedup={dedup!r}: use True, False or 'auto'")


# --------------------------------------------------------------------------------------------
# The dispatcher
# --------------------------------------------------------------------------------------------


class HierarchicalAlltoAllTokenDispatcher(MoEAlltoAllTokenDispatcher):
    """Megatron's alltoall dispatcher with the EP All-to-All split into intra-node and rail hops.

    Same constructor as Megatron's plus ``topology`` (``topology.get_topology``) and ``dedup``
    (True / False / 'auto'). An EP group inside one node takes the flat scheme.
    """

    def __init__(
        self,
        num_local_experts: int,
        local_expert_indices: list[int],
        config,
        pg_collection: ProcessGroupCollection | None = None,
        *,
        topology: Topology,
        dedup: bool | str = "auto",
    ) -> None:
        check_supported(config)
        super().__init__(num_local_experts, local_expert_indices, config, pg_collection)
        ep_ranks = tuple(dist.get_process_group_ranks(self.ep_group))
        if ep_ranks != topology.ep.ranks:
            raise ValueError(
                f"the topology describes EP group {list(topology.ep.ranks)} but this layer's EP "
                f"group is {list(ep_ranks)}: build the topology (get_topology) after "
                "initialize_model_parallel with the same parallel state the layer uses"
            )
        self.topology = topology
        if not topology.spans_nodes:
            cls = Flat
            logger.info(
                "EP group %s lies inside one node: the hierarchical dispatcher uses the flat "
                "All-to-All (nothing crosses a node boundary)",
                list(ep_ranks),
            )
        else:
            cls = TwoHopDedup if resolve_dedup(dedup, config) else TwoHop
        self.exchange = cls(topology, num_local_experts, self.ep_group)
        self.last_traffic: DispatchTraffic | None = None
        """The last forward's traffic (a result for the layer's metrics, not a hand-off)."""
        self._handle = None
        self.cudagraph_attrs = []

    @property
    def scheme(self) -> str:
        return self.exchange.name

    @property
    def dedup(self) -> bool:
        return isinstance(self.exchange, TwoHopDedup)

    # ---- the plan --------------------------------------------------------------------------
    def _plan(self, hidden_states, routing_map, eff_map, probs) -> DispatchPlan:
        """Gather every source's counts (one collective, one host copy) and derive what the
        steps need, Megatron's expert-TP sizes and the traffic included."""
        topo, E = self.topology, self.num_experts
        nle, ep, tp = self.num_local_experts, self.ep_size, self.tp_size
        mine = source_counts(eff_map, topo.num_nodes, topo.ranks_per_node)
        gathered = mine.new_empty(ep * tp * mine.numel())
        dist.all_gather_into_tensor(gathered, mine, group=self.tp_ep_group)
        gathered = gathered.cpu().view(ep, tp, -1)  # tp_ep ranks are tp-fastest
        counts = gathered[:, self.tp_rank]  # [ep, E + EP + N]: the sources of my EP group
        first = self.local_expert_indices[0]
        # [tp, ep, nle] -> [tp * ep, nle]: tokens each source rank sends to each local expert
        per_local = gathered[:, :, first : first + nle].transpose(0, 1).contiguous()
        assign = counts[:, :E].view(ep, ep, nle).sum(-1)
        num_out_tokens = int(assign[self.ep_rank].sum())
        x = hidden_states.view(-1, hidden_states.shape[-1])
        row_sizes = (x.shape[-1] * x.element_size(), probs.element_size())
        by_rank = traffic_from_counts(
            counts, topo.num_nodes, topo.ranks_per_node, E, self.dedup, *row_sizes
        )
        me = self.ep_rank
        hops = by_rank["hops"][me]
        if self.scheme == "flat":  # one hop, all of it inside the node
            hops = {"intra_node": hops["intra_node"]}
        traffic = DispatchTraffic(
            scheme=self.scheme,
            rank=by_rank["hier"][me],
            group=sum(by_rank["hier"], Traffic()),
            flat_rank=by_rank["flat"][me],
            flat_group=sum(by_rank["flat"], Traffic()),
            hops=hops,
            tokens=x.shape[0],
            assignments=num_out_tokens,
            schemes={
                name: int(v[me])
                for name, v in scheme_bytes(
                    counts, topo.num_nodes, topo.ranks_per_node, E, *row_sizes
                ).items()
            },
            received_load=float(load_max_over_mean(received_tokens(counts, E))),
        )
        return DispatchPlan(
            hidden_shape=hidden_states.shape,
            token_shape=x.shape,
            routing_map=routing_map,
            drop_and_pad=self.drop_and_pad,
            probs_dtype=probs.dtype,
            counts=counts,
            assign=assign,
            per_local_expert=per_local.view(-1, nle),
            tp_splits=per_local.sum(dim=(1, 2)).tolist(),
            tokens_per_expert=per_local.sum(dim=(0, 1)),
            num_out_tokens=num_out_tokens,
            traffic=traffic,
        )

    def _effective_map(self, routing_map: torch.Tensor) -> torch.Tensor:
        """With drop-and-pad every expert takes exactly ``capacity`` tokens from every rank:
        the ones Megatron's ``permute(drop_and_pad=True)`` picks (routed first, token order)."""
        if not self.drop_and_pad:
            return routing_map
        T, E = routing_map.shape
        capacity = get_capacity(
            num_tokens=T * self.config.moe_router_topk,
            num_experts=E,
            capacity_factor=self.moe_expert_capacity_factor,
        )
        picked = routing_map.to(torch.int8).T.argsort(dim=-1, descending=True, stable=True)
        picked = picked[:, :capacity]  # [E, capacity]
        eff = torch.zeros_like(routing_map.T).scatter(1, picked, True).T
        if self.dedup and not bool((routing_map.sum(0) >= capacity).all()):
            # an expert is padded with unrouted tokens, which permute places after the routed
            # ones, out of token order; the dedup path orders by token, so it cannot follow.
            # (Raised on this rank only: its peers then fail on the collective timeout.)
            raise ValueError(
                "moe_pad_expert_input_to_capacity with dedup needs a routing_map with at least "
                "capacity tokens per expert (TopKRouter guarantees it); use dedup=False"
            )
        return eff.contiguous()

    # ---- dispatch --------------------------------------------------------------------------
    def dispatch_preprocess(self, hidden_states, routing_map, probs):
        """``hidden [S, B, H]``, ``routing_map [T, E]`` bool, ``probs [T, E]`` -> send rows and
        their probs, in the scheme's send order."""
        assert probs.dim() == 2 and routing_map.dim() == 2 and routing_map.dtype == torch.bool
        eff_map = self._effective_map(routing_map)
        plan = self._plan(hidden_states, routing_map, eff_map, probs)
        self.last_traffic = plan.traffic
        x = hidden_states.view(plan.token_shape)
        rows, row_probs, self._handle = self.exchange.pack(x, eff_map, probs, plan)
        return rows, row_probs

    def token_dispatch(self, rows, row_probs):
        """The scheme's hops. Returns the flat All-to-All's output: rows ``[sum, H]`` ordered
        by source EP rank, local expert, token, and their probs ``[sum]``."""
        rows, row_probs, self._handle = self.exchange.dispatch(rows, row_probs, self._handle)
        return rows, row_probs

    def dispatch_postprocess(self, rows, row_probs):
        """Expert-TP all-gather, then sort chunks [tp][src][expert] -> [expert][tp][src]
        (Megatron's order). Returns ``(expert_input [n, H], tokens_per_expert [nle], probs [n])``."""
        plan = self._handle.plan
        if self.tp_size > 1:
            rows = all_gather_v(rows, self.tp_group, plan.tp_splits)
            row_probs = all_gather_v(row_probs, self.tp_group, plan.tp_splits)
        if self.num_local_experts > 1:
            sizes = plan.per_local_expert.ravel().tolist()
            order = self.sort_input_by_local_experts.tolist()
            rows = reorder_chunks(rows, sizes, order)
            row_probs = reorder_chunks(row_probs, sizes, order)
        return rows, plan.tokens_per_expert, row_probs

    # ---- combine ---------------------------------------------------------------------------
    def combine_preprocess(self, hidden_states):
        """Undo the local-expert sort, reduce-scatter over expert-TP (in probs dtype, as
        Megatron does): back to the flat All-to-All's output order."""
        plan = self._handle.plan
        if self.num_local_experts > 1:
            sizes = plan.per_local_expert.T.ravel().tolist()
            order = self.restore_output_by_local_experts.tolist()
            hidden_states = reorder_chunks(hidden_states, sizes, order)
        if self.tp_size > 1:
            dtype = hidden_states.dtype
            hidden_states = reduce_scatter_v(
                hidden_states.to(plan.probs_dtype), self.tp_group, plan.tp_splits, self.tp_rank
            ).to(dtype)
        return hidden_states

    def token_combine(self, hidden_states, async_finish=True, allocate_on_comm_stream=True):
        """The scheme's hops back."""
        return self.exchange.combine(hidden_states, self._handle)

    def combine_postprocess(self, rows):
        """Back to token order (Megatron's ``unpermute`` or the dedup sum): ``[S, B, H]``."""
        handle, self._handle = self._handle, None
        return self.exchange.unpack(rows, handle).view(handle.plan.hidden_shape)


def use_hierarchical_dispatcher(
    moe_layer,
    topology: Topology,
    dedup: bool | str = "auto",
    pg_collection: ProcessGroupCollection | None = None,
) -> HierarchicalAlltoAllTokenDispatcher:
    """Replace ``moe_layer.token_dispatcher`` (built by MoELayer from its hard-coded choice)
    with the hierarchical one, on the same process groups; returns the new dispatcher."""
    old = moe_layer.token_dispatcher
    if pg_collection is None:
        pg_collection = _groups_of(old)
    dispatcher = HierarchicalAlltoAllTokenDispatcher(
        moe_layer.num_local_experts,
        moe_layer.local_expert_indices,
        config=moe_layer.config,
        pg_collection=pg_collection,
        topology=topology,
        dedup=dedup,
    )
    moe_layer.token_dispatcher = dispatcher
    return dispatcher


def use_one_device_permutation(moe_layer) -> bool:
    """On one device (EP = expert-TP = 1, as the virtual cluster runs) Megatron's alltoall
    dispatcher exchanges nothing but still sorts what it received by local expert, an identity
    order: three split-and-cat of all E experts' rows a layer, ~1,200 of the CPU study preset's
    5,272 host operator calls a micro-batch (benchmarks/host_ops.py). Megatron's allgather
    dispatcher with one rank permutes the same rows into the same order without them: put it
    in place of the alltoall one where nothing else differs (no padding to capacity, no
    shared-expert overlap, no padding for quantization). Returns whether it did."""
    old, config = moe_layer.token_dispatcher, moe_layer.config
    if (
        type(old) is not MoEAlltoAllTokenDispatcher
        or old.ep_size * old.tp_size != 1
        or config.moe_pad_expert_input_to_capacity
        or config.moe_shared_expert_overlap
        or getattr(config, "moe_router_padding_for_quantization", False)
    ):
        return False
    moe_layer.token_dispatcher = MoEAllGatherTokenDispatcher(
        moe_layer.num_local_experts,
        moe_layer.local_expert_indices,
        config=config,
        pg_collection=_groups_of(old),
    )
    return True


def _groups_of(dispatcher) -> ProcessGroupCollection:
    """The process groups a Megatron dispatcher was built on, for the one that replaces it."""
    pg_collection = ProcessGroupCollection()
    pg_collection.ep, pg_collection.expt_tp = dispatcher.ep_group, dispatcher.tp_group
    pg_collection.tp_ep = dispatcher.tp_ep_group
    return pg_collection
