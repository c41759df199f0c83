"""Expert placement: move experts that are chosen together onto one node, from a routing profile.

With one copy per token and node (the two-hop dispatcher with dedup), a token's inter-node
bytes are proportional to the number of *remote* nodes among its k experts. Which expert
lives on which node is a free choice as long as the routing does not read it: a permutation
of the experts (their weights, the router's rows and every per-expert router buffer, and the
optimizer state of those tensors) is the same model, with other experts on each node. Three
steps, each a function and a subcommand:

- **profile** (``RoutingProfile``, ``ProfileCollector``, ``profile_job``): per MoE layer, the
  co-activation counts of the tokens of each source node, ``coact [L, N, E, E]`` (how often
  experts e and f are kept for the same token from node n; the diagonal is the source-node
  count ``[N, E]``), and a uniform sample of tokens with their kept experts and source node,
  for the exact objective. Gathered by a forward hook on the plugin's routers (their output
  routing map and probabilities, the kept assignments; the source node from the router's
  ``expert_is_local`` row, which the topology, or on a virtual cluster ``virtual.enter``,
  sets to the routing rank's node): nothing in the plugin changes.
- **plan** (``plan_placement``): per layer, a permutation of the E experts over the EP ranks
  (E / EP experts per rank, EP rank r on node r // ranks per node, as ``topology`` lays out an
  EP group) that minimises the expected number of remote nodes per token on the sample, with
  every node holding E / N experts and no node receiving more than max(the hottest node's load
  now, 1.05 x the mean) (``--load-slack``). Search: a greedy start (each expert on the node whose tokens use it most, hottest
  first) and the current placement, each improved by pairwise swaps between nodes (best
  swap per expert, until none improves), the better kept; then each node's experts spread over
  its ranks by load (longest first). Graph partitioners (METIS, KaHIP) minimise a cut under a
  balance tolerance: they neither keep exact sizes nor take the per-node affinity that
  domain-sharded data gives, and at E <= a few hundred experts the swap search on the exact
  objective takes seconds.
- **apply** (``apply_placement``): a torch_dist checkpoint (the CPU loop's or Megatron's
  ``save_checkpoint``'s) rewritten with the experts permuted: SequentialMLP / TEGroupedMLP /
  the plugin's grouped experts (one key layout: ``...mlp.experts.experts.*`` with a layer and
  an expert axis, or one key per expert with ``singleton_local_shards``), their per-expert
  ``_extra_state`` objects, the router's per-expert tensors (``weight``, ``bias``,
  ``expert_bias``, ``qb_beta``) and the optimizer's per-parameter state of all of them
  (``optimizer.state.<name>.<parameter key>``). Anything per-expert it does not know is
  refused, never copied unpermuted.

Refused routers (the routing reads the expert index or the node map, so a permutation is not
the same function): locmoe and locmoe_plus (the GrAP gate ties expert i to hidden chunk i),
hash (its token -> expert table is rebuilt from the seed at build time and not saved, and
top-k > 1 takes consecutive experts), and Megatron's group-limited routing
(``moe_router_num_groups``: the groups are blocks of consecutive experts). docs/placement.md
has the commands, the equality test's numbers and the limits.

    python -m megatron_locmoe.analysis.placement plan PROFILE.npz -o PLAN.json
    python -m megatron_locmoe.analysis.placement apply CKPT_ROOT PLAN.json -o OUT_ROOT
    python -m megatron_locmoe.analysis.placement profile SETTINGS.json -o PROFILE.npz
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from megatron_locmoe.config import NODE_MAP_SETTINGS, LocMoEConfig


class PlacementError(ValueError):
    """Bad input to profile / plan / apply, in one line that says what to change."""


def check_router(
    router_type: str | None, num_groups: int | None = None, node_settings: dict | None = None
) -> None:
    """Raise PlacementError unless a placement leaves this router's model function unchanged:
    the router class declares ``supports_expert_placement`` (routers.base.PluginRouterMixin;
    its ``placement_obstacle`` says why not) and the run has no group-limited routing and none
    of the settings that read which experts are on the token's node (``node_settings``:
    config.NODE_MAP_SETTINGS set, e.g. the outgoing cap, the node margin)."""
    from megatron_locmoe.routers import ROUTERS  # imports Megatron-Core: only when checked

    supported = " and ".join(n for n, c in ROUTERS.items() if c.supports_expert_placement)
    cls = ROUTERS.get(router_type)
    if cls is None:
        raise PlacementError(f"unknown router type {router_type!r}: placement supports {supported}")
    if not cls.supports_expert_placement:
        raise PlacementError(
            f"cannot place the experts of a {router_type} router: {cls.placement_obstacle}; "
            f"placement supports the {supported} routers"
        )
    if num_groups:
        raise PlacementError(
            f"group-limited routing (--moe-router-num-groups {num_groups}) picks experts by "
            "blocks of consecutive experts, which a placement would regroup (another routing): "
            "profile and place a run without --moe-router-num-groups"
        )
    if node_settings:
        flags = ", ".join(
            f"--locmoe-{name.replace('_', '-')} {value:g}" for name, value in node_settings.items()
        )
        raise PlacementError(
            f"{flags} favours the experts of the token's own node, so moving experts between "
            "nodes changes which experts the tokens pick (another routing): profile and place a "
            "run without it"
        )


# --------------------------------------------------------------------------------------------
# Profile
# --------------------------------------------------------------------------------------------


@dataclass
class RoutingProfile:
    """Routing statistics of a short run, per MoE layer (L layers, N nodes of an EP group, E
    experts, S sampled tokens, k experts per token).

    ``coact[l, n, e, f]``: tokens from node n whose kept experts include both e and f (the
    diagonal: tokens from n that chose e); ``tokens[l, n]``: tokens from node n routed;
    ``sample_experts[l, s]``: the kept experts of sampled token s (-1 pads), ``sample_nodes[l,
    s]`` its node (-1: an empty slot, when fewer than S tokens were routed)."""

    layers: list[str]
    num_experts: int
    topk: int
    ep_size: int
    num_nodes: int
    router_type: str
    num_groups: int | None
    coact: np.ndarray
    tokens: np.ndarray
    sample_experts: np.ndarray
    sample_nodes: np.ndarray
    node_settings: dict = field(default_factory=dict)
    """The profiled run's settings that read the node map (config.NODE_MAP_SETTINGS: the
    outgoing cap, the node margin, the fill), name -> value; empty: none."""

    @property
    def ranks_per_node(self) -> int:
        return self.ep_size // self.num_nodes

    @property
    def source_counts(self) -> np.ndarray:
        """``[L, N, E]`` assignments of node n's tokens to expert e."""
        return np.einsum("lnee->lne", self.coact)

    def save(self, path: str | os.PathLike) -> None:
        meta = dict(
            layers=self.layers,
            num_experts=self.num_experts,
            topk=self.topk,
            ep_size=self.ep_size,
            num_nodes=self.num_nodes,
            router_type=self.router_type,
            num_groups=self.num_groups,
            node_settings=self.node_settings,
        )
        np.savez_compressed(
            path,
            meta=np.array(json.dumps(meta)),
            coact=self.coact,
            tokens=self.tokens,
            sample_experts=self.sample_experts,
            sample_nodes=self.sample_nodes,
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> RoutingProfile:
        fix = "give the .npz that `placement profile` (or RoutingProfile.save) wrote"
        try:
            with np.load(path, allow_pickle=False) as f:
                meta = json.loads(str(f["meta"]))
                arrays = {k: f[k] for k in ("coact", "tokens", "sample_experts", "sample_nodes")}
        except (OSError, KeyError, ValueError) as e:
            raise PlacementError(f"{path}: not a routing profile ({e}); {fix}") from None
        cap = meta.pop("outgoing_cap", None)  # profiles written before node_settings
        if cap is not None:
            meta.setdefault("node_settings", {"max_outgoing_fraction": cap})
        profile = cls(**meta, **arrays)
        profile.check()
        return profile

    def check(self) -> None:
        L, N, E = len(self.layers), self.num_nodes, self.num_experts
        if self.coact.shape != (L, N, E, E) or self.tokens.shape != (L, N):
            raise PlacementError(
                f"profile arrays coact {self.coact.shape} / tokens {self.tokens.shape} do not "
                f"match {L} layers, {N} nodes, {E} experts; re-run `placement profile`"
            )
        if self.ep_size % N or E % self.ep_size:
            raise PlacementError(
                f"profile cluster: EP {self.ep_size} over {N} nodes with {E} experts does not "
                "tile (EP a multiple of the nodes, experts a multiple of EP)"
            )


class ProfileCollector:
    """Forward hook on the plugin's routers counting what ``RoutingProfile`` holds.

    Install with ``install()`` (a global module forward hook, so it sees the routers of a
    model it was never handed, e.g. inside ``sim.trainer.train_job``) and ``remove()``. Each
    router call adds its kept assignments (routing map and a positive probability: capacity
    drops and padding carry 0) to the layer's counts; the source node is the node whose
    experts the router's ``expert_is_local`` marks (the routing rank's node in its EP group).
    The sample keeps the ``sample_size`` tokens of smallest random key over the whole run
    (uniform, seeded). The counts stay on the routing map's device, so a GPU run is not
    synchronised by its profile (the node map's shape is checked once per router);
    ``training_only`` leaves evaluation's routing out; ``reset()`` starts a new window."""

    def __init__(
        self,
        num_experts: int,
        ep_size: int,
        num_nodes: int,
        sample_size=1 << 16,
        training_only: bool = False,
    ):
        self.E, self.ep_size, self.N, self.S = num_experts, ep_size, num_nodes, sample_size
        self.training_only = training_only
        self.layers: dict[int, dict] = {}  # global layer number -> its counts
        self.router_type: str | None = None
        self.num_groups: int | None = None
        self.node_settings: dict = {}
        self.topk: int | None = None
        self._generators: dict[torch.device, torch.Generator] = {}
        self._checked: set[int] = set()  # routers whose node map was checked
        self._handle = None

    def install(self) -> ProfileCollector:
        self._handle = torch.nn.modules.module.register_module_forward_hook(self._hook)
        return self

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def reset(self) -> None:
        """Forget the counts (a new profile window); the sampling stream goes on."""
        self.layers = {}

    def _hook(self, module, args, output) -> None:
        from megatron_locmoe.routers.base import PluginRouterMixin

        if not isinstance(module, PluginRouterMixin) or getattr(module, "is_mtp_layer", False):
            return
        if self.training_only and not module.training:
            return
        probs_TE, routing_map_TE = output
        self._count(module, probs_TE, routing_map_TE)

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(0)
        return self._generators[device]

    @torch.no_grad()
    def _count(self, router, probs_TE: torch.Tensor, routing_map_TE: torch.Tensor) -> None:
        E, N = self.E, self.N
        if routing_map_TE.shape[-1] != E:
            raise PlacementError(
                f"a router routes over {routing_map_TE.shape[-1]} experts, the profile expects "
                f"{E}: give the collector the model's --num-experts"
            )
        self.router_type = type(router).name
        self.num_groups = router.config.moe_router_num_groups
        self.node_settings = router.locmoe.node_map_settings()
        self.topk = router.topk
        local_E = router.expert_is_local.detach()
        if id(router) not in self._checked:  # the node's size; a virtual rank switch keeps it
            if int(local_E.sum()) * N != E:
                raise PlacementError(
                    f"the router's node hosts {int(local_E.sum())} of {E} experts, the profile "
                    f"expects {N} nodes per EP group: give the collector the run's EP size and "
                    "nodes"
                )
            self._checked.add(id(router))
        device = routing_map_TE.device
        # the node of the first local expert, on the device (no host read per call)
        node = local_E.to(device).float().argmax().reshape(1) // (E // N)
        kept_TE = routing_map_TE & (probs_TE > 0)
        layer = router.layer_number
        if layer is None:
            raise PlacementError("a router has no layer number (build it inside a GPT model)")
        state = self.layers.get(layer)
        if state is None:
            state = self.layers[layer] = dict(
                coact=torch.zeros(N, E, E, dtype=torch.float64, device=device),
                tokens=torch.zeros(N, dtype=torch.float64, device=device),
                keys=torch.empty(0, device=device),
                experts=torch.empty(0, self.topk, dtype=torch.int16, device=device),
                nodes=torch.empty(0, dtype=torch.int16, device=device),
            )
        m = kept_TE.float()
        pair = (m.t() @ m).double()  # exact: counts below 2^24 per call
        state["coact"].index_add_(0, node, pair.unsqueeze(0))
        state["tokens"].index_add_(
            0, node, torch.full((1,), float(kept_TE.shape[0]), dtype=torch.float64, device=device)
        )
        self._sample(state, kept_TE, node)

    def _sample(self, state: dict, kept_TE: torch.Tensor, node: torch.Tensor | int) -> None:
        T, k = kept_TE.shape[0], self.topk
        if T == 0:
            return
        device = kept_TE.device
        # each token's kept experts, in expert order, padded with -1 (drops leave fewer than k)
        order = torch.where(kept_TE, torch.arange(self.E, device=device), self.E)
        order = order.sort(-1).values[:, :k]
        experts = torch.where(order < self.E, order, -1).to(torch.int16)
        keys = torch.rand(T, generator=self._generator(device), device=device)
        keys = torch.cat([state["keys"], keys])
        experts = torch.cat([state["experts"], experts])
        node = torch.as_tensor(node, device=device).to(torch.int16).reshape(1)
        nodes = torch.cat([state["nodes"], node.expand(T)])
        if keys.numel() > self.S:
            keep = keys.topk(self.S, largest=False).indices
            keys, experts, nodes = keys[keep], experts[keep], nodes[keep]
        state["keys"], state["experts"], state["nodes"] = keys, experts, nodes

    def profile(self, num_layers: int | None = None) -> RoutingProfile:
        """This process's counts as a RoutingProfile (``gathered`` merges every rank's)."""
        if not self.layers:
            raise PlacementError(
                "no router of the plugin ran while the collector was installed: profile a run of "
                "the plugin's layers (--moe-router-type megatron or switch)"
            )
        numbers = sorted(self.layers)
        L, S, k = len(numbers), self.S, self.topk
        experts = np.full((L, S, k), -1, dtype=np.int16)
        nodes = np.full((L, S), -1, dtype=np.int16)
        for i, n in enumerate(numbers):
            st = self.layers[n]
            order = st["keys"].argsort()
            experts[i, : order.numel()] = st["experts"][order].cpu().numpy()
            nodes[i, : order.numel()] = st["nodes"][order].cpu().numpy()
        return RoutingProfile(
            layers=[f"decoder.layers.{n - 1}.mlp" for n in numbers],
            num_experts=self.E,
            topk=k,
            ep_size=self.ep_size,
            num_nodes=self.N,
            router_type=self.router_type,
            num_groups=self.num_groups,
            node_settings=self.node_settings,
            coact=np.stack([self.layers[n]["coact"].cpu().numpy() for n in numbers]),
            tokens=np.stack([self.layers[n]["tokens"].cpu().numpy() for n in numbers]),
            sample_experts=experts,
            sample_nodes=nodes,
        )

    def gathered(self) -> RoutingProfile:
        """Every rank's counts summed and samples merged (collective: every rank calls it).
        Layers a rank does not host (pipeline stages) count zero there."""
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_world_size() == 1:
            return self.profile()
        mine = {n: tuple(s[k].cpu() for k in ("coact", "tokens", "keys", "experts", "nodes"))
                for n, s in self.layers.items()}  # fmt: skip
        meta = (self.router_type, self.num_groups, self.node_settings, self.topk)
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (mine, meta))
        merged = ProfileCollector(self.E, self.ep_size, self.N, self.S)
        for layers, (router_type, num_groups, node_settings, topk) in parts:
            if router_type is not None:
                merged.router_type, merged.num_groups, merged.topk = router_type, num_groups, topk
                merged.node_settings = node_settings
            for n, (coact, tokens, keys, experts, nodes) in layers.items():
                st = merged.layers.setdefault(
                    n,
                    dict(
                        coact=torch.zeros_like(coact),
                        tokens=torch.zeros_like(tokens),
                        keys=torch.empty(0),
                        experts=torch.empty(0, topk, dtype=torch.int16),
                        nodes=torch.empty(0, dtype=torch.int16),
                    ),
                )
                st["coact"] += coact
                st["tokens"] += tokens
                st["keys"] = torch.cat([st["keys"], keys])
                st["experts"] = torch.cat([st["experts"], experts])
                st["nodes"] = torch.cat([st["nodes"], nodes])
        for st in merged.layers.values():
            if st["keys"].numel() > self.S:
                keep = st["keys"].topk(self.S, largest=False).indices
                st["keys"], st["experts"], st["nodes"] = (
                    st["keys"][keep],
                    st["experts"][keep],
                    st["nodes"][keep],
                )
        return merged.profile()


