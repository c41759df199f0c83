"""Grouped experts (torch._grouped_mm) equal Megatron's per-expert loop: same parameters and
checkpoint keys, bitwise-equal outputs and gradients inside the plugin's MoE layer on 2 ranks
(EP=2, 4 local experts each, some receiving no tokens), for SwiGLU, GeLU, top-1 with
probabilities on the input, and bf16; plus the spec wiring and its validation."""

from __future__ import annotations

import dataclasses
import functools
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from megatron_locmoe.config import ConfigError, LocMoEConfig
from megatron_locmoe.sim.cluster import ParallelLayout
from megatron_locmoe.sim.testing import build_moe_layer, moe_config
from megatron_locmoe.validation import changes_megatron, validate

CASES = {
    "swiglu_top2": dict(moe_router_topk=2),
    "gelu_top2": dict(moe_router_topk=2, gated_linear_unit=False, activation_func=F.gelu),
    "probs_on_input_top1": dict(moe_router_topk=1, moe_apply_probs_on_input=True),
    "bf16_top2": dict(moe_router_topk=2, params_dtype=torch.bfloat16, bf16=True),
    "skewed_top1": dict(moe_router_topk=1, num_moe_experts=16, hidden_size=32),
    "te_wgrad_fusion_flag_top2": dict(moe_router_topk=2),
}
GROUPED_ONLY = {
    # TE's default (no apex here): the local linears' constructor would refuse it; the grouped
    # experts never run those linears, so they must build and match the loop regardless
    "te_wgrad_fusion_flag_top2": dict(gradient_accumulation_fusion=True),
}


def _per_expert_grads(experts) -> dict:
    """Weight gradients by SequentialMLP's names (the grouped module's arrive stacked)."""
    from megatron_locmoe.experts import PROJECTIONS, GroupedSequentialMLP

    if not isinstance(experts, GroupedSequentialMLP):
        return {n: p.grad for n, p in experts.named_parameters()}
    return {
        f"local_experts.{e}.{proj}.weight": getattr(experts, f"{proj}_weight").grad[e]
        for proj in PROJECTIONS
        for e in range(experts.num_local_experts)
    }


