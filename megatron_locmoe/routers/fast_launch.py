"""Launching the router's Triton kernels with little host time.

Why: ``kernel[grid](*args)`` binds every argument in Python, specializes each one, hashes a
cache key and checks the kernel's globals on every call, host time of the order of the
router's whole card time at training shapes (docs/performance.md). ``FastLaunch`` keys
the compiled kernel on what Triton specializes our kinds of arguments on (each tensor's dtype
and 16-byte alignment, each int's width, divisibility by 16 and whether it is 1, the
constexprs and warps) and calls the compiled kernel's launcher with the current raw stream,
as Triton does after its lookup. The first call with a new key goes through
``kernel[grid]`` (which compiles), and so does every call under Triton's interpreter or with
a launch hook installed (profilers).
"""

from __future__ import annotations

import torch

try:
    from triton import knobs
except ImportError:  # pragma: no cover - older triton: no hooks to honour
    knobs = None


def _spec(arg) -> tuple | type:
    """What Triton's specialization reads from one runtime argument (over-keying only costs a
    compile)."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, not arg.data_ptr() & 15
    if isinstance(arg, bool):
        return bool, arg
    if isinstance(arg, int):
        return arg == 1, not arg & 15, -(2**31) <= arg < 2**31
    return type(arg)  # float: always fp32, never specialized


def _hooked() -> bool:
    """A launch hook is installed (an empty HookChain, Triton 3.5+'s default, is none)."""
    hook = knobs.runtime.launch_enter_hook if knobs is not None else None
    return hook is not None and bool(getattr(hook, "calls", True))


class FastLaunch:
    """``FastLaunch(jit_fn)(grid, *args, num_warps=w, **constexprs)``: ``jit_fn[grid](*args,
    **constexprs, num_warps=w)`` without Triton's per-call binding. ``args`` are the kernel's
    runtime parameters in order; the constexprs must be its trailing parameters."""

    def __init__(self, fn, interpreted: bool):
        self.fn = fn
        self.direct = not interpreted
        self.compiled: dict[tuple, object] = {}

    def __call__(self, grid: tuple[int, ...], *args, num_warps: int, **constexprs) -> None:
        if not self.direct:
            self.fn[grid](*args, **constexprs, num_warps=num_warps)
            return
        device = torch.cuda.current_device()
        values = tuple(constexprs.values())
        key = (device, num_warps, values, *map(_spec, args))
        kernel = self.compiled.get(key)
        if kernel is None or _hooked():
            names = tuple(self.fn.arg_names[len(args) :])
            if names != tuple(constexprs):  # the launcher takes every parameter, in order
                raise TypeError(f"{self.fn.__name__}: pass the constexprs in order {names}")
            self.compiled[key] = self.fn[grid](*args, **constexprs, num_warps=num_warps)
            return
        grid = grid + (1,) * (3 - len(grid))
        stream = torch._C._cuda_getCurrentRawStream(device)
        kernel.run(
            *grid, stream, kernel.function, kernel.packed_metadata, None, None, None, *args, *values
        )