class ProfileWindows:
    """A training run's routing as profiles of ``interval`` iterations each (``--locmoe-routing-
    profile DIR``, ``--locmoe-routing-profile-interval K``): ``DIR/profile_iterA-B.npz`` holds
    iterations A..B (1-based, inclusive), so a plan made on one window can be checked on the
    next (``plan --check``); ``interval`` 0 writes one profile of the whole run. Training
    routing only (evaluation is left out). ``at_iteration`` is called before every micro-batch
    with the iterations completed so far (Megatron's ``args.curr_iteration``), ``close`` after
    training: both are collective (every rank gathers; rank 0 writes). The collector is built
    at the first micro-batch, when the model and its topology exist: ``shape()`` returns
    (number of experts, EP size, nodes per EP group)."""

    def __init__(self, out_dir: str | os.PathLike, interval: int, shape, sample_size=1 << 16):
        self.out_dir, self.interval, self.shape = Path(out_dir), interval, shape
        self.S = sample_size
        self.collector: ProfileCollector | None = None
        self.start: int | None = None  # iterations completed when the window began
        self.last: int | None = None  # iterations completed before the last micro-batch counted
        self.written: list[Path] = []

    def at_iteration(self, completed: int) -> None:
        if self.collector is None:
            E, ep, nodes = self.shape()
            self.collector = ProfileCollector(E, ep, nodes, self.S, training_only=True).install()
            self.start = completed
        if self.interval and completed - self.start >= self.interval and self.collector.layers:
            self._write(completed)
        self.last = completed

    def close(self) -> list[Path]:
        """Write the last window (the iterations since the previous one); returns every file."""
        if self.collector is not None:
            if self.collector.layers:
                self._write(self.last + 1)
            self.collector.remove()
        return self.written

    def discard(self) -> None:
        """Stop counting without writing (the run failed or stopped): no collective, so a
        rank may call it alone; the hook leaves the process's modules."""
        if self.collector is not None:
            self.collector.remove()

    def _write(self, end: int) -> None:
        import torch.distributed as dist

        profile = self.collector.gathered()
        path = self.out_dir / f"profile_iter{self.start + 1:07d}-{end:07d}.npz"
        if not dist.is_initialized() or dist.get_rank() == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            profile.save(path)
            print(
                f"[locmoe] routing profile of iterations {self.start + 1}-{end}: {path}", flush=True
            )
        self.written.append(path)
        self.collector.reset()
        self.start = end


