"""The patch registry: applied once per device, never touches torch globally, revertible; the
device layer's choice of device and backend."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from megatron_locmoe import adaptor, device
from megatron_locmoe.adaptor import REGISTRY, HostCudaShim, Patch, PatchRegistry, TorchView
from megatron_locmoe.device import DeviceChoice

CPU = DeviceChoice("cpu", "gloo")


@pytest.fixture
def registry():
    yield REGISTRY
    REGISTRY.revert()


def test_every_patch_names_an_existing_megatron_object():
    for target in REGISTRY.patches:
        module, attrs = adaptor.registry._split_module(target)
        obj = module
        for name in attrs:
            obj = getattr(obj, name)  # raises if Megatron renamed it
        assert target.startswith(("megatron.core.", "megatron.training."))


def test_cpu_patches_are_module_local_and_revertible(registry):
    router = importlib.import_module("megatron.core.transformer.moe.router")
    dispatcher = importlib.import_module("megatron.core.transformer.moe.token_dispatcher")
    original_move = dispatcher.maybe_move_tensor_to_cpu
    original_bias = router.TopKRouter._apply_expert_bias
    applied = registry.apply(CPU)
    assert set(applied) == set(REGISTRY.patches)
    assert registry.apply(CPU) == applied  # idempotent
    # Megatron's modules see a CPU shim, the real torch.cuda is untouched.
    assert isinstance(router.torch, TorchView)
    assert router.torch.cuda.current_device() == "cpu"
    assert router.torch.cuda is not torch.cuda and torch.cuda.current_device is not None
    assert router.torch.Tensor is torch.Tensor and router.torch.cat is torch.cat
    with router.torch.cuda.stream(router.torch.cuda.Stream()):
        router.torch.cuda.current_stream().wait_stream(None)
    assert dispatcher.maybe_move_tensor_to_cpu is adaptor.maybe_move_tensor_to_cpu
    assert router.TopKRouter._apply_expert_bias is not original_bias
    assert not hasattr(router.TopKRouter._apply_expert_bias, "_torchdynamo_orig_callable")
    with pytest.raises(RuntimeError, match="cannot re-apply"):
        registry.apply(DeviceChoice("npu", "hccl"))
    registry.revert()
    assert router.torch is torch
    assert dispatcher.maybe_move_tensor_to_cpu is original_move
    assert router.TopKRouter._apply_expert_bias is original_bias


def test_on_cuda_only_the_training_side_patches(registry):
    """No device patch on CUDA; the flags/validation/config patches apply on every device."""
    assert sorted(registry.apply(DeviceChoice("cuda", "nccl"))) == [
        "megatron.core.datasets.utils.compile_helpers",
        "megatron.training.argument_utils.core_transformer_config_from_args",
        "megatron.training.argument_utils.gpt_config_from_args",
        "megatron.training.arguments.add_megatron_arguments",
        "megatron.training.arguments.core_transformer_config_from_args",
        "megatron.training.arguments.validate_args",
    ]


def test_maybe_move_tensor_to_cpu_returns_numpy_splits():
    splits = torch.tensor([3, 0, 5])
    out = adaptor.maybe_move_tensor_to_cpu(splits, as_numpy=True)
    assert isinstance(out, np.ndarray) and out.tolist() == [3, 0, 5]
    assert adaptor.maybe_move_tensor_to_cpu(splits) is splits
    assert adaptor.maybe_move_tensor_to_cpu(None) is None


def test_registry_rejects_duplicates_and_bad_targets():
    reg = PatchRegistry()
    p = Patch(target="megatron.core.utils.torch.nn", why="test", make=lambda d: None)
    reg.register(p)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register(p)
    reg2 = PatchRegistry()
    reg2.register(Patch(target="megatron.core.utils.torch.cuda.amp", why="t", make=lambda d: None))
    with pytest.raises(ValueError, match="only <module>.torch.<attr>"):
        reg2.apply(CPU)


def test_host_shim_falls_back_to_torch_cuda():
    shim = HostCudaShim()
    assert shim.is_available() is False
    assert shim.amp is torch.cuda.amp
    event = shim.Event(enable_timing=True)
    event.record()
    event.synchronize()


def test_describe_lists_every_patch():
    text = REGISTRY.describe()
    for target, patch in REGISTRY.patches.items():
        assert target in text and patch.why in text


@pytest.mark.parametrize(
    "cuda, npu, forced, expected",
    [
        (True, False, "", ("cuda", "nccl")),
        (False, True, "", ("npu", "hccl")),
        (True, True, "", ("cuda", "nccl")),
        (False, False, "", ("cpu", "gloo")),
        (True, False, "cpu", ("cpu", "gloo")),
    ],
)
def test_device_choice(monkeypatch, cuda, npu, forced, expected):
    monkeypatch.setattr(device, "_cuda_available", lambda: cuda)
    monkeypatch.setattr(device, "_npu_available", lambda: npu)
    monkeypatch.setenv("LOCMOE_DEVICE", forced)
    choice = device.choose_device()
    assert (choice.type, choice.backend) == expected


def test_device_choice_rejects_unknown(monkeypatch):
    monkeypatch.setenv("LOCMOE_DEVICE", "tpu")
    with pytest.raises(ValueError, match="LOCMOE_DEVICE='tpu'"):
        device.choose_device()


ROPE_MODULES = (
    "megatron.core.models.common.embeddings.rope_utils",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding",
)


def test_the_rope_cp_split_is_replaced_where_megatron_binds_it(registry):
    """On the CPU every module that binds get_pos_emb_on_this_cp_rank (RoPE, mRoPE, YaRN)
    gets the device-agnostic split, and revert() gives Megatron's back. (Megatron's failing on
    the CPU, the rows against its batch split and RoPE training under CP 2:
    tests/test_context_parallel_cpu.py.)"""
    modules = [importlib.import_module(name) for name in ROPE_MODULES]
    originals = [m.get_pos_emb_on_this_cp_rank for m in modules]
    assert len(set(originals)) == 1
    registry.apply(CPU)
    for m in modules:
        assert m.get_pos_emb_on_this_cp_rank is adaptor.shims.pos_emb_on_this_cp_rank
    registry.revert()
    assert [m.get_pos_emb_on_this_cp_rank for m in modules] == originals
