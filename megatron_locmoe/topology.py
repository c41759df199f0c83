"""Where the experts live: the node map of every expert-parallel (EP) group and its subgroups.

LocMoE's locality loss needs the experts on a token's own node; the hierarchical dispatcher
needs two process subgroups per EP group: the EP ranks of one node (hop 1, NVLink/HCCS) and the
*rail* of EP ranks with the same local index on every node (hop 2, one NIC each). This module
derives both from Megatron's parallel_state, whatever the TP/CP/EP/DP/PP layout and rank order.

Nodes. Global rank r lives on node ``r // devices_per_node`` (torchrun and Slurm launch ranks
node-major). ``devices_per_node`` is torchrun's LOCAL_WORLD_SIZE unless given explicitly, which
is how a simulated cluster of several "nodes" runs on one machine. Host names are gathered too,
so a launcher that does not place ranks node-major fails here with a message, not later with
wrong traffic.

Inside one EP group we index nodes 0..N-1 in EP-rank order; every node holds the same number L
of consecutive EP ranks ("ranks per node"), and since Megatron gives each EP rank a contiguous
block of experts, every node holds a contiguous block of experts.

Subgroups are created collectively: every rank walks the same sorted list of all EP groups and
calls ``new_group`` for every intra-node and rail group, once per process (module singleton).
"""

from __future__ import annotations

import os
import socket
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta

import torch.distributed as dist
from megatron.core import parallel_state


class TopologyError(ValueError):
    """An invalid node / parallel layout, with the numbers that clash and what to change."""


@dataclass(frozen=True)
class EPGroupLayout:
    """One EP group: its global ranks in EP-rank order and the node of each."""

    ranks: tuple[int, ...]
    global_nodes: tuple[int, ...]
    """Global node id of each EP rank (``global rank // devices_per_node``)."""

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def num_nodes(self) -> int:
        return len(set(self.global_nodes))

    @property
    def ranks_per_node(self) -> int:
        return self.size // self.num_nodes

    def node_of_ep_rank(self, ep_rank: int) -> int:
        """Node index (0..num_nodes-1, in EP-rank order) of an EP rank."""
        return ep_rank // self.ranks_per_node

    def local_index(self, ep_rank: int) -> int:
        """Position of an EP rank among the EP ranks of its node."""
        return ep_rank % self.ranks_per_node

    def intra_node_ranks(self, node: int) -> tuple[int, ...]:
        """Global ranks of the EP ranks on one node, in EP-rank order."""
        per = self.ranks_per_node
        return self.ranks[node * per : (node + 1) * per]

    def rail_ranks(self, local_index: int) -> tuple[int, ...]:
        """Global ranks with the same local index on every node, in node order."""
        return self.ranks[local_index :: self.ranks_per_node]


