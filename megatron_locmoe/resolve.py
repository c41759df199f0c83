"""The plugin's ``auto`` settings made concrete, each with its reason, and the start-up summary.

``--moe-router-type locmoe`` alone must give the whole method at the fast path's speed: the
defaults that depend on the run (does expert parallelism leave the node? is this a CUDA
process? is Transformer Engine's grouped MLP in the spec? is there a capacity factor?) are
decided here, in one place. ``resolve`` is pure: the layer spec calls it once, prints the
summary and hands the answer to every MoE layer, which builds its router, dispatcher and
experts from it (``settled``). Explicit values are kept as given (their checks are
``validation.validate``'s); only ``auto`` is decided, and never to a value that would then fail.
The router's own settings (fused path, capacity) are decided by its class
(``routers.base.PluginRouterMixin.resolve_settings``), the dispatcher and experts here.
"""

from __future__ import annotations

import dataclasses
import json

from megatron_locmoe.config import LocMoEConfig, Resolution, grouped_experts_unsupported
from megatron_locmoe.device import choose_device
from megatron_locmoe.dispatch.dispatcher import resolve_dedup, unsupported_settings
from megatron_locmoe.graphs import moe_layer_class
from megatron_locmoe.routers import router_class
from megatron_locmoe.topology import current_topology
from megatron_locmoe.validation import validate
from megatron_locmoe.virtual import VirtualCluster


def _plugin_router(locmoe: LocMoEConfig) -> bool:
    return router_class(locmoe.router_type).is_plugin_router


def _dispatcher(locmoe: LocMoEConfig, tc, topology) -> tuple[str, str]:
    if locmoe.dispatcher != "auto":
        return locmoe.dispatcher, "as given"
    if not _plugin_router(locmoe):
        return "alltoall", (
            "auto: Megatron's own dispatcher with --moe-router-type megatron "
            "(--locmoe-dispatcher hierarchical for the two-hop one)"
        )
    if topology is None or not topology.spans_nodes:
        where = "one node" if topology is not None else "an unknown node map"
        return "alltoall", f"auto: expert parallelism inside {where}, nothing crosses nodes"
    blockers = unsupported_settings(tc)
    if blockers:
        return "alltoall", (
            "auto: the two-hop dispatcher would suit this node map, but "
            + "; ".join(b.as_setting() for b in blockers)
            + " (flat All-to-All kept)"
        )
    return "hierarchical", (
        f"auto: expert parallelism spans {topology.num_nodes} nodes: first hop inside the node"
    )


def _experts(locmoe: LocMoEConfig, tc) -> tuple[str, str]:
    if locmoe.experts != "auto":
        return locmoe.experts, "as given"
    te = getattr(tc, "transformer_impl", "local") == "transformer_engine"
    grouped_gemm = bool(getattr(tc, "moe_grouped_gemm", False))
    if te and grouped_gemm:
        return "loop", "auto: --moe-grouped-gemm under transformer-engine: TEGroupedMLP"
    unsupported = grouped_experts_unsupported(tc)
    if not _plugin_router(locmoe) and not grouped_gemm:
        return "loop", "auto: Megatron's experts with --moe-router-type megatron"
    if unsupported:
        return "loop", (
            "auto: Megatron's per-expert loop, since grouped experts do not support "
            + ", ".join(unsupported)
        )
    return "grouped", "auto: all local experts in two torch._grouped_mm GEMMs"


def resolve(locmoe: LocMoEConfig, tc, topology=None, device_type: str | None = None) -> Resolution:
    """``locmoe`` with every ``auto`` decided for this model (``tc``, Megatron's
    TransformerConfig or its parsed arguments), node map and device type."""
    # the router's own settings are its class's to decide (routers.base.resolve_settings)
    router = router_class(locmoe.router_type).resolve_settings(locmoe, tc, device_type)
    choices = {
        "dispatcher": _dispatcher(locmoe, tc, topology),
        "fused_router": router.pop("fused_router"),
        "experts": _experts(locmoe, tc),
        **router,
    }
    config = dataclasses.replace(locmoe, **{name: value for name, (value, _) in choices.items()})
    return Resolution(config, {name: why for name, (_, why) in choices.items()})


