"""Save and resume the CPU training loop through Megatron's distributed checkpointing.

The GPU path saves with Megatron's own ``save_checkpoint`` (``--save --ckpt-format
torch_dist``); this module gives the simulated-cluster loop the same format and the same
pieces: the model's ``sharded_state_dict()`` (the plugin routers' capacity state — delta,
ec_min, the step they came from, the routing step — are persistent buffers in it), the Adam
state sharded like the parameters it belongs to (Megatron's own helpers, as its FP32Optimizer
does; that class itself allocates on ``device='cuda'``), and each rank's RNG state,
written with the torch_dist strategy into ``DIR/iter_XXXXXXX`` next to Megatron's
``latest_checkpointed_iteration.txt`` tracker file. Under pipeline parallelism each rank
holds its stage's model chunks (``model``, or ``model0``, ``model1``, ... with virtual stages,
as Megatron names them); the sharded keys are global (layer and expert offsets), so a
checkpoint loads into any pipeline and expert layout. Beside the files, ``locmoe_settings.json``
records the router type, the expert count and the plugin version; both loads compare them with
the model first, so another router or expert count is refused in one line rather than with
Megatron's KeyError or shape traceback (or, for routers without parameters, not at all).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def _paths(root: str | os.PathLike, iteration: int | None = None) -> tuple[Path, Path | None]:
    """Megatron's tracker file and (for an iteration) its ``iter_XXXXXXX`` directory."""
    from megatron.training.checkpointing import (
        get_checkpoint_name,
        get_checkpoint_tracker_filename,
    )

    tracker = Path(get_checkpoint_tracker_filename(str(root)))
    if iteration is None:
        return tracker, None
    return tracker, Path(get_checkpoint_name(str(root), iteration, return_base_dir=True))


def latest_iteration(root: str | os.PathLike) -> int | None:
    """The iteration named in the tracker file, or None if nothing was saved under root.

    (Megatron's read_metadata all-reduces the value on a CUDA tensor, so it is read here.)"""
    tracker, _ = _paths(root)
    if not tracker.exists():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise ValueError(
            f"{tracker} holds {text!r}, not an iteration number; point the load directory at a "
            "checkpoint saved by this loop or by Megatron's save_checkpoint."
        )
    return int(text)


def iteration_dirs(root: str | os.PathLike) -> list[int]:
    """The iterations with an ``iter_XXXXXXX`` directory under root, ascending."""
    found = []
    for d in Path(root).glob("iter_*"):
        digits = d.name.removeprefix("iter_")
        if d.is_dir() and digits.isdigit():
            found.append(int(digits))
    return sorted(found)


def agreed_iteration(root: str | os.PathLike) -> int | None:
    """``latest_iteration`` as every rank reads it, the same on all or an error on all (one
    all-reduce): ranks that resumed from different iterations would train on silently apart."""
    mine = latest_iteration(root)
    value = -1 if mine is None else mine
    bounds = torch.tensor([value, -value], dtype=torch.long)
    dist.all_reduce(bounds, op=dist.ReduceOp.MAX)
    highest, lowest = int(bounds[0]), -int(bounds[1])
    if highest != lowest:

        def name(v):
            return "nothing" if v < 0 else f"iteration {v}"

        raise RuntimeError(
            f"ranks disagree on the checkpoint to resume under {root}: between {name(lowest)} "
            f"and {name(highest)} (this rank: {name(value)}); a save still in progress, or "
            "nodes that see different directories: give every node the same --load directory"
        )
    return mine


def _rng_state() -> object:
    """This rank's RNG states as a ShardedObject (one entry per rank), as Megatron's
    checkpoints keep them: torch's default generator (hidden dropout, initialisation) and
    Megatron's model-parallel tracker (attention and expert dropout forks), plus Python's and
    numpy's."""
    import random

    import numpy as np
    from megatron.core import tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    rank, world = dist.get_rank(), dist.get_world_size()
    state = {
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
        "random": random.getstate(),
        "numpy": np.random.get_state(),
    }
    return ShardedObject("rng_state", state, (world,), (rank,))


