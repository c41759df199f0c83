"""The plugin's command-line flags, built from LocMoEConfig, and their validation.

Flags come from the dataclass fields through Megatron's own ArgumentGroupFactory (field
docstrings become the help): ``--moe-router-type`` for the router, ``--locmoe-<field>`` for the
rest. The adaptor adds them to Megatron's parser and runs ``validate_locmoe_args`` after
Megatron's ``validate_args``, so a bad combination fails at parse time with its fix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
from types import SimpleNamespace

from megatron.training.argument_utils import ArgumentGroupFactory

from megatron_locmoe.config import ConfigError, LocMoEConfig
from megatron_locmoe.data.indexed import check_dataset
from megatron_locmoe.graphs import check_local_cuda_graphs
from megatron_locmoe.node_data import check_domains
from megatron_locmoe.routers import router_class, router_names
from megatron_locmoe.routers.hash import load_token_counts
from megatron_locmoe.validation import changes_megatron, validate

logger = logging.getLogger(__name__)

ARGS_DEFAULTS = {"tokenizer_type": "NullTokenizer"}
"""Megatron argument defaults of the plugin's pretrain_gpt (the launcher checks with them too)."""

_FLAG_OVERRIDES = {"router_type": "moe_router_type"}
_BARE_MEANS_ON = {"fused_router"}
"""auto/on/off settings that were switches once: the bare flag keeps meaning on."""


_FILES_TO_COME: frozenset[str] = frozenset()


@contextlib.contextmanager
def files_written_before_training(paths):
    """Validate as if ``paths`` existed: a step before training writes them (the launcher's
    data step); the model build checks them again once they are there."""
    global _FILES_TO_COME
    saved, _FILES_TO_COME = _FILES_TO_COME, frozenset(os.path.abspath(p) for p in paths)
    try:
        yield
    finally:
        _FILES_TO_COME = saved


def _written_before_training(path: str) -> bool:
    return os.path.abspath(path) in _FILES_TO_COME and not os.path.exists(path)


def check_data_args(args) -> None:
    """The indexed datasets ``--data-path`` (a blend: weights and prefixes) and the per-split
    paths name, checked as Megatron's loader will read them (``check_indexed_dataset``): raises
    DatasetError naming the file. Those a step before training writes are passed over."""
    if getattr(args, "mock_data", False):
        return
    from megatron.core.datasets.utils import get_blend_from_list

    for name in ("data_path", "train_data_path", "valid_data_path", "test_data_path"):
        blend = get_blend_from_list(getattr(args, name, None))  # Megatron's reading of it
        for prefix in blend[0] if blend else []:
            if all(_written_before_training(f"{prefix}.{ext}") for ext in ("bin", "idx")):
                continue
            check_indexed_dataset(prefix)


def check_indexed_dataset(prefix: str) -> None:
    """A dataset that the command line names, checked as Megatron's IndexedDataset reads it (any
    token dtype, O(1) reads): raises DatasetError naming the file and the commands that write
    such datasets."""
    fix = (
        "rebuild it (python -m megatron_locmoe.data.corpus, python -m megatron_locmoe.sim.data "
        f"--out {prefix}, or Megatron's tools/preprocess_data.py)"
    )
    check_dataset(prefix, whole=False, fix=fix)


def dest(field_name: str) -> str:
    """argparse dest of a LocMoEConfig field: ``moe_router_type`` or ``locmoe_<field>``."""
    return _FLAG_OVERRIDES.get(field_name, f"locmoe_{field_name}")


class _LocMoEArgumentFactory(ArgumentGroupFactory):
    """Megatron's dataclass-to-argparse factory with the plugin's flag names."""

    def _build_argparse_kwargs_from_field(self, attribute):
        kwargs = super()._build_argparse_kwargs_from_field(attribute)
        name = dest(attribute.name)
        kwargs["dest"] = name
        flag = "--" + name.replace("_", "-")
        if kwargs.get("action") == "store_false":
            flag = "--no-" + flag[2:]
        kwargs["arg_names"] = [flag]
        if attribute.name in _BARE_MEANS_ON:  # --locmoe-fused-router alone: on
            kwargs.update(nargs="?", const="on")
        if attribute.name == "router_type":
            kwargs["choices"] = router_names()
        return kwargs