def layer_resolution(locmoe: LocMoEConfig, tc) -> Resolution:
    """``resolve`` for this process: the current topology (if one was built) and device."""
    cluster = VirtualCluster.from_config(locmoe)
    # a virtual cluster decides as its ranks would (their dispatcher: the traffic it counts)
    topology = current_topology() if cluster is None else cluster.topology(0)
    return resolve(locmoe, tc, topology, choose_device().type)


def settled(locmoe: LocMoEConfig | Resolution, tc) -> Resolution:
    """What a layer or router builds from. The spec validates and resolves once and hands the
    Resolution down (layer, router, experts take it as it is); a bare LocMoEConfig (a layer or
    router built directly) is validated against ``tc`` and resolved here."""
    if isinstance(locmoe, Resolution):
        return locmoe
    return layer_resolution(validate(locmoe, tc), tc)


# ---- the start-up summary ----------------------------------------------------------------


def summary_fields(resolution: Resolution, tc, topology=None) -> dict:
    """What the run does, as plain values (the W&B config and the TensorBoard text)."""
    cfg, E, k = resolution.config, tc.num_moe_experts, tc.moe_router_topk
    out: dict = {"router": cfg.router_type, "top_k": k, "num_experts": E}
    router = router_class(cfg.router_type)
    if router.has_grap_gate:
        out["gate"] = (
            f"GrAP {cfg.grap_mode}"
            + (", learnable bias" if cfg.grap_bias else "")
            + (f", temperature {cfg.grap_temperature:g}" if cfg.grap_temperature != 1.0 else "")
            + (", learnable temperature" if cfg.grap_learnable_temperature else "")
        )
    if router.has_switch_balance_loss:
        out["balance_loss"] = f"switch form, alpha {cfg.aux_loss_coeff:g}"
    elif not router.is_plugin_router:
        out["balance_loss"] = (
            f"Megatron's {tc.moe_router_load_balancing_type}, coeff {tc.moe_aux_loss_coeff}"
        )
    if router.has_locality_loss:
        out["locality_loss"] = (
            f"mu {cfg.locality_loss_coeff:g}, smoothing {cfg.locality_smoothing:g}"
            if cfg.locality_loss_coeff
            else "off (mu 0)"
        )
    if cfg.node_target_share:
        out["node_target"] = (
            f"node-local share {cfg.node_target_share:g} ("
            + {
                "logits": f"bias rate {cfg.node_bias_rate:g}, on the logits",
                "selection": f"bias rate {cfg.node_bias_rate:g}, on the choice of experts only",
                "learned": "a learned offset on the logits, TA-MoE's",
            }[cfg.node_bias_mode]
            + "; ours)"
        )
    if cfg.node_margin:
        out["node_margin"] = (
            f"another node's expert only if its logit beats the local one's by {cfg.node_margin:g}"
        )
    if cfg.node_fill_mass < 1:
        out["node_fill"] = (
            f"the fewest nodes that keep {cfg.node_fill_mass:g} of a token's top-{k} mass"
        )
    if cfg.rank_balance_loss_coeff:
        out["rank_balance_loss"] = (
            f"alpha {cfg.rank_balance_loss_coeff:g} over the EP ranks (DeepSeek-V2's "
            "communication balance)"
        )
    if cfg.max_outgoing_fraction is not None:
        out["outgoing_cap"] = (
            f"at most {cfg.max_outgoing_fraction:g} of a rank's tokens per micro-batch have an "
            "expert on another node (FasterMoE's topology gate, any top-k)"
        )
    if router.has_affinity_routing:
        threshold = cfg.plus_affinity_threshold
        out["token_choice"] = f"top-{k} by affinity cos(token, GrAP row)" + (
            f", the fewest whose gate values sum to {threshold:g}" if threshold else ""
        )
    asked = (
        f"clamp({cfg.plus_capacity_multiplier:g} C*, floor, ceiling): LocMoE+'s expert choice "
        "by affinity below the ceiling, token choice at it; C* = "
        if router.has_affinity_routing
        else ""
    )
    out["capacity"] = {
        "bound": asked + f"LocMoE's lower bound (percentile {cfg.capacity_percentile:g}, floor "
        f"{cfg.capacity_floor_factor:g}, ceiling factor {tc.moe_expert_capacity_factor}, "
        + (
            f"re-estimated every {cfg.capacity_reestimate_interval} steps)"
            if cfg.capacity_reestimate_interval
            else "estimated on the first batch)"
        ),
        "none": "dropless"
        if tc.moe_expert_capacity_factor is None
        else f"capacity factor {tc.moe_expert_capacity_factor}, overflow dropped and counted",
    }[cfg.capacity_mode]
    out["dispatcher"] = cfg.dispatcher
    if cfg.dispatcher == "hierarchical":
        dedup = "on" if resolve_dedup(cfg.dedup_setting, tc) else "off"
        out["dedup"] = dedup + (
            f" (auto: top-{k}"
            + (
                ": a token crosses to each remote node once)"
                if k > 1
                else " sends one copy per node anyway)"
            )
            if cfg.dispatcher_dedup == "auto"
            else " (as given)"
        )
    cluster = VirtualCluster.from_config(cfg)
    if cluster is not None:
        out["virtual_cluster"] = (
            f"{cluster.describe()} on this device: micro-batch i is routed as rank i mod "
            f"{cluster.ranks}; each rank's traffic is counted, not sent"
        )
        topology = cluster.topology(0)
    if topology is not None:
        out["node_map"] = (
            f"{topology.num_nodes} nodes x {topology.ranks_per_node} EP ranks "
            f"(EP {topology.ep_size}, {E // topology.num_nodes} experts per node)"
        )
    out["fused_router"] = cfg.fused_router
    out["expert_impl"] = _expert_impl(cfg, tc)
    out["why"] = dict(resolution.reasons)
    return out