@dataclass(frozen=True)
class ProfileRequest:
    """``--locmoe-routing-profile DIR --locmoe-routing-profile-interval K`` as a run asks for
    it: ``from_args`` holds the flags' rules (for pretrain_gpt and the launcher's CPU loop),
    ``windows`` makes the run's ProfileWindows once its model exists, and ``start`` does so for
    the CPU loop's ``train_job`` (``TrainSettings.routing_profile``: the loop calls
    ``at_iteration`` before every step, ``close`` after training, ``discard`` if it fails)."""

    out_dir: str
    interval: int = 0
    sample_size: int = 1 << 16

    def __post_init__(self):
        if self.interval < 0:
            raise PlacementError(
                f"--locmoe-routing-profile-interval {self.interval}: give K >= 1 iterations a "
                "window, or 0 for one profile of the whole run"
            )

    @classmethod
    def from_args(cls, args) -> ProfileRequest | None:
        """The request Megatron's parsed arguments make, or None; raises ConfigError."""
        from megatron_locmoe.config import ConfigError

        interval = getattr(args, "locmoe_routing_profile_interval", 0) or 0
        if getattr(args, "locmoe_routing_profile", None) is None:
            if interval:
                raise ConfigError(
                    "--locmoe-routing-profile-interval without --locmoe-routing-profile: give "
                    "the directory the profiles go to"
                )
            return None
        if not args.num_experts:
            raise ConfigError("--locmoe-routing-profile profiles MoE routing: give --num-experts")
        try:
            return cls(args.locmoe_routing_profile, interval)
        except PlacementError as e:
            raise ConfigError(str(e)) from None

    def windows(self, shape) -> ProfileWindows:
        return ProfileWindows(self.out_dir, self.interval, shape, self.sample_size)

    def start(self, ctx, settings) -> ProfileWindows:
        """The CPU loop's windows: the shape from the virtual cluster, else the job's ranks."""
        shape = _cluster_shape(ctx, settings)
        return self.windows(lambda: (settings.model.num_moe_experts, *shape))