def _restore_rng_state(state: dict) -> None:
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])


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
    """The optimizer's state dict with each moment a ShardedTensor shaped like its parameter and
    the step, shared by every parameter, saved once: Megatron's FP32Optimizer recipe."""
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        optim_state_to_sharding_state,
    )
    from megatron.core.optimizer.optimizer import MegatronOptimizer

    if is_loading:
        _init_adam_state(optimizer)
    state = optimizer.state_dict()
    step = MegatronOptimizer._extract_common_per_param_step(state)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    id_map = get_param_id_to_sharded_param_map(model_sd, params)
    optim_state_to_sharding_state(state, id_map, exclude_keys=("step",))
    if step is not None:
        state["state"]["common_step"] = step
    return state


def _load_optimizer_state(optimizer, state: dict) -> None:
    from megatron.core.optimizer.optimizer import MegatronOptimizer

    step = state["state"].pop("common_step", None)
    if step is not None:
        MegatronOptimizer._restore_common_per_param_step(state, step)
    optimizer.load_state_dict(state)


def _model_state(chunks: list) -> dict:
    """This rank's model chunks' sharded state dicts under Megatron's names."""
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def _load_model_state(chunks: list, state: dict) -> None:
    if len(chunks) == 1:
        chunks[0].load_state_dict(state["model"])
    else:
        for i, chunk in enumerate(chunks):
            chunk.load_state_dict(state[f"model{i}"])


def _sharded_state(chunks: list, optimizer, iteration: int, is_loading: bool) -> dict:
    models = _model_state(chunks)
    return models | {
        "optimizer": _sharded_optimizer_state(optimizer, models, is_loading),
        "iteration": iteration,
        "rng_state": _rng_state(),
    }


SETTINGS = "locmoe_settings.json"
"""The plugin settings a checkpoint was saved with (``model_settings``), written by ``save``
before the checksums (so they cover it); absent from checkpoints of older versions."""


def model_settings(chunks: list) -> dict:
    """What a checkpoint must match to load into these model chunks: the router type (the
    ``--moe-router-type`` key of the first router found, Megatron's own TopKRouter counting as
    megatron; None on a pipeline stage without MoE layers), the expert count, the plugin
    version (megatron_locmoe.__version__), and the routing settings that read where experts
    live (group-limited groups, config.NODE_MAP_SETTINGS: ``placement apply`` refuses those)."""
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_locmoe import __version__
    from megatron_locmoe.routers import ROUTERS

    plugin_routers = tuple(ROUTERS.values())
    router = found = None
    for module in (m for chunk in chunks for m in chunk.modules()):
        if isinstance(module, plugin_routers):
            router = type(module).name  # the most derived: locmoe_plus, not locmoe
        elif isinstance(module, TopKRouter):
            router = "megatron"
        if router is not None:
            found = module
            break
    config = getattr(chunks[0], "config", None)
    locmoe = getattr(found, "locmoe", None)
    return {
        "router_type": router,
        "num_experts": getattr(config, "num_moe_experts", None),
        "plugin_version": __version__,
        "num_groups": getattr(config, "moe_router_num_groups", None),
        "node_map_settings": locmoe.node_map_settings() if locmoe is not None else {},
    }


def _related_routers(a: str, b: str) -> bool:
    """Whether one router type's class derives from the other's (locmoe_plus from locmoe): the
    same parameters and buffers, so the weights of one start the other."""
    from megatron_locmoe.routers import ROUTERS

    if a not in ROUTERS or b not in ROUTERS:
        return False
    return issubclass(ROUTERS[a], ROUTERS[b]) or issubclass(ROUTERS[b], ROUTERS[a])


def _check_settings(chunks: list, path: Path, weights_only: bool = False) -> None:
    """Refuse a checkpoint saved with another router type or expert count, naming both values
    and the fix; a different plugin version is only logged (the state format is Megatron's).
    ``weights_only`` (starting from a checkpoint's weights, --finetune): a router whose class
    derives from the saved one's, or the other way round, may start from it."""
    saved_file = path / SETTINGS
    if not saved_file.is_file():
        return  # saved before the settings were recorded
    saved, mine = json.loads(saved_file.read_text()), model_settings(chunks)
    differ = []
    for key, flag, what in (
        ("router_type", "--moe-router-type", "router"),
        ("num_experts", "--num-experts", "expert count"),
    ):
        if None in (saved.get(key), mine[key]) or saved.get(key) == mine[key]:
            continue
        if key == "router_type" and weights_only and _related_routers(saved[key], mine[key]):
            continue
        differ.append((flag, what, saved[key], mine[key]))
    if differ:
        was = ", ".join(f"{what} {old}" for _, what, old, _ in differ)
        now = ", ".join(f"{what} {new}" for _, what, _, new in differ)
        same = " ".join(f"{flag} {old}" for flag, _, old, _ in differ)
        raise ValueError(
            f"checkpoint {path} was saved with {was}, this run has {now}: resume with the "
            f"checkpoint's settings ({same}), or start fresh without --load (another --save "
            "directory)"
        )
    version = saved.get("plugin_version")
    if version != mine["plugin_version"] and dist.get_rank() == 0:
        logger.warning(
            "checkpoint %s was saved by megatron_locmoe %s, this is %s",
            path,
            version,
            mine["plugin_version"],
        )


