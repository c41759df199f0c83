"""The three ways tokens travel to their experts: flat, two-hop and two-hop with dedup.

Notation. EP group = N nodes x L EP ranks per node (``topology.py``); EP rank ``(a, i)`` = node a,
local index i; each EP rank holds ``nle`` consecutive experts, so a node holds ``W = L * nle``
consecutive experts. T = local tokens, H = hidden size.

Every scheme is a stateless strategy with four steps: ``pack`` (source rows in send order),
``dispatch`` (the hops), ``combine`` (the hops back) and ``unpack`` (rows back to ``[T, H]``).
Each step takes the forward's frozen handle and returns the next one, so what combine needs is
exactly what dispatch recorded: no state on the dispatcher between the steps. Every scheme's
``dispatch`` returns the flat All-to-All's output (rows by source EP rank, local expert, token),
so what happens after it (expert-TP gather, local-expert sort, experts) is common to all three.

Flat (EP inside one node): one All-to-All over the EP group, as Megatron's alltoall dispatcher.

Two-hop (one copy per token-expert assignment, like the flat All-to-All):
  hop 1, intra-node: rank (a, i) sends every assignment for an expert on rank (b, j) to (a, j);
  hop 2, rail:       (a, j) forwards the assignments for (b, j), b != a, to (b, j).
  Own-node assignments are finished after hop 1; remote ones cross the node boundary once, on
  rail j. Order: the source permutes tokens expert-major (Megatron's ``permute``), i.e. chunks
  in destination order [b][j]; they are re-chunked to [j][b] for hop 1; the hop-1 receive
  buffer is [i][b] (source local index, destination node) and is re-chunked to [b][i] for hop 2;
  the hop-2 receive buffer on (b, j) is then [a][i] = source EP rank order, each chunk in the
  source's expert-major token order: exactly the flat All-to-All's output. Hence outputs and
  gradients are bitwise those of the flat dispatcher.

Two-hop with dedup (DeepEP-style, one copy per token and remote node):
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
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from megatron.core.transformer.moe.moe_utils import permute, unpermute

from megatron_locmoe.dispatch.collectives import all_to_all, inverse, offsets, reorder_chunks
from megatron_locmoe.dispatch.traffic import DispatchTraffic
from megatron_locmoe.topology import Topology


@dataclass(frozen=True)
class DispatchPlan:
    """What the gathered per-source counts decide for one forward, before any row moves."""

    hidden_shape: torch.Size
    """The layer input's shape ``[S, B, H]`` (the output gets it back)."""
    token_shape: torch.Size
    """``[T, H]``."""
    routing_map: torch.Tensor
    """``[T, E]`` bool as the router returned it (Megatron's permute / unpermute take it)."""
    drop_and_pad: bool
    probs_dtype: torch.dtype
    counts: torch.Tensor
    """``[EP, E + EP + N]`` on the host: ``source_counts`` of every source of the EP group."""
    assign: torch.Tensor
    """``[EP(src), EP(dst)]`` assignments."""
    per_local_expert: torch.Tensor
    """``[TP * EP, nle]``: what each source sends to each local expert (Megatron's
    ``num_global_tokens_per_local_expert``)."""
    tp_splits: list[int]
    """Rows per expert-TP rank (the expert-TP all-gather's sizes)."""
    tokens_per_expert: torch.Tensor
    """``[nle]`` rows each local expert receives."""
    num_out_tokens: int
    """Assignments this rank sends (after drops, with padding)."""
    traffic: DispatchTraffic


class _Scheme:
    """Geometry shared by the schemes: this rank's place in the EP group."""

    name: str

    def __init__(self, topology: Topology, num_local_experts: int, ep_group=None) -> None:
        self.topology = topology
        self.ep_group = ep_group
        self.N, self.L = topology.num_nodes, topology.ranks_per_node
        self.a, self.i = topology.node, topology.local_index
        self.me, self.nle = topology.ep_rank, num_local_experts
        self.W = self.L * num_local_experts

    def _permute(self, x, probs, plan: DispatchPlan):
        """Megatron's ``permute``: rows expert-major, i.e. destination-rank-major."""
        rows, row_probs, permutation, _, _ = permute(
            x,
            plan.routing_map,
            probs=probs,
            num_out_tokens=plan.num_out_tokens,
            fused=False,
            drop_and_pad=plan.drop_and_pad,
        )
        return rows, row_probs, permutation

    @staticmethod
    def _unpermute(rows, permutation, plan: DispatchPlan):
        return unpermute(
            rows,
            permutation,
            restore_shape=plan.token_shape,
            routing_map=plan.routing_map,
            fused=False,
            drop_and_pad=plan.drop_and_pad,
        )


