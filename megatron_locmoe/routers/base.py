"""What every plugin router shares: the LocMoE config, the node map, drops and metrics.

Routers subclass Megatron's TopKRouter (so MoELayer, checkpoints, the aux-loss plumbing and
``set_layer_number`` work unchanged) and mix this in. Shapes: T tokens on this rank (after
sequence parallelism), E experts, k experts per token.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
from megatron.core.transformer.moe.router import TopKRouter

import megatron_locmoe.routers.fused as fused
import megatron_locmoe.routers.kernels as kernels
from megatron_locmoe import metrics
from megatron_locmoe.config import ROUTER_SETTINGS, ConfigError, LocMoEConfig, Resolution
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


def _parameters(fn) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters)


MEGATRON_ROUTER_INIT = _parameters(TopKRouter.__init__)
"""What the installed Megatron's TopKRouter takes at construction (dev adds layer_number)."""
MEGATRON_ROUTER_FORWARD = _parameters(TopKRouter.forward)
"""What its forward takes (dev: input_ids, packed_seq_params besides the padding mask)."""
MEGATRON_ROUTING = _parameters(TopKRouter.routing)
"""What its routing takes (dev: the same keywords as forward)."""


def megatron_router_args(config, pg_collection, is_mtp_layer, layer_number) -> dict:
    """TopKRouter.__init__'s keywords for this Megatron: layer_number only where it takes it
    (Megatron-LM dev builds routers with it; 0.19.2 and main set it later, set_layer_number)."""
    args = {"config": config, "pg_collection": pg_collection, "is_mtp_layer": is_mtp_layer}
    if layer_number is not None and "layer_number" in MEGATRON_ROUTER_INIT:
        args["layer_number"] = layer_number
    return args


def megatron_keywords(taken: frozenset[str], **given) -> dict:
    """The keywords of ``given`` that the Megatron function whose parameters are ``taken``
    accepts (dev's input_ids / packed_seq_params reach 0.19.2's TopKRouter as nothing: it has
    no use for them)."""
    return {name: value for name, value in given.items() if name in taken}


