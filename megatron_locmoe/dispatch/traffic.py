"""What a dispatch puts on the intra- and inter-node links: exact copies and bytes per rank.

Per forward pass of one layer (dispatch + combine; the backward mirrors it), counting only the
EP exchange (the expert-TP all-gather / reduce-scatter is the same for every scheme and stays
in a node). A *token copy* is one hidden row sent to another rank; sends to oneself are free and
not counted. A copy is intra-node or inter-node by the nodes of sender and receiver. Bytes =
dispatch bytes + combine bytes: a copy costs ``H * hidden element size`` each way, plus in the
dispatch one probs element (flat and two-hop) or ``2 * width`` probs elements (dedup: probs +
mask of the copy's scope, width = nle on intra-node hops, W on the rail hop). ``flat_*`` fields
give what Megatron's flat All-to-All sends for the same routing. Everything comes from the
per-source counts (``source_counts``) that the dispatch gathers anyway, so the benchmark and
the cost model count with the same functions as a training run.
"""

from __future__ import annotations

from dataclasses import asdict, astuple, dataclass, field

import torch


def copy_bytes(hidden_bytes: int, prob_bytes: int, dedup_width: int | None = None) -> int:
    """Bytes of one token copy, dispatch + combine: the hidden row each way plus one prob (flat
    / hierarchical), or plus prob and mask of the copy's scope of ``dedup_width`` experts
    (dedup). The dispatcher counts its traffic with it, so bytes logged by a run convert back
    to copies exactly."""
    if dedup_width is None:
        return 2 * hidden_bytes + prob_bytes
    return 2 * hidden_bytes + 2 * dedup_width * prob_bytes


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
