"""Hierarchical (two-hop) token dispatcher: the first All-to-All hop stays inside the node.

Why. Megatron's ``MoEAlltoAllTokenDispatcher`` does one All-to-All over the whole expert-parallel
(EP) group, so every GPU talks to every GPU of every node and tokens for node-local experts mix
with inter-node traffic. LocMoE (DESIGN.md §2) wants local tokens to stay on NVLink/HCCS and
inter-node traffic to flow only between *rail peers* (same local index on different nodes), so
all NICs of a node work in parallel. This dispatcher plugs into Megatron's ``MoELayer`` unchanged:
it keeps the six-step sequence ``dispatch_preprocess / token_dispatch / dispatch_postprocess /
combine_preprocess / token_combine / combine_postprocess``.

Notation. EP group = N nodes x L EP ranks per node (``topology.py``); EP rank ``(a, i)`` = node a,
local index i; each EP rank holds ``nle`` consecutive experts, so a node holds ``W = L * nle``
consecutive experts. T = local tokens, H = hidden size.

Hop structure
-------------
Without dedup (``dedup=False``; one copy per token-expert assignment, like the flat All-to-All):
  hop 1, intra-node: rank (a, i) sends every assignment for an expert on rank (b, j) to (a, j);
  hop 2, rail:       (a, j) forwards the assignments for (b, j), b != a, to (b, j).
  Own-node assignments are finished after hop 1; remote ones cross the node boundary once, on
  rail j. Order: the source permutes tokens expert-major (Megatron's ``permute``), i.e. chunks
  in destination order [b][j]; they are re-chunked to [j][b] for hop 1; the hop-1 receive
  buffer is [i][b] (source local index, destination node) and is re-chunked to [b][i] for hop 2;
  the hop-2 receive buffer on (b, j) is then [a][i] = source EP rank order, each chunk in the
  source's expert-major token order: exactly the flat All-to-All's output. Hence everything after
  it (expert-TP all-gather, sort by local expert, experts, the mirror combine and ``unpermute``)
  sees bitwise the same tensors in the same order: outputs and gradients are bitwise equal.

With dedup (``dedup=True``; DeepEP-style, one copy per token and remote node):
  hop 1, intra-node: own-node tokens, one copy per (token, destination rank) (rank-level dedup);
  hop 2, rail:       one copy per (token, remote node b) to (b, i), the source's own rail peer;
  hop 3, intra-node: (b, i) fans each copy out to the ranks of node b that host one of its
                     experts, one copy per (token, rank).
  Every copy carries, per expert of its scope (rank or node), the routing prob and a 0/1 mask
  (packed into one probs-dtype tensor). The destination expands copies into one row per
  assignment and orders them by (source EP rank, local expert, source token order) - the flat
  order - with a stable sort of the mask's nonzeros, so experts again see bitwise the same
  input in the same order. The combine is the mirror with *pre-reduction*: the expert outputs
  of one copy are summed on the destination rank (and the ranks' partial sums on the rail
  receiver) before travelling back, so the layer output and the input gradient equal the flat
  dispatcher's only up to float summation order (bitwise when no token has two experts inside
  one rank/node scope that is not the first scope it reaches, e.g. always for top-1).
  Hops 1 and 2 both start at the source and use different links, so they can overlap.

Default: ``dedup="auto"`` = on for top-k > 1, off for top-1. Measured with
``benchmarks/dispatch_traffic.py``: for top-1 dedup cannot remove a copy (a token has at most
one expert per node) and only adds metadata and a third hop; for top-k >= 2 it cuts inter-node
bytes (see the table in the report / README).

Traffic accounting (``dispatcher.last_traffic``, a ``DispatchTraffic``)
-----------------------------------------------------------------------
Per forward pass of one layer (dispatch + combine, the backward mirrors it), counting only the EP
exchange (the expert-TP all-gather / reduce-scatter is identical for both schemes and stays in a
node). A *token copy* is one hidden row sent to another rank; sends to oneself are free and not
counted. A copy is intra-node or inter-node by the nodes of sender and receiver. Bytes = dispatch
bytes + combine bytes: a copy costs ``H * hidden element size`` each way, plus in the dispatch
one probs element (flat and hierarchical) or ``2 * width`` probs elements (dedup: probs + mask
of the copy's scope, width = nle on intra-node hops, W on the rail hop). ``flat_*`` fields give
what Megatron's flat All-to-All sends for the same routing. Numbers are given for this rank
(what it sends) and summed over its EP group; all come from one all-gather of per-source counts
that the dispatch needs anyway, through ``traffic_from_counts`` (also used by the benchmark).

Metadata: one ``all_gather_into_tensor`` over the expert-TP x EP group of per-source counts
(assignments per expert, tokens per destination rank, tokens per destination node), copied to
the host once per step (Megatron's alltoall dispatcher does the same gather and a D2H copy).

Unsupported (ValueError naming the setting): ``moe_permute_fusion``,
``overlap_moe_expert_parallel_comm``, ``moe_shared_expert_overlap``, the flex dispatcher,
``moe_router_padding_for_quantization``, CUDA graphs. An EP group inside one node falls back to
the flat path (inherited from Megatron) with an info log.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import asdict, astuple, dataclass, field

import torch
import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe.moe_utils import get_capacity, permute, unpermute
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

from megatron_locmoe.costmodel import copy_bytes
from megatron_locmoe.topology import Topology

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Device-agnostic collectives (Megatron's allocate on torch.cuda.current_device())
# --------------------------------------------------------------------------------------------


class _AllToAll(torch.autograd.Function):
    """Uneven ``all_to_all_single`` on any device; backward = the same with swapped splits."""

    @staticmethod
    def forward(ctx, x, group, output_splits: list[int], input_splits: list[int]):
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        return _a2a(x, group, output_splits, input_splits)

    @staticmethod
    def backward(ctx, grad):
        return _a2a(grad, ctx.group, ctx.input_splits, ctx.output_splits), None, None, None


def _a2a(x: torch.Tensor, group, output_splits: list[int], input_splits: list[int]):
    if group is None:  # a group of one rank: the send to oneself
        return x.clone()
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
    return out


def all_to_all(x: torch.Tensor, group, output_splits: list[int], input_splits: list[int]):
    """Differentiable uneven All-to-All of rows ``x [sum(input_splits), ...]`` (lists of ints)."""
    return _AllToAll.apply(x, group, list(output_splits), list(input_splits))


def all_gather_v(x: torch.Tensor, group, sizes: list[int]) -> torch.Tensor:
    """Rows of every rank of ``group`` in rank order, ``[sum(sizes), ...]``; as an All-to-All
    so uneven sizes work on every backend (backward sums the copies = reduce-scatter)."""
    n = len(sizes)
    if n == 1:
        return x
    return all_to_all(torch.cat([x] * n), group, sizes, [x.shape[0]] * n)


def reduce_scatter_v(x: torch.Tensor, group, sizes: list[int], rank: int) -> torch.Tensor:
    """Sum over ``group`` of chunk ``rank`` of ``x [sum(sizes), ...]``, summed in rank order."""
    n = len(sizes)
    if n == 1:
        return x
    parts = all_to_all(x, group, [sizes[rank]] * n, sizes)
    return parts.view(n, sizes[rank], *x.shape[1:]).sum(0)


def reorder_chunks(x: torch.Tensor, sizes: list[int], order: list[int]) -> torch.Tensor:
    """Concatenate the chunks ``x.split(sizes)`` in ``order`` (differentiable)."""
    chunks = torch.split(x, sizes, dim=0)
    return torch.cat([chunks[k] for k in order], dim=0)


def _inverse(order: list[int]) -> list[int]:
    inv = [0] * len(order)
    for pos, k in enumerate(order):
        inv[k] = pos
    return inv


# --------------------------------------------------------------------------------------------
# Counts and traffic accounting (pure functions; the benchmark uses them too)
# --------------------------------------------------------------------------------------------


def source_counts(routing_map: torch.Tensor, num_nodes: int, ranks_per_node: int) -> torch.Tensor:
    """Per-source counts the dispatch plan needs, one int64 vector ``[E + EP + N]``.

    ``routing_map [T, E]`` bool -> assignments per expert ``[E]``, tokens with at least one expert
    on each EP rank ``[EP]`` and on each node ``[N]``.
    """
    T, E = routing_map.shape
    ep = num_nodes * ranks_per_node
    m = routing_map.bool()
    per_expert = m.sum(0)
    per_rank = m.view(T, ep, E // ep).any(-1).sum(0)
    per_node = m.view(T, num_nodes, E // num_nodes).any(-1).sum(0)
    return torch.cat([per_expert, per_rank, per_node]).long()


@dataclass(frozen=True)
class Traffic:
    """Token copies and bytes put on intra-node and inter-node links (dispatch + combine)."""

    intra_node_copies: int = 0
    inter_node_copies: int = 0
    intra_node_bytes: int = 0
    inter_node_bytes: int = 0

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))


@dataclass(frozen=True)
class DispatchTraffic:
    """One layer, one forward pass: what this rank and its EP group send, and the flat baseline."""

    scheme: str
    """'hierarchical', 'hierarchical+dedup' or 'flat' (fallback inside one node)."""
    rank: Traffic
    group: Traffic | None
    flat_rank: Traffic
    flat_group: Traffic | None
    hops: dict[str, tuple[int, int]] = field(default_factory=dict)
    """This rank's sends per hop: name -> (copies, bytes)."""
    tokens: int = 0
    """Tokens of this rank (the layer's T)."""
    assignments: int = 0
    """Token-expert assignments this rank dispatches (after drop, incl. padding)."""

    def as_dict(self) -> dict:
        return asdict(self)


