"""Megatron's CUDA graphs (``--cuda-graph-impl``, ``--cuda-graph-modules``) as the plugin reads
them: which modules a capture covers, the MoE layer class that splits the MoE forward into
graphable parts, and the settings a capture cannot run with.

A floor of its own: the routers, the resolution and the spec all ask these questions, and none
of them is below the others.
"""

from __future__ import annotations

from megatron.core.transformer.transformer_layer import MoETransformerLayer

from megatron_locmoe.config import ConfigError


def graph_module_names(tc) -> set[str]:
    """``--cuda-graph-modules`` as names (Megatron's CudaGraphModule members or strings)."""
    modules = getattr(tc, "cuda_graph_modules", None) or []
    return {
        str(getattr(m, "name", m)) for m in ([modules] if isinstance(modules, str) else modules)
    }


def graphs_capture_router(tc) -> bool:
    """Whether Megatron's CUDA graphs (``--cuda-graph-impl``) capture the router's forward."""
    impl = getattr(tc, "cuda_graph_impl", "none")
    if impl in (None, "none"):
        return False
    names = graph_module_names(tc)
    if impl == "full_iteration" or not names or names == {"full"}:
        return True  # the whole iteration, or the whole layer
    return bool(names & {"moe", "moe_router", "moe_preprocess"})


def moe_layer_class(tc) -> type | None:
    """The transformer layer class for MoE layers, or None to keep the spec's.

    Megatron-Core 0.19's GPT specs build MoE layers as TransformerLayer, whose local CUDA
    graphs (``--cuda-graph-impl local``) capture the whole layer or nothing of the MoE; its
    MoETransformerLayer splits the MoE forward into router (with the dispatcher's preprocess),
    experts and postprocess and graphs the first and last. With moe_router / moe_preprocess /
    moe in ``--cuda-graph-modules`` the MoE layers are built as that class."""
    if getattr(tc, "cuda_graph_impl", "none") != "local":
        return None
    if graph_module_names(tc) & {"moe", "moe_router", "moe_preprocess"}:
        return MoETransformerLayer
    return None


def check_local_cuda_graphs(tc) -> None:
    """Refuse local CUDA graphs that would capture a dropless MoE layer whole: its dispatch
    waits on the host for the split sizes, which a capture cannot (Megatron fails late, with
    an invalidated capture, after its warm-up steps)."""
    if getattr(tc, "cuda_graph_impl", "none") != "local" or moe_layer_class(tc) is not None:
        return
    names = graph_module_names(tc)
    drop_and_pad = tc.moe_expert_capacity_factor is not None and tc.moe_pad_expert_input_to_capacity
    if (not names or "attn" in names) and not drop_and_pad:
        raise ConfigError(
            "--cuda-graph-impl local with --cuda-graph-modules "
            f"{' '.join(sorted(names)) or '(empty: whole layers)'} captures each MoE layer "
            "whole (Megatron-Core's TransformerLayer), and its dropless dispatch waits on the "
            "host: add moe_router to --cuda-graph-modules (the MoE layers' router and "
            "postprocess graphed, through Megatron's MoETransformerLayer; their attention "
            "then runs eagerly), pad to capacity (--moe-expert-capacity-factor with "
            "--moe-pad-expert-input-to-capacity), or use --cuda-graph-impl transformer_engine"
        )