_UNESCAPED_PERCENT = re.compile(r"%(?!%|\(\w+\)[a-z])")


def mend_help_strings(parser) -> list[str]:
    """Escape a bare '%' in any help string argparse cannot format (Megatron 0.19.2's help of
    --moe-paged-stash-buffer-size-factor-cuda has one, so Megatron's own --help crashes);
    returns the flags mended."""
    mended = []
    for action in parser._actions:
        if not action.help or "%" not in action.help:
            continue
        try:
            action.help % {**vars(action), "prog": parser.prog}
        except (ValueError, TypeError, KeyError):
            action.help = _UNESCAPED_PERCENT.sub("%%", action.help)
            mended.extend(action.option_strings)
    return mended


def add_locmoe_args(parser):
    """Add the LocMoE flags to an argparse parser (idempotent; guards against upstream names)."""
    if "--moe-router-type" in parser._option_string_actions:
        return parser
    _LocMoEArgumentFactory(LocMoEConfig).build_group(parser, title="LocMoE")
    group = parser.add_argument_group(title="LocMoE data (megatron_locmoe/node_data.py)")
    group.add_argument(
        "--locmoe-domain-data-path",
        nargs="+",
        default=None,
        metavar="PREFIX",
        help="Domain-sharded data: one dataset prefix per domain; every rank of node k reads "
        "domain k mod D (node-correlated data, the setting locality-aware routing is for). "
        "Without it every rank reads --data-path's mixture (Megatron's loader, the control).",
    )
    group.add_argument(
        "--locmoe-domain-valid-data-path",
        nargs="+",
        default=None,
        metavar="PREFIX",
        help="Held-out data of each domain (same order as --locmoe-domain-data-path); without "
        "it, each domain's --split validation part. The evaluation reports every domain's loss.",
    )
    group = parser.add_argument_group(title="LocMoE routing profile (analysis/placement.py)")
    group.add_argument(
        "--locmoe-routing-profile",
        default=None,
        metavar="DIR",
        help="Write the training routing (co-activation and source-node counts, a token "
        "sample) as expert placement's profiles, DIR/profile_iterA-B.npz, for "
        "`python -m megatron_locmoe.analysis.placement plan`.",
    )
    group.add_argument(
        "--locmoe-routing-profile-interval",
        type=int,
        default=0,
        metavar="K",
        help="One profile every K training iterations (plan on one, check on the next); 0: "
        "one profile of the whole run.",
    )
    return parser


def gpt_dataset_options(args) -> dict:
    """GPTDatasetConfig's fields that come from the command line alone (not the blend or the
    tokenizer), as Megatron-LM's pretrain_gpt reads them: shared by the plugin's pretrain_gpt
    and the launcher's CPU loop, so --split, --eod-mask-loss, --reset-* and --data-cache-path
    mean the same in both."""
    return dict(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        split=args.split,
        path_to_cache=args.data_cache_path,
        mmap_bin_files=args.mmap_bin_files,
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader,
    )


def locmoe_config_from_args(args) -> LocMoEConfig:
    """The LocMoEConfig the parsed arguments describe."""
    return LocMoEConfig(
        **{f.name: getattr(args, dest(f.name)) for f in dataclasses.fields(LocMoEConfig)}
    )


def _transformer_view(args) -> SimpleNamespace:
    """Megatron's args as the TransformerConfig LocMoEConfig.validate reads: the same names,
    but for the expert count."""
    return SimpleNamespace(**{**vars(args), "num_moe_experts": args.num_experts})


