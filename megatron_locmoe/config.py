"""LocMoE settings in one dataclass, validated against Megatron's TransformerConfig.

Interpretations where the paper is silent (docs/design.md §1) are recorded beside each field. Every
invalid value raises ConfigError naming the value and the fix; field docstrings double as CLI
help when the Megatron adaptor turns the fields into ``--locmoe-*`` flags.

A floor: this module imports nothing of the plugin. ``LocMoEConfig.check_values`` holds the rules
that need only the settings and the model; the rules that need the router registry or the
dispatcher are ``megatron_locmoe.validation.validate``'s, which calls this one first.
"""

import math
import numbers
import types
from dataclasses import dataclass, field, fields
from typing import Literal, get_args, get_origin


def grouped_experts_unsupported(transformer_config) -> list[str]:
    """The settings the grouped experts (torch._grouped_mm) cannot run with; empty if none."""
    tc = transformer_config
    return [
        why
        for why, bad in (
            ("expert linear biases (--disable-bias-linear)", tc.add_bias_linear),
            ("fp8/fp4 (use transformer-engine's grouped MLP)", tc.fp8 or getattr(tc, "fp4", None)),
            ("the TE activation module", getattr(tc, "use_te_activation_func", False)),
        )
        if bad
    ]


def sdpa_attention_unsupported(transformer_config) -> list[str]:
    """The settings the plugin's SDPA core attention (torch's scaled_dot_product_attention) does
    not run with; empty if none."""
    tc = transformer_config
    return [
        why
        for why, bad in (
            (
                "--transformer-impl transformer_engine (TE's own fused attention runs there)",
                getattr(tc, "transformer_impl", "local") == "transformer_engine",
            ),
            (
                "--context-parallel-size > 1 (the local spec's CP attention runs there)",
                getattr(tc, "context_parallel_size", 1) > 1,
            ),
            ("sliding-window attention (--window-size)", getattr(tc, "window_size", None)),
            (
                f"--softmax-type {getattr(tc, 'softmax_type', 'vanilla')}",
                getattr(tc, "softmax_type", "vanilla") != "vanilla",
            ),
        )
        if bad
    ]


class ConfigError(ValueError):
    """An invalid LocMoE setting: the message names the value and what to change."""


