"""Grouped expert MLP on ``torch._grouped_mm``: all local experts in two GEMM launches.

Without transformer-engine (TEGroupedMLP) or the grouped_gemm package, Megatron-Core 0.19
runs experts as SequentialMLP: one small GEMM pair per expert, launch-bound and far from the
card's peak at fine-grained expert counts. ``GroupedSequentialMLP`` is a SequentialMLP built by
Megatron as usual (same initialisation, same modules) whose expert weights then move into one
stacked parameter per projection, ``linear_fc1_weight`` [E_local, out, in] and
``linear_fc2_weight``; each projection is one ``torch._grouped_mm`` over the token groups of
the dispatcher's output and its weight gradient arrives stacked, with no copies. Every expert
linear keeps a persistent ``weight`` buffer that is a view of its slice, so state dicts and
Megatron's distributed checkpoints keep SequentialMLP's keys and sharding: a checkpoint moves
between the loop and the grouped experts either way. The views are re-bound whenever the
stacked storage moves (``.to()``, Megatron's DDP buffers). Expert linears are local GEMMs
under expert parallelism (Megatron skips their TP collectives: the dispatcher does them), so
expert-tensor-parallel shards group the same way.

Numerics equal Megatron's per-expert path (same GEMM inputs and the MLP's own activation
code): bitwise on the CPU (tests/test_experts.py); on GPUs the forward is bitwise and the
input gradient differs only by the backward GEMM kernels' rounding (docs/performance.md).
"""

from __future__ import annotations

import copy
import dataclasses
import functools

import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
from megatron.core.fusions.fused_bias_geglu import quick_gelu, weighted_bias_quick_geglu_impl
from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl
from megatron.core.transformer.moe.experts import SequentialMLP

from megatron_locmoe.config import grouped_experts_unsupported

PROJECTIONS = ("linear_fc1", "linear_fc2")

GROUPED_MM_DTYPES_CUDA = (torch.bfloat16,)
"""Dtypes torch._grouped_mm runs on CUDA (sm90+) in torch 2.11; the CPU takes float32 too."""