def _cluster_shape(ctx, settings) -> tuple[int, int]:
    """(EP size, nodes per EP group) of a CPU-loop job: the virtual cluster's, else the
    simulated ranks' topology."""
    from megatron_locmoe.virtual import VirtualCluster

    cluster = VirtualCluster.from_config(settings.locmoe)
    if cluster is not None:
        return cluster.ep_size, cluster.ep_groups[0].num_nodes
    topo = ctx.topology()
    return topo.ep_size, topo.num_nodes


def profile_job(ctx, settings, sample_size: int = 1 << 16) -> dict:
    """SimCluster job: ``sim.trainer.train_job`` with a ProfileCollector installed (resume
    from ``settings.load_dir`` and train the profile's steps, or only evaluate). Returns the
    run's results with ``profile`` (the RoutingProfile, the same on every rank)."""
    from megatron_locmoe.sim.trainer import train_job

    ep, nodes = _cluster_shape(ctx, settings)
    collector = ProfileCollector(settings.model.num_moe_experts, ep, nodes, sample_size).install()
    try:
        result = train_job(ctx, settings)
    finally:
        collector.remove()
    result["profile"] = collector.gathered()
    return result


# --------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------


def remote_nodes(experts_SK: np.ndarray, nodes_S: np.ndarray, node_of_E: np.ndarray) -> float:
    """Mean number of remote nodes among the kept experts of the sampled tokens (the inter-node
    copies per token with one copy per token and node), under ``node_of_E``."""
    valid = nodes_S >= 0
    X, src = experts_SK[valid].astype(np.int64), nodes_S[valid].astype(np.int64)
    if len(src) == 0:
        return 0.0
    N = int(node_of_E.max()) + 1
    on = np.zeros((len(src), N), dtype=bool)
    rows = np.repeat(np.arange(len(src)), X.shape[1])
    cols = X.reshape(-1)
    ok = cols >= 0
    on[rows[ok], node_of_E[cols[ok]]] = True
    on[np.arange(len(src)), src] = False
    return float(on.sum(1).mean())


class _SwapSearch:
    """Pairwise swaps between nodes on the sampled tokens' exact remote-node count."""

    def __init__(self, experts_SK, nodes_S, num_nodes, num_experts, load_E, cap):
        valid = nodes_S >= 0
        self.X = experts_SK[valid].astype(np.int64)
        self.src = nodes_S[valid].astype(np.int64)
        self.N, self.E = num_nodes, num_experts
        S = len(self.src)
        self.has = np.zeros((S, num_experts), dtype=bool)
        rows = np.repeat(np.arange(S), self.X.shape[1])
        cols = self.X.reshape(-1)
        self.has[rows[cols >= 0], cols[cols >= 0]] = True
        self.tokens_of = [np.flatnonzero(self.has[:, e]) for e in range(num_experts)]
        self.load_E, self.cap = load_E, cap

    def run(self, node_of_E: np.ndarray, max_passes: int = 50) -> np.ndarray:
        node = node_of_E.copy()
        S = len(self.src)
        cnt = np.zeros((S, self.N), dtype=np.int32)
        for e in range(self.E):
            np.add.at(cnt, (self.tokens_of[e], node[e]), 1)
        node_load = np.bincount(node, weights=self.load_E, minlength=self.N)
        for _ in range(max_passes):
            improved = False
            for e in range(self.E):
                best, best_f = -0.5, -1  # integer deltas: only strict improvements
                a = node[e]
                for f in np.flatnonzero(node != a):
                    b = node[f]
                    shift = self.load_E[f] - self.load_E[e]
                    if node_load[a] + shift > self.cap or node_load[b] - shift > self.cap:
                        continue
                    d = self._delta(cnt, e, a, f, b)
                    if d < best:
                        best, best_f = d, f
                if best_f >= 0:
                    f, b = best_f, node[best_f]
                    self._move(cnt, e, a, b, f)
                    node[e], node[f] = b, a
                    shift = self.load_E[f] - self.load_E[e]
                    node_load[a] += shift
                    node_load[b] -= shift
                    improved = True
            if not improved:
                break
        return node

    def _only(self, e, f):
        t = self.tokens_of[e]
        return t[~self.has[t, f]]

    def _delta(self, cnt, e, a, f, b) -> int:
        """Change in the remote-node count when e moves a -> b and f moves b -> a."""
        total = 0
        for t, frm, to in ((self._only(e, f), a, b), (self._only(f, e), b, a)):
            if len(t) == 0:
                continue
            src = self.src[t]
            lose = (cnt[t, frm] == 1) & (src != frm)
            gain = (cnt[t, to] == 0) & (src != to)
            total += int(gain.sum()) - int(lose.sum())
        return total

    def _move(self, cnt, e, a, b, f) -> None:
        te, tf = self._only(e, f), self._only(f, e)
        cnt[te, a] -= 1
        cnt[te, b] += 1
        cnt[tf, b] -= 1
        cnt[tf, a] += 1


def _greedy_nodes(source_NE: np.ndarray, per_node: int) -> np.ndarray:
    """Each expert, hottest first, on the node whose tokens use it most among nodes with room."""
    N, E = source_NE.shape
    node = np.full(E, -1)
    room = np.full(N, per_node)
    for e in np.argsort(-source_NE.sum(0), kind="stable"):
        for n in np.argsort(-source_NE[:, e], kind="stable"):
            if room[n]:
                node[e], room[n] = n, room[n] - 1
                break
    return node