# --------------------------------------------------------------------------------------------
# Flat
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlatHandle:
    plan: DispatchPlan
    permutation: torch.Tensor
    send: list[int]
    recv: list[int]


class Flat(_Scheme):
    """One All-to-All over the EP group (the EP group lies inside one node)."""

    name = "flat"

    def pack(self, x, eff_map, probs, plan: DispatchPlan):
        rows, row_probs, permutation = self._permute(x, probs, plan)
        send = plan.assign[self.me].tolist()
        recv = plan.assign[:, self.me].tolist()
        return rows, row_probs, FlatHandle(plan, permutation, send, recv)

    def dispatch(self, rows, row_probs, h: FlatHandle):
        rows = all_to_all(rows, self.ep_group, h.recv, h.send)
        return rows, all_to_all(row_probs, self.ep_group, h.recv, h.send), h

    def combine(self, rows, h: FlatHandle):
        return all_to_all(rows, self.ep_group, h.send, h.recv)

    def unpack(self, rows, h: FlatHandle):
        return self._unpermute(rows, h.permutation, h.plan)


# --------------------------------------------------------------------------------------------
# Two-hop
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TwoHopHandle:
    plan: DispatchPlan
    permutation: torch.Tensor
    sizes_dst: list[int]
    """Rows for each destination EP rank, [b][j] (permute's order)."""
    order_hop1: list[int]
    """[b][j] -> [j][b]: the hop-1 send order."""
    sizes_mid: list[int]
    """Rows received in hop 1, [i'][b] (source local index, destination node)."""
    order_mid: list[int]
    """[i'][b] -> [b][i']: the rail send order."""
    send1: list[int]
    recv1: list[int]
    send2: list[int]
    recv2: list[int]


class TwoHop(_Scheme):
    """Intra-node hop, then rail hop; every split comes from the plan's assignment matrix."""

    name = "hierarchical"

    def pack(self, x, eff_map, probs, plan: DispatchPlan):
        N, L, a, i = self.N, self.L, self.a, self.i
        A = plan.assign.view(N, L, N, L)  # [a, i, b, j]
        sizes_mid = [int(A[a, i2, b, i]) for i2 in range(L) for b in range(N)]
        h = TwoHopHandle(
            plan=plan,
            permutation=None,
            sizes_dst=plan.assign[self.me].tolist(),
            order_hop1=[b * L + j for j in range(L) for b in range(N)],
            sizes_mid=sizes_mid,
            order_mid=[i2 * N + b for b in range(N) for i2 in range(L)],
            send1=[int(A[a, i, :, j].sum()) for j in range(L)],
            recv1=[sum(sizes_mid[i2 * N : (i2 + 1) * N]) for i2 in range(L)],
            send2=[int(A[a, :, b, i].sum()) for b in range(N)],
            recv2=[int(A[c, :, a, i].sum()) for c in range(N)],
        )
        rows, row_probs, permutation = self._permute(x, probs, plan)
        rows = reorder_chunks(rows, h.sizes_dst, h.order_hop1)
        row_probs = reorder_chunks(row_probs, h.sizes_dst, h.order_hop1)
        return rows, row_probs, replace(h, permutation=permutation)

    def dispatch(self, rows, row_probs, h: TwoHopHandle):
        intra, rail = self.topology.intra_node_group, self.topology.rail_group
        out = []
        for t in (rows, row_probs):
            t = all_to_all(t, intra, h.recv1, h.send1)
            t = reorder_chunks(t, h.sizes_mid, h.order_mid)
            out.append(all_to_all(t, rail, h.recv2, h.send2))
        return out[0], out[1], h

    def combine(self, rows, h: TwoHopHandle):
        rows = all_to_all(rows, self.topology.rail_group, h.send2, h.recv2)
        sizes = [h.sizes_mid[k] for k in h.order_mid]
        rows = reorder_chunks(rows, sizes, inverse(h.order_mid))
        return all_to_all(rows, self.topology.intra_node_group, h.send1, h.recv1)

    def unpack(self, rows, h: TwoHopHandle):
        sizes = [h.sizes_dst[k] for k in h.order_hop1]
        rows = reorder_chunks(rows, sizes, inverse(h.order_hop1))
        return self._unpermute(rows, h.permutation, h.plan)


