"""Small real Megatron-Core MoE layers for simulated CPU clusters (tests, demo, benchmarks)."""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection


def moe_config(ep: int, tp: int = 1, **overrides) -> TransformerConfig:
    """A small fp32 MoE config that runs on the CPU (local spec, CPU init, no fusions).

    Top-1 routing gets pre-softmax scores unless told otherwise (Megatron requires it)."""
    kwargs = dict(
        num_layers=1,
        hidden_size=16,
        num_attention_heads=4,
        num_moe_experts=8,
        moe_router_topk=2,
        moe_ffn_hidden_size=24,
        moe_token_dispatcher_type="alltoall",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        tensor_model_parallel_size=tp,
        expert_model_parallel_size=ep,
        sequence_parallel=tp > 1,
        use_cpu_initialization=True,
        add_bias_linear=False,
        gated_linear_unit=True,
        activation_func=F.silu,
        params_dtype=torch.float32,
        moe_router_dtype="fp32",
        transformer_impl="local",
    )
    kwargs.update(overrides)
    kwargs.setdefault("moe_router_pre_softmax", kwargs["moe_router_topk"] == 1)
    return TransformerConfig(**kwargs)


def build_moe_layer(
    config: TransformerConfig,
    pg_collection: ProcessGroupCollection | None = None,
    router=None,
    locmoe=None,
    vocab_size: int | None = None,
):
    """Megatron's own MoELayer from the spec its config names: the local spec (SequentialMLP
    experts), or with ``transformer_impl="transformer_engine"`` TE's (TEGroupedMLP with
    ``moe_grouped_gemm``, a loop over TE linears without). The router is Megatron's TopKRouter
    unless ``router`` (a MoESubmodules.router builder) is given; with a ``locmoe`` config the
    plugin's LocMoELayer (its router, dispatcher and experts setting; the hash router maps
    ``vocab_size`` token ids) instead."""
    te = config.transformer_impl == "transformer_engine"
    if te:
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider
    spec = get_moe_module_spec_for_backend(
        TESpecProvider() if te else LocalSpecProvider(),
        num_experts=config.num_moe_experts,
        moe_grouped_gemm=te and config.moe_grouped_gemm,
        use_te_activation_func=False,
    )
    if locmoe is not None:
        from megatron_locmoe.layer import locmoe_mlp_builder

        spec = locmoe_mlp_builder(spec, locmoe, vocab_size=vocab_size)
    elif router is not None:
        submodules = dataclasses.replace(spec.keywords["submodules"], router=router)
        spec = functools.partial(spec.func, submodules=submodules)
    layer = spec(config=config, pg_collection=pg_collection or get_default_pg_collection())
    layer.set_layer_number(1)
    return layer


def solo_pg_collection(timeout=None) -> ProcessGroupCollection:
    """A collection whose every group is this rank alone (collective: all ranks must call)."""
    mine = None
    for r in range(dist.get_world_size()):
        group = dist.new_group([r], timeout=timeout)
        if r == dist.get_rank():
            mine = group
    pgs = ProcessGroupCollection()
    for name in (
        "ep",
        "tp",
        "cp",
        "expt_tp",
        "expt_dp",
        "expt_dp_gtp_remat",
        "tp_ep",
        "tp_cp",
        "tp_dp_cp",
    ):
        setattr(pgs, name, mine)
    return pgs


def gather_expert_weights(layer, num_experts: int, group) -> list[dict[str, torch.Tensor]]:
    """State dict of every expert (index = global expert id), gathered over the EP group."""
    local = [
        {k: v.detach().clone() for k, v in expert.state_dict().items() if v is not None}
        for expert in layer.experts.local_experts
    ]
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, local, group=group)
    experts = [e for rank_experts in gathered for e in rank_experts]
    assert len(experts) == num_experts
    return experts