def _ranks_by_load(members: np.ndarray, load_E: np.ndarray, ranks: int) -> list[list[int]]:
    """A node's experts over its ranks, longest load first to the least-loaded rank with room."""
    per = len(members) // ranks
    out: list[list[int]] = [[] for _ in range(ranks)]
    totals = np.zeros(ranks)
    for e in sorted(members, key=lambda e: (-load_E[e], e)):
        r = min((r for r in range(ranks) if len(out[r]) < per), key=lambda r: (totals[r], r))
        out[r].append(int(e))
        totals[r] += load_E[e]
    return [sorted(r) for r in out]


@dataclass
class LayerPlan:
    """One layer's placement: ``perm[p]`` is the old expert that becomes expert p (so it lives
    on EP rank p // (E / EP)), and the objective on the profile before and after."""

    layer: str
    perm: list[int]
    remote_nodes_before: float
    remote_nodes_after: float
    node_local_before: float
    node_local_after: float
    rank_load_max_over_mean_before: float
    rank_load_max_over_mean_after: float
    node_load_max_over_mean_before: float
    node_load_max_over_mean_after: float


@dataclass
class Plan:
    num_experts: int
    ep_size: int
    num_nodes: int
    router_type: str
    layers: list[LayerPlan] = field(default_factory=list)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        try:
            raw = json.loads(Path(path).read_text())
            plan = cls(**{k: v for k, v in raw.items() if k != "layers"})
            plan.layers = [LayerPlan(**layer) for layer in raw["layers"]]
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise PlacementError(
                f"{path}: not a placement plan ({e}); give the JSON `placement plan` wrote"
            ) from None
        for layer in plan.layers:
            if sorted(layer.perm) != list(range(plan.num_experts)):
                raise PlacementError(
                    f"{path}: {layer.layer}'s perm is not a permutation of 0..{plan.num_experts - 1}"
                )
        return plan

    def summary(self) -> str:
        rows = [
            f"{'layer':<22} {'remote nodes/token':>20} {'node-local share':>18} "
            f"{'rank load max/mean':>19}"
        ]
        for p in self.layers:
            rows.append(
                f"{p.layer:<22} {p.remote_nodes_before:>9.4f} -> {p.remote_nodes_after:<7.4f} "
                f"{p.node_local_before:>8.4f} -> {p.node_local_after:<6.4f} "
                f"{p.rank_load_max_over_mean_before:>8.3f} -> {p.rank_load_max_over_mean_after:<6.3f}"
            )
        before = np.mean([p.remote_nodes_before for p in self.layers])
        after = np.mean([p.remote_nodes_after for p in self.layers])
        rows.append(f"mean remote nodes per token: {before:.4f} -> {after:.4f}")
        return "\n".join(rows)


def _max_over_mean(values: np.ndarray) -> float:
    mean = values.mean()
    return float(values.max() / mean) if mean > 0 else 1.0


def _local_share(source_NE: np.ndarray, node_of_E: np.ndarray) -> float:
    """Share of the assignments whose expert is on the token's node."""
    total = source_NE.sum()
    hits = sum(source_NE[n, node_of_E == n].sum() for n in range(source_NE.shape[0]))
    return float(hits / total) if total else 0.0


def _rank_loads(load_E: np.ndarray, order: np.ndarray, ep: int) -> np.ndarray:
    """Assignments each EP rank receives when slot p holds expert ``order[p]``."""
    return load_E[np.asarray(order)].reshape(ep, -1).sum(1)


def plan_placement(profile: RoutingProfile, load_slack: float = 0.05) -> Plan:
    """The placement of every profiled layer (see the module docstring for the search). No
    node may receive more than max(the hottest node's load now, (1 + load_slack) x the mean)."""
    if load_slack < 0:
        raise PlacementError(f"--load-slack {load_slack} must be >= 0 (e.g. 0.05)")
    check_router(profile.router_type, profile.num_groups, profile.node_settings)
    E, N, EP = profile.num_experts, profile.num_nodes, profile.ep_size
    per_rank, per_node, R = E // EP, E // N, EP // N
    slot_node = np.arange(E) // per_node  # node of expert slot p, as topology lays it out
    plan = Plan(E, EP, N, profile.router_type)
    for li, name in enumerate(profile.layers):
        source_NE = profile.source_counts[li]
        load_E = source_NE.sum(0)
        X, src = profile.sample_experts[li], profile.sample_nodes[li]
        identity = slot_node.copy()
        cap = max(
            np.bincount(identity, weights=load_E, minlength=N).max(),
            (1 + load_slack) * load_E.sum() / N,
        )
        search = _SwapSearch(X, src, N, E, load_E, cap + 1e-9)
        starts = [identity]
        greedy = _greedy_nodes(source_NE, per_node)
        if np.bincount(greedy, weights=load_E, minlength=N).max() <= cap + 1e-9:
            starts.append(greedy)
        best = min(
            (search.run(s) for s in starts), key=lambda nodes: (remote_nodes(X, src, nodes), 0)
        )
        if remote_nodes(X, src, best) >= remote_nodes(X, src, identity):
            best = identity  # nothing gained: keep the experts where they are
        perm: list[int] = []
        for n in range(N):
            members = np.flatnonzero(best == n)
            if np.array_equal(best, identity):
                ranks = [list(range(n * per_node + r * per_rank, n * per_node + (r + 1) * per_rank))
                         for r in range(R)]  # fmt: skip
            else:
                ranks = _ranks_by_load(members, load_E, R)
            for r in ranks:
                perm.extend(r)
        perm_arr = np.array(perm)
        node_after = np.empty(E, dtype=np.int64)
        node_after[perm_arr] = slot_node

        plan.layers.append(
            LayerPlan(
                layer=name,
                perm=[int(p) for p in perm],
                remote_nodes_before=remote_nodes(X, src, identity),
                remote_nodes_after=remote_nodes(X, src, node_after),
                node_local_before=_local_share(source_NE, identity),
                node_local_after=_local_share(source_NE, node_after),
                rank_load_max_over_mean_before=_max_over_mean(
                    _rank_loads(load_E, np.arange(E), EP)
                ),
                rank_load_max_over_mean_after=_max_over_mean(_rank_loads(load_E, perm_arr, EP)),
                node_load_max_over_mean_before=_max_over_mean(
                    np.bincount(identity, weights=load_E, minlength=N)
                ),
                node_load_max_over_mean_after=_max_over_mean(
                    np.bincount(node_after, weights=load_E, minlength=N)
                ),
            )
        )
    return plan