def traffic_from_counts(
    counts: torch.Tensor,
    num_nodes: int,
    ranks_per_node: int,
    num_experts: int,
    dedup: bool,
    hidden_bytes: int,
    prob_bytes: int,
) -> dict[str, list]:
    """Per-rank sends of flat, hierarchical and (if ``dedup``) dedup dispatch.

    ``counts [EP, E + EP + N]``: ``source_counts`` of every EP rank. ``hidden_bytes`` = H x element
    size of a hidden row, ``prob_bytes`` = element size of a prob. Returns lists over EP ranks:
    ``flat`` / ``hier`` of ``Traffic`` and ``hops`` of {hop name: (copies, bytes)}.
    """
    N, L = num_nodes, ranks_per_node
    ep, E = N * L, num_experts
    nle, W = E // ep, E // N
    c = counts.detach().to("cpu", torch.long)
    per_rank = c[:, :E].view(ep, ep, nle).sum(-1).view(N, L, N, L)  # [a, i, b, j] assignments
    tok_rank = c[:, E : E + ep].view(N, L, N, L)  # tokens of (a,i) with an expert on (b,j)
    tok_node = c[:, E + ep :].view(N, L, N)  # tokens of (a,i) with an expert on node b
    copy_flat = copy_bytes(hidden_bytes, prob_bytes)  # one assignment, dispatch + combine

    # every sender (a, i) at once, [N, L] each; einsum's repeated letters take diagonals
    total = per_rank.sum((2, 3))
    own = torch.einsum("aiaj->ai", per_rank)  # assignments to experts on the sender's node
    to_self = torch.einsum("aiai->ai", per_rank)
    flat_intra, flat_inter = own - to_self, total - own
    if not dedup:
        h1 = total - torch.einsum("aibi->ai", per_rank)  # all but those for my rail peers
        h2 = per_rank.sum((1, 2)) - torch.einsum("akaj->aj", per_rank)  # rail: node's off-node
        columns = {"intra_node": (h1, copy_flat), "rail": (h2, copy_flat)}
        hier_intra, hier_inter = (h1, h1 * copy_flat), (h2, h2 * copy_flat)  # (copies, bytes)
    else:
        row_rank = copy_bytes(hidden_bytes, prob_bytes, dedup_width=nle)
        row_node = copy_bytes(hidden_bytes, prob_bytes, dedup_width=W)
        h1 = torch.einsum("aiaj->ai", tok_rank) - torch.einsum("aiai->ai", tok_rank)
        h2 = tok_node.sum(2) - torch.einsum("aia->ai", tok_node)
        # rows that rail peers (b, i) forward to (a, j), minus own-node tokens (hop 1 took them)
        fan_aij = torch.einsum("biaj->aij", tok_rank) - torch.einsum("aiaj->aij", tok_rank)
        h3 = fan_aij.sum(-1) - torch.einsum("aii->ai", fan_aij)
        columns = {"intra_node": (h1, row_rank), "rail": (h2, row_node), "fan_out": (h3, row_rank)}
        hier_intra, hier_inter = (h1 + h3, (h1 + h3) * row_rank), (h2, h2 * row_node)

    def rows(*tensors):
        return zip(*(t.reshape(-1).tolist() for t in tensors), strict=True)

    flat = [Traffic(i, o, i * copy_flat, o * copy_flat) for i, o in rows(flat_intra, flat_inter)]
    hier = [Traffic(ic, oc, ib, ob) for ic, ib, oc, ob in rows(*hier_intra, *hier_inter)]
    names = list(columns)
    hops = [
        {name: (n, n * columns[name][1]) for name, n in zip(names, values, strict=True)}
        for values in rows(*(columns[name][0] for name in names))
    ]
    return {"flat": flat, "hier": hier, "hops": hops}