def save(chunks: list, optimizer, iteration: int, root: str | os.PathLike) -> Path:
    """Write the model chunks, optimizer and RNG state of ``iteration`` (collective over all
    ranks). A failed write (disk full, ...) raises on every rank naming the first OS error and
    its file, after the partial ``iter_XXXXXXX`` directory is removed; the tracker then still
    names the last complete checkpoint."""
    from megatron.core import dist_checkpointing

    from megatron_locmoe.adaptor.shims import WRITE_ERRORS

    tracker, path = _paths(root, iteration)

    def make_dir() -> None:
        if dist.get_rank() == 0:
            path.mkdir(parents=True, exist_ok=True)

    _saved_or_removed(path, root, make_dir)
    WRITE_ERRORS.clear()
    state = _sharded_state(chunks, optimizer, iteration, False)
    _saved_or_removed(path, root, lambda: dist_checkpointing.save(state, str(path)))

    def seal() -> None:
        if dist.get_rank() == 0:  # the files are all written: their checksums, then the tracker
            (path / SETTINGS).write_text(json.dumps(model_settings(chunks), indent=1))
            _write_checksums(path)
            tmp = tracker.with_name(f".{tracker.name}.tmp")
            tmp.write_text(str(iteration))
            os.replace(tmp, tracker)  # never a half-written tracker

    _saved_or_removed(path, root, seal)
    return path


def _first_os_error(error: BaseException | None) -> str | None:
    """``STRERROR: PATH`` of the first OS error behind a failed save on this rank: a write
    Megatron's writer reduced to its class (shims.WRITE_ERRORS), else one in the exception's
    chain."""
    from megatron_locmoe.adaptor.shims import WRITE_ERRORS

    found = WRITE_ERRORS[0] if WRITE_ERRORS else None
    chains = [error]
    failures = getattr(error, "failures", None)  # torch's CheckpointException: rank -> (exc, tb)
    if isinstance(failures, dict):
        chains += [f[0] if isinstance(f, tuple) else f for _, f in sorted(failures.items())]
    for seen in chains:
        while found is None and isinstance(seen, BaseException):
            if isinstance(seen, OSError):
                found = seen
            seen = seen.__cause__ or seen.__context__
    if found is None:
        return None
    text = found.strerror or str(found)
    return f"{text}: {found.filename}" if found.filename else text


def _saved_or_removed(path: Path, root, step) -> None:
    """Run one step of a save on every rank; if it failed on any, rank 0 removes the partial
    ``path`` and every rank raises with the first OS error (its file) of the lowest failing
    rank, or that rank's exception."""
    error = None
    try:
        step()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # torch's CheckpointException is a BaseException
        error = e
    mine = None
    if error is not None:
        os_error = _first_os_error(error)
        mine = (0, os_error) if os_error else (1, f"{type(error).__name__}: {error}")
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, mine)
    failed = sorted((r[0], rank, r[1].splitlines()[0]) for rank, r in enumerate(reports) if r)
    if not failed:
        return
    if dist.get_rank() == 0:
        import shutil

        shutil.rmtree(path, ignore_errors=True)
    dist.barrier()
    _, rank, text = failed[0]  # the first OS error, else the first rank's exception
    last = latest_iteration(root)
    kept = f"iteration {last}" if last is not None else "none"
    raise RuntimeError(
        f"{text} (rank {rank}): checkpoint {path.name} was not saved and its partial directory "
        f"was removed; the last complete checkpoint under {root}: {kept}. Free space or give "
        "another --save directory"
    ) from error


CHECKSUMS = "locmoe_checksums.json"
"""SHA-256 of every file of an iteration, written by ``save`` after the files."""


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_checksums(path: Path) -> None:
    import json

    sums = {
        f.name: _sha256(f) for f in sorted(path.iterdir()) if f.is_file() and f.name != CHECKSUMS
    }
    tmp = path / f".{CHECKSUMS}.tmp"
    tmp.write_text(json.dumps(sums, indent=1))
    os.replace(tmp, path / CHECKSUMS)