def evaluate_plan(plan: Plan, profile: RoutingProfile) -> list[dict]:
    """The plan's objective on another profile of the same model (held-out routing, e.g. later
    steps): per layer, remote nodes per token and node-local share, before and after."""
    if (profile.num_experts, profile.ep_size, profile.num_nodes) != (
        plan.num_experts,
        plan.ep_size,
        plan.num_nodes,
    ):
        raise PlacementError(
            f"profile of {profile.num_experts} experts, EP {profile.ep_size}, "
            f"{profile.num_nodes} nodes; the plan's {plan.num_experts}, {plan.ep_size}, "
            f"{plan.num_nodes}: check the plan against a profile of the same cluster"
        )
    slot_node = np.arange(plan.num_experts) // (plan.num_experts // plan.num_nodes)
    rows = []
    for layer in plan.layers:
        if layer.layer not in profile.layers:
            raise PlacementError(f"the profile has no {layer.layer}; profile every planned layer")
        li = profile.layers.index(layer.layer)
        after = np.empty(plan.num_experts, dtype=np.int64)
        after[np.asarray(layer.perm)] = slot_node
        X, src = profile.sample_experts[li], profile.sample_nodes[li]
        source_NE = profile.source_counts[li]
        load_E = source_NE.sum(0)
        rows.append(
            dict(
                layer=layer.layer,
                remote_nodes_before=remote_nodes(X, src, slot_node),
                remote_nodes_after=remote_nodes(X, src, after),
                node_local_before=_local_share(source_NE, slot_node),
                node_local_after=_local_share(source_NE, after),
                rank_load_max_over_mean_before=_max_over_mean(
                    _rank_loads(load_E, np.arange(plan.num_experts), plan.ep_size)
                ),
                rank_load_max_over_mean_after=_max_over_mean(
                    _rank_loads(load_E, np.asarray(layer.perm), plan.ep_size)
                ),
            )
        )
    return rows


def window_savings(paths: list[str | os.PathLike], load_slack: float = 0.05) -> list[dict]:
    """Placement re-applied every K iterations, measured on a run's profile windows
    (``--locmoe-routing-profile-interval K``): for each window after the first, the plan made
    on the window before it, evaluated on this one (held-out routing: what the next K
    iterations send). The routing of the routers placement accepts does not read the
    placement, so this is exactly what the run would have sent with the placement re-applied
    at each window's start. Means over layers: remote nodes per token (the inter-node copies
    with one copy per token and node), node-local share, assignments per EP rank (max / mean),
    before (the run's placement) and after."""
    profiles = [(Path(p), RoutingProfile.load(p)) for p in paths]
    if len(profiles) < 2:
        raise PlacementError(
            f"{len(profiles)} profile window(s): plan on one window and check on the next needs "
            "two or more (--locmoe-routing-profile-interval K below the run's iterations)"
        )
    rows = []
    for (prev_path, prev), (path, profile) in zip(profiles, profiles[1:], strict=False):
        plan = plan_placement(prev, load_slack)
        held = evaluate_plan(plan, profile)
        keys = [k for k in held[0] if k != "layer"]
        means = {k: float(np.mean([r[k] for r in held])) for k in keys}
        before, after = means["remote_nodes_before"], means["remote_nodes_after"]
        in_sample = np.mean([x.remote_nodes_after for x in plan.layers]) / max(
            np.mean([x.remote_nodes_before for x in plan.layers]), 1e-12
        )
        rows.append(
            dict(
                planned_on=prev_path.name,
                window=path.name,
                layers=len(held),
                **means,
                ratio=after / before if before > 0 else 1.0,
                in_sample_ratio=float(in_sample),
            )
        )
    return rows


# --------------------------------------------------------------------------------------------
# Apply
# --------------------------------------------------------------------------------------------

_STATE = r"(?:optimizer\.state\.[^.]+\.)?"
EXPERT_KEY = re.compile(rf"^{_STATE}decoder\.layers\.mlp\.experts\.experts\.(?!\d)")
"""Stacked expert tensors [layers, E, ...] (SequentialMLP, TEGroupedMLP, the grouped experts)
and their optimizer state; the expert index right after the layer index."""
ROUTER_KEY = re.compile(rf"^{_STATE}decoder\.layers\.mlp\.router\.(?P<name>[^./]+)$")
PER_EXPERT_ROUTER_STATE = ("weight", "bias", "expert_bias", "qb_beta")
"""Router tensors with one row per expert: the gate rows and bias, the aux-loss-free balancing
bias, quantile balancing's bias. Their layer axis comes first, the expert axis second."""
_DCP_FILES = re.compile(r"(\.distcp|^\.metadata|^metadata\.json|^common\.pt)$")


def _single_process_group() -> bool:
    """A one-process gloo group for Megatron's dist_checkpointing; True if made here. In a
    process of several ranks the rewrite would be collective: refused."""
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise PlacementError(
                f"apply runs in one process; this one is rank {dist.get_rank()} of "
                f"{dist.get_world_size()}: run it alone (the command, or a 1-rank SimCluster)"
            )
        return False
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return True


def _checkpoint_dir(root: Path) -> tuple[int, Path]:
    from megatron_locmoe.sim.checkpoint import latest_iteration

    iteration = latest_iteration(root)
    if iteration is None:
        raise PlacementError(
            f"{root} holds no latest_checkpointed_iteration.txt: give the --save directory of a "
            "torch_dist checkpoint (the CPU loop's or Megatron's)"
        )
    path = root / f"iter_{iteration:07d}"
    if not (path / "metadata.json").is_file():
        raise PlacementError(
            f"{path} is not a torch_dist checkpoint (no metadata.json): save with --ckpt-format "
            "torch_dist"
        )
    return iteration, path


def _saved_router(path: Path, common: dict) -> tuple:
    """(router type, group count, node-map settings, expert count) the checkpoint records: the
    CPU loop's locmoe_settings.json, else Megatron's saved args."""
    settings = path / "locmoe_settings.json"
    if settings.is_file():
        saved = json.loads(settings.read_text())
        node_settings = saved.get("node_map_settings")
        if node_settings is None:  # written before node_map_settings
            cap = saved.get("max_outgoing_fraction")
            node_settings = {} if cap is None else {"max_outgoing_fraction": cap}
        return (
            saved.get("router_type"),
            saved.get("num_groups"),
            node_settings,
            saved.get("num_experts"),
        )
    args = common.get("args")
    if args is None:
        return None, None, {}, None
    saved = {
        n: getattr(args, f"locmoe_{n}") for n in NODE_MAP_SETTINGS if hasattr(args, f"locmoe_{n}")
    }
    node_settings = LocMoEConfig(**saved).node_map_settings()
    return (
        getattr(args, "moe_router_type", "megatron"),
        getattr(args, "moe_router_num_groups", None),
        node_settings,
        getattr(args, "num_experts", None),
    )


def _inverse(perm_LE: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm_LE)
    for li, perm in enumerate(perm_LE):
        inv[li, perm] = np.arange(len(perm))
    return inv


