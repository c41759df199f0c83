"""Save and resume the CPU training loop through Megatron's distributed checkpointing.

The GPU path saves with Megatron's own ``save_checkpoint`` (``--save --ckpt-format
torch_dist``); this module gives the simulated-cluster loop the same format and the same
pieces: the model's ``sharded_state_dict()`` (the plugin routers' capacity state — delta,
ec_min, the step they came from, the routing step — are persistent buffers in it), the Adam
state sharded like the parameters it belongs to (Megatron's own helpers, as its FP32Optimizer
does; that class itself allocates on ``device='cuda'``), and each rank's RNG state,
written with the torch_dist strategy into ``DIR/iter_XXXXXXX`` next to Megatron's
``latest_checkpointed_iteration.txt`` tracker file.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

TRACKER_FILE = "latest_checkpointed_iteration.txt"
"""Megatron's name for the file holding the last saved iteration."""


def iteration_dir(root: str | os.PathLike, iteration: int) -> Path:
    """Megatron's directory name for one saved iteration."""
    return Path(root) / f"iter_{iteration:07d}"


def latest_iteration(root: str | os.PathLike) -> int | None:
    """The iteration named in the tracker file, or None if nothing was saved under root."""
    tracker = Path(root) / TRACKER_FILE
    if not tracker.exists():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise ValueError(
            f"{tracker} holds {text!r}, not an iteration number; point the load directory at a "
            "checkpoint saved by this loop or by Megatron's save_checkpoint."
        )
    return int(text)


def _rng_state() -> object:
    """This rank's RNG state as a ShardedObject (one entry per rank)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    rank, world = dist.get_rank(), dist.get_world_size()
    return ShardedObject("rng_state", {"torch": torch.get_rng_state()}, (world,), (rank,))


def _init_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Zero Adam moments for every parameter, so a load knows the state's structure."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not optimizer.state[p]:
                optimizer.state[p] = {
                    "step": torch.zeros((), dtype=torch.float32),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }


def _sharded_optimizer_state(optimizer, model_sd: dict, is_loading: bool) -> dict:
    """The optimizer's state dict with each moment a ShardedTensor shaped like its parameter;
    the step (equal for every parameter) saved once, as Megatron does."""
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        optim_state_to_sharding_state,
    )

    if is_loading:
        _init_adam_state(optimizer)
    state = optimizer.state_dict()
    steps = {float(s["step"]) for s in state["state"].values() if "step" in s}
    if len(steps) > 1:
        raise ValueError(f"parameters are at different optimizer steps {sorted(steps)}")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    id_map = get_param_id_to_sharded_param_map(model_sd, params)
    optim_state_to_sharding_state(state, id_map, exclude_keys=("step",))
    state["common_step"] = steps.pop() if steps else 0.0
    return state


def _load_optimizer_state(optimizer, state: dict) -> None:
    step = state.pop("common_step")
    for param_state in state["state"].values():
        param_state["step"] = torch.tensor(step, dtype=torch.float32)
    optimizer.load_state_dict(state)


def _sharded_state(model, optimizer, iteration: int, is_loading: bool) -> dict:
    model_sd = model.sharded_state_dict()
    return {
        "model": model_sd,
        "optimizer": _sharded_optimizer_state(optimizer, model_sd, is_loading),
        "iteration": iteration,
        "rng_state": _rng_state(),
    }


def save(model, optimizer, iteration: int, root: str | os.PathLike) -> Path:
    """Write the model, optimizer and RNG state of ``iteration`` (collective over all ranks)."""
    from megatron.core import dist_checkpointing

    path = iteration_dir(root, iteration)
    if dist.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(_sharded_state(model, optimizer, iteration, False), str(path))
    dist.barrier()
    if dist.get_rank() == 0:
        (Path(root) / TRACKER_FILE).write_text(str(iteration))
    dist.barrier()
    return path


def load(model, optimizer, root: str | os.PathLike) -> int:
    """Restore the latest iteration saved under ``root`` into model and optimizer; return it."""
    from megatron.core import dist_checkpointing

    iteration = latest_iteration(root)
    if iteration is None:
        raise FileNotFoundError(
            f"no {TRACKER_FILE} under {root}: nothing to resume from; save first or drop the "
            "load directory."
        )
    state = dist_checkpointing.load(
        _sharded_state(model, optimizer, iteration, True), str(iteration_dir(root, iteration))
    )
    model.load_state_dict(state["model"])
    _load_optimizer_state(optimizer, state["optimizer"])
    torch.set_rng_state(state["rng_state"]["torch"])
    return int(state["iteration"])