def grouped_vs_loop_job(ctx, case: str, dispatcher: str):
    from megatron_locmoe.experts import GroupedSequentialMLP

    ctx.topology()
    config = moe_config(ep=2, **CASES[case])
    dtype = config.params_dtype
    out = {}
    for impl in ("loop", "grouped"):
        torch.manual_seed(11)  # identical weights for both implementations
        impl_config = config
        if impl == "grouped" and case in GROUPED_ONLY:
            impl_config = dataclasses.replace(config, **GROUPED_ONLY[case])
        layer = build_moe_layer(
            impl_config,
            locmoe=LocMoEConfig(router_type="megatron", dispatcher=dispatcher, experts=impl),
        )
        gen = torch.Generator().manual_seed(100 + ctx.rank)
        x = torch.randn(5, 3, config.hidden_size, generator=gen)
        if case == "skewed_top1":  # most tokens to few experts; several experts get none
            x[..., : config.hidden_size // 4] += 4.0
        x = x.to(dtype).requires_grad_(True)
        y, _ = layer(x)
        (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        out[impl] = dict(
            cls=type(layer.experts),
            y=y.detach(),
            x_grad=x.grad,
            w_grads=_per_expert_grads(layer.experts),
            keys=sorted(layer.state_dict()),
        )
    loop, grouped = out["loop"], out["grouped"]
    return dict(
        classes=(loop["cls"].__name__, grouped["cls"].__name__),
        is_grouped=issubclass(grouped["cls"], GroupedSequentialMLP),
        same_keys=loop["keys"] == grouped["keys"],
        y_equal=torch.equal(loop["y"], grouped["y"]),
        x_grad_equal=torch.equal(loop["x_grad"], grouped["x_grad"]),
        w_grads_equal=loop["w_grads"].keys() == grouped["w_grads"].keys()
        and all(torch.equal(loop["w_grads"][n], g) for n, g in grouped["w_grads"].items()),
        max_diff=float((loop["y"].float() - grouped["y"].float()).abs().max()),
    )


@pytest.mark.parametrize("case", list(CASES))
def test_grouped_experts_equal_megatron_loop(cluster2, case):
    results = cluster2.run(
        grouped_vs_loop_job,
        case,
        "alltoall",
        layout=ParallelLayout(devices_per_node=1, ep=2),
    )
    for r in results:
        assert r["classes"] == ("SequentialMLP", "GroupedSequentialMLP")
        assert r["is_grouped"] and r["same_keys"]
        assert r["y_equal"], r["max_diff"]
        assert r["x_grad_equal"] and r["w_grads_equal"]


def test_grouped_experts_with_hierarchical_dispatcher(cluster2):
    results = cluster2.run(
        grouped_vs_loop_job,
        "swiglu_top2",
        "hierarchical",
        layout=ParallelLayout(devices_per_node=1, ep=2),
    )
    assert all(r["y_equal"] and r["x_grad_equal"] and r["w_grads_equal"] for r in results)


def test_experts_setting_selects_module_and_validates():
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
    from megatron.core.transformer.moe.experts import SequentialMLP

    from megatron_locmoe.experts import GroupedSequentialMLP
    from megatron_locmoe.layer import experts_builder
    from megatron_locmoe.resolve import resolve

    stock = (
        get_moe_module_spec_for_backend(LocalSpecProvider(), num_experts=8)
        .keywords["submodules"]
        .experts
    )
    assert stock.func is SequentialMLP
    assert experts_builder(stock, LocMoEConfig(experts="grouped")).func is GroupedSequentialMLP
    assert experts_builder(stock, LocMoEConfig(experts="loop")) is stock
    # any other experts (a loop over TE linears, TEGroupedMLP) are replaced by grouped only
    other_loop = functools.partial(
        stock.func,
        submodules=dataclasses.replace(stock.keywords["submodules"], linear_fc1=torch.nn.Linear),
    )
    for other in (other_loop, functools.partial(torch.nn.Identity)):
        assert experts_builder(other, LocMoEConfig(experts="loop")) is other
        grouped = experts_builder(other, LocMoEConfig(experts="grouped"))
        assert grouped.func is GroupedSequentialMLP
        linears = grouped.keywords["submodules"]
        assert (linears.linear_fc1, linears.linear_fc2) == (
            stock.keywords["submodules"].linear_fc1,
            stock.keywords["submodules"].linear_fc2,
        )

    # auto: TEGroupedMLP under TE with --moe-grouped-gemm; grouped for the plugin's routers (and
    # for Megatron's with --moe-grouped-gemm) where the model allows it; else Megatron's loop
    def experts(router_type, **tc):
        tc = dict(transformer_impl="local", moe_grouped_gemm=False, add_bias_linear=False) | tc
        tc = SimpleNamespace(fp8=None, use_te_activation_func=False, **tc)
        return resolve(LocMoEConfig(router_type=router_type), tc).config.experts

    assert experts("locmoe") == "grouped"
    assert experts("hash", moe_grouped_gemm=True) == "grouped"
    assert experts("megatron") == "loop" and experts("megatron", moe_grouped_gemm=True) == "grouped"
    assert experts("locmoe", transformer_impl="transformer_engine", moe_grouped_gemm=True) == "loop"
    assert experts("locmoe", transformer_impl="transformer_engine") == "grouped"
    assert experts("locmoe", add_bias_linear=True) == "loop"  # grouped cannot: no error either
    assert not LocMoEConfig().wants_grouped_experts(False)
    assert changes_megatron(LocMoEConfig(), True) and not changes_megatron(LocMoEConfig(), False)
    with pytest.raises(ConfigError, match="--disable-bias-linear"):
        validate(LocMoEConfig(experts="grouped"), moe_config(ep=1, add_bias_linear=True))
    with pytest.raises(ConfigError, match="experts='fast'"):
        validate(LocMoEConfig(experts="fast"))


def checkpoint_interchange_job(ctx):
    """Megatron torch_dist checkpoints move between the loop and the grouped experts."""
    from megatron.core import dist_checkpointing

    ctx.topology()
    config = moe_config(ep=2, moe_router_topk=2)

    def layer(impl, seed):
        torch.manual_seed(seed)
        return build_moe_layer(config, locmoe=LocMoEConfig(router_type="megatron", experts=impl))

    def weights(layer_):
        state = layer_.experts.state_dict().items()
        return {k: v.clone() for k, v in state if torch.is_tensor(v)}

    out = {}
    for src, dst in (("loop", "grouped"), ("grouped", "loop")):
        saved, target = layer(src, 1), layer(dst, 2)
        path = ctx.scratch / f"experts_{src}_to_{dst}"
        if ctx.rank == 0:
            path.mkdir(parents=True, exist_ok=True)
        torch.distributed.barrier()
        dist_checkpointing.save(saved.sharded_state_dict(), str(path))
        before, reference = weights(target), weights(saved)
        differs_before = any(not torch.equal(before[k], reference[k]) for k in reference)
        loaded = dist_checkpointing.load(target.sharded_state_dict(), str(path))
        target.load_state_dict(loaded)
        out[f"{src}->{dst}"] = dict(
            differs_before=differs_before,
            equal_after=weights(saved).keys() == weights(target).keys()
            and all(torch.equal(weights(saved)[k], weights(target)[k]) for k in weights(saved)),
        )
    grouped = layer("grouped", 3).experts
    grouped.to(torch.float64)  # .to() moves the views separately; they must be re-bound
    w = grouped.linear_fc1_weight
    view_ok = grouped.local_experts[1].linear_fc1.weight.data_ptr() == w[1].data_ptr()
    grouped.linear_fc2_weight.data = grouped.linear_fc2_weight.data.clone() + 1  # as DDP moves it
    fresh = grouped.state_dict()["local_experts.0.linear_fc2.weight"]
    out["rebind"] = dict(
        to_dtype=view_ok and w.dtype == torch.float64,
        after_move=torch.equal(fresh, grouped.linear_fc2_weight[0].detach()),
    )
    return out


def test_checkpoints_move_between_loop_and_grouped(cluster2):
    results = cluster2.run(
        checkpoint_interchange_job, layout=ParallelLayout(devices_per_node=1, ep=2)
    )
    for r in results:
        for direction in ("loop->grouped", "grouped->loop"):
            assert r[direction] == dict(differs_before=True, equal_after=True), direction
        assert r["rebind"] == dict(to_dtype=True, after_move=True)
