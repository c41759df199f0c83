"""The device layer picks cuda / npu / cpu and nccl / hccl / gloo from what is present.

Faked at the boundary the code really reads: ``torch.cuda.is_available()``, whether a
``torch_npu`` package imports (its import registers ``torch.npu``), and ``LOCMOE_DEVICE``.
The Ascend rank case (torch_npu's ``transfer_to_npu`` makes ``torch.cuda`` answer for the NPUs)
must still come out as npu / hccl.
"""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from megatron_locmoe import adaptor, device
from megatron_locmoe.device import BACKEND_FOR_DEVICE, DeviceChoice, choose_device


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """``machine(cuda=..., npu=...)``: fake what is installed and visible.

    npu=None: torch_npu is not installed; False: installed, no NPU visible; True: NPUs.
    """
    monkeypatch.delenv("LOCMOE_DEVICE", raising=False)
    had_npu = hasattr(torch, "npu")
    saved_npu = getattr(torch, "npu", None)

    def make(cuda: bool, npu: bool | None):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
        if npu is None:
            monkeypatch.setitem(sys.modules, "torch_npu", None)  # import raises ImportError
            return
        pkg = tmp_path / "site" / "torch_npu"
        pkg.mkdir(parents=True, exist_ok=True)
        (pkg / "__init__.py").write_text(
            textwrap.dedent(
                f"""
                import types, torch
                torch.npu = types.SimpleNamespace(is_available=lambda: {npu!r},
                                                  device_count=lambda: {8 if npu else 0})
                """
            )
        )
        monkeypatch.syspath_prepend(str(tmp_path / "site"))

    yield make
    sys.modules.pop("torch_npu", None)
    if had_npu:
        torch.npu = saved_npu
    elif hasattr(torch, "npu"):
        del torch.npu


@pytest.mark.parametrize(
    "cuda, npu, expected",
    [
        (False, None, ("cpu", "gloo")),  # a laptop / CI: nothing present
        (True, None, ("cuda", "nccl")),  # a GPU node
        (False, True, ("npu", "hccl")),  # an Ascend node (torch_npu imports, NPUs visible)
        (False, False, ("cpu", "gloo")),  # torch_npu installed, no NPU visible
        (True, False, ("cuda", "nccl")),  # GPU node that also has torch_npu installed
    ],
)
def test_device_and_backend_follow_what_is_present(machine, cuda, npu, expected):
    machine(cuda=cuda, npu=npu)
    choice = choose_device()
    assert (choice.type, choice.backend) == expected
    assert choice.backend == BACKEND_FOR_DEVICE[choice.type]


def test_ascend_rank_after_transfer_to_npu_is_npu(machine):
    """transfer_to_npu replaces torch.cuda by torch.npu, so torch.cuda.is_available() is True on
    an Ascend rank; torch_npu being imported must win."""
    machine(cuda=True, npu=True)
    import torch_npu  # noqa: F401  the rank entry imports it before anything else

    choice = choose_device()
    assert (choice.type, choice.backend) == ("npu", "hccl")
    assert adaptor.accelerator_shim(choice) is torch.npu  # Megatron's MoE path gets torch.npu


def test_cuda_node_without_torch_npu_never_imports_it(machine):
    machine(cuda=True, npu=None)
    assert choose_device().type == "cuda"
    assert sys.modules.get("torch_npu") is None


@pytest.mark.parametrize("forced, expected", [("cpu", "gloo"), (" NPU ", "hccl"), ("cuda", "nccl")])
def test_locmoe_device_overrides_detection(machine, monkeypatch, forced, expected):
    machine(cuda=True, npu=None)
    monkeypatch.setenv("LOCMOE_DEVICE", forced)
    choice = choose_device()
    assert choice.type == forced.strip().lower() and choice.backend == expected


def test_unknown_forced_device_names_the_choices(machine, monkeypatch):
    machine(cuda=False, npu=None)
    monkeypatch.setenv("LOCMOE_DEVICE", "tpu")
    with pytest.raises(ValueError, match=r"LOCMOE_DEVICE='tpu'.*\['cpu', 'cuda', 'npu'\]"):
        choose_device()


def test_device_choice_places_ranks():
    assert DeviceChoice("cuda", "nccl").torch_device(3) == torch.device("cuda", 3)
    assert DeviceChoice("cpu", "gloo").torch_device(3) == torch.device("cpu")
    assert (
        DeviceChoice("npu", "hccl").is_accelerator
        and not DeviceChoice("cpu", "gloo").is_accelerator
    )


def test_detection_reads_the_environment_each_time(machine, monkeypatch):
    """No caching: a SimCluster worker sets LOCMOE_DEVICE=cpu after import and is obeyed."""
    machine(cuda=True, npu=None)
    assert device.detect_device_type() == "cuda"
    monkeypatch.setenv("LOCMOE_DEVICE", "cpu")
    assert device.detect_device_type() == "cpu"
