"""What the GPU benchmarks share: a one-process Megatron parallel state, timing with device
events after warm-up (median of repeats), peak memory, the card's published peaks, and the
results record (card, versions, command).

Every benchmark prints ratios against a baseline measured in the same run on the same card;
absolute numbers only go into the JSON with the card's name.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

CARD_PEAKS = {
    # name substring: (memory bandwidth B/s, dense bf16 FLOP/s), from NVIDIA's datasheets
    "H100 80GB HBM3": (3.35e12, 989e12),  # H100 SXM5
    "H100 PCIe": (2.0e12, 756e12),
    "H100 NVL": (3.9e12, 835e12),
    "H200": (4.8e12, 989e12),
}


def card_peaks(device: torch.device) -> tuple[str, float | None, float | None]:
    """(name, bandwidth B/s, bf16 FLOP/s) of this device; None where the card is unknown."""
    if device.type != "cuda":
        return platform.processor() or "cpu", None, None
    name = torch.cuda.get_device_name(device)
    for key, (bw, flops) in CARD_PEAKS.items():
        if key in name:
            return name, bw, flops
    return name, None, None


def init_single_process(device_type: str) -> torch.device:
    """A world of one (nccl on GPU, gloo on CPU) with Megatron's parallel state, so routers,
    dispatchers and experts build exactly as in training (EP = TP = 1)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_locmoe import adaptor
    from megatron_locmoe.device import BACKEND_FOR_DEVICE, DeviceChoice
    from megatron_locmoe.topology import get_topology

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    if device_type == "cpu":
        os.environ["LOCMOE_DEVICE"] = "cpu"
    adaptor.apply()
    choice = DeviceChoice(device_type, BACKEND_FOR_DEVICE[device_type])
    device = choice.torch_device()
    if device_type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(choice.backend, rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(1234)
    get_topology(devices_per_node=1)
    return device


def moe_config(H: int, E: int, k: int, **overrides):
    """The benchmarks' one-layer bf16 MoE TransformerConfig: ``testing.moe_config`` (local
    spec, fp32 routing, pre-softmax scores for top-1) on the device, with Megatron's aux loss at
    0.01 and a plain GELU MLP unless ``overrides`` say otherwise."""
    import torch.nn.functional as F

    from megatron_locmoe.sim.testing import moe_config as small_moe_config

    kwargs = dict(
        hidden_size=H,
        num_attention_heads=8,
        num_moe_experts=E,
        moe_router_topk=k,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=0.01,
        params_dtype=torch.bfloat16,
        bf16=True,
        use_cpu_initialization=False,
        gated_linear_unit=False,
        activation_func=F.gelu,
    )
    return small_moe_config(ep=1, **{**kwargs, **overrides})


def timed(fn: Callable[[], None], device: torch.device, warmup: int, repeats: int, inner: int):
    """Median milliseconds per call of ``fn`` over ``repeats`` timings of ``inner`` calls each,
    after ``warmup`` calls (compilation, autotuning and allocator warm-up happen there)."""
    return timed_interleaved({"fn": fn}, device, warmup, repeats, inner)["fn"]


def add_timing_args(p, warmup: int, repeats: int, inner: int) -> None:
    """The command-line options of ``timed``'s loop (--warmup, --repeats, --inner), with a
    benchmark's defaults."""
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--inner", type=int, default=inner)


def timed_interleaved(
    fns: dict[str, Callable[[], None]], device: torch.device, warmup: int, repeats: int, inner: int
) -> dict[str, float]:
    """``timed`` for several functions whose samples alternate (A B C A B C ...), so a drift in
    the machine's speed (a busy host: these calls are often host-bound) hits each alike and
    their ratios stay meaningful."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize(device)
                start.record()
                for _ in range(inner):
                    fn()
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end) / inner)
            else:
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                samples[name].append((time.perf_counter() - t0) * 1000 / inner)
    return {name: statistics.median(values) for name, values in samples.items()}


def cuda_graphed(
    fn: Callable[[], None], device: torch.device, warmup: int = 3
) -> Callable[[], None]:
    """``fn`` (forward and backward) captured once into a CUDA graph: the returned callable
    replays it, so the host launches one graph instead of every kernel. Warm-up runs on a side
    stream first (compilation, autotuning, lazily built state), as CUDA-graph capture needs."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def device_time(fn: Callable[[], None], device: torch.device, reps: int = 20) -> float | None:
    """Milliseconds of device work per call, host overhead hidden: the calls are queued behind
    a ~50 ms device-side sleep, so the card never waits for the host (None off CUDA). With
    ``timed`` this tells a host-bound call (timed >> device_time) from a device-bound one."""
    if device.type != "cuda":
        return None
    for _ in range(3):
        fn()
    torch.cuda.synchronize(device)
    torch.cuda._sleep(int(1e8))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def profile(
    fn: Callable[[], None],
    device: torch.device,
    title: str,
    steps: int = 5,
    sort_by: str = "self_cpu_time_total",
) -> None:
    """Print where one call's time goes (ops by ``sort_by``: host self time by default, for
    host-bound calls; ``self_device_time_total`` for the card's; kernels launched per call)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.key_averages()
    kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    print(f"\n--- profile: {title}: {kernels / steps:.0f} device kernels per call")
    print(events.table(sort_by=sort_by, row_limit=25, max_name_column_width=60))


def peak_memory_mb(fn: Callable[[], None], device: torch.device) -> float | None:
    """Peak device memory allocated during one call beyond what was allocated before it."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def record(device: torch.device, **extra) -> dict:
    """The header of a results file: card, versions, command."""
    import megatron.core

    name, bw, flops = card_peaks(device)
    return {
        "card": name,
        "memory_bandwidth_Bps": bw,
        "bf16_peak_flops": flops,
        "torch": torch.__version__,
        "megatron_core": megatron.core.__version__,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        **extra,
    }


def write_json(path: str | None, data: dict) -> None:
    """Write the results file (its directory made as needed); nothing without a path."""
    if not path:
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def save(path: str | None, data: dict) -> None:
    """Write the results file and say so."""
    if path:
        write_json(path, data)
        print(f"wrote {path}")


def cell(value: float | None, spec: str) -> str:
    """A table cell: the value formatted by ``spec``, '-' where it was not measured (None)."""
    return "-" if value is None else format(value, spec)


def print_checks(checks: dict[str, object], against: str = "") -> None:
    """One line per check printed under a timing table: what was compared, the agreement."""
    for name, check in checks.items():
        print(f"  {name}{against}: {check}")


def print_graph_checks(rows: dict[str, dict]) -> None:
    """One line per row timed captured in a CUDA graph: its outputs against eager mode's."""
    print_checks({n: r["graph_check"] for n, r in rows.items() if "graph_check" in r}, " vs eager")


def run_pretrain_gpt(
    name: str, argv: list[str], logs: str | None = None, nproc: int = 1, env: dict | None = None
) -> tuple[str, float]:
    """``torchrun --standalone -m megatron_locmoe.pretrain_gpt ARGV`` (Megatron's pretrain()):
    (its standard output, seconds). A failure raises with the output's tail; with ``logs`` (a
    folder) the whole output of every run of ``name`` goes to ``logs/<name>.log``."""
    import subprocess

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free rendezvous port: runs may share a machine
        f"--nproc-per-node={nproc}",
        "-m",
        "megatron_locmoe.pretrain_gpt",
        *argv,
    ]
    full_env = dict(os.environ, CUDA_DEVICE_MAX_CONNECTIONS="1", PYTHONUNBUFFERED="1")
    full_env.update(env or {})
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env)
    if logs:
        os.makedirs(logs, exist_ok=True)
        with open(os.path.join(logs, f"{name}.log"), "a") as f:
            f.write(" ".join(cmd) + "\n" + proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout, time.time() - t0
