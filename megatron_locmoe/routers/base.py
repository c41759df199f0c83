"""What every plugin router shares: the LocMoE config, the node map, drops and metrics.

Routers subclass Megatron's TopKRouter (so MoELayer, checkpoints, the aux-loss plumbing and
``set_layer_number`` work unchanged) and mix this in. Shapes: T tokens on this rank (after
sequence parallelism), E experts, k experts per token.
"""

from __future__ import annotations

import torch

import megatron_locmoe.routers.fused as fused
from megatron_locmoe import metrics
from megatron_locmoe.config import ConfigError, LocMoEConfig
from megatron_locmoe.topology import current_topology
from megatron_locmoe.virtual import RankStateBank, VirtualCluster


def drop_to_capacity(
    probs_TE: torch.Tensor,
    routing_map_TE: torch.Tensor,
    capacity: int,
    priority_TE: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep at most ``capacity`` tokens per expert: those of highest ``priority`` (default: the
    probability, Megatron's drop policy ``probs``; locmoe_plus ranks by affinity).

    Returns (probs, routing_map, dropped) with dropped = number of assignments removed.
    """
    T = routing_map_TE.shape[0]
    if capacity >= T:
        return probs_TE, routing_map_TE, routing_map_TE.new_zeros((), dtype=torch.long)
    priority_TE = probs_TE if priority_TE is None else priority_TE
    return fused.drop_by_rank(probs_TE, routing_map_TE, priority_TE, capacity)


class PluginRouterMixin:
    """Node map and routing metrics for a TopKRouter subclass."""

    name: str
    """The ``--moe-router-type`` that selects this router (the registry's key)."""
    locmoe: LocMoEConfig
    probs_have_grad = True
    """Whether the probabilities carry a gradient (hash routing's are constants)."""
    uses_locmoe_alpha = True
    """Switch-form balance loss with LocMoE's alpha (locmoe, switch); Megatron's own otherwise."""
    has_grap_gate = False
    """LocMoE's GrAP gate (its --locmoe-grap-* settings apply)."""
    has_locality_loss = False
    """LocMoE's locality loss and the node target (--locmoe-locality-loss-coeff, ...)."""
    has_fused_path = False
    """A fused routing path (--locmoe-fused-router, --moe-router-fusion's own path)."""
    has_capacity_bound = False
    """LocMoE's capacity lower bound (--locmoe-capacity-mode bound; auto with a capacity
    factor)."""
    has_affinity_routing = False
    """LocMoE+'s affinity routing and adaptive capacity (its --locmoe-plus-* settings)."""
    default_reestimate_interval = 0
    """K of the capacity re-estimate when --locmoe-capacity-reestimate-interval is not given."""
    default_capacity_factor: float | None = None
    """The capacity factor the simulated cluster's loop gives this router when the run names
    none (routers that need one: switch 1.0, locmoe_plus 1.1, the papers' baselines)."""

    @classmethod
    def check_model(cls, locmoe: LocMoEConfig, tc) -> None:
        """Raise ConfigError for model settings this router cannot run with. ``tc`` is a
        TransformerConfig or Megatron's parsed arguments (same names): the parse-time check and
        the model build run this one function."""
        if tc.moe_router_num_groups:
            raise ConfigError(
                f"group-limited routing (--moe-router-num-groups {tc.moe_router_num_groups}) is "
                f"a Megatron TopKRouter feature; use --moe-router-type megatron for it"
            )
        if locmoe.capacity_bound_applies(tc):
            cls.check_capacity_bound(locmoe, tc)

    @classmethod
    def check_capacity_bound(cls, locmoe: LocMoEConfig, tc) -> None:
        """capacity_mode bound applies: only the locmoe router has that capacity."""
        raise ConfigError(
            f"capacity_mode='bound' is LocMoE's capacity; the {cls.name} router uses "
            "--moe-expert-capacity-factor"
        )

    def get_aux_loss_coeff(self, aux_loss_type: str) -> float:
        """LocMoE's alpha for Megatron's Switch-form ``aux_loss``; its seq/global variants off."""
        if not self.uses_locmoe_alpha:
            return super().get_aux_loss_coeff(aux_loss_type)
        return self.locmoe.aux_loss_coeff if aux_loss_type == "aux_loss" else 0.0

    def _init_plugin(self, locmoe) -> None:
        """``locmoe``: the layer's Resolution, or a LocMoEConfig (or None) for a router built
        on its own, which then validates and resolves its settings itself."""
        from megatron_locmoe.resolve import settled  # resolve imports the routers' config

        self.locmoe = settled(locmoe or LocMoEConfig(router_type=self.name), self.config).config
        cluster = VirtualCluster.from_config(self.locmoe)
        # on a virtual cluster the node of virtual rank 0 (enter_virtual_rank switches it)
        topo = current_topology() if cluster is None else cluster.topology(0)
        expert_nodes = torch.tensor(topo.expert_nodes(self.config.num_moe_experts))
        # [E] bool: experts hosted on this rank's node. Buffer so it follows .to(device).
        self.register_buffer("expert_is_local", expert_nodes == topo.node, persistent=False)

    # ---- the virtual cluster (megatron_locmoe/virtual.py) ----------------------------------
    per_rank_host: tuple[str, ...] = ()
    """Host attributes that are one rank's state on a real cluster (one copy per virtual rank)."""

    def per_rank_buffers(self) -> tuple[str, ...]:
        """Buffers that are one rank's state on a real cluster, for this router's settings (one
        copy per virtual rank); the node's experts are always per rank."""
        return ()

    def per_rank_tables(self, expert_is_local_VE: torch.Tensor) -> dict[str, torch.Tensor]:
        """Buffers that are functions of a rank's node, as ``[V, ...]`` tables from the node map
        of every virtual rank: the node's experts, and whatever a router derives from them."""
        return {"expert_is_local": expert_is_local_VE.to(self.expert_is_local.device)}

    def _init_virtual(self) -> None:
        """Last step of a router's __init__: with a virtual cluster, one copy of the per-rank
        state for each virtual rank, and the node map of every rank."""
        cluster = VirtualCluster.from_config(self.locmoe)
        self._virtual_bank = None
        if cluster is None:
            return
        table = cluster.expert_is_local(self.config.num_moe_experts)
        self._virtual_bank = RankStateBank(
            self,
            cluster.ranks,
            buffers=self.per_rank_buffers(),
            host=self.per_rank_host,
            derived=self.per_rank_tables(table),
        )

    def enter_virtual_rank(self, rank: int) -> None:
        """Route the next forwards as virtual rank ``rank`` (``virtual.enter`` calls this)."""
        if self._virtual_bank is not None:
            self._virtual_bank.enter(self, rank)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """A virtual cluster's checkpoint holds virtual rank 0's per-rank state, as a real
        cluster's holds data-parallel rank 0's."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        bank = getattr(self, "_virtual_bank", None)
        if bank is not None and bank.current != 0:
            for name, value in bank.rank_zero_values(self).items():
                if prefix + name in destination:
                    destination[prefix + name] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, *args, **kwargs):
        """A loaded state becomes every virtual rank's (each real rank resumes from it)."""
        result = super()._load_from_state_dict(*args, **kwargs)
        bank = getattr(self, "_virtual_bank", None)
        if bank is not None:
            bank.broadcast(self)
            for name in bank.host:
                bank.reset_host(name)
        return result

    def check_input(self, input: torch.Tensor) -> None:
        """With ``check_router_input``: refuse a non-finite input, naming layer and ranks, on
        every rank of the pipeline stage together (one all-reduce over the tp-dp-cp group,
        whose ranks all run this layer now, as Megatron's global aux loss does), so no peer
        waits for the failed rank in the dispatcher. Runs on ranks without tokens too."""
        if not self.locmoe.check_router_input:
            return
        bad_T = ~torch.isfinite(input).reshape(-1, input.shape[-1]).all(-1)
        mine = int(bad_T.sum())
        total = torch.tensor([mine], dtype=torch.long, device=input.device)
        import torch.distributed as dist

        if dist.is_initialized():
            dist.all_reduce(total, group=self.tp_dp_cp_group)
        if int(total) == 0:
            return
        rank = dist.get_rank() if dist.is_initialized() else 0
        where = (
            f"{mine} of {bad_T.numel()} router input tokens on rank {rank} are not finite "
            f"(first: token {int(bad_T.nonzero()[0])})"
            if mine
            else f"router inputs on other ranks are not finite ({int(total)} tokens; rank {rank}'s are finite)"
        )
        raise FloatingPointError(
            f"MoE layer {self.layer_number}: {where}; the layers before this router produced them"
        )

    def route_no_tokens(self, input: torch.Tensor):
        """Routing for a rank with no tokens this forward (an empty micro-batch or shard):
        empty probs and map, still on the autograd graph of ``input`` (its gradient is empty
        too), no losses (no token to balance) and no metrics (nothing to average). The
        tensor/context-parallel peers of such a rank have no tokens either (those splits are
        even), so skipping their collectives is safe; collectives over wider groups are run by
        ``_no_token_collectives`` with zero contributions, so no peer waits."""
        E = self.config.num_moe_experts
        probs_TE = input.new_zeros(0, E, dtype=torch.float32)
        if self.probs_have_grad and torch.is_grad_enabled():
            # on the graph exactly where the token path's probs would be: the dispatcher's
            # backward then runs the same collectives on this rank as on its peers
            for source in (input, *self.parameters()):
                if source.requires_grad:
                    probs_TE = probs_TE + source.sum().float() * 0
        routing_map_TE = torch.zeros(0, E, dtype=torch.bool, device=input.device)
        self._no_token_collectives(routing_map_TE)
        return probs_TE, routing_map_TE

    def _no_token_collectives(self, routing_map_TE: torch.Tensor) -> None:
        """The token path's collectives over groups wider than tensor/context parallelism."""

    def record_routing_metrics(
        self,
        probs_TE: torch.Tensor,
        routing_map_TE: torch.Tensor,
        dropped: torch.Tensor | None = None,
        capacity: int = 0,
        locality_loss: torch.Tensor | None = None,
        delta: torch.Tensor | None = None,
        ec_min: torch.Tensor | None = None,
        expert_choice: bool = False,
    ) -> None:
        """Record the full metric set (zeros where a metric does not apply to this router) with
        one tracker write; the vector comes from one compiled graph on CUDA."""
        zero = probs_TE.new_zeros(())
        vector = fused.run(
            fused.router_metric_vector,
            probs_TE.device,
            probs_TE,
            routing_map_TE,
            self.expert_is_local,
            zero if dropped is None else dropped,
            capacity,
            zero if locality_loss is None else locality_loss,
            zero if delta is None else delta,
            zero if ec_min is None else ec_min,
            expert_choice,
        )
        metrics.record_vector(self, metrics.ROUTER_METRICS, vector)
