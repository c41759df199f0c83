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
    on each EP rank ``[EP]`` and on each node ``[N]``. Leading dimensions are kept: ``[S, T, E]``
    (S sources' maps) gives ``[S, E + EP + N]`` in the same few kernels.
    """
    *lead, T, E = routing_map.shape
    ep = num_nodes * ranks_per_node
    m = routing_map.bool()
    per_expert = m.sum(-2)
    per_rank = m.view(*lead, T, ep, E // ep).any(-1).sum(-2)
    per_node = m.view(*lead, T, num_nodes, E // num_nodes).any(-1).sum(-2)
    return torch.cat([per_expert, per_rank, per_node], dim=-1).long()


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
    schemes: dict[str, int] = field(default_factory=dict)
    """This rank's bytes under every scheme for the same routing (``SCHEME_BYTES`` names)."""
    received_load: float = 1.0
    """Assignments received per EP rank of the group, max / mean."""

    def as_dict(self) -> dict:
        return asdict(self)


def _sender_copies(
    counts: torch.Tensor, num_nodes: int, ranks_per_node: int, num_experts: int, dedup: bool
) -> dict:
    """Copies every sender ``(node a, local index i)`` puts on each hop, ``[N, L]`` tensors on
    the device of ``counts`` (no host copy): ``flat_intra`` / ``flat_inter`` (Megatron's flat
    All-to-All) and the two-hop scheme's hop columns (``intra_node``, ``rail`` and, with
    ``dedup``, ``fan_out``)."""
    N, L = num_nodes, ranks_per_node
    ep, E = N * L, num_experts
    nle = E // ep
    c = counts.long()
    per_rank = c[:, :E].reshape(ep, ep, nle).sum(-1).view(N, L, N, L)  # [a, i, b, j] assignments
    tok_rank = c[:, E : E + ep].reshape(N, L, N, L)  # tokens of (a,i) with an expert on (b,j)
    tok_node = c[:, E + ep :].reshape(N, L, N)  # tokens of (a,i) with an expert on node b

    # every sender (a, i) at once, [N, L] each; einsum's repeated letters take diagonals
    total = per_rank.sum((2, 3))
    own = torch.einsum("aiaj->ai", per_rank)  # assignments to experts on the sender's node
    to_self = torch.einsum("aiai->ai", per_rank)
    out = {"flat_intra": own - to_self, "flat_inter": total - own}
    if not dedup:
        out["intra_node"] = total - torch.einsum("aibi->ai", per_rank)  # all but rail peers'
        out["rail"] = per_rank.sum((1, 2)) - torch.einsum("akaj->aj", per_rank)  # node's off-node
        return out
    out["intra_node"] = torch.einsum("aiaj->ai", tok_rank) - torch.einsum("aiai->ai", tok_rank)
    out["rail"] = tok_node.sum(2) - torch.einsum("aia->ai", tok_node)
    # rows that rail peers (b, i) forward to (a, j), minus own-node tokens (hop 1 took them)
    fan_aij = torch.einsum("biaj->aij", tok_rank) - torch.einsum("aiaj->aij", tok_rank)
    out["fan_out"] = fan_aij.sum(-1) - torch.einsum("aii->ai", fan_aij)
    return out


def _hop_row_bytes(
    num_experts: int, ep: int, num_nodes: int, dedup: bool, hidden_bytes: int, prob_bytes: int
) -> dict[str, int]:
    """Bytes of one copy on each hop of the two-hop scheme (dedup rows carry their scope's
    probs and mask)."""
    if not dedup:
        row = copy_bytes(hidden_bytes, prob_bytes)
        return {"intra_node": row, "rail": row}
    row_rank = copy_bytes(hidden_bytes, prob_bytes, dedup_width=num_experts // ep)
    row_node = copy_bytes(hidden_bytes, prob_bytes, dedup_width=num_experts // num_nodes)
    return {"intra_node": row_rank, "rail": row_node, "fan_out": row_rank}


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
    sends = _sender_copies(counts.detach().to("cpu"), N, L, num_experts, dedup)
    row = _hop_row_bytes(num_experts, N * L, N, dedup, hidden_bytes, prob_bytes)
    copy_flat = copy_bytes(hidden_bytes, prob_bytes)  # one assignment, dispatch + combine
    names = [name for name in ("intra_node", "rail", "fan_out") if name in sends]
    intra = sum(sends[name] for name in names if name != "rail")
    intra_bytes = sum(sends[name] * row[name] for name in names if name != "rail")
    hier_intra, hier_inter = (intra, intra_bytes), (sends["rail"], sends["rail"] * row["rail"])

    def rows(*tensors):
        return zip(*(t.reshape(-1).tolist() for t in tensors), strict=True)

    flat = [
        Traffic(i, o, i * copy_flat, o * copy_flat)
        for i, o in rows(sends["flat_intra"], sends["flat_inter"])
    ]
    hier = [Traffic(ic, oc, ib, ob) for ic, ib, oc, ob in rows(*hier_intra, *hier_inter)]
    hops = [
        {name: (n, n * row[name]) for name, n in zip(names, values, strict=True)}
        for values in rows(*(sends[name] for name in names))
    ]
    return {"flat": flat, "hier": hier, "hops": hops}


SCHEME_BYTES = (
    "flat_intra_node_bytes",
    "flat_inter_node_bytes",
    "two_hop_intra_node_bytes",
    "two_hop_inter_node_bytes",
    "dedup_intra_node_bytes",
    "dedup_inter_node_bytes",
)
"""What each EP rank would send (dispatch + combine) with each scheme for the same routing."""


def scheme_bytes(
    counts: torch.Tensor,
    num_nodes: int,
    ranks_per_node: int,
    num_experts: int,
    hidden_bytes: int,
    prob_bytes: int,
) -> dict[str, torch.Tensor]:
    """``{name of SCHEME_BYTES: [EP] bytes}`` of every EP rank under the flat All-to-All, the
    two-hop dispatcher and the two-hop dispatcher with per-node dedup, from the ``source_counts``
    of every EP rank (``counts [EP, E + EP + N]``), on the device of ``counts`` (no host copy:
    the virtual cluster records them without waiting for the device). Inter-node bytes go to
    remote nodes only; sends to oneself are free."""
    N, L = num_nodes, ranks_per_node
    out = {}
    for prefix, dedup in (("two_hop", False), ("dedup", True)):
        sends = _sender_copies(counts, N, L, num_experts, dedup)
        row = _hop_row_bytes(num_experts, N * L, N, dedup, hidden_bytes, prob_bytes)
        intra = sum(sends[n] * row[n] for n in ("intra_node", "fan_out") if n in sends)
        out[f"{prefix}_intra_node_bytes"] = intra.reshape(-1)
        out[f"{prefix}_inter_node_bytes"] = (sends["rail"] * row["rail"]).reshape(-1)
    copy_flat = copy_bytes(hidden_bytes, prob_bytes)
    out["flat_intra_node_bytes"] = (sends["flat_intra"] * copy_flat).reshape(-1)
    out["flat_inter_node_bytes"] = (sends["flat_inter"] * copy_flat).reshape(-1)
    return {name: out[name] for name in SCHEME_BYTES}


def received_tokens(counts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[EP]`` token-expert assignments each EP rank receives (its own included): the load
    of the ranks, from every rank's ``source_counts``."""
    ep = counts.shape[0]
    return counts[:, :num_experts].long().reshape(ep, ep, num_experts // ep).sum((0, 2))


def load_max_over_mean(received_EP: torch.Tensor) -> torch.Tensor:
    """max / mean of the tokens the EP ranks receive (1 when all receive the same; 1 when none
    receives any), on the device."""
    r = received_EP.double()
    mean = r.mean()
    return torch.where(mean > 0, r.max() / mean.clamp_min(1e-30), torch.ones_like(mean))