def check_schedule(args) -> None:
    """Refuse ``--train-iters`` below 1 and a warm-up as long as the decay at parse time:
    Megatron accepts them and the run then dies after every rank has started (a bare
    AssertionError on the CPU loop, nothing trained or the scheduler's assertion on the GPU
    path)."""
    iters = getattr(args, "train_iters", None)
    if iters is not None and iters < 1:
        raise ConfigError(
            f"--train-iters {iters}: a run trains at least 1 step; give --train-iters N with "
            "N >= 1 (or --train-samples)"
        )
    warmup = getattr(args, "lr_warmup_iters", 0) or 0
    decay = getattr(args, "lr_decay_iters", None) or iters
    if iters and getattr(args, "lr_warmup_fraction", None) is None and warmup >= decay:
        raise ConfigError(
            f"--lr-warmup-iters {warmup} is not below the {decay} iterations the learning rate "
            "decays over (--lr-decay-iters, else --train-iters), which Megatron's scheduler "
            "asserts once every rank has started: lower --lr-warmup-iters or raise --train-iters"
        )


def validate_locmoe_args(args) -> LocMoEConfig:
    """Check the plugin flags against the rest of Megatron's arguments; raise ConfigError."""
    check_schedule(args)
    cfg = locmoe_config_from_args(args)
    _check_virtual_and_domain_args(args, cfg)
    changes = changes_megatron(cfg, bool(getattr(args, "moe_grouped_gemm", False)))
    if args.num_experts is None:
        if changes:
            raise ConfigError(
                f"--moe-router-type {cfg.router_type} / --locmoe-dispatcher {cfg.dispatcher} / "
                f"--locmoe-attention {cfg.attention} need an MoE model: set --num-experts"
            )
        return validate(cfg)
    validate(cfg, _transformer_view(args))  # the model's own MoE settings too (top-k >= 1, ...)
    if not changes:
        return cfg
    if router_class(cfg.router_type).is_plugin_router and getattr(args, "mtp_num_layers", None):
        raise ConfigError(
            "multi-token-prediction layers are built from stock specs and would keep Megatron's "
            f"router while the decoder uses {cfg.router_type}: drop --mtp-num-layers"
        )
    if cfg.hash_token_counts:  # only routers that read it take it (validation)
        if not _written_before_training(cfg.hash_token_counts):
            # before any process starts, not at model build
            load_token_counts(cfg.hash_token_counts, getattr(args, "vocab_size", None))
    if cfg.attention == "sdpa" and getattr(args, "reset_attention_mask", False):
        raise ConfigError(
            "--locmoe-attention sdpa masks causally by position, not by document: drop "
            "--reset-attention-mask or --locmoe-attention sdpa"
        )
    check_local_cuda_graphs(_transformer_view(args))  # also at model build, for spec users
    _check_topology_args(args, cfg)
    return cfg