@functools.cache
def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` exists here for this device and dtype (asked every
    forward: cached, so the device query runs once)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cuda":
        return dtype in GROUPED_MM_DTYPES_CUDA and torch.cuda.get_device_capability(device)[0] >= 9
    return device.type == "cpu"


def grouped_linear(x_TI: torch.Tensor, weight_EOI: torch.Tensor, offsets_E: torch.Tensor):
    """Per-group ``x @ W_e.T``: rows offsets[e-1]:offsets[e] of x use expert e's weight.

    x [T, in], weight [E, out, in], offsets [E] int32 (cumulative token counts) -> [T, out]."""
    return torch._grouped_mm(x_TI, weight_EOI.transpose(-2, -1), offs=offsets_E)


def _build_expert_shards(
    module_prefix, suffix, keys, templates, key, stacked_EOI, replica_id, flattened_range
):
    """The per-expert sharded tensors of a stacked weight, or of an optimizer state shaped like
    it. Megatron rewrites the factory's key after it is made (the block drops the layer index;
    the optimizer prepends its own prefix) by replacing its leading part, so the experts' keys
    get the same new leading part. An expert's own factory (SwiGLU's gate/up split of fc1) is
    built here, since Megatron builds one level of factories."""
    if flattened_range is not None:
        raise NotImplementedError(
            "grouped experts' checkpoints do not support flattened (distributed-optimizer) "
            "shards yet: drop --use-distributed-optimizer or use --locmoe-experts loop"
        )
    assert key.endswith(suffix), (key, suffix)
    leading = key[: len(key) - len(suffix)]
    shards = {}
    for e, (k, template) in enumerate(zip(keys, templates, strict=True)):
        assert template.key.startswith(module_prefix), (template.key, module_prefix)
        new_key = leading + template.key[len(module_prefix) :]
        if isinstance(template, ShardedTensorFactory):
            shards[k] = dataclasses.replace(template, key=new_key, data=stacked_EOI[e]).build()
        else:
            shards[k] = dataclasses.replace(
                template, key=new_key, data=stacked_EOI[e], dtype=stacked_EOI.dtype
            )
    return shards


def _merge_expert_shards(keys, templates, loaded: dict) -> torch.Tensor:
    """The inverse of _build_expert_shards: the loaded per-expert tensors, stacked."""
    return torch.stack(
        [
            t.merge_fn(loaded[k]) if isinstance(t, ShardedTensorFactory) else loaded[k]
            for k, t in zip(keys, templates, strict=True)
        ]
    )


class GroupedSequentialMLP(SequentialMLP):
    """SequentialMLP whose experts run as two grouped GEMMs (same parameters and results)."""

    def __init__(self, num_local_experts, config, submodules, pg_collection=None, name=None):
        if config.gradient_accumulation_fusion:
            # TE's fused weight-gradient accumulation (on by default under TE) is a check in the
            # local linears' constructor that needs apex; these linears never run (their weights
            # become views), and the stacked weights' gradients reach Megatron's DDP as .grad.
            config = copy.copy(config)
            config.gradient_accumulation_fusion = False
        super().__init__(num_local_experts, config, submodules, pg_collection, name)
        unsupported = grouped_experts_unsupported(self.config)
        if unsupported:
            raise ValueError(
                "grouped experts (torch._grouped_mm) do not support "
                + ", ".join(unsupported)
                + "; change those settings or use the per-expert loop (--locmoe-experts loop)."
            )
        for proj in PROJECTIONS:
            experts = [getattr(e, proj).weight for e in self.local_experts]
            stacked = torch.nn.Parameter(torch.stack([w.detach() for w in experts]))
            for attr, value in vars(experts[0]).items():  # Megatron's tags: allreduce=False...
                setattr(stacked, attr, value)
            self.register_parameter(f"{proj}_weight", stacked)
            for expert in self.local_experts:
                del getattr(expert, proj).weight  # the Parameter; its slice view replaces it
        self._rebind_views()

    def _weights(self, proj: str) -> torch.Tensor:
        """The stacked weights of one projection: [E_local, out, in] (a Parameter)."""
        return getattr(self, f"{proj}_weight")

    def _rebind_views(self) -> None:
        """Point every expert linear's ``weight`` buffer at its slice of the stacked weight
        (after ``.to()``, or when Megatron's DDP moved the parameter into its buffer)."""
        for proj in PROJECTIONS:
            stacked = self._weights(proj).detach()
            for i, expert in enumerate(self.local_experts):
                linear = getattr(expert, proj)
                view = linear._buffers.get("weight")
                if view is None or view.data_ptr() != stacked[i].data_ptr():
                    linear.register_buffer("weight", stacked[i], persistent=True)

    def _apply(self, fn, *args, **kwargs):
        module = super()._apply(fn, *args, **kwargs)  # moves the views as separate tensors
        self._rebind_views()
        return module

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """SequentialMLP's keys only: the stacked parameters are left out, and the experts'
        views, which the children save next, are rebound to them first."""
        self._rebind_views()
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for proj in PROJECTIONS:
            destination.pop(f"{prefix}{proj}_weight", None)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, *args, **kwargs
    ):
        """Loading goes through the experts' views (SequentialMLP's keys) into the stacked
        weights. A torch_dist load hands the stacked weight itself (the sharded state dict's
        factory merged it); its slices then stand in for the experts' keys."""
        self._rebind_views()
        for proj in PROJECTIONS:
            stacked = state_dict.get(f"{prefix}{proj}_weight")
            for e in range(self.num_local_experts if stacked is not None else 0):
                state_dict.setdefault(f"{prefix}local_experts.{e}.{proj}.weight", stacked[e])
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, *args, **kwargs
        )
        for proj in PROJECTIONS:
            key = f"{prefix}{proj}_weight"
            if key in missing_keys:
                missing_keys.remove(key)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """SequentialMLP's sharded tensors (its keys, shapes and offsets: checkpoints move
        between the loop and the grouped experts), built from the stacked weights by one
        factory per projection. The optimizer maps its state to the model's sharded tensors by
        parameter, so the factory's data must be the stacked parameter: Adam's moments of it
        are then saved under the loop's per-expert keys too."""
        self._rebind_views()
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        for proj in PROJECTIONS:
            keys = [
                f"{prefix}local_experts.{e}.{proj}.weight" for e in range(self.num_local_experts)
            ]
            templates = [sharded.pop(k).without_data() for k in keys]
            name = f"{prefix}{proj}_weight"
            sharded[name] = ShardedTensorFactory(
                key=name,
                data=self._weights(proj),
                build_fn=functools.partial(
                    _build_expert_shards, prefix, f"{proj}_weight", keys, templates
                ),
                merge_fn=functools.partial(_merge_expert_shards, keys, templates),
                replica_id=templates[0].replica_id,
            )
        return sharded

    def _scaled_activation(self, h_TF: torch.Tensor, probs_T: torch.Tensor) -> torch.Tensor:
        """Activation times each token's routing probability, by the same code path Megatron's
        MLP.forward takes for experts (fused weighted SwiGLU / quick-GeGLU kernels when
        bias_activation_fusion is on, else the unfused GLU), so results match bit for bit."""
        cfg, scale_T1 = self.config, probs_T.unsqueeze(-1)
        if cfg.bias_activation_fusion:
            if cfg.activation_func == F.silu and cfg.gated_linear_unit:
                return weighted_bias_swiglu_impl(
                    h_TF, None, scale_T1, cfg.activation_func_fp8_input_store
                )
            if cfg.activation_func == quick_gelu and cfg.gated_linear_unit:
                return weighted_bias_quick_geglu_impl(
                    h_TF,
                    None,
                    scale_T1,
                    cfg.activation_func_fp8_input_store,
                    cfg.glu_linear_offset,
                    cfg.activation_func_clamp_value,
                )
            raise ValueError(
                "bias_activation_fusion with routing probabilities supports swiglu and quick_geglu "
                "only (as Megatron's MLP); pass --no-bias-swiglu-fusion or change the activation."
            )
        if cfg.gated_linear_unit:
            x_glu, x_linear = torch.chunk(h_TF, 2, dim=-1)
            if (val := cfg.activation_func_clamp_value) is not None:
                x_glu = x_glu.clamp(min=None, max=val)
                x_linear = x_linear.clamp(min=-val, max=val)
            out_TF = cfg.activation_func(x_glu) * (x_linear + cfg.glu_linear_offset)
        else:
            out_TF = cfg.activation_func(h_TF)
        return (out_TF * scale_T1).to(out_TF.dtype)

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        """[T, H] tokens grouped by local expert, [E_local] counts, [T] probs -> ([T, H], None)."""
        x_TH, probs_T = permuted_local_hidden_states, permuted_probs
        if self.config.moe_apply_probs_on_input:
            x_TH = (probs_T.unsqueeze(-1) * x_TH).to(x_TH.dtype)
            probs_T = torch.ones_like(probs_T)
        w1, w2 = self._weights("linear_fc1"), self._weights("linear_fc2")
        if not grouped_mm_available(x_TH.device, x_TH.dtype):  # same math, one GEMM per expert
            counts = torch.as_tensor(tokens_per_expert).tolist()
            outs = [
                F.linear(self._scaled_activation(F.linear(x, w1[e]), p), w2[e])
                for e, (x, p) in enumerate(
                    zip(x_TH.split(counts), probs_T.split(counts), strict=True)
                )
            ]
            return torch.cat(outs), None
        # cumulative counts: summed where the dispatcher left them (the host), copied once
        offsets_E = torch.as_tensor(tokens_per_expert).cumsum(0)
        offsets_E = offsets_E.to(device=x_TH.device, dtype=torch.int32, non_blocking=True)
        h_TF = grouped_linear(x_TH, w1, offsets_E)
        h_TF = self._scaled_activation(h_TF, probs_T)
        return grouped_linear(h_TF, w2, offsets_E), None

    def backward_dw(self):
        raise NotImplementedError(
            "grouped experts compute weight gradients in the backward pass; drop "
            "--delay-wgrad-compute or use the per-expert loop (--locmoe-experts loop)"
        )