def _verify_checksums(path: Path) -> None:
    """Every rank checks a share of the files against ``save``'s checksums; a damaged or
    missing file stops all ranks, named, before anything is read into the model."""
    import json

    manifest = path / CHECKSUMS
    bad: list[str] = []
    if manifest.is_file():
        sums = json.loads(manifest.read_text())
        rank, world = dist.get_rank(), dist.get_world_size()
        for i, (name, digest) in enumerate(sorted(sums.items())):
            if i % world != rank:
                continue
            f = path / name
            if not f.is_file():
                bad.append(f"{name} is missing")
            elif _sha256(f) != digest:
                bad.append(f"{name} does not match its checksum")
    count = torch.tensor([len(bad)])
    dist.all_reduce(count)
    if int(count):
        mine = f" (this rank: {'; '.join(bad)})" if bad else ""
        raise RuntimeError(
            f"checkpoint {path} is damaged: {int(count)} file(s) fail the checksums written at "
            f"save{mine}; resume from an earlier iteration or a good copy"
        )


def _all_ranks_succeed(action: str, fn):
    """Run ``fn`` on every rank; if it fails on any, every rank raises (the others would
    otherwise start training and wait for that rank in their first collective)."""
    error = None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - re-raised below, on this rank and the others
        error = e
    failed = torch.tensor([0 if error is None else 1])
    dist.all_reduce(failed)
    if error is not None:
        raise error
    if int(failed):
        raise RuntimeError(f"{action} failed on {int(failed)} other rank(s); see their errors")
    return result


def _checked_path(root: str | os.PathLike, iteration: int) -> Path:
    """The iteration's directory, present and matching its checksums on every rank."""
    _, path = _paths(root, iteration)

    def find() -> None:
        if not path.is_dir():
            raise FileNotFoundError(
                f"{_paths(root)[0]} names iteration {iteration}, but {path} is missing: the "
                "save did not finish or the directory was moved; restore it or point --load "
                "elsewhere"
            )

    _all_ranks_succeed(f"opening {path}", find)
    _verify_checksums(path)
    return path


def load(
    chunks: list,
    optimizer,
    root: str | os.PathLike,
    *,
    optimizer_state: bool = True,
    rng: bool = True,
    iteration: int | None = None,
) -> int | None:
    """Restore the latest iteration saved under ``root`` (or ``iteration``, Megatron's
    --ckpt-step) into the model chunks and optimizer; return it (None when nothing was saved
    there: the caller starts afresh, as Megatron does). ``optimizer_state`` / ``rng`` False:
    leave the optimizer / the RNGs as they are (Megatron's --no-load-optim / --no-load-rng)."""
    from megatron.core import dist_checkpointing

    if iteration is None:
        iteration = agreed_iteration(root)
        if iteration is None:
            return None
    path = _checked_path(root, iteration)
    _all_ranks_succeed(f"checking {path}", lambda: _check_settings(chunks, path))

    def restore() -> int:
        sharded = _sharded_state(chunks, optimizer, iteration, True)
        if not optimizer_state:
            del sharded["optimizer"]
        if not rng:
            del sharded["rng_state"]
        state = dist_checkpointing.load(sharded, str(path))
        _load_model_state(chunks, state)
        if optimizer_state:
            _load_optimizer_state(optimizer, state["optimizer"])
        if rng:
            _restore_rng_state(state["rng_state"])
        return int(state["iteration"])

    return _all_ranks_succeed(f"loading {path}", restore)


def load_model_weights(chunks: list, root: str | os.PathLike) -> int:
    """Only the model weights of the latest iteration under ``root``, from any pipeline,
    virtual-stage and expert layout (Megatron's --finetune); returns the iteration read."""
    from megatron.core import dist_checkpointing

    iteration = agreed_iteration(root)
    if iteration is None:
        raise FileNotFoundError(f"no checkpoint under {root} to take the model weights from")
    path = _checked_path(root, iteration)
    _all_ranks_succeed(f"checking {path}", lambda: _check_settings(chunks, path, weights_only=True))

    def restore() -> None:
        models = _model_state(chunks)
        state = dist_checkpointing.load(models, str(path))
        _load_model_state(chunks, state)

    _all_ranks_succeed(f"loading the model weights of {path}", restore)
    return iteration
