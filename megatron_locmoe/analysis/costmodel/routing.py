"""What a router does per token and MoE layer, measured in a run, and the same at another
cluster layout: the cost model's routing statistics.

The simulated CPU cluster measures *what* each router sends: exact intra- and inter-node byte
counts from the hierarchical dispatcher, turned here into token copies per token with the
dispatcher's per-copy sizes (``copy_bytes``).

With the run's node and expert counts the measured copies are used (with per-node dedup where
the run used it; the flat scheme's intra-node copies, which the dispatcher does not log, use
the formula below); only the node size may differ from the run's, which rescales the
intra-node copies (``RoutingStats.copies_at``). Other node or expert counts are extrapolated
with one number per router, its *locality gain* ``g = (p - u) / (1 - u)``: p the measured
node-local share of assignments, u the share a router blind to locality gets (the experts on
the token's node over all experts). ``g = 0``: no locality (hash, switch, Megatron's aux-loss
top-k on average); ``g = 1``: every assignment stays on its node. At the new layout
``p' = u' + g (1 - u')``; a node hosting no expert (more nodes than experts) has ``p' = 0``.
Copies per token then follow without dedup (exact for top-1, an upper bound for top-k > 1):
hierarchical intra = ``a (1 - 1/G)`` (hop 1 also carries the rows bound for other rails),
inter = ``a (1 - p')``; flat intra = ``a p' (1 - 1/G)``, inter = ``a (1 - p')``. Every router
keeps its own top-k and drop rate: a workload sets the model and batch, not the routing.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_locmoe.analysis.errors import InputError
from megatron_locmoe.dispatch.traffic import copy_bytes

SCHEMES = ("hierarchical", "flat")
"""The dispatchers modeled: this plugin's two-hop hierarchical one, Megatron's flat All-to-All."""


@dataclass(frozen=True)
class RoutingStats:
    """What one router does per token and MoE layer, measured in a run (dispatch direction)."""

    name: str
    topk: int
    assignments_per_token: float
    """Token-expert assignments per token after drops (top-k minus dropped)."""
    node_local_fraction: float
    """Share of assignments whose expert is on the token's node."""
    intra_copies_per_token: float
    """Intra-node token copies per token of the run's dispatcher (hierarchical)."""
    inter_copies_per_token: float
    """Inter-node token copies per token of the run's dispatcher."""
    flat_inter_copies_per_token: float
    """Inter-node copies Megatron's flat All-to-All would send for the same routing."""
    nodes: int
    devices_per_node: int
    num_experts: int
    dedup: bool = False

    def __post_init__(self):
        if not 0.0 <= self.node_local_fraction <= 1.0:
            raise ValueError(
                f"{self.name}: node-local fraction {self.node_local_fraction} outside [0, 1]"
            )
        if self.nodes < 1 or self.devices_per_node < 1:
            raise ValueError(f"{self.name}: nodes and devices per node must be >= 1")

    @property
    def locality_gain(self) -> float:
        """g = (p - u) / (1 - u): 0 = locality-blind, 1 = all assignments on their node."""
        u = uniform_local_share(self.num_experts, self.nodes)
        return 0.0 if u >= 1.0 else (self.node_local_fraction - u) / (1.0 - u)

    @classmethod
    def from_run(cls, run) -> RoutingStats:
        """From a demo run (``runlog.Run`` with run.json): the byte counts of the last
        TAIL_FRACTION of the steps, turned into copies with the dispatcher's per-copy sizes."""
        rec = run.record
        need = (
            "topk",
            "num_experts",
            "nodes",
            "ranks_per_node",
            "tokens_per_rank_step",
            "hidden_size",
            "hidden_element_bytes",
            "prob_element_bytes",
            "dedup",
        )
        missing = [k for k in need if k not in rec]
        if missing:
            raise InputError(
                f"run {run.name} has no {missing} in its run.json: the cost model needs a run "
                "written by megatron_locmoe.analysis.demo (TensorBoard events alone hold no sizes)"
            )
        T = rec["tokens_per_rank_step"]
        return cls._from_bytes(
            run.name,
            rec,
            dropped_per_token=run.tail_mean("tokens_dropped") / T,
            node_local=run.tail_mean("node_local_fraction"),
            intra=run.tail_mean("intra_node_bytes") / T,
            inter=run.tail_mean("inter_node_bytes") / T,
            flat_inter=run.tail_mean("flat_inter_node_bytes") / T,
        )

    @classmethod
    def from_sweep_row(cls, row: dict) -> RoutingStats:
        """From one run of the locality sweep's results file (``megatron_locmoe.analysis.sweep``)."""
        return cls._from_bytes(
            row["run"],
            row,
            dropped_per_token=row["dropped"] * row["topk"],
            node_local=row["node_local"],
            intra=row["intra_bytes_per_token"],
            inter=row["inter_bytes_per_token"],
            flat_inter=row["flat_inter_bytes_per_token"],
        )

    @classmethod
    def _from_bytes(cls, name, rec, dropped_per_token, node_local, intra, inter, flat_inter):
        """Bytes per token (dispatch + combine) turned into copies with the dispatcher's
        per-copy sizes (``copy_bytes``); ``rec``: the run's sizes."""
        N, G, E = rec["nodes"], rec["ranks_per_node"], rec["num_experts"]
        hidden = rec["hidden_size"] * rec["hidden_element_bytes"]
        pb = rec["prob_element_bytes"]
        flat_copy = copy_bytes(hidden, pb)
        if rec["dedup"]:
            intra_copy = copy_bytes(hidden, pb, dedup_width=E // (N * G))
            inter_copy = copy_bytes(hidden, pb, dedup_width=E // N)
        else:
            intra_copy = inter_copy = flat_copy
        return cls(
            name=name,
            topk=rec["topk"],
            assignments_per_token=rec["topk"] - dropped_per_token,
            node_local_fraction=node_local,
            intra_copies_per_token=intra / intra_copy,
            inter_copies_per_token=inter / inter_copy,
            flat_inter_copies_per_token=flat_inter / flat_copy,
            nodes=N,
            devices_per_node=G,
            num_experts=E,
            dedup=bool(rec["dedup"]),
        )

    def copies_at(
        self, nodes: int, devices_per_node: int, num_experts: int, scheme: str = "hierarchical"
    ) -> tuple[float, float, float]:
        """(node-local share, intra copies, inter copies) per token at another layout.

        With the run's nodes and experts the measured node-local share and inter-node copies
        hold whatever the node size (which node hosts an expert does not depend on it); the
        intra-node copies are scaled by (1 - 1/G') / (1 - 1/G) for G' devices per node instead
        of G (the copies to the sender itself, 1/G of them, are free). Any other node or
        expert count: the locality-gain extrapolation of the module docstring (no dedup)."""
        if scheme not in SCHEMES:
            raise ValueError(f"scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
        if nodes < 1 or devices_per_node < 1 or num_experts < 1:
            raise ValueError("nodes, devices per node and experts must be >= 1")
        a, G = self.assignments_per_token, devices_per_node
        if (nodes, num_experts) == (self.nodes, self.num_experts):
            p = self.node_local_fraction
            if scheme == "flat":
                return p, a * p * (1 - 1 / G), self.flat_inter_copies_per_token
            run_G = self.devices_per_node
            rescale = (1 - 1 / G) / (1 - 1 / run_G) if run_G > 1 else 1.0
            return p, self.intra_copies_per_token * rescale, self.inter_copies_per_token
        hosting = min(1.0, num_experts / nodes)  # share of nodes that host experts
        u = uniform_local_share(num_experts, nodes)  # 1 on one node, so p = 1 there
        p = hosting * (u + self.locality_gain * (1.0 - u))
        inter = a * (1.0 - p)
        intra = a * (1 - 1 / G) if scheme == "hierarchical" else a * p * (1 - 1 / G)
        return p, intra, inter


def uniform_local_share(num_experts: int, nodes: int) -> float:
    """Node-local share a locality-blind router gets: the experts of a node that hosts any (at
    least 1; experts are spread evenly) over all experts."""
    return max(1.0, num_experts / nodes) / num_experts