# --------------------------------------------------------------------------------------------
# Two-hop with dedup
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DedupReceived:
    """What the destination side of a dedup dispatch learnt from the rows it received."""

    send3: list[int]
    recv3: list[int]
    fan_index: torch.Tensor
    """Rail-received copy of every fan-out row (hop 3's send order)."""
    rail_rows: int
    final_index: torch.Tensor
    """Receive-buffer row of every expert row (flat order)."""
    buffer_rows: int
    hop1_rows: int
    """Rows of the receive buffer that came in hop 1 (the rest came in hop 3)."""


@dataclass(frozen=True)
class DedupHandle:
    plan: DispatchPlan
    unit_index: torch.Tensor
    """Source token of every copy, in unit order (own-node ranks, then remote nodes, by expert)."""
    unit_sizes: list[int]
    hop1_copies: int
    send1: list[int]
    recv1: list[int]
    send2: list[int]
    recv2: list[int]
    recv3_sizes: list[int]
    """Copies of source (c, i') that (a, i') relays to this rank, [i'][c]."""
    received: DedupReceived | None = None


class TwoHopDedup(_Scheme):
    """One copy per (token, own-node rank) and per (token, remote node), fanned out there."""

    name = "hierarchical+dedup"

    def pack(self, x, eff_map, probs, plan: DispatchPlan):
        """Rows ``[R1 + R2, H]`` (hop-1 copies, then rail copies) and their flattened meta
        ``[R1*2nle + R2*2W]`` (probs and mask of each copy's scope)."""
        N, L, a, i, nle, W = self.N, self.L, self.a, self.i, self.nle, self.W
        T = x.shape[0]
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
        E, ep = nle * N * L, N * L
        tok_rank = plan.counts[:, E : E + ep].view(N, L, N, L)
        tok_node = plan.counts[:, E + ep :].view(N, L, N)
        h = DedupHandle(
            plan=plan,
            unit_index=torch.cat(idx_units),
            unit_sizes=[int(t.numel()) for t in idx_units],
            hop1_copies=sum(r.shape[0] for r in rows1),
            send1=[int(tok_rank[a, i, a, j]) for j in range(L)],
            recv1=[int(tok_rank[a, i2, a, i]) for i2 in range(L)],
            send2=[0 if b == a else int(tok_node[a, i, b]) for b in range(N)],
            recv2=[0 if c == a else int(tok_node[c, i, a]) for c in range(N)],
            recv3_sizes=[
                0 if c == a else int(tok_rank[c, i2, a, i]) for i2 in range(L) for c in range(N)
            ],
        )
        rows = torch.cat(rows1 + rows2)
        meta = torch.cat([torch.cat(meta1).reshape(-1)] + [t.reshape(-1) for t in meta2])
        return rows, meta, h

    def dispatch(self, rows, meta, h: DedupHandle):
        """Hops 1-3, then one row per assignment in flat order with its prob."""
        N, L, a, nle, W = self.N, self.L, self.a, self.nle, self.W
        n1 = h.hop1_copies
        rows1, rows2 = rows[:n1], rows[n1:]
        meta1 = meta[: n1 * 2 * nle].view(n1, 2 * nle)
        meta2 = meta[n1 * 2 * nle :].view(-1, 2 * W)
        intra, rail = self.topology.intra_node_group, self.topology.rail_group

        # hop 1: own-node copies, [j][token]; hop 2: one copy per remote node, to (b, i)
        rows1 = all_to_all(rows1, intra, h.recv1, h.send1)
        meta1 = all_to_all(meta1, intra, h.recv1, h.send1)
        rows2 = all_to_all(rows2, rail, h.recv2, h.send2)
        meta2 = all_to_all(meta2, rail, h.recv2, h.send2)
        # hop 3: fan out to the ranks of this node hosting one of the copy's experts
        mask2 = meta2[:, W:] > 0.5
        fan_index, send3 = [], []
        for j in range(L):
            sel = mask2[:, j * nle : (j + 1) * nle].any(-1).nonzero().squeeze(-1)
            fan_index.append(sel)
            send3.append(int(sel.numel()))
        fan_index = torch.cat(fan_index)
        cols = torch.arange(W, device=meta2.device).view(L, nle)
        fan_cols = torch.cat([cols[j].expand(send3[j], nle) for j in range(L)])  # [rows3, nle]
        rows3 = rows2.index_select(0, fan_index)
        meta3 = torch.cat(
            [
                meta2[:, :W][fan_index[:, None], fan_cols],
                meta2[:, W:][fan_index[:, None], fan_cols],
            ],
            dim=1,
        )
        recv3 = [sum(h.recv3_sizes[i2 * N : (i2 + 1) * N]) for i2 in range(L)]
        rows3 = all_to_all(rows3, intra, recv3, send3)
        meta3 = all_to_all(meta3, intra, recv3, send3)

        # one row per assignment in flat order (source EP rank, local expert, token)
        buf = torch.cat([rows1, rows3])
        meta = torch.cat([meta1, meta3])
        n1r = rows1.shape[0]
        starts1, starts3 = offsets(h.recv1), offsets(h.recv3_sizes)
        src_rows, chunk_of_row = [], []
        for c in range(N):
            for i2 in range(L):
                if c == a:
                    start, size = starts1[i2], h.recv1[i2]
                else:
                    k = i2 * N + c
                    start, size = n1r + starts3[k], h.recv3_sizes[k]
                src_rows.append(torch.arange(start, start + size, device=buf.device))
                chunk_of_row.append(
                    torch.full((size,), c * L + i2, dtype=torch.long, device=buf.device)
                )
        src_rows = torch.cat(src_rows)  # buffer rows in source EP rank order
        chunk_of_row = torch.cat(chunk_of_row)
        mask = meta[:, nle:].index_select(0, src_rows) > 0.5  # [rows, nle]
        r, le = mask.nonzero(as_tuple=True)  # row-major: row, then expert
        order = torch.argsort(chunk_of_row[r] * nle + le, stable=True)
        r, le = r[order], le[order]
        final_index = src_rows[r]
        expected = int(h.plan.assign[:, self.me].sum())
        assert final_index.numel() == expected, (final_index.numel(), expected)
        received = DedupReceived(
            send3=send3,
            recv3=recv3,
            fan_index=fan_index,
            rail_rows=rows2.shape[0],
            final_index=final_index,
            buffer_rows=buf.shape[0],
            hop1_rows=n1r,
        )
        out_probs = meta[final_index, le]
        return buf.index_select(0, final_index), out_probs, replace(h, received=received)

    def combine(self, y, h: DedupHandle):
        """Pre-reduce per copy on this rank, send back over hop 3, pre-reduce per node copy on
        the rail receiver, hop 2 back, hop 1 back. Returns ``[R1 + R2, H]`` at the source."""
        rc = h.received
        intra, rail = self.topology.intra_node_group, self.topology.rail_group
        H = y.shape[-1]
        buf = y.new_zeros((rc.buffer_rows, H)).index_add(0, rc.final_index, y)
        rows1, rows3 = buf[: rc.hop1_rows], buf[rc.hop1_rows :]
        rows3 = all_to_all(rows3, intra, rc.send3, rc.recv3)
        rows2 = y.new_zeros((rc.rail_rows, H)).index_add(0, rc.fan_index, rows3)
        rows2 = all_to_all(rows2, rail, h.send2, h.recv2)
        rows1 = all_to_all(rows1, intra, h.send1, h.recv1)
        return torch.cat([rows1, rows2])

    def unpack(self, rows, h: DedupHandle):
        """Sum the returned copies per token, copies in expert order: ``[T, H]``."""
        L, a, sizes = self.L, self.a, h.unit_sizes
        # returned rows: own-node units [j] then remote units [b != a]; reorder to unit order
        units_own = list(range(a, a + L))  # unit positions of the own-node ranks
        remote = [k for k in range(len(sizes)) if k not in units_own]
        ret_sizes = [sizes[k] for k in units_own] + [sizes[k] for k in remote]
        rows = reorder_chunks(rows, ret_sizes, inverse(units_own + remote))
        assert rows.shape[0] == sum(sizes) and h.hop1_copies == sum(sizes[k] for k in units_own)
        out = rows.new_zeros(h.plan.token_shape)
        return out.index_add(0, h.unit_index, rows)


SCHEMES = {cls.name: cls for cls in (Flat, TwoHop, TwoHopDedup)}
"""Scheme name (as logged in ``DispatchTraffic.scheme``) -> strategy class."""