def _check_virtual_and_domain_args(args, cfg: LocMoEConfig) -> None:
    """The virtual cluster runs in one process and needs whole micro-batches per virtual rank;
    domain-sharded data needs a node map, Megatron's ordered sampler and no --data-path."""
    shape = cfg.virtual_shape
    if shape is not None:
        ranks = cfg.virtual_ranks
        if args.world_size != 1:
            raise ConfigError(
                f"--locmoe-virtual-cluster {cfg.virtual_cluster} trains its {ranks} ranks in one "
                f"process; this job has {args.world_size}: launch one rank (torchrun "
                "--nproc-per-node 1; the launcher: --nodes 1 --devices-per-node 1)"
            )
        per_pass = args.micro_batch_size * ranks
        if args.global_batch_size % per_pass:
            raise ConfigError(
                f"--global-batch-size {args.global_batch_size} is not a multiple of "
                f"--micro-batch-size {args.micro_batch_size} x the virtual cluster's {ranks} "
                f"ranks ({per_pass}): every virtual rank needs whole micro-batches"
            )
    domains = getattr(args, "locmoe_domain_data_path", None)
    valid = getattr(args, "locmoe_domain_valid_data_path", None)
    if valid and not domains:  # the control with per-domain held-out data
        _check_held_out_per_domain(args, valid, shape)
        return
    if not domains:
        return
    if args.data_path or getattr(args, "train_data_path", None) or args.mock_data:
        raise ConfigError(
            "--locmoe-domain-data-path replaces --data-path / --train-data-path / --mock-data "
            "(node k reads domain k mod D); give one or the other"
        )
    if args.dataloader_type not in (None, "single"):
        raise ConfigError(
            f"--dataloader-type {args.dataloader_type} with --locmoe-domain-data-path: the "
            "domains are laid out for Megatron's ordered sampler; use --dataloader-type single"
        )
    if shape is not None:
        nodes = shape[0]
    else:
        dpn = cfg.devices_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
        if not dpn:
            raise ConfigError(
                "--locmoe-domain-data-path needs the node map: launch with torchrun (it sets "
                "LOCAL_WORLD_SIZE) or pass --locmoe-devices-per-node"
            )
        nodes = max(args.world_size // dpn, 1)
    try:
        check_domains(len(domains), nodes, len(valid) if valid else None)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    mixture_valid = getattr(args, "valid_data_path", None)
    if valid and mixture_valid:
        raise ConfigError(
            "--valid-data-path with --locmoe-domain-valid-data-path: give one held-out set, "
            "each node's domain (--locmoe-domain-valid-data-path) or one for every rank "
            "(--valid-data-path)"
        )
    if getattr(args, "test_data_path", None):
        raise ConfigError(
            "--test-data-path with --locmoe-domain-data-path: the domain-sharded loader reads "
            "no test set; drop it"
        )
    if not valid and not mixture_valid and getattr(args, "split", None) is None:
        raise ConfigError(
            "--locmoe-domain-data-path without held-out data splits each domain by --split, "
            "which is not set: give --split (e.g. 969,30,1), each domain's held-out prefix "
            "(--locmoe-domain-valid-data-path) or one held-out set (--valid-data-path)"
        )
    if mixture_valid and getattr(args, "split", None) not in (None, "100,0,0"):
        raise ConfigError(
            f"--split {args.split} with --valid-data-path: the whole domains train and the "
            "held-out set is --valid-data-path's; drop --split"
        )
    for prefix in [*domains, *(valid or [])]:
        if not all(_written_before_training(f"{prefix}.{ext}") for ext in ("bin", "idx")):
            check_indexed_dataset(prefix)


def _check_held_out_per_domain(args, valid: list[str], shape) -> None:
    """--locmoe-domain-valid-data-path alone: every rank trains on Megatron's mixture and rank r
    evaluates domain r mod D, so each domain needs a rank and the held-out data one source."""
    if getattr(args, "valid_data_path", None):
        raise ConfigError(
            "--locmoe-domain-valid-data-path and --valid-data-path both give held-out data: "
            "keep one (the per-domain prefixes report every domain's loss and the mixture's)"
        )
    ranks = shape[0] * shape[1] if shape is not None else args.data_parallel_size
    if len(valid) > ranks:
        raise ConfigError(
            f"{len(valid)} held-out domains for {ranks} data-parallel ranks: rank r evaluates "
            f"domain r mod {len(valid)}, so give at most {ranks} prefixes (or run more ranks)"
        )
    if args.dataloader_type not in (None, "single"):
        raise ConfigError(
            f"--dataloader-type {args.dataloader_type} with --locmoe-domain-valid-data-path: the "
            "domains are laid out for Megatron's ordered sampler; use --dataloader-type single"
        )
    for prefix in valid:
        if not all(_written_before_training(f"{prefix}.{ext}") for ext in ("bin", "idx")):
            check_indexed_dataset(prefix)


def _check_topology_args(args, cfg: LocMoEConfig) -> None:
    """Devices per node against the world size; warn when EP never leaves a node."""
    if cfg.virtual_cluster is not None:
        return  # one process; its node map is the virtual cluster's (checked above)
    dpn = cfg.devices_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
    if not dpn:
        return  # torchrun sets LOCAL_WORLD_SIZE; the topology raises later if it is missing
    world = args.world_size
    if world % dpn:
        raise ConfigError(
            f"world size {world} is not a multiple of {dpn} devices per node: fix "
            "--locmoe-devices-per-node (or the launcher's --nproc-per-node)"
        )
    etp = args.expert_tensor_parallel_size or args.tensor_model_parallel_size
    if args.expert_model_parallel_size * etp <= dpn:
        logger.warning(
            "expert parallelism (EP %d x expert-TP %d) fits inside one node of %d devices: the "
            "locality loss and the hierarchical dispatcher have no effect on traffic",
            args.expert_model_parallel_size,
            etp,
            dpn,
        )
