"""The Megatron adaptor: the one registry of every change the plugin makes to Megatron-Core.

``registry`` (Patch, PatchRegistry, REGISTRY), ``shims`` (what CUDA calls mean on the CPU and
NPU) and ``patches`` (every registration; ``apply``). ``apply()`` installs the patches that fit
this process's device; ``python -m megatron_locmoe.adaptor --list`` prints them.
"""

from megatron_locmoe.adaptor.patches import apply, main
from megatron_locmoe.adaptor.registry import CHECKED_ON, REGISTRY, Patch, PatchRegistry, TorchView
from megatron_locmoe.adaptor.shims import HostCudaShim, accelerator_shim, maybe_move_tensor_to_cpu

__all__ = [
    "CHECKED_ON",
    "REGISTRY",
    "HostCudaShim",
    "Patch",
    "PatchRegistry",
    "TorchView",
    "accelerator_shim",
    "apply",
    "main",
    "maybe_move_tensor_to_cpu",
]