def permute_state(tensors: dict, objects: dict, perm_LE: np.ndarray, num_experts: int):
    """The checkpoint's tensors and objects with the experts of every layer permuted:
    ``perm_LE[l, p]`` is the old expert that becomes expert p of layer l (identity rows for
    layers without a plan). ``tensors``: {key: global tensor}; ``objects``: {unique key:
    ShardedObject}. Returns (tensors, objects, names of what was permuted). Refuses
    per-expert state it does not know."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    E, L = num_experts, perm_LE.shape[0]
    index = torch.from_numpy(perm_LE).long()
    out, permuted = {}, []
    for key, t in tensors.items():
        router = ROUTER_KEY.match(key)
        per_expert = EXPERT_KEY.match(key) or (
            router is not None and router["name"] in PER_EXPERT_ROUTER_STATE
        )
        if per_expert:
            if t.dim() < 2 or t.shape[0] != L or t.shape[1] != E:
                raise PlacementError(
                    f"{key} has shape {tuple(t.shape)}, expected [layers {L}, experts {E}, ...]: "
                    "the checkpoint's model does not match the plan (another layer or expert count)"
                )
            idx = index.view(L, E, *([1] * (t.dim() - 2))).expand_as(t)
            out[key] = torch.gather(t, 1, idx)
            permuted.append(key)
        elif ".mlp.experts." in key or (
            router is not None and t.dim() >= 2 and t.shape[0] == L and t.shape[1] == E
        ):
            raise PlacementError(
                f"{key}: per-expert state in a layout placement does not know (expected "
                "decoder.layers.mlp.experts.experts.* with a layer and an expert axis, or router "
                f"{', '.join(PER_EXPERT_ROUTER_STATE)}); save without --ckpt-fully-parallel / "
                "singleton local shards, or teach megatron_locmoe.analysis.placement its layout"
            )
        else:
            out[key] = t
    inverse = _inverse(perm_LE)
    new_objects = {}
    for unique, obj in objects.items():
        if ".mlp.experts.experts." in obj.key:
            if len(obj.global_shape) != 2 or tuple(obj.global_shape) != (L, E):
                raise PlacementError(
                    f"{unique}: an expert object over {obj.global_shape}, expected ({L}, {E})"
                )
            layer, expert = obj.global_offset
            obj = ShardedObject(
                obj.key, obj.data, obj.global_shape, (layer, int(inverse[layer, expert])), 0
            )
            permuted.append(obj.key)
        new_objects[obj.unique_key] = obj
    return out, new_objects, sorted(set(permuted))


def _load_everything(path: Path):
    """(common state, {key: global tensor}, {unique key: ShardedObject}) of a torch_dist
    checkpoint, read whole into this process."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
    from megatron.core.dist_checkpointing.serialization import (
        load_common_state_dict,
        load_sharded_metadata,
    )

    common = load_common_state_dict(str(path))
    metadata = load_sharded_metadata(str(path))
    request = {}
    for unique, item in metadata.items():
        if item.key == "common_state":
            continue
        if isinstance(item, ShardedTensor):
            data = torch.empty(item.global_shape, dtype=item.dtype)
            request[unique] = ShardedTensor.from_rank_offsets(item.key, data, replica_id=0)
        else:
            request[unique] = ShardedObject(
                item.key, None, item.global_shape, item.global_offset, 0
            )
    loaded = dist_checkpointing.load(request, str(path), validate_access_integrity=False)
    tensors = {request[u].key: loaded[u] for u, r in request.items() if torch.is_tensor(loaded[u])
               and isinstance(r, ShardedTensor)}  # fmt: skip
    objects = {
        u: ShardedObject(r.key, loaded[u], r.global_shape, r.global_offset, 0)
        for u, r in request.items()
        if isinstance(r, ShardedObject)
    }
    return common, tensors, objects


def _write_checksums(path: Path) -> None:
    """locmoe_checksums.json, as sim.checkpoint.save writes it (the loop's load checks it)."""
    sums = {}
    for f in sorted(path.iterdir()):
        if f.is_file() and f.name != "locmoe_checksums.json":
            sums[f.name] = hashlib.sha256(f.read_bytes()).hexdigest()
    (path / "locmoe_checksums.json").write_text(json.dumps(sums, indent=1))