# --------------------------------------------------------------------------------------------
# Configuration checks
# --------------------------------------------------------------------------------------------


def check_supported(config) -> None:
    """Raise ValueError for settings the hierarchical dispatcher does not support."""
    problems = unsupported_settings(config)
    if problems:
        raise ValueError(
            "HierarchicalAlltoAllTokenDispatcher does not support: " + "; ".join(problems) + "."
        )


def unsupported_settings(config) -> list[str]:
    """The settings of ``config`` the hierarchical dispatcher cannot run with, each with its
    fix (empty when it can run)."""
    problems = []
    if config.moe_token_dispatcher_type == "flex":
        problems.append(
            "moe_token_dispatcher_type='flex' selects DeepEP/HybridEP; the hierarchical "
            "dispatcher replaces the alltoall dispatcher: set moe_token_dispatcher_type='alltoall'"
        )
    elif config.moe_token_dispatcher_type != "alltoall":
        problems.append(
            f"moe_token_dispatcher_type={config.moe_token_dispatcher_type!r}; the hierarchical "
            "dispatcher replaces the alltoall dispatcher: set moe_token_dispatcher_type='alltoall'"
        )
    if config.moe_permute_fusion:
        problems.append("moe_permute_fusion=True (TE fused permute); set it to False")
    if getattr(config, "overlap_moe_expert_parallel_comm", False):
        problems.append(
            "overlap_moe_expert_parallel_comm=True (the 1F1B EP-overlap schedule drives "
            "Megatron's own dispatchers); set it to False"
        )
    if config.moe_shared_expert_overlap:
        problems.append("moe_shared_expert_overlap=True; set it to False")
    if getattr(config, "moe_router_padding_for_quantization", False):
        problems.append("moe_router_padding_for_quantization=True (fp8/fp4); set it to False")
    if getattr(config, "cuda_graph_impl", "none") != "none":
        problems.append(f"cuda_graph_impl={config.cuda_graph_impl!r}; set it to 'none'")
    return problems


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
    (True / False / 'auto'). Inherits the flat path for EP groups inside one node.
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
        self.dedup = resolve_dedup(dedup, config)
        self.hierarchical = topology.spans_nodes
        self.num_nodes, self.ranks_per_node = topology.num_nodes, topology.ranks_per_node
        self.node, self.local_index = topology.node, topology.local_index
        self.last_traffic: DispatchTraffic | None = None
        self.cudagraph_attrs = []
        if not self.hierarchical:
            logger.info(
                "EP group %s lies inside one node: the hierarchical dispatcher uses the flat "
                "All-to-All (nothing crosses a node boundary)",
                list(ep_ranks),
            )

    @property
    def scheme(self) -> str:
        if not self.hierarchical:
            return "flat"
        return "hierarchical+dedup" if self.dedup else "hierarchical"

    # ---- metadata --------------------------------------------------------------------------
    def _plan(self, routing_map: torch.Tensor, hidden: torch.Tensor, probs: torch.Tensor):
        """Gather every source's counts (one collective, one host copy); set Megatron's fields
        the expert-TP gather and the local-expert sort use; record the traffic."""
        N, L, E = self.num_nodes, self.ranks_per_node, self.num_experts
        nle, ep, tp = self.num_local_experts, self.ep_size, self.tp_size
        mine = source_counts(routing_map, N, L)
        gathered = mine.new_empty(ep * tp * mine.numel())
        dist.all_gather_into_tensor(gathered, mine, group=self.tp_ep_group)
        gathered = gathered.cpu().view(ep, tp, -1)  # tp_ep ranks are tp-fastest
        counts = gathered[:, self.tp_rank]  # [ep, E + EP + N]: the sources of my EP group
        self.counts = counts
        first = self.local_expert_indices[0]
        # [tp, ep, nle] -> [tp * ep, nle]: tokens each source rank sends to each local expert
        per_local = gathered[:, :, first : first + nle].transpose(0, 1).contiguous()
        self.num_global_tokens_per_local_expert = per_local.view(-1, nle)
        self.output_splits_tp = per_local.sum(dim=(1, 2))
        self.tokens_per_expert = per_local.sum(dim=(0, 1))
        # [ep(src), ep(dst)] assignments, for the non-dedup chunk plan
        self.assign = counts[:, :E].view(ep, ep, nle).sum(-1)
        self.num_out_tokens = int(self.assign[self.ep_rank].sum())

        plan = traffic_from_counts(
            counts,
            N,
            L,
            E,
            self.dedup,
            hidden.shape[-1] * hidden.element_size(),
            probs.element_size(),
        )
        me = self.ep_rank
        self.last_traffic = DispatchTraffic(
            scheme=self.scheme,
            rank=plan["hier"][me],
            group=sum(plan["hier"], Traffic()),
            flat_rank=plan["flat"][me],
            flat_group=sum(plan["flat"], Traffic()),
            hops=plan["hops"][me],
            tokens=routing_map.shape[0],
            assignments=self.num_out_tokens,
        )

    def _effective_map(self, routing_map: torch.Tensor) -> torch.Tensor:
        """With drop-and-pad every expert takes exactly ``capacity`` tokens from every rank:
        the ones Megatron's ``permute(drop_and_pad=True)`` picks (routed first, token order)."""
        if not self.drop_and_pad:
            return routing_map
        T, E = routing_map.shape
        self.capacity = get_capacity(
            num_tokens=T * self.config.moe_router_topk,
            num_experts=E,
            capacity_factor=self.moe_expert_capacity_factor,
        )
        picked = routing_map.to(torch.int8).T.argsort(dim=-1, descending=True, stable=True)
        picked = picked[:, : self.capacity]  # [E, capacity]
        eff = torch.zeros_like(routing_map.T).scatter(1, picked, True).T
        if self.dedup and not bool((routing_map.sum(0) >= self.capacity).all()):
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
        their probs (1-D), in hop-1 send order."""
        if not self.hierarchical:
            out = super().dispatch_preprocess(hidden_states, routing_map, probs)
            self._record_flat_fallback(routing_map, hidden_states, probs)
            return out
        assert probs.dim() == 2 and routing_map.dim() == 2 and routing_map.dtype == torch.bool
        self.hidden_shape = hidden_states.shape
        self.probs, self.routing_map = probs, routing_map
        x = hidden_states.view(-1, self.hidden_shape[-1])  # [T, H]
        self.hidden_shape_before_permute = x.shape
        eff_map = self._effective_map(routing_map)
        self._plan(eff_map, x, probs)
        if self.dedup:
            return self._dedup_preprocess(x, eff_map, probs)
        N, L = self.num_nodes, self.ranks_per_node
        rows, row_probs, self.reversed_local_input_permutation_mapping, _, _ = permute(
            x,
            routing_map,
            probs=probs,
            num_out_tokens=self.num_out_tokens,
            fused=False,
            drop_and_pad=self.drop_and_pad,
        )
        # expert-major = destination-rank-major [b][j]; hop 1 wants [j][b]
        self._sizes_dst = self.assign[self.ep_rank].tolist()
        self._order_hop1 = [b * L + j for j in range(L) for b in range(N)]
        rows = reorder_chunks(rows, self._sizes_dst, self._order_hop1)
        row_probs = reorder_chunks(row_probs, self._sizes_dst, self._order_hop1)
        return rows, row_probs

    def token_dispatch(self, rows, row_probs):
        """Hop 1 (intra-node) and hop 2 (rail); with dedup also hop 3 (fan-out). Returns the
        flat All-to-All's output: rows ``[sum, H]`` ordered by source EP rank, local expert,
        token, and their probs ``[sum]``."""
        if not self.hierarchical:
            return super().token_dispatch(rows, row_probs)
        if self.dedup:
            return self._dedup_dispatch(rows, row_probs)
        N, L, a, i = self.num_nodes, self.ranks_per_node, self.node, self.local_index
        A = self.assign.view(N, L, N, L)  # [a, i, b, j]
        send1 = [int(A[a, i, :, j].sum()) for j in range(L)]
        recv1_sizes = [int(A[a, i2, b, i]) for i2 in range(L) for b in range(N)]  # [i'][b]
        recv1 = [sum(recv1_sizes[i2 * N : (i2 + 1) * N]) for i2 in range(L)]
        group1 = self.topology.intra_node_group
        rows = all_to_all(rows, group1, recv1, send1)
        row_probs = all_to_all(row_probs, group1, recv1, send1)
        # [i'][b] -> [b][i'] for the rail hop
        self._sizes_mid = recv1_sizes
        self._order_mid = [i2 * N + b for b in range(N) for i2 in range(L)]
        rows = reorder_chunks(rows, recv1_sizes, self._order_mid)
        row_probs = reorder_chunks(row_probs, recv1_sizes, self._order_mid)
        send2 = [int(A[a, :, b, i].sum()) for b in range(N)]
        recv2 = [int(A[c, :, a, i].sum()) for c in range(N)]
        self._splits = (send1, recv1, send2, recv2)
        rows = all_to_all(rows, self.topology.rail_group, recv2, send2)
        row_probs = all_to_all(row_probs, self.topology.rail_group, recv2, send2)
        return rows, row_probs

    def dispatch_postprocess(self, rows, row_probs):
        """Expert-TP all-gather, then sort chunks [tp][src][expert] -> [expert][tp][src]
        (Megatron's order). Returns ``(expert_input [n, H], tokens_per_expert [nle], probs [n])``."""
        if not self.hierarchical:
            return super().dispatch_postprocess(rows, row_probs)
        if self.tp_size > 1:
            sizes = self.output_splits_tp.tolist()
            rows = all_gather_v(rows, self.tp_group, sizes)
            row_probs = all_gather_v(row_probs, self.tp_group, sizes)
        if self.num_local_experts > 1:
            sizes = self.num_global_tokens_per_local_expert.ravel().tolist()
            order = self.sort_input_by_local_experts.tolist()
            rows = reorder_chunks(rows, sizes, order)
            row_probs = reorder_chunks(row_probs, sizes, order)
        tokens_per_expert = self.tokens_per_expert
        self.tokens_per_expert = None
        return rows, tokens_per_expert, row_probs

    # ---- combine ---------------------------------------------------------------------------
    def combine_preprocess(self, hidden_states):
        """Undo the local-expert sort, reduce-scatter over expert-TP (in probs dtype, as
        Megatron does): back to the flat All-to-All's output order."""
        if not self.hierarchical:
            return super().combine_preprocess(hidden_states)
        if self.num_local_experts > 1:
            sizes = self.num_global_tokens_per_local_expert.T.ravel().tolist()
            order = self.restore_output_by_local_experts.tolist()
            hidden_states = reorder_chunks(hidden_states, sizes, order)
        if self.tp_size > 1:
            dtype = hidden_states.dtype
            hidden_states = reduce_scatter_v(
                hidden_states.to(self.probs.dtype),
                self.tp_group,
                self.output_splits_tp.tolist(),
                self.tp_rank,
            ).to(dtype)
        return hidden_states

    def token_combine(self, hidden_states, async_finish=True, allocate_on_comm_stream=True):
        """Mirror of ``token_dispatch``: rail hop back, then intra-node hop back."""
        if not self.hierarchical:
            return super().token_combine(hidden_states, async_finish, allocate_on_comm_stream)
        if self.dedup:
            return self._dedup_combine(hidden_states)
        send1, recv1, send2, recv2 = self._splits
        rows = all_to_all(hidden_states, self.topology.rail_group, send2, recv2)
        sizes = [self._sizes_mid[k] for k in self._order_mid]
        rows = reorder_chunks(rows, sizes, _inverse(self._order_mid))
        return all_to_all(rows, self.topology.intra_node_group, send1, recv1)

    def combine_postprocess(self, rows):
        """Back to expert-major order, then Megatron's ``unpermute``; ``[S, B, H]``."""
        if not self.hierarchical:
            return super().combine_postprocess(rows)
        if self.dedup:
            out = self._dedup_postprocess(rows)
        else:
            sizes = [self._sizes_dst[k] for k in self._order_hop1]
            rows = reorder_chunks(rows, sizes, _inverse(self._order_hop1))
            out = unpermute(
                rows,
                self.reversed_local_input_permutation_mapping,
                restore_shape=self.hidden_shape_before_permute,
                routing_map=self.routing_map,
                fused=False,
                drop_and_pad=self.drop_and_pad,
            )
        return out.view(self.hidden_shape)

    # ---- dedup path ------------------------------------------------------------------------
    def _dedup_preprocess(self, x, eff_map, probs):
        """Copies per (token, own-node rank) for hop 1 and per (token, remote node) for hop 2.
        Returns rows ``[R1 + R2, H]`` and their flattened meta ``[R1*2nle + R2*2W]``."""
        N, L, a = self.num_nodes, self.ranks_per_node, self.node
        T, nle = x.shape[0], self.num_local_experts
        W = L * nle
        m = eff_map.view(T, N, W)
        p = probs.view(T, N, W)
        idx_units, rows1, meta1, rows2, meta2 = [], [], [], [], []
        for b in range(N):  # units in expert order (the combine sums in this order)
            if b == a:
                for j in range(L):
                    mj = m[:, a, j * nle : (j + 1) * nle]
                    idx = mj.any(-1).nonzero().squeeze(-1)
                    idx_units.append(idx)
                    rows1.append(x.index_select(0, idx))
                    pj = p[:, a, j * nle : (j + 1) * nle].index_select(0, idx)
                    meta1.append(torch.cat([pj, mj.index_select(0, idx).to(pj.dtype)], dim=1))
            else:
                idx = m[:, b].any(-1).nonzero().squeeze(-1)
                idx_units.append(idx)
                rows2.append(x.index_select(0, idx))
                pb = p[:, b].index_select(0, idx)
                meta2.append(torch.cat([pb, m[:, b].index_select(0, idx).to(pb.dtype)], dim=1))
        self._unit_index = torch.cat(idx_units)  # source token of every copy, in unit order
        self._unit_sizes = [int(t.numel()) for t in idx_units]
        self._n1 = sum(r.shape[0] for r in rows1)
        rows = torch.cat(rows1 + rows2)
        meta = torch.cat([torch.cat(meta1).reshape(-1)] + [t.reshape(-1) for t in meta2])
        return rows, meta

    def _dedup_dispatch(self, rows, meta):
        N, L, a, i = self.num_nodes, self.ranks_per_node, self.node, self.local_index
        nle = self.num_local_experts
        W, E, ep = L * nle, self.num_experts, self.ep_size
        me = self.ep_rank
        tok_rank = self.counts[:, E : E + ep].view(N, L, N, L)
        tok_node = self.counts[:, E + ep :].view(N, L, N)
        n1 = self._n1
        rows1, rows2 = rows[:n1], rows[n1:]
        meta1 = meta[: n1 * 2 * nle].view(n1, 2 * nle)
        meta2 = meta[n1 * 2 * nle :].view(-1, 2 * W)
        intra, rail = self.topology.intra_node_group, self.topology.rail_group

        # hop 1: own-node copies, [j][token]
        send1 = [int(tok_rank[a, i, a, j]) for j in range(L)]
        recv1 = [int(tok_rank[a, i2, a, i]) for i2 in range(L)]
        rows1 = all_to_all(rows1, intra, recv1, send1)
        meta1 = all_to_all(meta1, intra, recv1, send1)
        # hop 2: one copy per remote node, to the rail peer (b, i)
        send2 = [0 if b == a else int(tok_node[a, i, b]) for b in range(N)]
        recv2 = [0 if c == a else int(tok_node[c, i, a]) for c in range(N)]
        rows2 = all_to_all(rows2, rail, recv2, send2)
        meta2 = all_to_all(meta2, rail, recv2, send2)
        # hop 3: fan out to the ranks of this node hosting one of the copy's experts
        mask2 = meta2[:, W:] > 0.5
        fan_idx, send3 = [], []
        for j in range(L):
            sel = mask2[:, j * nle : (j + 1) * nle].any(-1).nonzero().squeeze(-1)
            fan_idx.append(sel)
            send3.append(int(sel.numel()))
        fan_idx = torch.cat(fan_idx)
        cols = torch.arange(W, device=meta2.device).view(L, nle)
        fan_cols = torch.cat(
            [cols[j].expand(send3[j], nle) for j in range(L)]
        )  # [rows3, nle]: the experts of the receiving rank
        rows3 = rows2.index_select(0, fan_idx)
        meta3 = torch.cat(
            [meta2[:, :W][fan_idx[:, None], fan_cols], meta2[:, W:][fan_idx[:, None], fan_cols]],
            dim=1,
        )
        recv3_sizes = [  # [i'][c]: copies of source (c, i') relayed by (a, i') to me
            0 if c == a else int(tok_rank[c, i2, a, i]) for i2 in range(L) for c in range(N)
        ]
        recv3 = [sum(recv3_sizes[i2 * N : (i2 + 1) * N]) for i2 in range(L)]
        rows3 = all_to_all(rows3, intra, recv3, send3)
        meta3 = all_to_all(meta3, intra, recv3, send3)
        self._dedup_splits = (send1, recv1, send2, recv2, send3, recv3)
        self._fan_idx, self._n_rows2 = fan_idx, rows2.shape[0]

        # final: one row per assignment in flat order (source EP rank, local expert, token)
        buf = torch.cat([rows1, rows3])
        meta = torch.cat([meta1, meta3])
        n1r = rows1.shape[0]
        starts1 = _offsets(recv1)
        starts3 = _offsets(recv3_sizes)
        src_rows, chunk_of_row = [], []
        for c in range(N):
            for i2 in range(L):
                s = c * L + i2
                if c == a:
                    start, size = starts1[i2], recv1[i2]
                else:
                    k = i2 * N + c
                    start, size = n1r + starts3[k], recv3_sizes[k]
                src_rows.append(torch.arange(start, start + size, device=buf.device))
                chunk_of_row.append(torch.full((size,), s, dtype=torch.long, device=buf.device))
        src_rows = torch.cat(src_rows)  # buffer rows in source EP rank order
        chunk_of_row = torch.cat(chunk_of_row)
        mask = meta[:, nle:].index_select(0, src_rows) > 0.5  # [rows, nle]
        r, le = mask.nonzero(as_tuple=True)  # row-major: row, then expert
        order = torch.argsort(chunk_of_row[r] * nle + le, stable=True)
        r, le = r[order], le[order]
        final_idx = src_rows[r]
        self._final_idx, self._n_buf, self._n1r = final_idx, buf.shape[0], n1r
        out_probs = meta[final_idx, le]
        expected = int(self.assign[:, me].sum())
        assert final_idx.numel() == expected, (final_idx.numel(), expected)
        return buf.index_select(0, final_idx), out_probs

    def _dedup_combine(self, y):
        """Pre-reduce per copy on this rank, send back over hop 3, pre-reduce per node copy on
        the rail receiver, hop 2 back, hop 1 back. Returns ``[R1 + R2, H]`` at the source."""
        send1, recv1, send2, recv2, send3, recv3 = self._dedup_splits
        intra, rail = self.topology.intra_node_group, self.topology.rail_group
        H = y.shape[-1]
        buf = y.new_zeros((self._n_buf, H)).index_add(0, self._final_idx, y)
        rows1, rows3 = buf[: self._n1r], buf[self._n1r :]
        rows3 = all_to_all(rows3, intra, send3, recv3)
        rows2 = y.new_zeros((self._n_rows2, H)).index_add(0, self._fan_idx, rows3)
        rows2 = all_to_all(rows2, rail, send2, recv2)
        rows1 = all_to_all(rows1, intra, send1, recv1)
        return torch.cat([rows1, rows2])

    def _dedup_postprocess(self, rows):
        """Sum the returned copies per token, copies in expert order: ``[T, H]``."""
        L, a, n1 = self.ranks_per_node, self.node, self._n1
        # returned rows: own-node units [j] then remote units [b != a]; reorder to unit order
        sizes = self._unit_sizes
        units_own = list(range(a, a + L))  # unit positions of the own-node ranks
        remote = [k for k in range(len(sizes)) if k not in units_own]
        ret_sizes = [sizes[k] for k in units_own] + [sizes[k] for k in remote]
        order = _inverse(units_own + remote)
        rows = reorder_chunks(rows, ret_sizes, order)
        assert rows.shape[0] == sum(sizes) and n1 == sum(sizes[k] for k in units_own)
        out = rows.new_zeros(self.hidden_shape_before_permute)
        return out.index_add(0, self._unit_index, rows)

    # ---- fallback --------------------------------------------------------------------------
    def _record_flat_fallback(self, routing_map, hidden, probs):
        """Inside one node: this rank's sends, all intra-node (no collective needed)."""
        nle = self.num_local_experts
        per_rank = routing_map.sum(0).view(self.ep_size, nle).sum(-1).cpu()
        copies = int(per_rank.sum() - per_rank[self.ep_rank])
        per_copy = copy_bytes(hidden.shape[-1] * hidden.element_size(), probs.element_size())
        t = Traffic(intra_node_copies=copies, intra_node_bytes=copies * per_copy)
        self.last_traffic = DispatchTraffic(
            scheme="flat",
            rank=t,
            group=None,
            flat_rank=t,
            flat_group=None,
            hops={"intra_node": (copies, copies * per_copy)},
            tokens=routing_map.shape[0],
            assignments=int(per_rank.sum()),
        )


def _offsets(sizes: list[int]) -> list[int]:
    """Start of every chunk: exclusive prefix sums."""
    return [0, *itertools.accumulate(sizes)][:-1]


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
        pg_collection = ProcessGroupCollection()
        pg_collection.ep, pg_collection.expt_tp = old.ep_group, old.tp_group
        pg_collection.tp_ep = old.tp_ep_group
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
