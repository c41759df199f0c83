"""What a locality-sweep run trains, in a form two TrainSettings can be compared by: every
run-control field as it is, the model, optimizer, batch and dataset in the form the CPU loop
builds them (sim/trainer.py), whichever way the settings describe them (at 03c7b47 the loop's
own size fields and overrides, or Megatron's TransformerConfig, GPT options and optimizer for
the flags; now the model, a TransformerConfig, and the same GPT options and optimizer).

tests/fixtures/locality_sweep_settings.json holds the former Python run table's runs (analysis/
sweep.py ``sweep_runs`` / ``run_key`` / ``settings_for`` at commit 03c7b47, before the runs
became preset entries): per layout and run its run key, label, priority and settings in this
form, on the corpora of :func:`tiny_corpora`. :func:`legacy_record` wrote it (it calls that
commit's API: ``python tests/sweep_equivalence.py OUT.json`` on a checkout of 03c7b47 with this
file copied in). tests/test_sweep_presets.py compares the preset's runs, built through the
launcher's translator, with it field by field. (What every run shares is stored once under
``common``: the file as :func:`legacy_record` wrote it, factored.)
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import sys
from pathlib import Path
from unittest import mock

MODEL_FIELDS = (
    "model",
    # at 03c7b47 (legacy_record): the loop's own model's sizes and overrides, or the flags'
    # TransformerConfig; one TransformerConfig, ``model``, since
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_experts",
    "topk",
    "transformer_overrides",
    "transformer_config",
)
"""TrainSettings fields the model is built from: compared as the config the loop builds
(``comparable``'s ``model``: the fixture recorded it so, whichever fields described it)."""
BUILT_FIELDS = ("gpt_model_options", "optimizer", "lr", "global_batch_size", "dataset_options")
"""Compared as the GPTModel arguments, optimizer, micro-batches and dataset the loop builds."""
PATH_FIELDS = (
    "data_prefix",
    "data_prefix_per_node",
    "eval_prefix",
    "eval_prefix_per_node",
    "tensorboard_dir",
    "progress_path",
)
"""Written relative to the corpus root / run directory, so the record is machine-independent."""


def tiny_corpora(root: Path, node_counts=(2, 4, 8, 16)) -> dict[int, dict]:
    """Per node count, a corpus laid out as ``demo.prepare_domains`` lays it out (one domain
    per node and its held-out documents, the mixture and its held-out, all_counts.npy), each
    dataset a few short documents: what the translator's parse-time checks read, fast."""
    import numpy as np

    from megatron_locmoe.sim.data import VOCAB_SIZE, write_documents

    out = {}
    for n in node_counts:
        d = root / f"nodes{n}"
        d.mkdir(parents=True, exist_ok=True)
        docs = [f"document {i} of a tiny corpus" for i in range(4)]
        prefixes = [write_documents(d / f"domain{k}", docs)["prefix"] for k in range(n)]
        valid = [write_documents(d / f"domain{k}_valid", docs)["prefix"] for k in range(n)]
        np.save(d / "all_counts.npy", np.ones(VOCAB_SIZE, dtype=np.int64))
        out[n] = {
            "prefixes": prefixes,
            "valid_prefixes": valid,
            "mixture": write_documents(d / "mixture", docs)["prefix"],
            "mixture_valid": write_documents(d / "mixture_valid", docs)["prefix"],
            "counts": str(d / "all_counts.npy"),
            "domains": [{"name": f"domain{k}"} for k in range(n)],
        }
    return out


def _plain(value):
    """JSON-able and machine-independent: callables by name, dtypes and enums by name."""
    if isinstance(value, functools.partial):
        return {"partial": _plain(value.func), "args": _plain(list(value.args)),
                "kwargs": _plain(value.keywords)}  # fmt: skip
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '?')}.{value.__qualname__}"
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


def _built_config(settings, ep: int):
    """The TransformerConfig the loop builds for ``settings`` on one pipeline stage, no TP / CP
    (sim/trainer.py ``_transformer_config``, the process groups' sizes given)."""
    from megatron.core import parallel_state as ps

    from megatron_locmoe.sim import trainer

    sizes = dict(
        get_pipeline_model_parallel_world_size=1,
        get_virtual_pipeline_model_parallel_world_size=None,
        get_tensor_model_parallel_world_size=1,
        get_expert_tensor_parallel_world_size=1,
        get_context_parallel_world_size=1,
    )
    with mock.patch.multiple(ps, **{k: (lambda v=v: v) for k, v in sizes.items()}):
        return trainer._transformer_config(settings, ep)