class PluginRouterMixin:
    """Node map and routing metrics for a TopKRouter subclass."""

    name: str
    """The ``--moe-router-type`` that selects this router (the registry's key)."""
    label: str
    """The router's name in tables and reports (e.g. LocMoE+)."""
    locmoe: LocMoEConfig

    # ---- capabilities: what the router is and does, asked instead of its name ----------------
    is_plugin_router = True
    """The plugin's routing (False: Megatron's own TopKRouter, metrics added; the plugin then
    keeps Megatron's dispatcher, experts and balance loss unless told otherwise)."""
    needs_token_ids = False
    """Routes by the input token ids (every pipeline stage hosting it reads the batch's tokens;
    its --locmoe-hash-* settings apply)."""
    builder_args: tuple[str, ...] = ()
    """What ``router_builder`` hands the constructor besides the settings (vocab_size,
    token_counts)."""
    probs_have_grad = True
    """Whether the probabilities carry a gradient (hash routing's are constants)."""
    uses_locmoe_alpha = True
    """Switch-form balance loss with LocMoE's alpha (locmoe, switch); Megatron's own otherwise."""
    has_switch_balance_loss = False
    """Attaches the Switch-form balance loss at LocMoE's alpha (--locmoe-aux-loss-coeff)."""
    has_grap_gate = False
    """LocMoE's GrAP gate (its --locmoe-grap-* settings apply)."""
    has_locality_loss = False
    """LocMoE's locality loss (--locmoe-locality-loss-coeff, --locmoe-locality-smoothing)."""
    has_node_target = False
    """The node-target bias and balance loss (--locmoe-node-target-share,
    --locmoe-node-bias-rate, --locmoe-node-bias-mode)."""
    has_node_selection = False
    """The node margin and the fewest-nodes fill on the choice of experts
    (--locmoe-node-margin, --locmoe-node-fill-mass; routers/node_selection.py)."""
    has_rank_balance_loss = False
    """DeepSeek-V2's communication-balance loss over the EP ranks
    (--locmoe-rank-balance-loss-coeff)."""
    has_outgoing_cap = False
    """FasterMoE's cap on the tokens that leave the node (--locmoe-max-outgoing-fraction)."""
    has_fused_path = False
    """A fused routing path (--locmoe-fused-router, --moe-router-fusion's own path)."""
    has_capacity_bound = False
    """LocMoE's capacity lower bound (--locmoe-capacity-mode bound; auto with a capacity
    factor; --locmoe-capacity-*)."""
    has_affinity_routing = False
    """LocMoE+'s affinity routing and adaptive capacity (its --locmoe-plus-* settings)."""
    default_reestimate_interval = 0
    """K of the capacity re-estimate when --locmoe-capacity-reestimate-interval is not given."""
    default_capacity_factor: float | None = None
    """The capacity factor the simulated cluster's loop gives this router when the run names
    none (routers that need one: switch 1.0, locmoe_plus 1.1, the papers' baselines)."""
    supports_expert_placement = False
    """Expert placement (analysis/placement.py) may permute its experts: its routing reads
    neither the expert index nor the node map, so the placed model is the same function."""
    placement_obstacle = "its routing may read the expert index or the node map"
    """Why not, when ``supports_expert_placement`` is False (placement.py's refusal says it)."""

    @classmethod
    def reads_setting(cls, name: str) -> bool:
        """Whether this router reads LocMoEConfig setting ``name`` (config.ROUTER_SETTINGS: the
        capability that reads it; settings not listed there apply to every router)."""
        capability = ROUTER_SETTINGS.get(name)
        return capability is None or bool(getattr(cls, capability))

    @classmethod
    def capacity_bound_applies(cls, locmoe: LocMoEConfig, tc) -> bool:
        """capacity_mode bound, or auto for a router with the bound and a capacity factor."""
        if locmoe.capacity_mode != "auto":
            return locmoe.capacity_mode == "bound"
        cf = getattr(tc, "moe_expert_capacity_factor", None)
        return cls.has_capacity_bound and cf is not None

    # ---- this router's ``auto`` settings (megatron_locmoe.resolve asks every router) ---------
    @classmethod
    def resolve_settings(cls, locmoe: LocMoEConfig, tc, device_type: str | None) -> dict:
        """setting -> (value, reason) for the settings this router decides: the fused path, the
        capacity mode and the re-estimate interval."""
        return {
            "fused_router": cls._fused_router(locmoe, tc, device_type),
            "capacity_mode": cls._capacity(locmoe, tc),
            "capacity_reestimate_interval": cls._reestimate_interval(locmoe),
        }

    @classmethod
    def _fused_router(cls, locmoe: LocMoEConfig, tc, device_type: str | None) -> tuple[str, str]:
        if not cls.has_fused_path:
            return locmoe.fused_router, f"as given (the {cls.name} router has no fused path)"
        if getattr(tc, "moe_router_fusion", False):
            return "on", "--moe-router-fusion: the locmoe router's own fused path"
        if locmoe.fused_router != "auto":
            return locmoe.fused_router, "as given"
        if device_type == "cuda":
            return "on", "auto: CUDA: " + cls._fused_path(locmoe, tc)
        return "off", f"auto: {device_type or 'unknown'} device: the reference path"

    @classmethod
    def _fused_path(cls, locmoe: LocMoEConfig, tc) -> str:
        """Which fused path a CUDA process takes with these settings."""
        if not kernels.HAVE_TRITON:
            return "one compiled graph (triton is not installed)"
        if kernels.DISABLED:
            return "one compiled graph (LOCMOE_TRITON_ROUTER=0)"
        unfused = [
            what
            for what, on in (
                ("the node-target bias", locmoe.node_target_share),
                ("the node margin", locmoe.node_margin),
                ("the fewest-nodes fill", locmoe.node_fill_mass < 1),
                ("the rank-balance loss", locmoe.rank_balance_loss_coeff),
            )
            if on
        ]
        if unfused:
            return f"the reference path ({' and '.join(unfused)}: no fused path)"
        capacity_mode = cls._capacity(locmoe, tc)[0]
        settled = dataclasses.replace(locmoe, capacity_mode=capacity_mode)
        if not kernels.gate_applies(settled, tc.num_moe_experts):
            return "compiled graphs (the Triton kernels cover the fixed gate without a threshold)"
        if capacity_mode == "bound":
            return (
                "the Triton kernels with the capacity drop (compiled graphs on re-estimate steps)"
            )
        return "the Triton kernels"

    @classmethod
    def _capacity(cls, locmoe: LocMoEConfig, tc) -> tuple[str, str]:
        if locmoe.capacity_mode != "auto":
            return locmoe.capacity_mode, "as given"
        cf = getattr(tc, "moe_expert_capacity_factor", None)
        if cls.has_capacity_bound and cf is not None:
            return "bound", (
                f"auto: --moe-expert-capacity-factor {cf}: LocMoE's lower bound, clamped below "
                "that factor's capacity"
            )
        if cls.has_capacity_bound:
            return "none", "auto: no --moe-expert-capacity-factor: dropless"
        return "none", f"auto: the {cls.name} router's own capacity handling"

    @classmethod
    def _reestimate_interval(cls, locmoe: LocMoEConfig) -> tuple[int, str]:
        if locmoe.capacity_reestimate_interval is not None:
            return locmoe.capacity_reestimate_interval, "as given"
        K = cls.default_reestimate_interval
        return K, f"default of the {cls.name} router" + (
            f": every {K} steps" if K else ": once, on the first batch"
        )

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
        if cls.capacity_bound_applies(locmoe, tc):
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

    def _init_plugin(self, resolution: Resolution, layer_number: int | None = None) -> None:
        """``resolution``: the settings, checked and settled (the layer's, or the one
        ``router_builder`` makes for a router built on its own); ``layer_number``: the one
        Megatron-LM dev builds routers with (kept on a Megatron whose TopKRouter does not take
        it, as dev's does)."""
        if layer_number is not None:
            self.layer_number = layer_number
        if not isinstance(resolution, Resolution):
            raise TypeError(
                f"the {self.name} router is built from a Resolution (checked settings, no auto "
                f"left), got {type(resolution).__name__}: build it with "
                "megatron_locmoe.routers.router_builder(settings), or pass "
                "megatron_locmoe.resolve.settled(settings, config)"
            )
        self.locmoe = resolution.config
        cluster = VirtualCluster.from_config(self.locmoe)
        # on a virtual cluster the node of virtual rank 0 (enter_virtual_rank switches it)
        topo = current_topology() if cluster is None else cluster.topology(0)
        expert_nodes = torch.tensor(topo.expert_nodes(self.config.num_moe_experts))
        # [E] bool: experts hosted on this rank's node. Buffer so it follows .to(device).
        self.register_buffer("expert_is_local", expert_nodes == topo.node, persistent=False)
        self.register_buffer("expert_node", expert_nodes, persistent=False)
        """[E] the node of each expert within the EP group (the same for every rank of it)."""
        self.num_nodes = topo.num_nodes
        self.ep_size = topo.ep_size
        """Ranks of this router's EP group (experts in contiguous blocks, Megatron's order)."""

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

    def forward(
        self,
        input: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        packed_seq_params=None,
    ):
        """The router call of every Megatron the plugin supports: 0.19's MoELayer passes
        ``(hidden, padding_mask)``, Megatron-LM dev's also ``input_ids`` and
        ``packed_seq_params``. [S, B, H] -> probs [T, E] (fp32), routing_map [T, E] bool;
        ``padding_mask`` [S, B] is Megatron's (True on padding). Checks the input on every rank
        together, gives a rank without tokens empty routing, and hands the tokens to the
        router's ``route_tokens``."""
        self.check_input(input)
        if input.numel() == 0:  # Megatron's gating and aux loss fail on an empty rank
            return self.route_no_tokens(input)
        return self.route_tokens(input, padding_mask, input_ids, packed_seq_params)

    def route_tokens(self, input, padding_mask, input_ids, packed_seq_params):
        """Route a non-empty [S, B, H] input (``forward``'s arguments, checked)."""
        raise NotImplementedError(f"{type(self).__name__} defines no route_tokens")

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