def _expert_impl(cfg: LocMoEConfig, tc) -> str:
    if cfg.experts == "grouped":
        return "GroupedSequentialMLP (torch._grouped_mm)"
    te = getattr(tc, "transformer_impl", "local") == "transformer_engine"
    if te and getattr(tc, "moe_grouped_gemm", False):
        return "TEGroupedMLP"
    return "SequentialMLP (Megatron's per-expert loop)"


_REASON_OF = {"capacity": "capacity_mode", "expert_impl": "experts"}
"""Summary lines whose reason is filed under the setting's own name."""


def summary_text(resolution: Resolution, tc, topology=None) -> str:
    """The start-up summary, one line per setting."""
    fields = summary_fields(resolution, tc, topology)
    why = fields.pop("why")
    lines = ["LocMoE plugin:"]
    for name, value in fields.items():
        reason = why.get(_REASON_OF.get(name, name))
        lines.append(f"  {name}: {value}" + (f"  [{reason}]" if reason else ""))
    if moe_layer_class(tc) is not None:
        lines.append(
            "  note: Megatron's local CUDA graphs capture each MoE layer's router (with the "
            "dispatcher's preprocess) and postprocess; dispatch, experts and the MoE layers' "
            "attention run eagerly (Megatron's MoETransformerLayer)"
        )
    cluster = VirtualCluster.from_config(resolution.config)
    topology = cluster.topology(0) if cluster is not None else topology
    if topology is not None and not topology.spans_nodes:
        lines.append(
            "  note: the EP group sits inside one node: the locality loss and the two-hop "
            "dispatcher have no effect on traffic here"
        )
    return "\n".join(lines)


def summary_json(resolution: Resolution, tc, topology=None) -> str:
    return json.dumps(summary_fields(resolution, tc, topology), indent=1, default=str)
