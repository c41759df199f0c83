"""Megatron's parsed arguments as the CPU loop's settings, refusing what it cannot honour.

Megatron's ``pretrain()`` is not a CPU target, so a ``device: cpu`` preset trains on the
simulated cluster (:mod:`megatron_locmoe.launch.cpu`) with :mod:`megatron_locmoe.sim.trainer`.
:func:`train_settings` maps the namespace Megatron's parser validated onto its
``TrainSettings`` and ``ParallelLayout`` while the plan is checked (before any rank starts):
Megatron's TransformerConfig and GPT options for the model, the router and ``--locmoe-*``
flags, steps, batch, seed, Megatron's optimizer and learning-rate schedule
(:func:`optimizer_settings`), TensorBoard / W&B dirs and ``--save`` / ``--load`` checkpoints
(:func:`checkpoint_settings`); every flag the loop cannot honour is refused with the fix.

The simulated cluster's modules (torch) and Megatron are imported inside the functions that
use them: the launcher loads none of them for ``--help`` or a ``--no-check`` dry run.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from megatron_locmoe.launch.presets import PresetError


def train_settings(args, run: str, devices_per_node: int, log_dir: Path, per_node: bool = False):
    """Megatron's parsed arguments -> (TrainSettings, ParallelLayout) of the CPU loop.

    The CPU loop (megatron_locmoe.sim.trainer) runs expert and pipeline parallelism (with
    virtual stages), in float32, through Megatron's forward-backward schedules (micro-batches
    accumulated up to the global batch), on indexed datasets of byte tokens or of the
    real-text corpus's tokenizer (:func:`vocab_refusals`; Megatron's GPT dataset with the
    flags' split, masks and cache; :func:`data_settings`), evaluates the
    held-out data the flags name once after training (:func:`held_out_settings`) and counts
    the routing of the last steps (``routing_stats_steps``: the tail the reports average
    over) and, with ``--locmoe-routing-profile``, writes the training routing's profile
    windows as pretrain_gpt does (``analysis.placement.ProfileRequest``); anything else in the flags is refused here rather than silently ignored. ``--save`` / ``--save-interval`` /
    ``--load`` map to its torch_dist checkpoints; its per-step progress goes to
    ``log_dir/progress.jsonl`` (tokens/s). The model is built from Megatron's own
    TransformerConfig for the flags, and the optimizer and schedule are Megatron's for them
    (:func:`optimizer_settings`), so every model and optimizer flag means what it means to
    pretrain_gpt."""
    # torch and Megatron when a plan is checked, not on import (the module's docstring)
    from megatron_locmoe.analysis.placement import ProfileRequest
    from megatron_locmoe.arguments import gpt_dataset_options, locmoe_config_from_args
    from megatron_locmoe.config import ConfigError
    from megatron_locmoe.sim.cluster import ParallelLayout
    from megatron_locmoe.sim.trainer import TrainSettings

    world = args.world_size
    refuse = []
    cp = args.context_parallel_size
    if cp > 1 and getattr(args, "window_size", None) is not None:
        refuse.append(f"--window-size with --context-parallel-size {cp}: drop one")
    if args.bf16 or args.fp16:
        refuse.append("--bf16/--fp16: the CPU loop trains in float32, drop it")
    locmoe = locmoe_config_from_args(args)
    # the nodes that read data: the virtual cluster's (each micro-batch is a virtual rank's,
    # on its virtual node) or the simulated cluster's
    nodes = locmoe.virtual_shape[0] if locmoe.virtual_shape else world // devices_per_node
    data, why = data_settings(args, nodes, per_node)
    refuse += why
    refuse += vocab_refusals(args.vocab_size, data)
    dp = world // (args.pipeline_model_parallel_size * args.tensor_model_parallel_size * cp)
    if locmoe.virtual_ranks:  # every process runs each virtual rank's micro-batches
        dp *= locmoe.virtual_ranks
    if args.global_batch_size % (args.micro_batch_size * dp):
        refuse.append(
            f"--global-batch-size {args.global_batch_size}: not a multiple of micro batch "
            f"{args.micro_batch_size} x data-parallel size {dp}"
        )
    if args.num_experts is None:
        refuse.append("--num-experts is missing: the CPU loop trains an MoE model")
    if args.optimizer != "adam":
        refuse.append(f"--optimizer {args.optimizer}: the CPU loop runs adam (AdamW), use adam")
    if args.train_iters is None:
        refuse.append("--train-samples: the CPU loop counts iterations, give --train-iters")
    if args.decoupled_lr is not None:
        refuse.append("--decoupled-lr: the CPU loop has one learning rate for every parameter")
    if "quantile_balancing" in str(args.moe_router_load_balancing_type):
        refuse.append(
            "--moe-router-load-balancing-type quantile_balancing: the CPU loop does not step its "
            "per-expert beta; use aux_loss, seq_aux_loss, global_aux_loss or "
            "--moe-router-enable-expert-bias"
        )
    if args.exit_duration_in_mins:
        refuse.append(
            "--exit-duration-in-mins: the CPU loop stops by iterations, use --exit-interval"
        )
    try:  # --locmoe-routing-profile: windows of the training routing, as pretrain_gpt's
        routing_profile = ProfileRequest.from_args(args)
    except ConfigError as e:
        refuse.append(str(e))
    held_out, why = held_out_settings(args, nodes, dp)
    refuse += why
    refuse += checkpoint_flag_refusals(args)
    if locmoe.devices_per_node not in (None, devices_per_node):
        refuse.append(
            f"--locmoe-devices-per-node {locmoe.devices_per_node} differs from the simulated "
            f"{devices_per_node} per node: drop it"
        )
    if refuse:
        raise PresetError(f"run {run} on the CPU loop: " + "; ".join(refuse))
    # torch, numpy and Megatron when a plan is checked, not on import (the module's docstring)
    from megatron.training.argument_utils import gpt_config_from_args

    from megatron_locmoe.analysis.runlog import tail_length
    from megatron_locmoe.spec import padded_vocab

    # the model is built from Megatron's own configs for these flags, as pretrain_gpt builds it
    gpt = gpt_config_from_args(args)
    gpt_model_options = dict(
        vocab_size=padded_vocab(gpt),
        max_sequence_length=gpt.seq_length,
        share_embeddings_and_output_weights=gpt.share_embeddings_and_output_weights,
        position_embedding_type=gpt.position_embedding_type,
        rotary_percent=gpt.rotary_percent,
        rotary_base=gpt.rotary_base,
        rope_scaling=gpt.rope_scaling,
        seq_len_interpolation_factor=gpt.seq_len_interpolation_factor,
        fp16_lm_cross_entropy=gpt.fp16_lm_cross_entropy,
    )
    wandb_dir = (args.wandb_save_dir or "wandb") if args.wandb_project else None
    # per-split paths: the whole training prefix trains (Megatron's blend_per_split), that of
    # --train-data-path or each domain's beside its own held-out prefix (pretrain_gpt's)
    whole = args.train_data_path or (
        getattr(args, "locmoe_domain_data_path", None)
        and (getattr(args, "locmoe_domain_valid_data_path", None) or args.valid_data_path)
    )
    data_options = {"split": "100,0,0"} if whole else {}
    settings = TrainSettings(
        **data,
        **held_out,
        routing_stats_steps=tail_length(args.train_iters),
        routing_profile=routing_profile,
        locmoe=locmoe,
        model=gpt.transformer,
        steps=args.train_iters,
        seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size,
        global_batch_size=args.global_batch_size,
        lr=args.lr,
        seed=args.seed,
        tensorboard_dir=args.tensorboard_dir,
        wandb_dir=wandb_dir,
        run_name=args.wandb_exp_name or run,
        save_interval=args.save_interval or 0,
        exit_interval=args.exit_interval or 0,
        exit_signal_handler=bool(args.exit_signal_handler),
        exit_signal=int(args.exit_signal),
        **checkpoint_settings(args),
        progress_path=str(log_dir / "progress.jsonl"),
        per_layer_logging=args.moe_per_layer_logging,
        check_for_nan_in_loss_and_grad=args.check_for_nan_in_loss_and_grad,
        dataset_options=gpt_dataset_options(args) | data_options,
        gpt_model_options=gpt_model_options,
        optimizer=optimizer_settings(args),
    )
    layout = ParallelLayout(
        devices_per_node=devices_per_node,
        ep=args.expert_model_parallel_size,
        etp=args.expert_tensor_parallel_size,
        tp=args.tensor_model_parallel_size,
        pp=args.pipeline_model_parallel_size,
        vp=args.virtual_pipeline_model_parallel_size,
        cp=cp,
    )
    return settings, layout


def vocab_refusals(vocab_size: int, data: dict) -> list[str]:
    """``--vocab-size`` must be the vocabulary of the training data's tokens: the real-text
    corpus's (its build.json records it, e.g. 32768) or 257 for the byte corpora
    ``megatron_locmoe.sim.data`` writes (no build.json). Datasets not there yet are passed over:
    the plan's data step builds them (the real-text corpus with the vocabulary its manifest
    pins)."""
    from megatron_locmoe.data.corpus import corpus_vocab  # numpy: when a plan is checked
    from megatron_locmoe.sim.data import VOCAB_SIZE

    prefixes = (data.get("data_prefix_per_node") or [data["data_prefix"]]) if data else []
    there = [p for p in prefixes if Path(f"{p}.idx").is_file()]
    vocabs = {p: corpus_vocab(p) or VOCAB_SIZE for p in there}
    if len(set(vocabs.values())) > 1:
        return ["the training datasets come from different vocabularies: " + ", ".join(
            f"{p} ({v})" for p, v in vocabs.items()) + "; train on one corpus"]  # fmt: skip
    want = next(iter(vocabs.values()), vocab_size)
    if vocab_size != want:
        what = "byte tokens" if want == VOCAB_SIZE else "tokens of its build.json's tokenizer"
        return [f"--vocab-size {vocab_size}: the corpus has {what}, use {want}"]
    return []


def data_settings(args, nodes: int, per_node: bool) -> tuple[dict, list[str]]:
    """TrainSettings' training-data fields for the flags, and what is refused:

    - ``--locmoe-domain-data-path D_0 .. D_{n-1}``: pretrain_gpt's domain-sharded loader, node
      k's ranks reading domain k mod n (the parse-time check: n <= nodes);
    - ``per_node`` (the pydoc-domains data step): one ``--data-path`` prefix per node, node k
      reading the k-th;
    - one ``--data-path`` or ``--train-data-path`` prefix, read by every rank (a blend of
      several is not: the CPU loop reads one dataset)."""
    domains = getattr(args, "locmoe_domain_data_path", None)
    if domains:
        per = [domains[k % len(domains)] for k in range(nodes)]
        return dict(data_prefix=per[0], data_prefix_per_node=per), []
    if per_node:
        if len(args.data_path or []) != nodes:
            return {}, [f"give one --data-path prefix per node ({nodes})"]
        return dict(data_prefix=args.data_path[0], data_prefix_per_node=list(args.data_path)), []
    refuse = []
    if args.test_data_path:
        refuse.append("--test-data-path: the CPU loop evaluates the validation data only; drop it")
    if args.train_data_path and args.split is not None:
        refuse.append(
            f"--split {args.split} with --train-data-path: Megatron's dataset config takes one or "
            "the other (split and blend_per_split are incompatible); drop --split"
        )
    paths = args.data_path or args.train_data_path
    if args.mock_data or not paths or len(paths) != 1:
        refuse.append(
            "give one --data-path PREFIX (python -m megatron_locmoe.sim.data --out PREFIX writes "
            "it), or one --train-data-path PREFIX"
        )
        return {}, refuse
    return dict(data_prefix=paths[0], data_prefix_per_node=None), refuse


def held_out_settings(args, nodes: int, dp: int) -> tuple[dict, list[str]]:
    """TrainSettings' evaluation fields for the flags, and what is refused.

    Megatron evaluates ``--eval-iters`` iterations of ``--eval-global-batch-size`` samples
    (default: the global batch) on the held-out data every ``--eval-interval`` steps (unset:
    never) and once after training; the CPU loop evaluates once, after the last step, the same
    number of micro-batches per rank (``eval_batches`` = eval-iters x eval global batch /
    (micro batch x data-parallel size)), each data-parallel rank its own samples. Held-out
    data: ``--locmoe-domain-valid-data-path`` with ``--locmoe-domain-data-path`` (node k's
    ranks evaluate domain k mod n's, as they train on it), or one ``--valid-data-path`` prefix
    (every rank). Refused: an interval that would evaluate during training, another
    evaluation micro-batch size, --skip-train, --full-validation, --multiple-validation-sets,
    --split's validation part, per-domain held-out data without training domains
    (pretrain_gpt has rank r evaluate domain r mod n; the CPU loop evaluates by node)."""
    refuse = []
    shares = [float(v) for v in re.findall(r"[.0-9]+", args.split or "100")]  # as Megatron's
    valid_share = shares[1] if len(shares) > 1 else 0.0
    if args.eval_iters and valid_share > 0:
        refuse.append(
            f"--split {args.split} with --eval-iters {args.eval_iters}: the CPU loop does not "
            "evaluate --split's validation part; use --split 100,0,0 or --eval-iters 0, and "
            "name held-out data with --valid-data-path or --locmoe-domain-valid-data-path"
        )
    domain_valid = getattr(args, "locmoe_domain_valid_data_path", None)
    valid = args.valid_data_path
    domains = getattr(args, "locmoe_domain_data_path", None)
    if domain_valid and not domains:
        refuse.append(
            "--locmoe-domain-valid-data-path without --locmoe-domain-data-path: pretrain_gpt "
            "has rank r evaluate domain r mod D, the CPU loop evaluates by node; give the "
            "training domains with --locmoe-domain-data-path, or one --valid-data-path"
        )
    if valid and len(valid) != 1:
        refuse.append(
            f"--valid-data-path {' '.join(valid)}: the CPU loop evaluates one held-out prefix"
        )
    if args.skip_train:
        refuse.append("--skip-train: the CPU loop trains, then evaluates; drop it")
    if refuse or not (domain_valid or valid) or not args.eval_iters:
        return {}, refuse
    if args.eval_interval is not None and args.eval_interval <= args.train_iters:
        refuse.append(
            f"--eval-interval {args.eval_interval}: Megatron would also evaluate during "
            "training, the CPU loop evaluates once, after the last step; drop --eval-interval "
            f"(or give one above --train-iters {args.train_iters}), or --eval-iters 0"
        )
    mbs = args.micro_batch_size
    if (args.eval_micro_batch_size or mbs) != mbs:
        refuse.append(
            f"--eval-micro-batch-size {args.eval_micro_batch_size}: the CPU loop evaluates "
            f"micro-batches of --micro-batch-size {mbs}; drop it"
        )
    eval_gbs = args.eval_global_batch_size or args.global_batch_size  # (Megatron: divisible)
    for flag, on in (
        ("--full-validation", args.full_validation),
        ("--multiple-validation-sets", args.multiple_validation_sets),
    ):
        if on:
            refuse.append(f"{flag}: the CPU loop evaluates --eval-iters iterations of one set")
    if refuse:
        return {}, refuse
    out = dict(eval_batches=args.eval_iters * (eval_gbs // (mbs * dp)))
    if domain_valid:
        out["eval_prefix_per_node"] = [domain_valid[k % len(domain_valid)] for k in range(nodes)]
    else:
        out["eval_prefix"] = valid[0]
    return out, []


CHECKPOINT_FLAGS_HONOURED = {
    "save": "--save: torch_dist checkpoints of the CPU loop",
    "save_interval": "--save-interval",
    "load": "--load: resume from its latest (or --ckpt-step) iteration",
    "no_load_optim": "--no-load-optim: fresh Adam state and learning-rate schedule",
    "no_load_rng": "--no-load-rng: the RNGs as seeded, not as saved",
    "finetune": "--finetune: --load's model weights only, from step 1",
    "pretrained_checkpoint": "--pretrained-checkpoint: its weights when --load has none",
    "ckpt_step": "--ckpt-step: that iteration of --load",
    "exit_on_missing_checkpoint": "--exit-on-missing-checkpoint: refused here when --load "
    "holds no checkpoint",
    "ckpt_format": "--ckpt-format torch_dist (the only format the CPU loop writes and reads)",
    "auto_detect_ckpt_format": "--auto-detect-ckpt-format: torch_dist is what it finds",
    "verify_integrity": "--verify-integrity: every load checks every file's checksum",
    "use_dist_ckpt_deprecated": "deprecated in Megatron, no effect",
    "dist_ckpt_format_deprecated": "deprecated in Megatron, no effect",
    "ckpt_fully_parallel_save_deprecated": "deprecated in Megatron, no effect",
    "async_strategy": "only read with --async-save, which is refused",
}
"""Flags of Megatron's checkpointing group the CPU loop honours (the rest are refused unless
they keep Megatron's default: ``checkpoint_flag_refusals``)."""

EXIT_FLAGS_REFUSED = {
    "exit_signal_handler_for_dataloader": "the CPU loop has no data-loader workers",
}


def _megatron_defaults() -> dict[str, tuple[object, str]]:
    """dest -> (default, flag) of every option in Megatron's checkpointing group."""
    # torch and Megatron when a plan is checked, not on import (the module's docstring)
    from megatron.training.arguments import add_megatron_arguments

    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_megatron_arguments(parser)
    out = {}
    for group in parser._action_groups:
        if group.title == "checkpointing":
            for action in group._group_actions:
                out[action.dest] = (action.default, action.option_strings[0])
    return out


def checkpoint_flag_refusals(args) -> list[str]:
    """Checkpoint and exit flags the CPU loop cannot honour, each with the fix; --load's and
    --finetune's directories checked before any rank starts."""
    refuse = []
    for dest, (default, flag) in _megatron_defaults().items():
        value = getattr(args, dest, default)
        if dest in CHECKPOINT_FLAGS_HONOURED or value == default:
            continue
        shown = flag if isinstance(value, bool) or value is None else f"{flag} {value}"
        refuse.append(f"{shown}: the CPU loop saves torch_dist synchronously; drop it")
    if args.ckpt_format != "torch_dist":
        refuse.append(f"--ckpt-format {args.ckpt_format}: the CPU loop writes torch_dist")
    for dest, why in EXIT_FLAGS_REFUSED.items():
        if getattr(args, dest, False):
            refuse.append(f"--{dest.replace('_', '-')}: {why}; drop it")
    if args.ckpt_step is not None and (args.finetune or args.pretrained_checkpoint):
        refuse.append(
            "--ckpt-step with --finetune / --pretrained-checkpoint: the CPU loop takes the "
            "latest iteration's weights; drop --ckpt-step"
        )
    refuse += _load_dir_refusals(args)
    return refuse


def _load_dir_refusals(args) -> list[str]:
    """--load / --pretrained-checkpoint naming nothing loadable, refused with the fix (--load
    may name an empty or missing --save directory: the usual resume-or-start idiom)."""
    # torch and Megatron when a plan is checked, not on import (the module's docstring)
    from megatron_locmoe.sim.checkpoint import iteration_dirs, latest_iteration

    out = []
    for flag, where in (
        ("--load", args.load),
        ("--pretrained-checkpoint", args.pretrained_checkpoint),
    ):
        if where is None:
            continue
        try:
            latest = latest_iteration(where)
        except ValueError as e:
            out.append(f"{flag} {where}: {e}")
            continue
        if latest is not None:
            if args.ckpt_step is not None and flag == "--load":
                if args.ckpt_step not in iteration_dirs(where):
                    have = ", ".join(map(str, iteration_dirs(where))) or "none"
                    out.append(
                        f"--ckpt-step {args.ckpt_step}: {where} holds no iteration "
                        f"{args.ckpt_step} (it has: {have})"
                    )
            continue
        same_as_save = args.save is not None and os.path.abspath(where) == os.path.abspath(
            args.save
        )
        if flag == "--pretrained-checkpoint" or args.finetune:
            out.append(f"{flag} {where}: no checkpoint there to take the model weights from")
        elif args.exit_on_missing_checkpoint:
            out.append(
                f"--load {where} holds no checkpoint and --exit-on-missing-checkpoint is set: "
                "point --load at a checkpoint directory, or drop the flag"
            )
        elif not os.path.isdir(where) and not same_as_save:
            out.append(
                f"--load {where}: no such directory; point it at a checkpoint directory (one "
                "with latest_checkpointed_iteration.txt), or drop --load to start from step 1"
            )
    return out


def checkpoint_settings(args) -> dict:
    """TrainSettings' checkpoint fields for Megatron's checkpoint flags (see
    CHECKPOINT_FLAGS_HONOURED): --finetune takes --load's weights only (Megatron: iteration 0,
    no optimizer, no RNG); --pretrained-checkpoint's weights start a run whose --load holds
    none."""
    settings = dict(
        save_dir=args.save,
        load_dir=args.load,
        load_optim=not args.no_load_optim,
        load_rng=not args.no_load_rng,
        load_iteration=args.ckpt_step,
    )
    if args.finetune:
        settings.update(load_dir=None, init_weights_dir=args.load)
    elif args.pretrained_checkpoint:
        settings.update(init_weights_dir=args.pretrained_checkpoint)
    return settings


def optimizer_settings(args):
    """The optimizer and learning-rate schedule Megatron's pretrain() builds from ``args``
    (``get_optimizer_param_scheduler``, iteration-based), for the CPU loop."""
    # torch and Megatron when a plan is checked, not on import (the module's docstring)
    from megatron_locmoe.sim.trainer import OptimizerSettings

    gbs = args.global_batch_size
    decay_steps = (args.lr_decay_iters or args.train_iters) * gbs
    if args.lr_warmup_fraction is not None:
        warmup_steps = args.lr_warmup_fraction * decay_steps
    else:
        warmup_steps = args.lr_warmup_iters * gbs
    wsd = args.lr_wsd_decay_iters
    scheduler = dict(
        init_lr=args.lr_warmup_init,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.start_weight_decay,
        end_wd=args.end_weight_decay,
        wd_incr_steps=args.train_iters * gbs,
        wd_incr_style=args.weight_decay_incr_style,
        wsd_decay_steps=None if wsd is None else wsd * gbs,
        lr_wsd_decay_style=args.lr_wsd_decay_style,
    )
    return OptimizerSettings(
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        clip_grad=args.clip_grad,
        scheduler=scheduler,
        samples_per_step=gbs,
    )