def _gpt_model_options(settings) -> dict:
    """GPTModel's arguments as the loop passes them (its defaults filled in)."""
    from megatron.core.models.gpt import GPTModel

    from megatron_locmoe.sim.data import VOCAB_SIZE

    defaults = {
        k: p.default
        for k, p in inspect.signature(GPTModel.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    options = {"vocab_size": VOCAB_SIZE, "max_sequence_length": settings.seq_length}
    options.update(settings.gpt_model_options)
    keys = ("share_embeddings_and_output_weights", "position_embedding_type", "rotary_percent",
            "rotary_base", "rope_scaling", "seq_len_interpolation_factor",
            "fp16_lm_cross_entropy")  # fmt: skip
    return {**{k: defaults[k] for k in keys}, **options}


def _optimizer(settings) -> dict:
    """The optimizer the loop builds: AdamW's betas and eps, clipping, the learning rate and
    weight decay at every step (constant, or Megatron's scheduler's arguments)."""
    o = settings.optimizer
    if o is None:  # trainer._optimizer: AdamW(lr), torch's betas and eps, no decay, no clipping
        return {"betas": [0.9, 0.999], "eps": 1e-8, "clip_grad": 0.0, "lr": settings.lr,
                "weight_decay": 0.0}  # fmt: skip
    s = o.scheduler
    constant = s["lr_decay_style"] == "constant" and s["lr_warmup_steps"] == 0
    steady_wd = s["start_wd"] == s["end_wd"]
    return {
        "betas": [o.adam_beta1, o.adam_beta2],
        "eps": o.adam_eps,
        "clip_grad": o.clip_grad,
        "lr": s["max_lr"] if constant else _plain(s),
        "weight_decay": s["start_wd"] if steady_wd else _plain(s),
    }


def _dataset(settings) -> dict:
    """GPTDatasetConfig's options as the loop builds them (trainer._dataset), with
    GPTDatasetConfig's defaults for the options the settings do not give."""
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    defaults = {
        f.name: f.default
        for f in dataclasses.fields(GPTDatasetConfig)
        if f.default is not dataclasses.MISSING
    }
    options = dict(split="100,0,0", path_to_cache=None, reset_position_ids=False,
                   reset_attention_mask=False, eod_mask_loss=False)  # fmt: skip
    options |= settings.dataset_options
    options |= dict(random_seed=settings.seed, sequence_length=settings.seq_length)
    keys = ("mmap_bin_files", "create_attention_mask")
    return _plain({**{k: defaults[k] for k in keys}, **options})


def comparable(settings, ep: int, root: Path, run_dir: Path) -> dict:
    """Everything ``settings`` trains and records, in the form the loop builds it."""
    from megatron_locmoe.sim.trainer import TrainSettings

    out = {}
    for f in dataclasses.fields(TrainSettings):
        if f.name in MODEL_FIELDS or f.name in BUILT_FIELDS:
            continue
        value = getattr(settings, f.name)
        if f.name in PATH_FIELDS:
            value = _relative(value, root, run_dir)
        out[f.name] = _plain(vars(value) if f.name == "locmoe" else value)
    if out["locmoe"].get("hash_token_counts"):
        out["locmoe"]["hash_token_counts"] = _relative(
            out["locmoe"]["hash_token_counts"], root, run_dir
        )
    config = _built_config(settings, ep)
    out["model"] = {f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config)}
    out["gpt_model"] = _plain(_gpt_model_options(settings))
    out["optimizer"] = _optimizer(settings)
    per_pass = settings.micro_batch_size * ep  # one data-parallel rank per EP rank here
    out["micro_batches_per_step"] = (settings.global_batch_size or per_pass) // per_pass
    out["dataset"] = _dataset(settings)
    return out


def _relative(value, root: Path, run_dir: Path):
    if isinstance(value, list):
        return [_relative(v, root, run_dir) for v in value]
    if value is None:
        return None
    for base, name in ((run_dir, "RUN"), (root, "DATA")):
        try:
            return f"{name}/{Path(value).relative_to(base)}"
        except ValueError:
            pass
    return value


def legacy_record(out: Path) -> None:
    """Write the former run table's settings and run keys (run at commit 03c7b47)."""
    import tempfile

    from megatron_locmoe.analysis import sweep

    args = sweep.parse_args([])
    record = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpora = tiny_corpora(root / "data")
        for layout in (*sweep.SWEEP_LAYOUTS, "4x1"):
            nodes, rpn = sweep.LAYOUTS[layout]
            for run in sweep.sweep_runs(layout):
                run_dir = root / "runs" / layout / run.name
                settings = sweep.settings_for(run, args, layout, corpora[nodes], run_dir)
                record[f"{layout}/{run.name}"] = {
                    "priority": run.priority,
                    "label": run.label,
                    "run_key": json.loads(json.dumps(sweep.run_key(run, args, layout))),
                    "settings": comparable(settings, nodes * rpn, root / "data", run_dir),
                }
    out.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    legacy_record(Path(sys.argv[1]))
