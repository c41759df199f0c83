"""Which device and which collective backend this process uses.

The plugin never hard-codes CUDA: the device type comes from what torch reports as present
(CUDA, Ascend NPU through torch_npu, or the CPU), and the backend follows the device
(nccl / hccl / gloo). ``LOCMOE_DEVICE`` forces a type, e.g. ``cpu`` for a simulated cluster on
a GPU machine.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass

import torch

BACKEND_FOR_DEVICE = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}
"""Collective backend per device type (torch's own defaults for these device types)."""

_ENV_DEVICE = "LOCMOE_DEVICE"


@dataclass(frozen=True)
class DeviceChoice:
    """The device type of this process and the collective backend that goes with it."""

    type: str
    backend: str

    @property
    def is_accelerator(self) -> bool:
        return self.type != "cpu"

    def torch_device(self, local_rank: int = 0) -> torch.device:
        if self.type == "cpu":
            return torch.device("cpu")
        return torch.device(self.type, local_rank)


def _npu_available() -> bool:
    """True when torch_npu imports and sees a device (import registers ``torch.npu``)."""
    try:
        importlib.import_module("torch_npu")
    except ImportError:
        return False
    npu = getattr(torch, "npu", None)
    return bool(npu is not None and npu.is_available())


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def _npu_process() -> bool:
    """True when this process already imported torch_npu and sees an NPU: an Ascend rank.

    Checked before CUDA because ``torch_npu.contrib.transfer_to_npu`` (imported by the Ascend
    rank entry, ``python -m megatron_locmoe.launch --worker``) replaces ``torch.cuda`` with
    ``torch.npu``, so ``torch.cuda.is_available()`` answers for the NPUs there."""
    return "torch_npu" in sys.modules and _npu_available()


def detect_device_type() -> str:
    """``cuda``, ``npu`` or ``cpu``: what is present, unless LOCMOE_DEVICE says otherwise."""
    forced = os.environ.get(_ENV_DEVICE, "").strip().lower()
    if forced:
        if forced not in BACKEND_FOR_DEVICE:
            raise ValueError(
                f"{_ENV_DEVICE}={forced!r} is not a device type this plugin knows; "
                f"use one of {sorted(BACKEND_FOR_DEVICE)} or unset it to detect the device."
            )
        return forced
    if _npu_process():
        return "npu"
    if _cuda_available():
        return "cuda"
    if _npu_available():
        return "npu"
    return "cpu"


def choose_device() -> DeviceChoice:
    """The device type present here and its collective backend."""
    device_type = detect_device_type()
    return DeviceChoice(type=device_type, backend=BACKEND_FOR_DEVICE[device_type])
