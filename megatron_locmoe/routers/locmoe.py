"""The LocMoE router: GrAP gate, Switch-form balance loss, locality loss, capacity bound.

GrAP (grouped average pooling): split each token's hidden vector into E chunks of d/E values;
the logit of expert i is the mean of chunk i, i.e. a dense gate with the fixed block matrix
W[i, j] = E/d for j in chunk i. Rows have disjoint supports, so the gate is orthogonal by
construction (the capacity theorem needs it) and nothing is learnt by default: the routing
losses train the model through the token activations (the router input is never detached).

Interpretations (docs/design.md §1): optional learnable block-diagonal weights (still orthogonal),
bias and temperature; softmax scores; top-k with k = 1 reproducing the paper and the expert
output scaled by the chosen probability; the locality loss uses this rank's mean routing
probabilities as D_c; delta is averaged over the tensor/data/context-parallel group so every
rank uses the same capacity.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    compute_routing_scores_for_aux_loss,
    get_capacity,
    topk_routing_with_score_function,
)
from megatron.core.transformer.moe.router import TopKRouter

import megatron_locmoe.routers.fused as fused
import megatron_locmoe.routers.kernels as kernels
import megatron_locmoe.routers.node_selection as node_selection
from megatron_locmoe import capacity as bound
from megatron_locmoe import metrics
from megatron_locmoe.config import ConfigError, LocMoEConfig
from megatron_locmoe.graphs import graphs_capture_router
from megatron_locmoe.routers.base import PluginRouterMixin, drop_to_capacity, megatron_router_args
from megatron_locmoe.routers.fused import locality_kl


class LocMoERouter(PluginRouterMixin, TopKRouter):
    """LocMoE routing as a Megatron-Core router (MoESubmodules.router)."""

    name = "locmoe"
    label = "LocMoE"
    has_switch_balance_loss = has_grap_gate = has_locality_loss = has_node_target = True
    has_rank_balance_loss = has_node_selection = True
    has_fused_path = has_capacity_bound = True
    placement_obstacle = (
        "its GrAP gate gives expert i the mean of hidden chunk i, so moving expert i would need "
        "the whole model's hidden dimension permuted"
    )

    @classmethod
    def check_model(cls, locmoe: LocMoEConfig, tc) -> None:
        n = tc.num_moe_experts
        if tc.hidden_size % n:
            raise ConfigError(
                f"GrAP splits the hidden size {tc.hidden_size} into {n} equal chunks, one per "
                f"expert: choose --hidden-size divisible by {n} or a number of experts dividing it"
            )
        super().check_model(locmoe, tc)
        if (
            locmoe.node_bias_mode == "learned"
            and locmoe.node_bias_rate != LocMoEConfig.node_bias_rate
        ):
            raise ConfigError(
                f"--locmoe-node-bias-rate {locmoe.node_bias_rate} steps the node bias, but "
                "--locmoe-node-bias-mode learned trains it with the optimizer (its learning "
                "rate): drop --locmoe-node-bias-rate"
            )
        if locmoe.node_bias_mode != "logits" and locmoe.node_target_share == 0:
            raise ConfigError(
                f"--locmoe-node-bias-mode {locmoe.node_bias_mode} places the node-target bias, "
                "but --locmoe-node-target-share is 0 (no bias): set a target share or drop "
                "--locmoe-node-bias-mode"
            )
        if locmoe.node_fill_mass < 1 and tc.moe_router_topk == 1:
            raise ConfigError(
                f"--locmoe-node-fill-mass {locmoe.node_fill_mass} fills a token's k slots from "
                "the fewest nodes, but with --moe-router-topk 1 every token has one node: drop "
                "the flag or route top-k > 1"
            )
        if locmoe.rank_balance_loss_coeff > 0 and locmoe.ep_ranks(tc) == 1:
            raise ConfigError(
                f"--locmoe-rank-balance-loss-coeff {locmoe.rank_balance_loss_coeff} balances the "
                "tokens the ranks of an EP group receive, but the EP group has one rank: set "
                "--expert-model-parallel-size (or a virtual cluster's EP) above 1, or drop the flag"
            )
        if not cls.capacity_bound_applies(locmoe, tc) and tc.moe_expert_capacity_factor is not None:
            raise ConfigError(
                "--moe-expert-capacity-factor with the locmoe router is the ceiling of LocMoE's "
                "capacity bound, but --locmoe-capacity-mode is none (dropless): use auto or "
                "bound, or remove the factor"
            )

    @classmethod
    def check_capacity_bound(cls, locmoe: LocMoEConfig, tc) -> None:
        cf = tc.moe_expert_capacity_factor
        if cf is None:
            raise ConfigError(
                "capacity_mode='bound' clamps the bound below the capacity-factor ceiling: "
                "set --moe-expert-capacity-factor (e.g. 1.0)"
            )
        if locmoe.capacity_floor_factor > cf:
            raise ConfigError(
                f"capacity floor factor {locmoe.capacity_floor_factor} is above the ceiling "
                f"--moe-expert-capacity-factor {cf}; lower the floor or raise the ceiling"
            )
        if tc.moe_pad_expert_input_to_capacity:
            raise ConfigError(
                "capacity_mode='bound' changes capacity per batch, which padding to the "
                "capacity-factor capacity cannot follow: drop --moe-pad-expert-input-to-capacity"
            )
        K = locmoe.capacity_reestimate_interval
        K = cls.default_reestimate_interval if K is None else K
        if K > 0 and graphs_capture_router(tc):
            raise ConfigError(
                f"the capacity is re-estimated every {K} steps, on the host, but "
                "--cuda-graph-impl captures the router, whose replays would keep the first "
                "capacity: leave moe_router/moe_preprocess/moe out of --cuda-graph-modules, or "
                "set --locmoe-capacity-reestimate-interval 0"
            )

    def __init__(
        self, config, pg_collection=None, is_mtp_layer=False, layer_number=None, *, locmoe=None
    ):
        super().__init__(**megatron_router_args(config, pg_collection, is_mtp_layer, layer_number))
        self._init_plugin(locmoe, layer_number)
        E, H = config.num_moe_experts, config.hidden_size
        cfg = self.locmoe
        # GrAP replaces Megatron's dense [E, H] gate (and its bias) by [E, H/E] block weights.
        del self.weight, self.bias
        self.bias = None
        block = torch.full((E, H // E), E / H, dtype=torch.float32)
        if cfg.grap_mode == "learnable":
            self.weight = torch.nn.Parameter(block)
            self.weight.sequence_parallel = config.sequence_parallel
        else:
            self.register_buffer("weight", block, persistent=False)
        self.grap_bias = torch.nn.Parameter(torch.zeros(E)) if cfg.grap_bias else None
        log_t = torch.tensor(math.log(cfg.grap_temperature))
        if cfg.grap_learnable_temperature:
            self.grap_log_temperature = torch.nn.Parameter(log_t)
        else:
            self.register_buffer("grap_log_temperature", log_t, persistent=False)
        for p in (self.grap_bias, self.grap_log_temperature):
            if isinstance(p, torch.nn.Parameter):
                p.sequence_parallel = config.sequence_parallel
        # what _kernels_apply needs besides the device, decided once
        self._kernel_gate = kernels.gate_applies(cfg, E)
        self.locality_on = (  # mu > 0 and this node hosts some but not all experts
            cfg.locality_loss_coeff > 0 and 0 < int(self.expert_is_local.sum()) < E
        )
        L = int(self.expert_is_local.sum())
        self.node_bias_on = node_selection.node_bias_applies(cfg, self.expert_is_local)
        # the node bias on the logits (and the node-aware balance target), or on selection only
        self.node_logit_bias_on = self.node_bias_on and cfg.node_bias_mode != "selection"
        self.node_bias_learned = self.node_bias_on and cfg.node_bias_mode == "learned"
        self.selection_bias_on = 0 < L < E and (
            cfg.node_margin > 0 or (self.node_bias_on and cfg.node_bias_mode == "selection")
        )
        if self.node_bias_learned:  # TA-MoE's offset: one parameter, the same on every rank;
            # 1-D, so Megatron's optimizer leaves it out of weight decay, as it does biases
            self.node_bias = torch.nn.Parameter(torch.zeros(1))
            self.node_bias.sequence_parallel = config.sequence_parallel
        elif self.node_bias_on:  # saved in checkpoints; only then, so other state dicts keep keys
            self.register_buffer("node_bias", torch.tensor(0.0))
        if self.node_logit_bias_on:
            weight_E = self._node_aux_weight(self.expert_is_local)
            self.register_buffer("node_aux_weight", weight_E, persistent=False)
        self.rank_balance_on = cfg.rank_balance_loss_coeff > 0 and self.ep_size > 1
        self.fill_on = cfg.node_fill_mass < 1 and self.num_nodes > 1 and self.topk > 1
        if self.fill_on:
            node_selection.check_blocks(self.expert_node, self.num_nodes)
        # Capacity state, saved in checkpoints: delta, ec_min and the training step they came from.
        self.register_buffer("capacity_delta", torch.tensor(-1.0, dtype=torch.float64))
        self.register_buffer("capacity_ec_min", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("capacity_estimated_step", torch.tensor(-1, dtype=torch.long))
        self.register_buffer("routing_step", torch.tensor(0, dtype=torch.long))
        # the Triton forward's finish-line counter (kernels.route), zero between launches
        self.register_buffer("route_ticket", torch.zeros((), dtype=torch.int32), persistent=False)
        self._capacity_host: dict | None = None
        self._capacity_tensors: dict = {}
        self._capacity_plans: dict = {}
        self._virtual_delta_sum = [0.0, 0.0, 0]  # delta sum, ranks with tokens, ranks seen
        self._init_virtual()

    per_rank_host = ("_capacity_host",)

    @property
    def pre_softmax(self) -> bool:
        """The chosen experts' gate values: the softmax over all E experts (pre) or over the
        chosen k (Megatron's default at top-k > 1; top-1 needs pre, Megatron's config says so)."""
        return bool(self.config.moe_router_pre_softmax)

    def _node_aux_weight(self, expert_is_local_E: torch.Tensor) -> torch.Tensor:
        """Balance-loss weights 1 / (E t_i) of the node target: t = p* / L on the node's L
        experts, (1 - p*) / (E - L) on the others."""
        E, L = expert_is_local_E.numel(), int(expert_is_local_E.sum())
        p = self.locmoe.node_target_share
        t_E = torch.where(expert_is_local_E, p / L, (1.0 - p) / (E - L))
        return 1.0 / (E * t_E)

    def per_rank_tables(self, expert_is_local_VE: torch.Tensor) -> dict[str, torch.Tensor]:
        tables = super().per_rank_tables(expert_is_local_VE)
        if self.node_logit_bias_on:
            tables["node_aux_weight"] = torch.stack(
                [self._node_aux_weight(row) for row in expert_is_local_VE]
            ).to(self.node_aux_weight.device)
        return tables

    def per_rank_buffers(self) -> tuple[str, ...]:
        """The node bias (each rank steers its own share) and the capacity state with its step
        counter (each rank counts its own routing steps); only where these settings use them."""
        names = ("node_bias",) if self.node_bias_on and not self.node_bias_learned else ()
        if self.locmoe.capacity_mode == "bound":
            names += self.CAPACITY_STATE + ("routing_step",)
        return names

    CAPACITY_STATE = ("capacity_delta", "capacity_ec_min", "capacity_estimated_step")

    # ---- Megatron hooks ---------------------------------------------------------------------
    def reset_parameters(self):
        """Nothing: Router.__init__ calls this for the dense gate that GrAP then replaces; the
        block weights are initialised in __init__."""

    def _load_from_state_dict(self, *args, **kwargs):
        self._capacity_host = None  # re-read the loaded capacity buffers once
        return super()._load_from_state_dict(*args, **kwargs)

    # ---- gate -------------------------------------------------------------------------------
    def gate_tensors(self) -> tuple:
        """(weight, log temperature, bias or None) as the routing paths read them: a fixed
        part (a buffer) as ``.data``, whose version counter is its own, so that Megatron's
        local CUDA graphs, which copy every buffer back in place (same values) between
        capturing a layer's forward and its backward, leave the saved tensors valid."""
        weight, log_temperature = self.weight, self.grap_log_temperature
        if not isinstance(weight, torch.nn.Parameter):
            weight = weight.data
        if not isinstance(log_temperature, torch.nn.Parameter):
            log_temperature = log_temperature.data
        return weight, log_temperature, self.grap_bias  # the bias is learnable or None

    def grap_raw(self, input_SBH: torch.Tensor) -> torch.Tensor:
        """W x for the block gate, fp32: [S, B, H] -> [S, B, E]."""
        E = self.config.num_moe_experts
        x = input_SBH.float().unflatten(-1, (E, -1))  # [S, B, E, H/E]
        return (x * self.gate_tensors()[0].to(x.device)).sum(-1)

    def logits_from_raw(self, raw: torch.Tensor) -> torch.Tensor:
        """Temperature and optional bias on top of W x."""
        _, log_temperature, bias = self.gate_tensors()
        logits = raw * log_temperature.exp()
        return logits + bias if bias is not None else logits

    def gating(self, input_SBH: torch.Tensor) -> torch.Tensor:
        return self.logits_from_raw(self.grap_raw(input_SBH))

    def gate_row_cosines(
        self, input_TH: torch.Tensor, raw_TE: torch.Tensor, expert_T: torch.Tensor
    ):
        """cos(token, gate row of its expert): (w_e . x) / (|w_e| |x|), [T]."""
        row_norm_E = self.weight.float().norm(dim=-1).to(raw_TE.device)
        x_norm_T = input_TH.float().norm(dim=-1).clamp_min(1e-30)
        return raw_TE.gather(1, expert_T[:, None]).squeeze(1) / (row_norm_E[expert_T] * x_norm_T)

    # ---- capacity ---------------------------------------------------------------------------
    def _host_state(self) -> dict:
        """Host mirror of the capacity buffers, read once (after init or a checkpoint load) and
        then kept in step, so the forward never waits on the device for them."""
        if self._capacity_host is None:
            self._capacity_host = dict(
                ec_min=float(self.capacity_ec_min),
                estimated=int(self.capacity_estimated_step),
                step=int(self.routing_step),
            )
        return self._capacity_host

    def _capacity_due(self) -> bool:
        """First batch always; then every K training steps in LocMoE+ mode (K > 0)."""
        host, K = self._host_state(), self.locmoe.capacity_reestimate_interval
        if host["estimated"] < 0:
            return True
        return self.training and K > 0 and host["step"] - host["estimated"] >= K

    def routed_cosines(self, input_TH, gate_TE, routing_map_TE) -> torch.Tensor:
        """cos(token, gate row of its first routed expert), [T]: what delta is estimated from.
        ``gate_TE`` is the gate's output the routing ranked (here W x)."""
        expert_T = gate_TE.masked_fill(~routing_map_TE, -math.inf).argmax(-1)
        return self.gate_row_cosines(input_TH, gate_TE, expert_T)

    @torch.no_grad()
    def estimate_capacity_bound(self, input_TH, gate_TE, routing_map_TE) -> None:
        """delta from this batch (averaged over the tp-dp-cp group's ranks that have tokens),
        then ec_min; a rank without tokens contributes nothing but joins the all-reduce."""
        if gate_TE.shape[0]:
            cos_T = self.routed_cosines(input_TH, gate_TE, routing_map_TE)
            local = [bound.estimate_delta(cos_T, self.locmoe.capacity_percentile), 1.0]
        else:
            local = [0.0, 0.0]
        delta = torch.tensor(local, dtype=torch.float64, device=gate_TE.device)
        group = self.tp_dp_cp_group
        if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(delta, group=group)
        total, with_tokens, complete = self._virtual_delta(delta)
        host = self._host_state()
        if with_tokens == 0:  # no rank had tokens: nothing to estimate from yet
            return
        value = total / with_tokens
        host["ec_min"] = bound.ec_min(self.config.hidden_size, self.config.num_moe_experts, value)
        self._capacity_plans.clear()  # keyed by ec_min: the old ones are not asked again
        host["estimated"] = host["step"]
        self.capacity_delta.fill_(value)
        self.capacity_ec_min.fill_(host["ec_min"])
        self.capacity_estimated_step.fill_(host["estimated"])
        if complete and self._virtual_bank is not None:  # every virtual rank: the full mean
            self._virtual_bank.broadcast(
                self, buffers=self.CAPACITY_STATE, host_fields={"_capacity_host": ("ec_min",)}
            )

    def _virtual_delta(self, delta: torch.Tensor) -> tuple[float, float, bool]:
        """(sum of delta over the ranks with tokens, their number, whether every rank is in).

        A real cluster all-reduces delta over its data-parallel ranks, which all estimate in
        the same micro step. On the virtual cluster those ranks route one after the other, so
        virtual rank v uses the mean over ranks 0..v for its micro-batch of that step: the
        one quantity that differs from the real cluster, and only for that micro-batch of
        ranks 0..V-2 (where the capacity is clamped to its floor or ceiling, not at all). The
        last rank completes the mean, which then becomes every rank's state."""
        if self._virtual_bank is None:
            return delta[0].item(), delta[1].item(), True
        acc = self._virtual_delta_sum
        acc[0] += delta[0].item()
        acc[1] += delta[1].item()
        acc[2] += 1
        total, with_tokens = acc[0], acc[1]
        complete = acc[2] == self._virtual_bank.ranks
        if complete:
            self._virtual_delta_sum = [0.0, 0.0, 0]
        return total, with_tokens, complete

    capacity_multiplier = 1.0
    """C* times this is the capacity asked of the bound (locmoe_plus: 2, the paper's 2C*)."""

    def capacity_ceiling(self, num_tokens: int) -> int:
        """The capacity-factor capacity the bound never exceeds."""
        k, E = self.topk, self.config.num_moe_experts
        return get_capacity(num_tokens * k, E, self.config.moe_expert_capacity_factor)

    def capacity_for(self, num_tokens: int) -> int:
        """C = clamp(ceil(m * ec_min), floor, ceiling) for this batch's T tokens (m: the
        capacity multiplier)."""
        k, E = self.topk, self.config.num_moe_experts
        ceiling = self.capacity_ceiling(num_tokens)
        floor = bound.floor_capacity(self.locmoe.capacity_floor_factor, num_tokens, k, E)
        asked = self.capacity_multiplier * self._host_state()["ec_min"]
        return bound.clamp_capacity(asked, min(floor, ceiling), ceiling)

    def capacity_plan(self, num_tokens: int) -> tuple[int, bool]:
        """(capacity_for(T), whether it binds below the ceiling: the expert-choice flag), kept
        per (T, ec_min): the fused paths ask every call and the answer changes only on a
        re-estimate."""
        key = (num_tokens, self._host_state()["ec_min"])
        plan = self._capacity_plans.get(key)
        if plan is None:
            capacity = self.capacity_for(num_tokens)
            plan = self._capacity_plans[key] = (
                capacity,
                capacity < self.capacity_ceiling(num_tokens),
            )
        return plan

    # ---- routing ----------------------------------------------------------------------------
    def _fused_applies(self, padding_mask) -> bool:
        """The fused path covers the paper's setting; padding masks, z-loss, top-k scaling and
        a capacity with gate values over the chosen k (the drop ranks those) take the
        reference path."""
        cfg = self.config
        return (
            self.locmoe.fused_router == "on"
            and padding_mask is None
            and (self.pre_softmax or self.locmoe.capacity_mode != "bound")
            and not cfg.moe_z_loss_coeff
            and cfg.moe_router_topk_scaling_factor is None
            and not self.node_bias_on
            and not self.selection_bias_on
            and not self.fill_on
            and not self.rank_balance_on
        )

    use_kernels = True
    """Whether the fused path may take the Triton kernels (False: the compiled graph, e.g. to
    compare the two in one process; LOCMOE_TRITON_ROUTER=0 does it for every router)."""

    def _kernels_apply(self, device: torch.device) -> bool:
        """The Triton kernels cover the paper's gate: fixed block weights, no bias, a fixed
        temperature, no LocMoE+ threshold (the compiled graphs take the rest)."""
        return self.use_kernels and self._kernel_gate and kernels.available(device)

    def loss_spec(self) -> fused.LossSpec:
        """The fused path's loss settings: the reference path's _apply_aux_loss (with Megatron's
        MTP and per-token scaling) and _apply_locality_loss, as constants."""
        cfg, mc = self.locmoe, self.config
        repeated_mtp = self.is_mtp_layer and mc.mtp_use_repeated_layer and mc.mtp_num_layers
        return fused.LossSpec(
            topk=self.topk,
            aux_coeff=self.get_aux_loss_coeff("aux_loss"),
            aux_scale=1.0 / mc.mtp_num_layers if repeated_mtp else 1.0,
            locality_coeff=self._locality_coeff() if self.locality_on else 0.0,
            locality_eps=cfg.locality_smoothing,
        )

    def route_tokens(self, input, padding_mask, input_ids, packed_seq_params):
        """probs [T, E] (fp32, zero off the map), routing_map [T, E] bool; padding tokens are
        left out of the balance and locality losses. ``input_ids`` and ``packed_seq_params``
        are not read: the gate sees the hidden states only."""
        del input_ids, packed_seq_params
        if self._fused_applies(padding_mask):
            probs_TE, routing_map_TE = self._fused_forward(input)
            if not self.pre_softmax:  # dropless here: the chosen k's softmax, renormalised
                probs_TE = probs_TE / probs_TE.sum(-1, keepdim=True)
            return probs_TE, routing_map_TE
        return self._reference_forward(input, padding_mask)

    def _fused_forward(self, input: torch.Tensor):
        """The whole routing step in Triton kernels (the paper's gate; a capacity drop on steps
        without a re-estimate), else one compiled graph (other gates; a capacity on steps
        without a re-estimate) or three (the re-estimate between gate and drop); one loss
        attachment and one metric write per layer."""
        x_TH = input.reshape(-1, self.config.hidden_size)
        T = x_TH.shape[0]
        with_losses = self.training and torch.is_grad_enabled()
        spec = self.loss_spec()
        # Megatron's calculate_per_token_loss factor on the attached losses (reference path)
        loss_scale = float(T * self.tp_cp_group.size()) if self.calculate_per_token_loss else 1.0
        bounded = self.locmoe.capacity_mode == "bound"
        if bounded and self._capacity_due():
            probs_TE, routing_map_TE, attached, aux, vector = self._reestimate_forward(
                x_TH, spec, with_losses
            )
        else:
            capacity, expert_choice = self.capacity_plan(T) if bounded else (None, False)
            if self._kernels_apply(x_TH.device):
                drop = kernels.Capacity(capacity, expert_choice) if bounded else None
                count = bounded and with_losses  # the drop counts the step on the device
                probs_TE, routing_map_TE = self._kernel_forward(
                    x_TH, spec, with_losses, loss_scale, drop, count
                )
                if count:
                    self._count_routing_step(on_device=False)
                return probs_TE, routing_map_TE  # losses and metrics applied in the kernels
            probs_TE, routing_map_TE, attached, aux, vector = self._graph_forward(
                x_TH, spec, with_losses, capacity, expert_choice
            )
        if bounded and with_losses:  # after the re-estimate read this step's number
            self._count_routing_step()
        if with_losses and spec.aux_coeff:
            self._record_aux_loss(aux / spec.aux_coeff)
        if with_losses and (spec.aux_coeff or spec.locality_coeff):
            if loss_scale != 1.0:
                attached = attached * loss_scale
            probs_TE = MoEAuxLossAutoScaler.apply(probs_TE, attached)
        metrics.record_vector(self, metrics.ROUTER_METRICS, vector)
        return probs_TE, routing_map_TE

    def _graph_forward(self, x_TH, spec, with_losses: bool, capacity, expert_choice: bool):
        """One compiled graph: dropless, or the drop at ``capacity`` (a step without a
        re-estimate). Returns (probs, routing map, attached loss, aux loss, metric vector)."""
        gate = self.gate_tensors()
        if capacity is None:
            probs_TE, routing_map_TE, _, attached, aux, vector = fused.run(
                fused.route_with_losses,
                x_TH.device,
                x_TH,
                *gate,
                *self._statistics_inputs(),
                spec,
                self.tp_cp_group,
                with_losses,
            )
            return probs_TE, routing_map_TE, attached, aux, vector
        return fused.run(
            fused.capacity_route_with_losses,
            x_TH.device,
            x_TH,
            *gate,
            *self._statistics_inputs(),
            self._capacity_tensor(capacity, x_TH.device),
            spec,
            self.tp_cp_group,
            with_losses,
            self.has_affinity_routing,
            self.locmoe.plus_affinity_threshold,
            expert_choice,
        )

    def _reestimate_forward(self, x_TH, spec, with_losses: bool):
        """Three compiled graphs: gate and token choice, then (on the host) the capacity
        re-estimated from this batch, then the drop, the losses and the metrics."""
        gate = self.gate_tensors()
        gate_TE, probs_TE, routing_map_TE, scores_TE = self.fused_route(x_TH, gate)
        self.estimate_capacity_bound(x_TH, gate_TE, routing_map_TE)
        capacity, expert_choice = self.capacity_plan(x_TH.shape[0])
        map_aux_TE = routing_map_TE
        probs_TE, routing_map_TE, dropped = drop_to_capacity(
            probs_TE, routing_map_TE, capacity, self.drop_priority(probs_TE, gate_TE)
        )
        attached = aux = kl = probs_TE.new_zeros(())
        if with_losses:
            attached, aux, kl = fused.run(
                fused.routing_losses,
                x_TH.device,
                scores_TE,
                map_aux_TE,
                self.expert_is_local,
                spec,
                self.tp_cp_group,
            )
        vector = fused.run(
            fused.router_metric_vector,
            x_TH.device,
            probs_TE,
            routing_map_TE,
            self.expert_is_local,
            dropped,
            capacity,
            kl,
            self.capacity_delta,
            self.capacity_ec_min,
            expert_choice,
        )
        return probs_TE, routing_map_TE, attached, aux, vector

    def _capacity_tensor(self, capacity: int, device: torch.device) -> torch.Tensor:
        """The capacity as a 0-d device tensor, made once per value (no copy per call)."""
        key = (capacity, device)
        if key not in self._capacity_tensors:
            self._capacity_tensors[key] = torch.tensor(capacity, device=device)
        return self._capacity_tensors[key]

    def fused_route(self, x_TH: torch.Tensor, gate: tuple):
        """Gate, scores and token choice of the capacity path, compiled on CUDA: (what the
        routing ranked [T, E], probs, routing map, aux-loss scores)."""
        return fused.route(x_TH, *gate, self.topk)

    def drop_priority(self, probs_TE: torch.Tensor, gate_TE: torch.Tensor) -> torch.Tensor:
        """What the capacity drop ranks an expert's tokens by: the probability (Megatron's
        drop policy ``probs``)."""
        return probs_TE

    def _no_token_collectives(self, routing_map_TE: torch.Tensor) -> None:
        """The capacity estimate all-reduces over the tp-dp-cp group when it is due, and the
        step counter that decides when must stay in step with the other ranks."""
        if self.locmoe.capacity_mode != "bound":
            return
        if self._capacity_due():
            E = self.config.num_moe_experts
            empty_TE = routing_map_TE.new_zeros(0, E, dtype=torch.float32)
            self.estimate_capacity_bound(empty_TE[:, :0], empty_TE, routing_map_TE)
        if self.training and torch.is_grad_enabled():
            self._count_routing_step()

    def _statistics_inputs(self):
        """What the fused paths' loss and metric epilogues read besides the routing: the node
        map and the capacity state (for the metrics)."""
        return self.expert_is_local, self.capacity_delta, self.capacity_ec_min

    def _kernel_forward(
        self, x_TH, spec, with_losses: bool, loss_scale: float, drop, count_step: bool = False
    ):
        """The Triton kernels: losses reach the gradient and metrics reach the tracker inside
        them (no scaler node, no record kernels). ``drop``: a ``kernels.Capacity`` or None;
        ``count_step``: the drop adds this step to ``routing_step`` (no launch of its own)."""
        slots, slot = None, metrics.layer_slot(self)
        if slot is not None:
            column, num_layers = slot
            lb_values = None
            if with_losses and spec.aux_coeff:
                lb_values = metrics.megatron_entry(
                    metrics.LOAD_BALANCING_LOSS, num_layers, x_TH.device, self.tp_cp_group
                )
            block = metrics.tracker_block(metrics.ROUTER_METRICS, num_layers, x_TH.device)
            slots = kernels.TrackerSlots(block, lb_values, column)
        probs_TE, routing_map_TE, _ = kernels.route(
            x_TH,
            *self.gate_tensors()[:2],
            *self._statistics_inputs(),
            spec,
            self.tp_cp_group,
            with_losses,
            loss_scale,
            slots,
            self.route_ticket,
            self.has_affinity_routing,
            drop,
            self.routing_step if count_step else None,
        )
        return probs_TE, routing_map_TE

    def _record_aux_loss(self, value: torch.Tensor) -> None:
        """Megatron's load_balancing_loss entry, as attach_and_log_load_balancing_loss writes it
        (summed over the tensor/context-parallel group at report time)."""
        slot = metrics.layer_slot(self)
        if slot is not None:
            column, num_layers = slot
            get_moe_metrics_tracker().record(
                metrics.LOAD_BALANCING_LOSS,
                value,
                column + 1,
                num_layers,
                reduce_group=self.tp_cp_group,
                needs_dp_avg=True,
            )

    def _count_routing_step(self, on_device: bool = True) -> None:
        """One more routing step, on the host mirror and (unless the drop kernel counted it
        already: ``on_device=False``) in the buffer."""
        if on_device:
            self.routing_step.add_(1)  # in place: no Module.__setattr__ per call
        self._host_state()["step"] += 1

    def _reference_forward(self, input: torch.Tensor, padding_mask: torch.Tensor | None):
        """Through Megatron's helpers, op by op (padding masks, z-loss, top-k scaling)."""
        cfg = self.locmoe
        if padding_mask is not None:
            padding_mask = padding_mask.reshape(-1)
        gate_TE, logits_TE = self.reference_gate(input)
        if self.node_logit_bias_on:
            logits_TE = logits_TE + self.node_bias * self.expert_is_local
        logits_TE = self.apply_z_loss(logits_TE, padding_mask=padding_mask)
        probs_TE, routing_map_TE = self.token_choice(logits_TE, self._selection_logits(logits_TE))
        T = routing_map_TE.shape[0]

        dropped, capacity, expert_choice = routing_map_TE.new_zeros((), dtype=torch.long), 0, False
        if cfg.capacity_mode == "bound":
            if self._capacity_due():
                self.estimate_capacity_bound(input.reshape(T, -1), gate_TE, routing_map_TE)
            capacity = self.capacity_for(T)
            expert_choice = capacity < self.capacity_ceiling(T)
            probs_TE, routing_map_TE, dropped = drop_to_capacity(
                probs_TE, routing_map_TE, capacity, self.drop_priority(probs_TE, gate_TE)
            )

        locality = torch.zeros((), device=probs_TE.device)
        if self.training and torch.is_grad_enabled():
            map_aux_TE, scores_TE = self.aux_routing(logits_TE, padding_mask)
            # with the node bias, sum f_i P_i / (E t_i): balanced against the node-aware target
            aux_scores_TE = (
                scores_TE * self.node_aux_weight if self.node_logit_bias_on else scores_TE
            )
            probs_TE = self._apply_aux_loss(
                probs_TE, aux_scores_TE, map_aux_TE, with_padding_mask=padding_mask is not None
            )
            probs_TE, locality = self._apply_locality_loss(probs_TE, scores_TE, padding_mask)
            if self.rank_balance_on:
                probs_TE = self._apply_rank_balance_loss(
                    probs_TE, scores_TE, routing_map_TE, padding_mask
                )
            if cfg.capacity_mode == "bound":
                self._count_routing_step()
            if self.node_bias_on and not self.node_bias_learned:
                node_selection.step_node_bias(self, routing_map_TE, padding_mask)
        self.record_routing_metrics(
            probs_TE,
            routing_map_TE,
            dropped,
            capacity,
            locality.detach(),
            self.capacity_delta,
            self.capacity_ec_min,
            expert_choice,
        )
        return probs_TE, routing_map_TE

    def reference_gate(self, input: torch.Tensor):
        """(what the routing ranks [T, E], the logits [T, E]) of the reference path."""
        raw_TE = self.grap_raw(input).view(-1, self.config.num_moe_experts)
        return raw_TE, self.logits_from_raw(raw_TE)

    def aux_routing(self, logits_TE: torch.Tensor, padding_mask):
        """(routing map, scores) the balance and locality losses see: Megatron's."""
        return compute_routing_scores_for_aux_loss(
            logits_TE, self.topk, "softmax", padding_mask=padding_mask
        )

    def token_choice(self, logits_TE: torch.Tensor, selection_TE: torch.Tensor | None = None):
        """Top-k of the logits, or of ``selection_TE`` where the choice ranks something else
        (``_selection_logits``): (probs, routing map). The gate values are Megatron's for the
        chosen experts: with --moe-router-pre-softmax (top-1: always) the softmax over all
        experts, as the paper; without it the softmax over the chosen k logits (they sum to 1,
        as Megatron's router's do); scaled by --moe-router-topk-scaling-factor."""
        chosen_TK = None
        if selection_TE is not None:
            chosen_TK = torch.topk(selection_TE, k=self.topk, dim=1).indices
        return topk_routing_with_score_function(
            logits_TE,
            self.topk,
            use_pre_softmax=self.pre_softmax,
            scaling_factor=self.config.moe_router_topk_scaling_factor,
            score_function="softmax",
            precomputed_indices=chosen_TK,
        )

    def _selection_logits(self, logits_TE: torch.Tensor) -> torch.Tensor | None:
        """[T, E] what the choice of experts ranks (routers/node_selection.py: the margin, the
        node bias under node_bias_mode selection, the fewest-nodes fill); None where it is the
        logits themselves."""
        if not (self.selection_bias_on or self.fill_on):
            return None
        bias = self.locmoe.node_margin if self.selection_bias_on else 0.0
        if self.selection_bias_on and self.node_bias_on and not self.node_logit_bias_on:
            bias = self.node_bias + bias
        mass = self.locmoe.node_fill_mass if self.fill_on else 1.0
        return node_selection.selection_scores(logits_TE, self, bias, mass, True)

    def _apply_rank_balance_loss(self, probs_TE, scores_TE, routing_map_TE, padding_mask):
        """Attach alpha_r * sum_r f_r P_r over the EP group's R ranks (DeepSeek-V2's
        communication-balance loss): f_r = R x this micro-batch's token copies sent to rank r
        (one per token and rank) / all its copies, P_r = the mean probability of rank r's
        experts over the tokens ``padding_mask`` [T] (True on padding) leaves valid."""
        T, E = scores_TE.shape
        R = self.ep_size
        valid_T = torch.ones(T, dtype=torch.bool, device=scores_TE.device)
        if padding_mask is not None:
            valid_T = ~padding_mask.bool()
        with torch.no_grad():
            sent_TR = (routing_map_TE & valid_T[:, None]).view(T, R, E // R).any(-1)
            f_R = R * sent_TR.sum(0).float() / sent_TR.sum().clamp_min(1)
        w_T = valid_T.to(scores_TE.dtype)
        P_R = (scores_TE.view(T, R, E // R).sum(-1) * w_T[:, None]).sum(0) / w_T.sum().clamp_min(1)
        size = self.tp_cp_group.size() if self.tp_cp_group is not None else 1
        loss = self.locmoe.rank_balance_loss_coeff / size * (f_R * P_R).sum()
        if self.calculate_per_token_loss:
            loss = loss * T * size
        return MoEAuxLossAutoScaler.apply(probs_TE, loss)

    def _locality_coeff(self) -> float:
        """mu over the tensor/context-parallel size: under SP / CP each of those ranks attaches
        the loss of its own shard and their gradients add up, so each counts 1/size of the
        micro-batch's (as Megatron scales its z-loss); otherwise the loss counted size times."""
        size = self.tp_cp_group.size() if self.tp_cp_group is not None else 1
        return self.locmoe.locality_loss_coeff / size

    def _apply_locality_loss(self, probs_TE, scores_TE, padding_mask):
        """Attach mu * KL(D_c || D_l) to the probs (Megatron's aux-loss autograd scaler);
        D_c averages the tokens that ``padding_mask`` [T] (True on padding) leaves valid."""
        if not self.locality_on:
            return probs_TE, torch.zeros((), device=probs_TE.device)
        if padding_mask is not None:
            valid_T = (~padding_mask.bool()).to(scores_TE.dtype)
            mean_E = (scores_TE * valid_T[:, None]).sum(0) / valid_T.sum().clamp_min(1)
        else:
            mean_E = scores_TE.mean(0)
        kl = locality_kl(mean_E, self.expert_is_local, self.locmoe.locality_smoothing)
        loss = self._locality_coeff() * kl
        if self.calculate_per_token_loss:
            loss = loss * probs_TE.shape[0] * self.tp_cp_group.size()
        return MoEAuxLossAutoScaler.apply(probs_TE, loss), kl