def apply_placement(root, plan: Plan, out_root, weights_only: bool = False) -> dict:
    """Write the latest checkpoint under ``root`` to ``out_root`` (same iteration) with the
    plan's permutation applied. ``weights_only``: leave the optimizer state out (start from it
    with --finetune / ``init_weights_dir``). Returns what was done."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    root, out_root = Path(root), Path(out_root)
    if out_root.resolve() == root.resolve():
        raise PlacementError(f"-o {out_root} is the input checkpoint: write to a new directory")
    iteration, path = _checkpoint_dir(root)
    out_path = out_root / path.name
    if out_path.exists() and any(out_path.iterdir()):
        raise PlacementError(f"{out_path} exists and is not empty: choose another -o directory")
    from megatron_locmoe import adaptor

    adaptor.apply()  # Megatron's checkpoint writer on this device (CPU: no CUDA calls); idempotent
    made = _single_process_group()
    try:
        common, tensors, objects = _load_everything(path)
        router, groups, node_settings, experts = _saved_router(path, common)
        if router is not None and router != plan.router_type:
            raise PlacementError(
                f"{path} was saved with router {router}, the plan was made for "
                f"{plan.router_type}: profile this run's checkpoint"
            )
        check_router(plan.router_type, groups, node_settings)
        if experts is not None and experts != plan.num_experts:
            raise PlacementError(
                f"{path} has {experts} experts, the plan {plan.num_experts}: profile this run"
            )
        optimizer_keys = [k for k in tensors if k.startswith("optimizer.")]
        odd = [k for k in optimizer_keys if not k.startswith("optimizer.state.")]
        if odd and not weights_only:
            raise PlacementError(
                f"{path}'s optimizer state is not kept per parameter ({odd[0]}: Megatron's "
                "distributed optimizer in a flattened layout): pass --weights-only and resume "
                "with --finetune --no-load-optim, or save with --dist-ckpt-optim-fully-reshardable"
            )
        expert_tensors = [t for k, t in tensors.items() if EXPERT_KEY.match(k)]
        if not expert_tensors:
            raise PlacementError(f"{path} holds no decoder.layers.mlp.experts tensors to place")
        L = expert_tensors[0].shape[0]
        perm_LE = np.tile(np.arange(plan.num_experts), (L, 1))
        for layer in plan.layers:
            li = int(re.fullmatch(r"decoder\.layers\.(\d+)\.mlp", layer.layer)[1])
            if li >= L:
                raise PlacementError(f"the plan's {layer.layer} is beyond the checkpoint's {L}")
            perm_LE[li] = layer.perm
        if weights_only:
            tensors = {k: t for k, t in tensors.items() if not k.startswith("optimizer.")}
            common = {k: v for k, v in common.items() if k != "optimizer"}
        tensors, objects, permuted = permute_state(tensors, objects, perm_LE, plan.num_experts)
        out_path.mkdir(parents=True, exist_ok=True)
        state = dict(common)
        for key, t in tensors.items():
            state[f"__tensor__/{key}"] = ShardedTensor.from_rank_offsets(key, t, replica_id=0)
        for unique, obj in objects.items():
            state[f"__object__/{unique}"] = obj
        dist_checkpointing.save(state, str(out_path))
    finally:
        if made:
            import torch.distributed as dist

            dist.destroy_process_group()
    for f in path.iterdir():  # the plugin's settings and anything else beside the shards
        if f.is_file() and not _DCP_FILES.search(f.name) and f.name != "locmoe_checksums.json":
            (out_path / f.name).write_bytes(f.read_bytes())
    record = dict(source=str(path), iteration=iteration, weights_only=weights_only,
                  permuted=permuted, plan=asdict(plan))  # fmt: skip
    (out_path / "locmoe_placement.json").write_text(json.dumps(record, indent=1))
    if (path / "locmoe_checksums.json").is_file():
        _write_checksums(out_path)
    (out_root / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return record


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def apply_job(ctx, root, plan_path, out_root, weights_only: bool = False) -> dict:
    """SimCluster job (one rank: its process has the plugin's device patches and a group)."""
    return apply_placement(root, Plan.load(plan_path), out_root, weights_only)


def _settings_from_json(path: str, layout):
    """The CPU loop's TrainSettings from a JSON object of its fields (``locmoe``: the
    LocMoEConfig's fields; ``optimizer``: OptimizerSettings' fields or null; ``model``: the
    loop's small model's TransformerConfig fields, ``sim.trainer.tiny_model``'s keywords, for
    ``layout``)."""
    from megatron_locmoe.config import LocMoEConfig
    from megatron_locmoe.sim.trainer import OptimizerSettings, TrainSettings, tiny_model

    try:
        raw = json.loads(Path(path).read_text())
        raw["locmoe"] = LocMoEConfig(**raw.get("locmoe", {}))
        raw["model"] = tiny_model(raw["locmoe"].router_type, layout, **raw.get("model", {}))
        if raw.get("optimizer") is not None:
            raw["optimizer"] = OptimizerSettings(**raw["optimizer"])
        return TrainSettings(**raw)
    except (OSError, ValueError, TypeError) as e:
        raise PlacementError(
            f"{path}: not the CPU loop's settings ({e}); give a JSON object of TrainSettings "
            "fields (megatron_locmoe/sim/trainer.py), e.g. with load_dir and steps one past it"
        ) from None


def _profile_command(args) -> None:
    from megatron_locmoe.sim.cluster import ParallelLayout, SimCluster

    layout = ParallelLayout(devices_per_node=args.devices_per_node, ep=args.ep)
    settings = _settings_from_json(args.settings, layout)
    with SimCluster(args.ranks) as cluster:
        result = cluster.run(profile_job, settings, args.sample, layout=layout)[0]
    profile = result["profile"]
    check_router(profile.router_type, profile.num_groups, profile.node_settings)
    profile.save(args.output)
    tokens = profile.tokens.sum(1)
    print(f"profile: {len(profile.layers)} layers, {int(tokens.min())} tokens each, "
          f"{profile.num_nodes} nodes x {profile.ranks_per_node} ranks -> {args.output}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_locmoe.analysis.placement",
        description="Expert placement from a routing profile (docs/placement.md).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("profile", help="run the CPU loop with the routing profile collector")
    p.add_argument("settings", help="JSON of the loop's TrainSettings fields (load_dir, steps...)")
    p.add_argument("-o", "--output", required=True, help="profile .npz to write")
    p.add_argument("--ranks", type=int, default=1, help="simulated ranks (1: a virtual cluster)")
    p.add_argument("--devices-per-node", type=int, default=1)
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size of the simulated run")
    p.add_argument("--sample", type=int, default=1 << 16, help="tokens sampled per layer")
    p = sub.add_parser("plan", help="compute the placement of a profile")
    p.add_argument("profile", help="the .npz that `profile` wrote")
    p.add_argument("-o", "--output", required=True, help="plan JSON to write")
    p.add_argument(
        "--load-slack",
        type=float,
        default=0.05,
        help="a node may receive (1 + this) x the mean load (or today's maximum)",
    )
    p.add_argument("--check", help="another profile (held-out routing) to evaluate the plan on")
    p = sub.add_parser(
        "windows", help="placement re-applied every K iterations, on a run's profile windows"
    )
    p.add_argument("profiles", nargs="+", help="profile_iterA-B.npz files of one run, in order")
    p.add_argument("--load-slack", type=float, default=0.05)
    p.add_argument("--out", help="JSON to write the rows to")
    p = sub.add_parser("apply", help="write a checkpoint with the plan's placement")
    p.add_argument("checkpoint", help="a --save directory (latest_checkpointed_iteration.txt)")
    p.add_argument("plan", help="the JSON that `plan` wrote")
    p.add_argument("-o", "--output", required=True, help="new checkpoint directory")
    p.add_argument("--weights-only", action="store_true", help="leave the optimizer state out")
    args = parser.parse_args(argv)
    try:
        if args.command == "profile":
            _profile_command(args)
        elif args.command == "plan":
            plan = plan_placement(RoutingProfile.load(args.profile), args.load_slack)
            plan.save(args.output)
            print(plan.summary())
            if args.check:
                rows = evaluate_plan(plan, RoutingProfile.load(args.check))
                for r in rows:
                    print(f"held out {r['layer']}: remote nodes/token "
                          f"{r['remote_nodes_before']:.4f} -> {r['remote_nodes_after']:.4f}, "
                          f"node-local {r['node_local_before']:.4f} -> {r['node_local_after']:.4f}")  # fmt: skip
        elif args.command == "windows":
            rows = window_savings(sorted(args.profiles), args.load_slack)
            for r in rows:
                print(f"{r['window']} (planned on {r['planned_on']}): remote nodes/token "
                      f"{r['remote_nodes_before']:.4f} -> {r['remote_nodes_after']:.4f} "
                      f"({r['ratio']:.3f}x; in sample {r['in_sample_ratio']:.3f}x), node-local "
                      f"{r['node_local_before']:.4f} -> {r['node_local_after']:.4f}, rank load "
                      f"max/mean {r['rank_load_max_over_mean_before']:.3f} -> "
                      f"{r['rank_load_max_over_mean_after']:.3f}")  # fmt: skip
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
        else:
            record = apply_placement(
                args.checkpoint, Plan.load(args.plan), args.output, args.weights_only
            )
            print(f"placed {len(record['permuted'])} tensors of iteration {record['iteration']} "
                  f"-> {args.output}")  # fmt: skip
    except PlacementError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