@dataclass
class Topology:
    """This rank's view of the node layout of its EP group, plus the subgroups it belongs to."""

    devices_per_node: int
    world_size: int
    rank: int
    ep_groups: tuple[EPGroupLayout, ...]
    """Every EP group of the job, sorted by first rank (identical on all ranks)."""
    ep: EPGroupLayout
    """This rank's EP group."""
    ep_rank: int
    intra_node_group: dist.ProcessGroup | None = field(default=None, repr=False)
    """EP ranks on this rank's node (None when that is only this rank)."""
    rail_group: dist.ProcessGroup | None = field(default=None, repr=False)
    """EP ranks with this rank's local index on every node (None with a single node)."""
    _owned_groups: list = field(default_factory=list, repr=False)

    # ---- this rank ------------------------------------------------------------------------
    @property
    def ep_size(self) -> int:
        return self.ep.size

    @property
    def num_nodes(self) -> int:
        """Nodes spanned by this rank's EP group."""
        return self.ep.num_nodes

    @property
    def ranks_per_node(self) -> int:
        """EP ranks of this group on each node (L)."""
        return self.ep.ranks_per_node

    @property
    def node(self) -> int:
        """This rank's node index within its EP group."""
        return self.ep.node_of_ep_rank(self.ep_rank)

    @property
    def local_index(self) -> int:
        return self.ep.local_index(self.ep_rank)

    @property
    def intra_node_ranks(self) -> tuple[int, ...]:
        return self.ep.intra_node_ranks(self.node)

    @property
    def rail_ranks(self) -> tuple[int, ...]:
        return self.ep.rail_ranks(self.local_index)

    @property
    def spans_nodes(self) -> bool:
        """True when this EP group crosses a node boundary (locality matters)."""
        return self.num_nodes > 1

    # ---- experts --------------------------------------------------------------------------
    def _experts_per_rank(self, num_experts: int) -> int:
        if num_experts % self.ep_size:
            raise TopologyError(
                f"{num_experts} experts cannot be split over expert-parallel size {self.ep_size}; "
                "use a number of experts that is a multiple of --expert-model-parallel-size."
            )
        return num_experts // self.ep_size

    def local_experts(self, ep_rank: int, num_experts: int) -> range:
        """Experts hosted by an EP rank (Megatron assigns contiguous blocks)."""
        per = self._experts_per_rank(num_experts)
        return range(ep_rank * per, (ep_rank + 1) * per)

    def experts_on_node(self, node: int, num_experts: int) -> range:
        per_node = self._experts_per_rank(num_experts) * self.ranks_per_node
        return range(node * per_node, (node + 1) * per_node)

    def expert_nodes(self, num_experts: int) -> list[int]:
        """Node index of every expert, [num_experts]."""
        per = self._experts_per_rank(num_experts)
        return [self.ep.node_of_ep_rank(e // per) for e in range(num_experts)]

    def destroy(self) -> None:
        for group in self._owned_groups:
            dist.destroy_process_group(group)
        self._owned_groups.clear()
        self.intra_node_group = None
        self.rail_group = None


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


def resolve_devices_per_node(devices_per_node: int | None) -> int:
    """The explicit value, else torchrun's LOCAL_WORLD_SIZE; a clear error when neither is set."""
    if devices_per_node is not None:
        value, source = devices_per_node, "devices_per_node"
    elif os.environ.get("LOCAL_WORLD_SIZE"):
        value, source = os.environ["LOCAL_WORLD_SIZE"], "LOCAL_WORLD_SIZE"
    else:
        raise TopologyError(
            "cannot tell how many devices each node has: launch with torchrun (it sets "
            "LOCAL_WORLD_SIZE) or pass --locmoe-devices-per-node."
        )
    try:
        value = int(value)
    except ValueError:
        raise TopologyError(f"{source}={value!r} is not an integer") from None
    if value < 1:
        raise TopologyError(f"{source}={value} must be at least 1")
    return value


def layout_ep_groups(
    ep_group_ranks: list[tuple[int, ...]],
    world_size: int,
    devices_per_node: int,
    expert_tensor_parallel_size: int = 1,
    hostnames: list[str] | None = None,
) -> tuple[EPGroupLayout, ...]:
    """Validate the node layout of every EP group; pure function of the rank lists.

    Raises TopologyError naming the numbers that clash and what to change.
    """
    G = devices_per_node
    if world_size % G:
        raise TopologyError(
            f"world size {world_size} is not a multiple of devices per node {G}; every node must "
            f"run the same number of ranks (change --nproc-per-node / --locmoe-devices-per-node "
            f"to a divisor of {world_size})."
        )
    if hostnames is not None:
        for start in range(0, world_size, G):
            hosts = set(hostnames[start : start + G])
            if len(hosts) > 1:
                raise TopologyError(
                    f"ranks {start}..{start + G - 1} should share a node ({G} devices per node) "
                    f"but run on hosts {sorted(hosts)}: the launcher does not place ranks "
                    "node-major. Use torchrun's default placement (or srun --distribution=block), "
                    "or set --locmoe-devices-per-node to the real number of ranks per host."
                )
    layouts = []
    for ranks in sorted(set(ep_group_ranks)):
        nodes = tuple(r // G for r in ranks)
        counts = Counter(nodes)
        per_node = set(counts.values())
        contiguous = all(nodes[i] <= nodes[i + 1] for i in range(len(nodes) - 1))
        ep, etp = len(ranks), expert_tensor_parallel_size
        if len(per_node) != 1 or not contiguous:
            placement = ", ".join(f"node {n}: {c}" for n, c in sorted(counts.items()))
            raise TopologyError(
                f"EP group {list(ranks)} does not tile nodes evenly ({placement} EP ranks) with "
                f"{G} devices per node: expert-model-parallel size {ep} x expert-tensor-parallel "
                f"size {etp} = {ep * etp} must be a multiple or a divisor of {G}, and {G} must be "
                f"a multiple of {etp}. Change --expert-model-parallel-size (e.g. to "
                f"{_suggest_ep(G, etp, world_size)}) or --locmoe-devices-per-node."
            )
        layouts.append(EPGroupLayout(ranks=tuple(ranks), global_nodes=nodes))
    return tuple(layouts)


def _suggest_ep(G: int, etp: int, world_size: int) -> str:
    options = [
        ep
        for ep in range(1, world_size // etp + 1)
        if (world_size // etp) % ep == 0 and ((ep * etp) % G == 0 or G % (ep * etp) == 0)
    ]
    return " or ".join(str(o) for o in options[-3:]) or "1"


_TOPOLOGY: Topology | None = None
_TOPOLOGY_KEY: tuple | None = None


def get_topology(
    devices_per_node: int | None = None,
    timeout: timedelta | None = None,
    create_groups: bool = True,
) -> Topology:
    """This rank's Topology, built collectively on first call (every rank must call it).

    Cached per process; rebuilt when Megatron's parallel state was re-initialised. Without
    ``devices_per_node`` an existing topology is returned as it is.
    """
    global _TOPOLOGY, _TOPOLOGY_KEY
    ep_group = parallel_state.get_expert_model_parallel_group()
    if devices_per_node is None and _TOPOLOGY is not None and _TOPOLOGY_KEY[1] == id(ep_group):
        return _TOPOLOGY  # no explicit size: the one this job already established
    G = resolve_devices_per_node(devices_per_node)
    key = (G, id(ep_group), create_groups)
    if _TOPOLOGY is not None and _TOPOLOGY_KEY == key:
        return _TOPOLOGY
    destroy_topology()
    _TOPOLOGY = build_topology(G, timeout=timeout, create_groups=create_groups)
    _TOPOLOGY_KEY = key
    return _TOPOLOGY


def destroy_topology() -> None:
    """Forget the cached topology and destroy the subgroups it created."""
    global _TOPOLOGY, _TOPOLOGY_KEY
    if _TOPOLOGY is not None:
        _TOPOLOGY.destroy()
    _TOPOLOGY, _TOPOLOGY_KEY = None, None


def build_topology(
    devices_per_node: int, timeout: timedelta | None = None, create_groups: bool = True
) -> Topology:
    """Collective: gather every rank's EP group and host, validate, create the subgroups."""
    if not dist.is_initialized():
        raise TopologyError("torch.distributed is not initialised; call init_process_group first")
    if not parallel_state.model_parallel_is_initialized():
        raise TopologyError(
            "Megatron's parallel state is not initialised; call "
            "parallel_state.initialize_model_parallel(...) (initialize_megatron does) first"
        )
    world_size, rank = dist.get_world_size(), dist.get_rank()
    my_ranks = tuple(dist.get_process_group_ranks(parallel_state.get_expert_model_parallel_group()))
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, (my_ranks, socket.gethostname()))
    layouts = layout_ep_groups(
        [g for g, _ in gathered],
        world_size,
        devices_per_node,
        parallel_state.get_expert_tensor_parallel_world_size(),
        hostnames=[h for _, h in gathered],
    )
    mine = next(layout for layout in layouts if layout.ranks == my_ranks)
    topo = Topology(
        devices_per_node=devices_per_node,
        world_size=world_size,
        rank=rank,
        ep_groups=layouts,
        ep=mine,
        ep_rank=my_ranks.index(rank),
    )
    if create_groups:
        _create_subgroups(topo, timeout)
    return topo


def _create_subgroups(topo: Topology, timeout: timedelta | None) -> None:
    """Every rank creates every subgroup in the same order (new_group is collective)."""
    for layout in topo.ep_groups:
        if layout.ranks_per_node > 1:
            for node in range(layout.num_nodes):
                ranks = layout.intra_node_ranks(node)
                group = dist.new_group(
                    list(ranks), timeout=timeout, group_desc="LOCMOE_EP_INTRA_NODE"
                )
                if topo.rank in ranks:
                    topo.intra_node_group = group
                    topo._owned_groups.append(group)
        if layout.num_nodes > 1:
            for local_index in range(layout.ranks_per_node):
                ranks = layout.rail_ranks(local_index)
                group = dist.new_group(list(ranks), timeout=timeout, group_desc="LOCMOE_EP_RAIL")
                if topo.rank in ranks:
                    topo.rail_group = group
                    topo._owned_groups.append(group)


def current_topology() -> Topology:
    """The topology built by get_topology(); routers read it, never build it.

    Building is collective, and a pipeline stage without MoE layers would never join it from
    a layer's constructor, so the adaptor (or a test) builds it at a point every rank reaches.
    """
    if _TOPOLOGY is None:
        raise TopologyError(
            "no topology yet: call megatron_locmoe.topology.get_topology(devices_per_node) on "
            "every rank after Megatron's parallel state is initialised (the plugin's layer spec "
            "does this) before building plugin routers"
        )
    return _TOPOLOGY