def _fits(value, annotation) -> bool:
    """Whether value has the type of a field's annotation (int, float, bool, str, X | None).

    Strict where a wrong type would be taken silently or fail later without the field's name:
    an int field refuses 2.5, "3" and bools (True would count as 1); a float field takes an
    int (as Python's numeric tower does) but neither a string nor a bool; a bool field takes
    only True/False ("no" is truthy). NumPy scalars count as the Python type they hold.
    """
    if isinstance(annotation, types.UnionType):
        return any(_fits(value, a) for a in get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return True  # Literal fields are checked against their values


def _type_name(annotation) -> str:
    """int, float, bool, str or 'int or None' for a field's annotation."""
    if isinstance(annotation, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(annotation))
    return "None" if annotation is type(None) else annotation.__name__


@dataclass
class LocMoEConfig:
    router_type: str = "megatron"
    """Router of every MoE layer, a key of megatron_locmoe.routers.ROUTERS (the registry checks
    the name): megatron
    (Megatron's TopKRouter, the default), locmoe, locmoe_plus (LocMoE+'s affinity routing and
    adaptive capacity), hash (Hash Layers), switch."""

    # ---- losses -------------------------------------------------------------------------------
    aux_loss_coeff: float = 0.01
    """alpha of the Switch-form load-balancing loss of the locmoe and switch routers (paper:
    0.01). The megatron router keeps Megatron's --moe-aux-loss-coeff."""
    locality_loss_coeff: float = 0.1
    """mu of the locality loss mu * KL(D_c || D_l); 0 switches it off. The paper gives no value:
    0.1 is the best trade-off of the locality sweep (docs/reproduction.md: the node-local share
    rises with mu up to 0.1 at no held-out loss, beyond it the loss grows)."""
    locality_smoothing: float = 1e-3
    """epsilon of the smoothed fully-local distribution D_l: (1-eps)/L on the L experts of the
    token's node, eps/(n-L) elsewhere (forward KL to an unsmoothed D_l is infinite)."""

    node_target_share: float = 0.0
    """Ours, after TA-MoE (arXiv 2302.09915), for loaders that give every node the same mixture
    (where no router that sees only the token beats 1/nodes): target node-local share p* of
    the locmoe router (and of Megatron's, with node_bias_mode selection); 0 switches it off.
    A bias on the logits of the node's own experts is
    adapted each training step towards p*, and the balance loss measures each rank's load
    against the node-aware target (p* over the local experts, 1 - p* over the others) instead
    of uniform; with the same p* on every node every expert gets the same load."""
    node_bias_rate: float = 0.1
    """Step size of that bias: bias += rate * (p* - this batch's node-local share) per step."""
    node_bias_mode: Literal["logits", "selection", "learned"] = "logits"
    """Where that bias acts. logits: on the logits, so it changes which experts a token picks
    and their gate values, and the balance loss measures load against the node-aware target.
    selection (after DeepSeek-V3's aux-loss-free balancing): only on which experts are picked;
    the gate values and the balance loss (uniform target) are the unbiased logits'. learned
    (TA-MoE's per-node gate offset): on the logits, a parameter trained by the optimizer on the
    node-aware balance loss (TA-MoE's topology-aware loss) instead of stepped at
    node_bias_rate. Needs node_target_share > 0."""
    node_margin: float = 0.0
    """Ours: a token takes another node's expert in place of one of its own node's only when
    that expert's logit beats the local one's by more than this margin (logit units; where the
    router ranks probabilities, its probability must exceed e^margin times the local one's).
    It acts on which experts are picked, not on the gate values; 0: off. The locmoe router adds
    it to the node bias under node_bias_mode selection; Megatron's router takes it in its
    top-k (routers/node_selection.py)."""
    node_fill_mass: float = 1.0
    """Ours, for top-k > 1: fill a token's k slots from as few nodes as the scores allow: the
    smallest M such that the best k experts on the token's M best nodes (ranked by the
    probability mass of their own best k) hold at least this share of its unconstrained top-k
    probability mass; an adaptive form of node-limited routing. Acts on which experts are
    picked, not on the gate values; 1: off (every token its unconstrained top-k). The locmoe
    and megatron routers (routers/node_selection.py)."""
    rank_balance_loss_coeff: float = 0.0
    """After DeepSeek-V2's communication-balance loss: alpha_r * sum_r f_r P_r over the R ranks
    of the EP group, f_r = R x (tokens sent to rank r, one copy per token and rank) / (all such
    copies), P_r = the mean routing probability of rank r's experts, so that no rank receives
    more tokens than the others; 0: off. Needs an EP group of more than one rank."""

    max_outgoing_fraction: float | None = None
    """FasterMoE's topology gate (PPoPP'22; its FMOE_TOPO_OUTGOING_FRACTION, default 0.14) for
    any top-k, on Megatron's router: per micro-batch and rank at most floor(F x T) of the T
    tokens may have an expert on another node; those whose best remote expert scores highest
    keep their top-k, the other tokens that wanted a remote expert take their top-k among their
    node's experts (the selection is masked; the aux loss stays on the unmasked scores). F in
    (0, 1]; unset: off. Needs at least top-k experts per node (routers/outgoing_cap.py)."""

    # ---- GrAP gate ---------------------------------------------------------------------------
    grap_mode: Literal["fixed", "learnable"] = "fixed"
    """fixed: logit i = mean of hidden chunk i (the paper). learnable: each expert owns d/n
    weights initialised to n/d (block-diagonal, so still orthogonal)."""
    grap_bias: bool = False
    """Learnable per-expert bias (zero init): our reading of the paper's undefined epsilon in
    G = ReLU(W x + epsilon)."""
    grap_temperature: float = 1.0
    """Multiplier on the GrAP logits before the softmax (chunk means make it nearly uniform)."""
    grap_learnable_temperature: bool = False
    """Learn that multiplier (as exp of a scalar parameter)."""

    fused_router: Literal["auto", "on", "off"] = "auto"
    """LocMoE routing without Megatron's op-by-op helpers (on): on CUDA, Triton kernels for the
    fixed gate (routers/kernels.py) and torch.compile'd graphs otherwise (routers/fused.py);
    eager graphs on CPU/NPU. The same results as the reference path (off) up to summation
    order; padding masks, z-loss and top-k scaling take the reference path. auto: on in CUDA
    processes, off elsewhere. Megatron's --moe-router-fusion also turns it on (TE's fused
    top-k has no GrAP gate or locality loss). The bare flag means on."""

    # ---- capacity ----------------------------------------------------------------------------
    capacity_mode: Literal["auto", "none", "bound"] = "auto"
    """none: dropless. bound: capacity from LocMoE's lower bound, clamped between the floor and
    Megatron's --moe-expert-capacity-factor ceiling; overflow dropped by probability. auto:
    bound for the locmoe router when --moe-expert-capacity-factor is set (the paper's
    method), else none."""
    capacity_floor_factor: float = 0.5
    """Floor of the bound capacity as a capacity factor: ceil(floor * T * k / n) tokens."""
    capacity_percentile: float = 0.05
    """delta = this percentile of cos(token, gate row of its expert) over routed tokens."""
    capacity_reestimate_interval: int | None = None
    """K: 0 estimates delta on the first batch and keeps it; K > 0 re-estimates every K training
    steps (the bound falls as features cluster). Default: the router's (locmoe 0, as the paper;
    locmoe_plus 100, a choice: the paper re-estimates but gives no interval)."""

    # ---- LocMoE+ (router locmoe_plus) ------------------------------------------------------
    plus_capacity_multiplier: float = 2.0
    """m of the adaptive capacity C = clamp(ceil(m * C*), floor, ceiling), C* being LocMoE's
    bound at the measured delta: LocMoE+'s Corollary 6 needs C >= 2 C* for expert choice."""
    plus_affinity_threshold: float = 0.0
    """Token choice of locmoe_plus: 0 takes each token's top-k experts by affinity; t in (0, 1]
    takes the fewest of them whose gate values sum to at least t (our reading of the paper's
    threshold on the cumulative affinity, which it gives no value for)."""

    # ---- hash router -------------------------------------------------------------------------
    hash_seed: int = 1234
    """Seed of the fixed random balanced token-id -> expert map (same on every rank)."""
    hash_token_counts: str | None = None
    """Path of a .npy with the corpus count of every token id (megatron_locmoe.sim.data writes
    PREFIX_counts.npy): the hash router then balances by frequency, not by id."""

    # ---- dispatcher --------------------------------------------------------------------------
    dispatcher: Literal["auto", "alltoall", "hierarchical"] = "auto"
    """alltoall: Megatron's flat All-to-All. hierarchical: first hop inside the node, second
    between rail peers (falls back to flat, with an info log, when EP fits in one node). auto:
    hierarchical for the plugin's routers when the EP group spans nodes and no setting rules
    it out (e.g. --moe-permute-fusion), else alltoall; Megatron's own router keeps alltoall."""
    dispatcher_dedup: Literal["auto", "on", "off"] = "auto"
    """Per-node dedup of the hierarchical dispatcher: a token crosses to each remote node once.
    auto = on for top-k > 1 (top-1 has nothing to dedup and would only add metadata)."""

    # ---- experts -----------------------------------------------------------------------------
    experts: Literal["auto", "loop", "grouped"] = "auto"
    """Expert MLPs. grouped: all local experts in two torch._grouped_mm GEMMs (the parameters
    and results of Megatron's per-expert loop; under transformer-engine too, with plain expert
    weights in place of TE's linears). loop: the spec's experts as Megatron builds them (its
    per-expert loop, or TEGroupedMLP with TE and --moe-grouped-gemm). auto: TEGroupedMLP with
    TE and --moe-grouped-gemm; else grouped for the plugin's routers (and for Megatron's with
    --moe-grouped-gemm) where the model allows it; else loop."""

    # ---- attention ---------------------------------------------------------------------------
    attention: Literal["megatron", "sdpa"] = "megatron"
    """Core attention of the local spec (--transformer-impl local). megatron: Megatron's
    DotProductAttention (the [b, n, s, s] scores in memory, softmax apart). sdpa: torch's
    scaled_dot_product_attention (flash / cuDNN / efficient kernels where the device has them,
    any device), the same function of the inputs, causal masks only; for runs without
    Transformer Engine (with TE, TE's attention runs)."""

    # ---- checks ------------------------------------------------------------------------------
    check_router_input: bool = False
    """Stop with the layer and the rank when a router's input holds a non-finite value (one
    NaN token otherwise turns that rank's whole input gradient into NaN). A debugging switch:
    one host sync per router call."""

    # ---- topology ----------------------------------------------------------------------------
    devices_per_node: int | None = None
    """Ranks per node; default torchrun's LOCAL_WORLD_SIZE. Set it to simulate nodes."""

    # ---- virtual cluster (megatron_locmoe/virtual.py) ---------------------------------------
    virtual_cluster: str | None = None
    """NODESxGPUS (e.g. 16x8): train on one device what a cluster of that many nodes x GPUs
    would route. The global batch is the data of the NODES x GPUS data-parallel ranks, each
    micro-batch belongs to one of them (micro-batch i to rank i mod NODES x GPUS), and every
    router routes it as that rank would: its node's experts, its own router state; traffic and
    load are counted as that cluster's dispatchers would send them. Needs one process (world
    size 1, so expert parallelism 1): gradient accumulation plays data parallelism."""
    virtual_ep_size: int | None = None
    """Expert-parallel size over the virtual cluster's ranks (consecutive ranks form an EP
    group, as Megatron's rank order with TP = CP = 1); default: every virtual rank. Must divide
    the number of experts and the virtual ranks, and tile nodes evenly."""

    def __post_init__(self):
        if isinstance(self.fused_router, bool):  # LocMoEConfig(fused_router=True) as before
            self.fused_router = "on" if self.fused_router else "off"

    @property
    def dedup_setting(self) -> bool | str:
        """dispatcher_dedup as the dispatcher takes it (True, False or 'auto')."""
        return {"on": True, "off": False}.get(self.dispatcher_dedup, self.dispatcher_dedup)

    def wants_grouped_experts(self, moe_grouped_gemm: bool) -> bool:
        """experts grouped, or auto with --moe-grouped-gemm."""
        return self.experts == "grouped" or (self.experts == "auto" and moe_grouped_gemm)

    def check_values(self, transformer_config=None) -> "LocMoEConfig":
        """Raise ConfigError for a value invalid by itself or for the model (``transformer_config``,
        when given); returns self for chaining. Not the whole check: the rules of the router
        registry and the dispatcher are ``megatron_locmoe.validation.validate``'s."""
        for f in fields(self):
            value = getattr(self, f.name)
            if get_origin(f.type) is not Literal and not _fits(value, f.type):
                raise ConfigError(
                    f"{f.name}={value!r} has type {type(value).__name__}, the field takes "
                    f"{_type_name(f.type)}; give a value such as {f.default!r} (the default)"
                )
            if get_origin(f.type) is Literal and value not in get_args(f.type):
                raise ConfigError(f"{f.name}={value!r}; use one of {', '.join(get_args(f.type))}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(
                    f"{f.name}={value} is not a finite number; give a value such as "
                    f"{f.default!r} (the default)"
                )
        for name in ("aux_loss_coeff", "locality_loss_coeff"):
            if getattr(self, name) < 0:
                raise ConfigError(
                    f"{name}={getattr(self, name)} is negative; use 0 to switch the loss off"
                )
        if not 0 <= self.node_target_share < 1:
            raise ConfigError(
                f"node_target_share={self.node_target_share} must lie in [0, 1) (0: off)"
            )
        if self.node_bias_rate <= 0:
            raise ConfigError(f"node_bias_rate={self.node_bias_rate} must be positive")
        if not 0 < self.node_fill_mass <= 1:
            raise ConfigError(
                f"node_fill_mass={self.node_fill_mass} must lie in (0, 1] (1: off; e.g. 0.9 "
                "keeps 90% of each token's top-k probability mass on the fewest nodes)"
            )
        for name in ("node_margin", "rank_balance_loss_coeff"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} is negative; use 0 for off")
        F = self.max_outgoing_fraction
        if F is not None and not 0 < F <= 1:
            raise ConfigError(
                f"max_outgoing_fraction={F} must lie in (0, 1]: the share of a rank's tokens that "
                "may leave the node (FasterMoE's default 0.14); drop the flag to route uncapped"
            )
        if not 0 < self.locality_smoothing < 1:
            raise ConfigError(
                f"locality_smoothing={self.locality_smoothing} must lie in (0, 1) (e.g. 1e-3)"
            )
        if self.grap_temperature <= 0:
            raise ConfigError(f"grap_temperature={self.grap_temperature} must be positive")
        if not 0 < self.capacity_percentile < 1:
            raise ConfigError(
                f"capacity_percentile={self.capacity_percentile} must lie in (0, 1) (e.g. 0.05)"
            )
        if self.capacity_floor_factor < 0:
            raise ConfigError(f"capacity_floor_factor={self.capacity_floor_factor} is negative")
        if self.capacity_reestimate_interval is not None and self.capacity_reestimate_interval < 0:
            raise ConfigError(
                f"capacity_reestimate_interval={self.capacity_reestimate_interval} is negative; "
                "use 0 to estimate once or K > 0 to re-estimate every K steps"
            )
        if self.plus_capacity_multiplier < 1:
            raise ConfigError(
                f"plus_capacity_multiplier={self.plus_capacity_multiplier} asks less than the "
                "bound C* itself; use at least 1 (the paper: 2)"
            )
        if not 0 <= self.plus_affinity_threshold <= 1:
            raise ConfigError(
                f"plus_affinity_threshold={self.plus_affinity_threshold} must lie in [0, 1] "
                "(0: plain top-k; e.g. 0.5)"
            )
        if self.devices_per_node is not None and self.devices_per_node < 1:
            raise ConfigError(f"devices_per_node={self.devices_per_node} must be at least 1")
        self._check_virtual_cluster()
        if transformer_config is not None:
            self._validate_against(transformer_config)
        return self

    @property
    def virtual_ranks(self) -> int | None:
        """The virtual cluster's ranks (nodes x GPUs per node), or None without one."""
        shape = self.virtual_shape
        return None if shape is None else shape[0] * shape[1]

    @property
    def virtual_ep(self) -> int | None:
        """The virtual cluster's EP size (``virtual_ep_size``, default every virtual rank), or
        None without a virtual cluster."""
        ranks = self.virtual_ranks
        return None if ranks is None else self.virtual_ep_size or ranks

    @property
    def virtual_shape(self) -> tuple[int, int] | None:
        """(nodes, GPUs per node) of ``virtual_cluster``, or None without one."""
        if self.virtual_cluster is None:
            return None
        text = str(self.virtual_cluster).strip().lower()
        parts = text.split("x")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ConfigError(
                f"virtual_cluster={self.virtual_cluster!r} is not NODESxGPUS; give e.g. 16x8 "
                "(16 nodes of 8 GPUs)"
            )
        nodes, gpus = int(parts[0]), int(parts[1])
        if nodes < 1 or gpus < 1:
            raise ConfigError(
                f"virtual_cluster={self.virtual_cluster!r} has no ranks; give at least 1x1"
            )
        return nodes, gpus

    def _check_virtual_cluster(self) -> None:
        shape = self.virtual_shape
        if shape is None:
            if self.virtual_ep_size is not None:
                raise ConfigError(
                    f"virtual_ep_size={self.virtual_ep_size} without a virtual cluster: add "
                    "--locmoe-virtual-cluster NODESxGPUS or drop --locmoe-virtual-ep-size"
                )
            return
        ranks = self.virtual_ranks
        if self.devices_per_node is not None:
            raise ConfigError(
                f"devices_per_node={self.devices_per_node} with virtual_cluster="
                f"{self.virtual_cluster}: the virtual cluster says how many GPUs a node has; "
                "drop --locmoe-devices-per-node"
            )
        ep = self.virtual_ep_size
        if ep is not None and (ep < 1 or ranks % ep):
            raise ConfigError(
                f"virtual_ep_size={ep} does not divide the virtual cluster's {ranks} ranks "
                f"({self.virtual_cluster}); use a divisor of {ranks}"
            )

    def _validate_virtual_against(self, tc) -> None:
        """The virtual cluster is data parallelism on one device: nothing may be split over
        real ranks, and what is per data-parallel rank must stay per rank."""
        nodes, gpus = self.virtual_shape
        ranks = nodes * gpus
        for flag, size in (
            ("--expert-model-parallel-size", tc.expert_model_parallel_size),
            ("--tensor-model-parallel-size", tc.tensor_model_parallel_size),
            ("--pipeline-model-parallel-size", tc.pipeline_model_parallel_size),
            ("--context-parallel-size", tc.context_parallel_size),
        ):
            if size != 1:
                raise ConfigError(
                    f"{flag} {size} with --locmoe-virtual-cluster {self.virtual_cluster}: the "
                    "virtual cluster trains every rank's data on one device (its expert "
                    f"parallelism is virtual, --locmoe-virtual-ep-size); set {flag} 1"
                )
        n = tc.num_moe_experts
        ep = self.virtual_ep
        if n % ep:
            fits = [d for d in range(1, ranks + 1) if ranks % d == 0 and n % d == 0]
            raise ConfigError(
                f"{n} experts do not split over the virtual cluster's expert-parallel size {ep} "
                f"({'all ' + str(ranks) + ' ranks' if self.virtual_ep_size is None else 'given'}"
                f"): set --locmoe-virtual-ep-size to one of {fits[-4:]} or change --num-experts"
            )
        if ep % gpus and gpus % ep:
            raise ConfigError(
                f"virtual EP size {ep} does not tile nodes of {gpus} GPUs evenly: use a multiple "
                f"or a divisor of {gpus}"
            )
        refused = (
            (
                getattr(tc, "moe_router_load_balancing_type", None) == "global_aux_loss"
                or "global_aux_loss" in (getattr(tc, "moe_router_load_balancing_type", None) or []),
                "--moe-router-load-balancing-type global_aux_loss (its token counts are "
                "all-reduced over the data-parallel ranks within a micro-batch, which the "
                "virtual ranks do not share; use aux_loss or seq_aux_loss)",
            ),
            (
                getattr(tc, "cuda_graph_impl", "none") not in (None, "none"),
                f"--cuda-graph-impl {getattr(tc, 'cuda_graph_impl', None)} (a replay would keep "
                "the traffic count and rank switch of the captured micro-batch; train eagerly)",
            ),
            (
                getattr(tc, "moe_pad_expert_input_to_capacity", False),
                "--moe-pad-expert-input-to-capacity (the padded slots would be counted as "
                "traffic of a dispatcher that is not there; drop the flag)",
            ),
        )
        for bad, what in refused:
            if bad:
                raise ConfigError(f"the virtual cluster cannot run with {what}")

    def _validate_against(self, tc) -> None:
        n, k = tc.num_moe_experts, tc.moe_router_topk
        if n is None:
            raise ConfigError("the model has no experts: set --num-experts")
        if k < 1:
            raise ConfigError(f"--moe-router-topk {k}: every token needs at least 1 expert")
        if k > n:
            raise ConfigError(
                f"--moe-router-topk {k} is larger than the number of experts {n}; use at most {n}"
            )
        unsupported = grouped_experts_unsupported(tc) if self.experts == "grouped" else []
        if unsupported:
            raise ConfigError(
                f"grouped experts (torch._grouped_mm) do not support {', '.join(unsupported)}: "
                "pass --disable-bias-linear and drop fp8/fp4, or use --locmoe-experts loop"
            )
        unsupported = sdpa_attention_unsupported(tc) if self.attention == "sdpa" else []
        if unsupported:
            raise ConfigError(
                f"--locmoe-attention sdpa does not run with {', '.join(unsupported)}: "
                "drop --locmoe-attention sdpa"
            )
        if self.virtual_cluster is not None:
            self._validate_virtual_against(tc)

    def node_map_settings(self) -> dict:
        """The NODE_MAP_SETTINGS this config sets away from their defaults (name -> value)."""
        defaults = LocMoEConfig()
        return {
            n: getattr(self, n)
            for n in NODE_MAP_SETTINGS
            if getattr(self, n) != getattr(defaults, n)
        }

    def ep_ranks(self, tc) -> int:
        """Ranks of an EP group: the virtual cluster's EP size, else Megatron's."""
        return self.virtual_ep or tc.expert_model_parallel_size


NODE_MAP_SETTINGS = ("max_outgoing_fraction", "node_margin", "node_fill_mass", "node_target_share")
"""Settings of Megatron's router that read which experts are on a token's node: moving experts
between nodes (analysis/placement.py) would change its routing under any of them."""


ROUTER_SETTINGS: dict[str, str] = {
    "aux_loss_coeff": "has_switch_balance_loss",
    "locality_loss_coeff": "has_locality_loss",
    "locality_smoothing": "has_locality_loss",
    "node_target_share": "has_node_target",
    "node_bias_rate": "has_node_target",
    "node_bias_mode": "has_node_target",
    "node_margin": "has_node_selection",
    "node_fill_mass": "has_node_selection",
    "rank_balance_loss_coeff": "has_rank_balance_loss",
    "max_outgoing_fraction": "has_outgoing_cap",
    "grap_mode": "has_grap_gate",
    "grap_bias": "has_grap_gate",
    "grap_temperature": "has_grap_gate",
    "grap_learnable_temperature": "has_grap_gate",
    "capacity_mode": "has_capacity_bound",
    "capacity_floor_factor": "has_capacity_bound",
    "capacity_percentile": "has_capacity_bound",
    "capacity_reestimate_interval": "has_capacity_bound",
    "plus_capacity_multiplier": "has_affinity_routing",
    "plus_affinity_threshold": "has_affinity_routing",
    "hash_seed": "needs_token_ids",
    "hash_token_counts": "needs_token_ids",
}
"""The settings only some routers read -> the router capability (a class attribute of the
router classes, megatron_locmoe.routers.base.PluginRouterMixin) that reads them. A value other
than the default given to a router without that capability is refused at parse time
(``megatron_locmoe.routers.check_router_settings``); every other setting applies to every
router. Not here: fused_router, a speed switch a preset sets for whichever router runs (a router
without a fused path keeps its one path and the start-up summary says so)."""


@dataclass(frozen=True)
class Resolution:
    """A LocMoEConfig with no ``auto`` left, and why each setting is what it is: what the layers,
    routers and experts are built from (``megatron_locmoe.resolve`` makes it)."""

    config: LocMoEConfig
    reasons: dict[str, str] = field(default_factory=dict)
    """setting -> how it was decided (for ``auto`` settings: why it resolved as it did)."""
