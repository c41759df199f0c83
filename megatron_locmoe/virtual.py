"""The virtual cluster: what NODES x GPUS ranks would route, trained on one device.

Routing on a cluster depends only on each rank's tokens and the node that rank sits on (and,
for some routers, state each rank keeps: LocMoE's node bias, its capacity estimate). So one
device can train exactly what a cluster would route: the global batch is the data of the
V = NODES x GPUS data-parallel ranks, split into V x m micro-batches (gradient accumulation
plays data parallelism), and micro-batch i belongs to virtual rank i mod V. That is Megatron's
own sample order: its pretraining sampler gives data-parallel rank r the r-th micro batch of
every slice of micro batch x DP samples, so the DP ranks' micro-batches interleaved are the
sample stream of one rank; the gradient (each micro-batch's loss over V x m, summed) is the
data-parallel average.

Before a micro-batch's forward the training step calls ``enter(model, rank)``: every plugin
router then routes as that rank of the real cluster would (its node's experts, its own copy of
the per-rank state: ``RankStateBank``), and every plugin MoE layer counts the traffic of that
rank (``VirtualTraffic``): when the last rank of an EP group has routed a micro step, the
bytes the flat, two-hop and two-hop-dedup dispatchers would put on the links and the tokens
each rank would receive are recorded under the metric names a real run uses, so the tracker's
average over the V x m micro-batches is the real cluster's average over its ranks and m.

Placement follows ``topology``: EP groups of ``ep_size`` consecutive virtual ranks (Megatron's
rank order with TP = CP = 1), each EP rank a contiguous block of experts, node of rank r =
r // GPUS. Where a real cluster all-reduces a router's state over data parallelism within one
micro step (LocMoE's capacity estimate), the virtual ranks of that micro step come one after
the other: see ``LocMoERouter`` for the one quantity that then differs (named, with its bound).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import cached_property

import torch

from megatron_locmoe import metrics
from megatron_locmoe.dispatch.traffic import (
    load_max_over_mean,
    received_tokens,
    scheme_bytes,
    source_counts,
)
from megatron_locmoe.topology import EPGroupLayout, Topology, layout_ep_groups


@dataclass(frozen=True)
class VirtualCluster:
    """NODES x GPUS virtual data-parallel ranks, EP groups of ``ep_size`` consecutive ranks."""

    nodes: int
    gpus_per_node: int
    ep_size: int

    @classmethod
    def from_config(cls, locmoe) -> VirtualCluster | None:
        """The virtual cluster a LocMoEConfig (or the spec's Resolution) asks for, or None."""
        cfg = getattr(locmoe, "config", locmoe)
        shape = cfg.virtual_shape if cfg is not None else None
        if shape is None:
            return None
        nodes, gpus = shape
        return cls(nodes, gpus, cfg.virtual_ep)

    @property
    def ranks(self) -> int:
        return self.nodes * self.gpus_per_node

    def describe(self) -> str:
        return (
            f"{self.nodes} nodes x {self.gpus_per_node} GPUs = {self.ranks} virtual ranks, "
            f"EP {self.ep_size}"
        )

    @cached_property
    def ep_groups(self) -> tuple[EPGroupLayout, ...]:
        """Every EP group's layout (validated by the topology module's own rule)."""
        ep = self.ep_size
        groups = [tuple(range(g * ep, (g + 1) * ep)) for g in range(self.ranks // ep)]
        return layout_ep_groups(groups, self.ranks, self.gpus_per_node)

    def topology(self, rank: int) -> Topology:
        """Virtual rank ``rank``'s view of the node layout, as a real rank's (no subgroups)."""
        layout = self.ep_groups[rank // self.ep_size]
        return Topology(
            devices_per_node=self.gpus_per_node,
            world_size=self.ranks,
            rank=rank,
            ep_groups=self.ep_groups,
            ep=layout,
            ep_rank=rank % self.ep_size,
        )

    def expert_is_local(self, num_experts: int) -> torch.Tensor:
        """``[V, E]`` bool: experts on each virtual rank's node (within its EP group)."""
        rows = []
        for rank in range(self.ranks):
            topo = self.topology(rank)
            nodes_E = torch.tensor(topo.expert_nodes(num_experts))
            rows.append(nodes_E == topo.node)
        return torch.stack(rows)

    def is_last_of_group(self, rank: int) -> bool:
        return rank % self.ep_size == self.ep_size - 1


# --------------------------------------------------------------------------------------------
# Per-rank router state
# --------------------------------------------------------------------------------------------


class RankStateBank:
    """One copy per virtual rank of a module's per-rank buffers and host attributes.

    ``enter(rank)`` saves the live values into the copy of the rank that was active and loads
    ``rank``'s copy, in place, so the tensors the routing paths hold (Triton kernels, compiled
    graphs) stay the same objects. ``derived`` buffers are functions of the rank (``[V, ...]``
    tables, e.g. the node's experts): loaded only when the row changes, never saved back.
    A checkpoint holds virtual rank 0's state (a real cluster saves data-parallel rank 0's);
    a loaded one becomes every rank's (``broadcast``), as every real rank resumes from it.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        ranks: int,
        buffers: tuple[str, ...] = (),
        host: tuple[str, ...] = (),
        derived: dict[str, torch.Tensor] | None = None,
    ):
        self.ranks, self.buffers, self.host = ranks, buffers, host
        self.current = 0
        self.copies = {
            n: [getattr(module, n).detach().clone() for _ in range(ranks)] for n in buffers
        }
        self.host_copies = {n: [_fresh(getattr(module, n)) for _ in range(ranks)] for n in host}
        self.derived = dict(derived or {})
        # which rows are equal, decided once on the host (no device sync per switch)
        self.row_class = {n: _row_classes(t) for n, t in self.derived.items()}
        for name, table in self.derived.items():
            getattr(module, name).copy_(table[0])

    def enter(self, module: torch.nn.Module, rank: int) -> None:
        if not 0 <= rank < self.ranks:
            raise ValueError(f"virtual rank {rank} is outside the cluster's 0..{self.ranks - 1}")
        old = self.current
        if rank == old:
            return
        for name in self.buffers:
            live, copies = getattr(module, name), self.copies[name]
            copies[old] = _follow(copies[old], live).copy_(live)
            copies[rank] = _follow(copies[rank], live)
            live.copy_(copies[rank])
        for name in self.host:
            self.host_copies[name][old] = getattr(module, name)
            setattr(module, name, self.host_copies[name][rank])
        for name, table in self.derived.items():
            if self.row_class[name][old] != self.row_class[name][rank]:
                live = getattr(module, name)
                if table.device != live.device:  # the module moved (e.g. to its GPU) after
                    table = self.derived[name] = table.to(live.device)  # build: no host copy
                live.copy_(table[rank])
        self.current = rank

    def rank_zero_values(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The per-rank buffers as virtual rank 0 holds them (the live ones if it is active)."""
        if self.current == 0:
            return {n: getattr(module, n) for n in self.buffers}
        return {n: self.copies[n][0] for n in self.buffers}

    def broadcast(self, module: torch.nn.Module, buffers=None, host_fields=None) -> None:
        """The live values of ``buffers`` (default all) become every rank's; ``host_fields``
        ``{attribute: keys}`` copies those keys of the live host attribute into every rank's
        (a dict each, e.g. the capacity's host mirror)."""
        for name in self.buffers if buffers is None else buffers:
            live = getattr(module, name)
            self.copies[name] = [live.detach().clone() for _ in range(self.ranks)]
        for name, keys in (host_fields or {}).items():
            live = getattr(module, name)
            for rank in range(self.ranks):
                if rank == self.current:
                    continue
                theirs = self.host_copies[name][rank]
                if live is None or theirs is None:
                    self.host_copies[name][rank] = None  # re-read from the buffers
                else:
                    theirs.update({k: live[k] for k in keys})

    def reset_host(self, name: str) -> None:
        """Every rank's host attribute ``name`` to None (re-read from its buffers)."""
        self.host_copies[name] = [None] * self.ranks


def _row_classes(table: torch.Tensor) -> list[int]:
    """An id per row of ``table``: equal rows, equal ids."""
    seen: dict[bytes, int] = {}
    rows = table.detach().cpu().reshape(table.shape[0], -1)
    return [seen.setdefault(row.numpy().tobytes(), len(seen)) for row in rows]


def _fresh(value):
    """A rank's own copy of a host attribute's initial value (dicts are not shared)."""
    return dict(value) if isinstance(value, dict) else value


def _follow(copy: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """``copy`` on the device and dtype of ``live`` (the module may have moved since)."""
    if copy.device != live.device or copy.dtype != live.dtype:
        return copy.to(device=live.device, dtype=live.dtype)
    return copy


# --------------------------------------------------------------------------------------------
# Traffic and load
# --------------------------------------------------------------------------------------------


class VirtualTraffic:
    """One MoE layer's traffic on the virtual cluster.

    ``count(rank, routing_map)`` keeps the rank's routing map (a reference: no work on the
    device, nothing on the host but a list entry, since a layer's dispatch may wait on the host
    and any launch here would then add to the step); when the last rank of its EP group has
    routed this micro step, the group's ``source_counts`` come from all its maps at once, and
    its bytes under every scheme (``traffic.scheme_bytes``) and its load are recorded for the
    layer under the metric names of a real run (``metrics.DISPATCH_METRICS``): the sum over the
    group's ranks, which is what the group's real ranks record one each. ``intra_node_bytes`` /
    ``inter_node_bytes`` take the scheme the real cluster would run (``scheme``: flat, two_hop
    or dedup)."""

    def __init__(self, cluster: VirtualCluster, num_experts: int, scheme: str):
        if scheme not in ("flat", "two_hop", "dedup"):
            raise ValueError(f"scheme {scheme!r}: use flat, two_hop or dedup")
        self.cluster, self.num_experts, self.scheme = cluster, num_experts, scheme
        layout = cluster.ep_groups[0]
        self.num_nodes, self.ranks_per_node = layout.num_nodes, layout.ranks_per_node
        self.maps: list[torch.Tensor | None] = [None] * cluster.ep_size

    def count(
        self, layer, rank: int, routing_map_TE: torch.Tensor, hidden_bytes: int, prob_bytes: int
    ) -> None:
        ep = self.cluster.ep_size
        self.maps[rank % ep] = routing_map_TE
        if not self.cluster.is_last_of_group(rank):
            return
        missing = [r for r, m in enumerate(self.maps) if m is None]
        if missing:
            raise RuntimeError(
                f"virtual ranks {missing} of EP group {rank // ep} did not route this micro "
                "step before its last rank: micro-batch i must belong to virtual rank i mod "
                f"{self.cluster.ranks} (megatron_locmoe.virtual.enter)"
            )
        maps, self.maps = self.maps, [None] * ep
        if len({m.shape for m in maps}) == 1:  # one stack, one set of kernels for the group
            counts = source_counts(torch.stack(maps), self.num_nodes, self.ranks_per_node)
        else:
            counts = torch.stack(
                [source_counts(m, self.num_nodes, self.ranks_per_node) for m in maps]
            )
        metrics.record_vector(
            layer, metrics.DISPATCH_METRICS, self._vector(counts, hidden_bytes, prob_bytes)
        )

    def _vector(self, counts, hidden_bytes: int, prob_bytes: int) -> torch.Tensor:
        sent = scheme_bytes(
            counts, self.num_nodes, self.ranks_per_node, self.num_experts, hidden_bytes, prob_bytes
        )
        totals = {name: v.sum() for name, v in sent.items()}
        load = load_max_over_mean(received_tokens(counts, self.num_experts))
        values = [
            totals[f"{self.scheme}_intra_node_bytes"],
            totals[f"{self.scheme}_inter_node_bytes"],
            *totals.values(),
            load * counts.shape[0],  # every rank of the group records the group's value
        ]
        return torch.stack([v.double() for v in values]).float()


# --------------------------------------------------------------------------------------------
# Entering a rank
# --------------------------------------------------------------------------------------------

_PARTICIPANTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _participants(model: torch.nn.Module) -> list:
    found = _PARTICIPANTS.get(model)
    if found is None:
        found = [m for m in model.modules() if hasattr(m, "enter_virtual_rank")]
        _PARTICIPANTS[model] = found
    return found


def enter(model: torch.nn.Module, rank: int) -> None:
    """Route the next forward of ``model`` (a chunk, wrapped or not) as virtual rank ``rank``:
    every plugin router and MoE layer of it switches to that rank's node and state."""
    for module in _participants(model):
        module.enter_virtual_rank(rank)
