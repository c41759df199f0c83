"""FastLaunch reuses a compiled kernel only for arguments Triton would specialize alike, and
hands the runner every parameter in order (the GPU side runs in test_router_kernels.py)."""

from __future__ import annotations

import pytest
import torch

from megatron_locmoe.routers.fast_launch import FastLaunch


class FakeJit:
    """Stands in for a JITFunction: ``fn[grid](...)`` compiles (counted) and returns a kernel
    whose ``[grid](*all_params)`` records the launch."""

    __name__ = "fake_kernel"
    arg_names = ["x_ptr", "n", "scale", "BLOCK", "FLAG"]

    def __init__(self):
        self.compiles, self.launches = 0, []

    def __getitem__(self, grid):
        def compile_and_launch(*args, num_warps, **constexprs):
            self.compiles += 1
            self.launches.append(("jit", grid, args, constexprs, num_warps))
            return FakeKernel(self)

        return compile_and_launch


class FakeKernel:
    """CompiledKernel's launcher interface: run(grid x3, stream, function, metadata, launch
    metadata, enter hook, exit hook, *every parameter)."""

    function, packed_metadata = "cu_function", "metadata"

    def __init__(self, jit):
        self.jit = jit

    def run(self, g0, g1, g2, stream, function, metadata, launch_metadata, enter, exit_, *params):
        assert (stream, function, metadata) == ("stream", "cu_function", "metadata")
        self.jit.launches.append(("direct", (g0, g1, g2), params))


@pytest.fixture
def launch(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(
        torch._C, "_cuda_getCurrentRawStream", lambda device: "stream", raising=False
    )
    jit = FakeJit()
    return jit, FastLaunch(jit, interpreted=False)


def test_second_launch_goes_direct_with_all_parameters_in_order(launch):
    jit, fast = launch
    x = torch.zeros(64)
    fast((3,), x, 32, 0.5, num_warps=4, BLOCK=16, FLAG=True)
    fast((5,), x, 48, 0.25, num_warps=4, BLOCK=16, FLAG=True)
    assert jit.compiles == 1
    assert jit.launches[-1] == ("direct", (5, 1, 1), (x, 48, 0.25, 16, True))


@pytest.mark.parametrize(
    "change",
    ["misaligned", "dtype", "int_one", "int_not_16", "int_64bit", "constexpr", "warps"],
)
def test_what_triton_specializes_on_compiles_again(launch, change):
    jit, fast = launch
    buffer = torch.zeros(65)
    base = dict(x=buffer[:64], n=32, BLOCK=16, num_warps=4)
    fast((1,), base["x"], base["n"], 1.0, num_warps=4, BLOCK=16, FLAG=False)
    new = dict(base)
    if change == "misaligned":
        new["x"] = buffer[1:]  # 4 bytes off
    elif change == "dtype":
        new["x"] = torch.zeros(64, dtype=torch.float64)
    elif change == "int_one":
        new["n"] = 1
    elif change == "int_not_16":
        new["n"] = 33
    elif change == "int_64bit":
        new["n"] = 2**32
    elif change == "constexpr":
        new["BLOCK"] = 32
    else:
        new["num_warps"] = 8
    fast((1,), new["x"], new["n"], 2.0, num_warps=new["num_warps"], BLOCK=new["BLOCK"], FLAG=False)
    assert jit.compiles == 2
    # a float argument alone never compiles again (Triton passes floats as fp32)
    fast((1,), new["x"], new["n"], 3.0, num_warps=new["num_warps"], BLOCK=new["BLOCK"], FLAG=False)
    assert jit.compiles == 2


def test_constexprs_out_of_order_are_refused(launch):
    _, fast = launch
    with pytest.raises(TypeError, match="in order"):
        fast((1,), torch.zeros(4), 16, 1.0, num_warps=4, FLAG=True, BLOCK=16)


def test_interpreted_always_goes_through_the_jit():
    jit = FakeJit()
    fast = FastLaunch(jit, interpreted=True)
    for _ in range(2):
        fast((1,), torch.zeros(4), 16, 1.0, num_warps=4, BLOCK=16, FLAG=True)
    assert jit.compiles == 2


def test_an_installed_launch_hook_takes_the_jit_path(launch, monkeypatch):
    """Profilers (proton) hook launches; the direct path would bypass them."""
    from triton import knobs

    jit, fast = launch
    hook = lambda metadata: None  # noqa: E731
    chain = knobs.runtime.launch_enter_hook
    if hasattr(chain, "calls"):  # triton 3.5+: a HookChain (restored after the test)
        monkeypatch.setattr(chain, "calls", [hook])
    else:  # older: the hook itself
        monkeypatch.setattr(knobs.runtime, "launch_enter_hook", hook)
    for _ in range(2):
        fast((1,), torch.zeros(4), 16, 1.0, num_warps=4, BLOCK=16, FLAG=True)
    assert jit.compiles == 2
