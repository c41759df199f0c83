"""A short GPT-MoE training loop on Megatron-Core for simulated CPU clusters.

Megatron's ``pretrain()`` is not a CPU target (device setup, NCCL, CUDA RNG), so the simulated
cluster trains with this loop instead: Megatron-Core's GPTModel built from the plugin's block
spec, Megatron's GPTDataset over the offline corpus, the plugin's metrics through Megatron's
MoE tracker into TensorBoard. It runs inside a SimCluster job (``train_job``); GPU runs use
``megatron_locmoe.pretrain_gpt`` (Megatron's own loop) instead.

Gradients follow Megatron's data-parallel semantics: the loss is the mean over this rank's
tokens that the loss mask keeps; dense parameters' grads are averaged over the dp-cp group
(data parallelism with context parallelism: CP ranks hold other tokens of the same samples);
expert parameters, which already received every rank's tokens through the All-to-All, are
divided by the same dp-cp size and summed over the expert-data-parallel group.
"""

from __future__ import annotations

import copy
import functools
import json
import time
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from megatron_locmoe.config import LocMoEConfig
from megatron_locmoe.sim import checkpoint
from megatron_locmoe.sim.cluster import ParallelLayout, StopRequested, stop_signal
from megatron_locmoe.sim.data import VOCAB_SIZE
from megatron_locmoe.virtual import VirtualCluster

if TYPE_CHECKING:
    from megatron.core.transformer import TransformerConfig


@dataclass(frozen=True)
class OptimizerSettings:
    """Megatron's optimizer and schedule as the CPU loop applies them (``launch.cpu_settings``
    builds them from the flags): AdamW, which is what Megatron's ``adam`` is without TE or apex; no
    weight decay on biases and 1-D parameters (Megatron's default parameter groups); clipping
    by the global gradient norm over the dense and the expert parameters; Megatron's own
    OptimizerParamScheduler, stepped by the global batch after every iteration."""

    adam_beta1: float
    adam_beta2: float
    adam_eps: float
    clip_grad: float
    """Largest global gradient norm (0: no clipping)."""
    scheduler: dict
    """OptimizerParamScheduler's arguments besides the optimizer."""
    samples_per_step: int
    """The scheduler's increment per iteration: the global batch."""


@dataclass
class TrainSettings:
    """One run of the loop (every rank gets the same settings)."""

    data_prefix: str
    locmoe: LocMoEConfig
    model: TransformerConfig = field(repr=False)
    """The model: Megatron's TransformerConfig with the run's parallel sizes (checked against
    the cluster's layout when the job starts). The launcher's CPU runs pass the one Megatron
    builds from the flags (``core_transformer_config_from_args``, as pretrain_gpt builds it),
    so every model flag means what it means to pretrain_gpt; the tests build the loop's small
    model with :func:`tiny_model`. The loop only makes it CPU-ready (weights initialised on the
    CPU) and attaches ``locmoe``."""
    steps: int = 30
    seq_length: int = 64
    micro_batch_size: int = 4
    global_batch_size: int | None = None
    """Samples per step over all data-parallel ranks; each rank accumulates gradients over
    global / (micro batch x data-parallel size) micro-batches (Megatron's --global-batch-size).
    None: one micro-batch per data-parallel rank."""
    lr: float = 3e-3
    seed: int = 1234
    tensorboard_dir: str | None = None
    wandb_dir: str | None = None
    """W&B run files (offline: WANDB_MODE=offline is set unless the caller chose a mode)."""
    run_name: str | None = None
    save_dir: str | None = None
    """Megatron torch_dist checkpoints (model, Adam state, router state, RNG) go here."""
    save_interval: int = 0
    """Save after every this many steps (0: never)."""
    load_dir: str | None = None
    """Resume from the latest checkpoint here (the run then continues to ``steps``)."""
    init_weights_dir: str | None = None
    """Start from the model weights of the latest checkpoint here, saved under any parallel
    layout (torch_dist reshards), with a fresh optimizer at step 0: Megatron's --load with
    --finetune --no-load-optim --no-load-rng. Ignored when ``load_dir`` holds a checkpoint."""
    exit_interval: int = 0
    """Stop after the first step divisible by this, saving first when ``save_dir`` is set
    (Megatron's --exit-interval; 0: run to ``steps``)."""
    exit_signal_handler: bool = False
    """On ``exit_signal``, save a checkpoint (with ``save_dir``) before stopping (Megatron's
    --exit-signal-handler). Any SIGINT / SIGTERM stops every rank at the next step boundary."""
    exit_signal: int = 15
    """The signal that saves first (Megatron's --exit-signal; SIGTERM)."""
    load_optim: bool = True
    """Restore the optimizer state with ``load_dir`` (Megatron's --no-load-optim: False)."""
    load_rng: bool = True
    """Restore the RNG state with ``load_dir`` (Megatron's --no-load-rng: False)."""
    load_iteration: int | None = None
    """Load this iteration of ``load_dir`` instead of the tracker's (Megatron's --ckpt-step)."""
    gpt_model_options: dict = field(default_factory=dict)
    """GPTModel's own arguments from the command line (embedding tying, position embeddings,
    padded vocabulary, maximum sequence length), as ``launch.train_settings`` takes them from
    Megatron's ``gpt_config_from_args``; empty: the loop's defaults."""
    data_prefix_per_node: list[str] | None = None
    """One corpus prefix per (simulated) node, read by that node's ranks instead of
    ``data_prefix``: node-correlated data (a domain-sharded loader, as in PanGu-Sigma), without
    which no router can keep more than 1/nodes of the assignments on the sender's node."""
    per_layer_logging: bool = False
    """Also log every metric per MoE layer (Megatron's names: ``moe/<name>_layer_<i>``)."""
    dataset_options: dict = field(default_factory=dict)
    """GPTDatasetConfig fields from a command line (``arguments.gpt_dataset_options``: --split,
    --eod-mask-loss, --reset-position-ids, --reset-attention-mask, --data-cache-path); empty:
    the whole corpus for training, every token in the loss."""
    progress_path: str | None = None
    """The logging rank appends one JSON line per step here (step, lm loss, seconds): progress
    bars and tokens/s for a driver that waits on the job."""
    eval_prefix: str | None = None
    """Held-out corpus: after training, ``eval_batches`` micro-batches per rank are evaluated
    (no gradients, eval mode) and their mean loss returned as ``eval_loss``."""
    eval_prefix_per_node: list[str] | None = None
    """One held-out prefix per node, read by that node's ranks instead of ``eval_prefix``."""
    eval_batches: int = 0
    check_for_nan_in_loss_and_grad: bool = True
    """Stop every rank, naming the step, the ranks and the first bad tensor, when the loss or a
    gradient is not finite (Megatron's --check-for-nan-in-loss-and-grad; default on there too)."""
    routing_profile: Any = None
    """--locmoe-routing-profile's request (``analysis.placement.ProfileRequest``, which the
    launcher passes; any object whose ``start(ctx, settings)`` returns windows with
    ``at_iteration(completed)``, ``close()`` and ``discard()``): the training routing in
    windows of iterations, as pretrain_gpt writes them. None: no profile."""
    routing_stats_steps: int = 0
    """Count every router's token-expert assignments (after drops) over the last this many
    training steps: ``tokens_per_expert`` [ranks][layers][E] in the results (0: off)."""
    optimizer: OptimizerSettings | None = None
    """Megatron's optimizer flags (the launcher's CPU runs pass them, the demo's and the
    sweep's among them); None: AdamW at the constant ``lr``, no weight decay, no clipping (the
    tests' own runs)."""


TINY_MODEL = dict(
    num_layers=2, hidden_size=64, num_attention_heads=4, num_moe_experts=8, moe_router_topk=1
)
"""The loop's small model's sizes (:func:`tiny_model`'s defaults)."""


def tiny_model(router_type: str, layout: ParallelLayout, **fields) -> TransformerConfig:
    """The loop's small fp32 GPT-MoE for ``router_type`` on ``layout``: Megatron's
    TransformerConfig (``testing.moe_config``: local spec, CPU init, no fusions) of
    :data:`TINY_MODEL`'s sizes, the layout's parallel sizes (sequence parallelism with TP, as
    Megatron requires for MoE), no dropout, and the router's own defaults (Megatron's aux loss
    at 0.01 for routers without LocMoE's balance loss, the router's capacity factor);
    ``fields``: TransformerConfig fields to change (sizes among them)."""
    from megatron_locmoe.sim.testing import moe_config

    etp = layout.etp if layout.etp is not None else layout.tp  # Megatron's default: TP
    config = dict(
        ep=layout.ep,
        tp=layout.tp,
        expert_tensor_parallel_size=etp,
        context_parallel_size=layout.cp,  # the local spec's attention: megatron_locmoe.attention
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vp,
        pipeline_dtype=torch.float32,
        **TINY_MODEL,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    # the registry imports Megatron's router modules: in a rank, not before its CPU shims
    from megatron_locmoe.routers import router_class

    router = router_class(router_type)
    if not router.uses_locmoe_alpha:  # Megatron's own balance loss: its settings
        config.update(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.01)
    cf = router.default_capacity_factor
    if cf is not None:
        config.update(moe_expert_capacity_factor=cf)
    config.update(fields)
    return moe_config(**config)


def _model(settings: TrainSettings, ep: int, vp_stage: int | None = None, config=None):
    """This pipeline rank's model chunk ``vp_stage`` (None: its only chunk): Megatron's GPTModel
    with the plugin's block spec for the chunk's layers, the embedding on the first stage and
    the output layer and loss on the last (Megatron's get_model). Chunks share one ``config``
    (the schedule reads the first chunk's)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    from megatron_locmoe.spec import check_and_connect, locmoe_block_spec

    if config is None:
        config = _transformer_config(settings, ep)
        config.locmoe = settings.locmoe
    options = {"vocab_size": VOCAB_SIZE, "max_sequence_length": settings.seq_length}
    options.update(settings.gpt_model_options)
    tp = config.tensor_model_parallel_size
    if options["vocab_size"] % tp:
        raise ValueError(
            f"vocabulary {options['vocab_size']} does not split over tensor-parallel size {tp}: "
            f"pad it (gpt_model_options vocab_size, Megatron's padded vocabulary) to a multiple"
        )
    spec = locmoe_block_spec(
        SimpleNamespace(
            transformer=config, vocab_size=options["vocab_size"], should_pad_vocab=False
        ),
        vp_stage=vp_stage,
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        vp_stage=vp_stage,
        **options,
    )
    check_and_connect([model])
    return model


def _model_chunks(settings: TrainSettings, ep: int) -> list:
    """Every model chunk of this pipeline rank, in order (one without virtual stages)."""
    from megatron.core import parallel_state

    config = _transformer_config(settings, ep)
    config.locmoe = settings.locmoe
    vp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    if vp is None:
        return [_model(settings, ep, config=config)]
    return [_model(settings, ep, vp_stage=i, config=config) for i in range(vp)]


def _transformer_config(settings: TrainSettings, ep: int):
    """The settings' model made CPU-ready (weights initialised on the CPU), its parallel sizes
    checked against this rank's process groups."""
    from megatron.core import parallel_state

    config = copy.copy(settings.model)
    etp = parallel_state.get_expert_tensor_parallel_world_size()
    for name, theirs, ours in (
        ("expert parallel size", config.expert_model_parallel_size, ep),
        ("tensor parallel size", config.tensor_model_parallel_size,
         parallel_state.get_tensor_model_parallel_world_size()),
        ("expert tensor parallel size", config.expert_tensor_parallel_size, etp),
        ("pipeline parallel size", config.pipeline_model_parallel_size,
         parallel_state.get_pipeline_model_parallel_world_size()),
        ("virtual pipeline size", config.virtual_pipeline_model_parallel_size,
         parallel_state.get_virtual_pipeline_model_parallel_world_size()),
        ("context parallel size", config.context_parallel_size,
         parallel_state.get_context_parallel_world_size()),
    ):  # fmt: skip
        if theirs != ours:
            raise ValueError(f"the model's {name} {theirs} is not the cluster layout's {ours}")
    config.use_cpu_initialization = True
    config.pipeline_dtype = config.pipeline_dtype or config.params_dtype
    return config


def _dataset(settings: TrainSettings, num_samples: int):
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

    from megatron_locmoe.sim.data import check_indexed_dataset

    check_indexed_dataset(settings.data_prefix)  # a clear error, not one deep in the loader
    options = dict(
        split="100,0,0",
        path_to_cache=None,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
    )
    options |= settings.dataset_options
    options |= dict(random_seed=settings.seed, sequence_length=settings.seq_length)
    config = GPTDatasetConfig(
        blend=([settings.data_prefix], None),
        tokenizer=NullTokenizer(vocab_size=VOCAB_SIZE),
        **options,
    )
    train, _, _ = BlendedMegatronDatasetBuilder(  # the train split only: the loop does not
        GPTDataset,
        [num_samples, 0, 0],
        lambda: True,
        config,  # evaluate
    ).build()
    return train


def _micro_batch(data, first: int, settings: TrainSettings):
    """(tokens, labels, loss_mask, position_ids, attention_mask) of the micro-batch starting at
    sample ``first``, as Megatron's GPT dataset makes them (attention mask only with
    --reset-attention-mask: otherwise the model's causal mask is the same and cheaper)."""
    batch = [data[first + i] for i in range(settings.micro_batch_size)]
    tokens, labels, loss_mask, positions = (
        torch.stack([b[key] for b in batch])
        for key in ("tokens", "labels", "loss_mask", "position_ids")
    )
    mask = None  # absent with --no-create-attention-mask-in-dataloader, as in pretrain_gpt
    if settings.dataset_options.get("reset_attention_mask") and "attention_mask" in batch[0]:
        mask = torch.stack([b["attention_mask"] for b in batch])
    return _on_this_cp_rank(tokens, labels, loss_mask, positions, mask)


def _on_this_cp_rank(tokens, labels, loss_mask, positions, mask):
    """This context-parallel rank's share of a micro-batch: Megatron's own
    get_batch_on_this_cp_rank (sequence chunks r and 2 cp - 1 - r of 2 cp; the attention
    mask's query rows only), as pretrain_gpt's get_batch; unchanged without CP."""
    from megatron.core import parallel_state
    from megatron.core.utils import get_batch_on_this_cp_rank

    if parallel_state.get_context_parallel_world_size() <= 1:  # 0: no process groups
        return tokens, labels, loss_mask, positions, mask
    keys = ("tokens", "labels", "loss_mask", "position_ids", "attention_mask")
    batch = dict(zip(keys, (tokens, labels, loss_mask, positions, mask), strict=True))
    batch = get_batch_on_this_cp_rank(
        batch, is_hybrid_cp=False, cp_group=parallel_state.get_context_parallel_group()
    )
    return tuple(batch[k] for k in keys)


def _num_microbatches(settings: TrainSettings, dp_size: int) -> int:
    """Micro-batches per rank and step for the global batch (Megatron's calculator)."""
    per_pass = settings.micro_batch_size * dp_size
    global_batch = settings.global_batch_size or per_pass
    if global_batch % per_pass:
        raise ValueError(
            f"global batch {global_batch} is not a multiple of micro batch "
            f"{settings.micro_batch_size} x data-parallel size {dp_size}"
        )
    return global_batch // per_pass


def _step_batches(data, settings: TrainSettings, step: int, num_microbatches: int, dp):
    """This rank's micro-batches of ``step`` in Megatron's pretraining-sampler order: micro-batch
    m is the m-th slice of micro batch x data-parallel size samples of the global batch, and
    data-parallel rank r takes its r-th micro batch of that slice. ``dp`` = (size, rank)."""
    dp_size, dp_rank = dp
    mbs = settings.micro_batch_size
    return [
        _micro_batch(data, ((step * num_microbatches + m) * dp_size + dp_rank) * mbs, settings)
        for m in range(num_microbatches)
    ]


def _virtual_step_batches(data_of_rank, settings, step, num_microbatches, cluster) -> list:
    """Every virtual rank's micro-batches of ``step``, each tagged with its rank, in the order
    one device runs them: micro step j of ranks 0..V-1, then j + 1 (micro-batch i belongs to
    virtual rank i mod V, as Megatron's sampler orders data-parallel ranks). ``data_of_rank(r)``: the dataset
    virtual rank r reads (its node's, with per-node data), indexed as a real rank r would."""
    V = cluster.ranks
    per_rank = [
        _step_batches(data_of_rank(r), settings, step, num_microbatches, (V, r)) for r in range(V)
    ]
    return [(r, per_rank[r][j]) for j in range(num_microbatches) for r in range(V)]


def _forward_step(data_iterator, model):
    """Megatron's forward_step_func for every stage and chunk: the next micro-batch through
    ``model``. Every chunk reads the tokens (the hash router's ids reach every stage through
    the model's pre-hook); only the first stage embeds them, only the last computes the loss.
    On a virtual cluster a micro-batch comes as (virtual rank, batch): the model routes it as
    that rank."""
    tokens, labels, loss_mask, positions, mask = _entered(next(data_iterator), model)
    output = model(tokens, positions, mask, labels=labels)
    return output, functools.partial(_loss_func, loss_mask)


def _entered(item, model):
    """The batch of a micro-batch; a virtual rank's (``(rank, batch)``) entered first."""
    if len(item) == 2:
        from megatron_locmoe import virtual

        rank, item = item
        virtual.enter(model, rank)
    return item


def _loss_func(loss_mask, per_token):
    """pretrain_gpt's loss_func: (sum of the kept tokens' losses, their count, the micro-batch
    mean for logging); the schedule divides the sum by the count and the micro-batches."""
    total = (per_token.float() * loss_mask).sum()
    count = loss_mask.sum().to(torch.int)
    return total, count, {"lm loss": (total / count.clamp(min=1)).detach()}


def _eval_step(data_iterator, model):
    """forward_step_func of the evaluation: the held-out loss sum and token count (float64)."""
    tokens, labels, loss_mask, positions, mask = _entered(next(data_iterator), model)
    output = model(tokens, positions, mask, labels=labels)

    def sums(per_token):
        kept = torch.stack([(per_token.double() * loss_mask).sum(), loss_mask.sum().double()])
        return kept[0].float(), loss_mask.sum().to(torch.int), {"sums": kept}

    return output, sums


def _run_schedule(chunks, settings: TrainSettings, batches: list, forward_only: bool) -> list:
    """``batches`` through Megatron's forward-backward schedule for this layout (no pipelining,
    1F1B, or interleaved with virtual stages); gradients accumulate over the micro-batches and
    are finalized by ``config.finalize_model_grads_func``. Returns what the last stage's loss
    function reported per micro-batch (empty elsewhere)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()(
        forward_step_func=_eval_step if forward_only else _forward_step,
        data_iterator=[iter(batches) for _ in chunks],  # each chunk reads every micro-batch
        model=chunks,
        num_microbatches=len(batches),
        seq_length=settings.seq_length,
        micro_batch_size=settings.micro_batch_size,
        forward_only=forward_only,
    )


def _from_last_stage(value: torch.Tensor) -> torch.Tensor:
    """``value`` as the last pipeline stage holds it, on every stage (in place)."""
    from megatron.core import parallel_state

    group = parallel_state.get_pipeline_model_parallel_group()
    if dist.get_world_size(group) > 1:
        src = parallel_state.get_pipeline_model_parallel_last_rank()
        dist.broadcast(value, src=src, group=group)
    return value


def _finalize_grads(chunks, num_tokens=None, pg_collection=None, force_all_reduce=False) -> None:
    """``config.finalize_model_grads_func``: Megatron's finalize_model_grads without its DDP
    buffers. Each chunk's gradients synchronised over the dp-cp group (data parallelism with
    context parallelism: CP ranks hold other tokens of the same samples; ``_sync_grads``) and,
    for the parameters marked sequence_parallel (norms, routers: replicated over TP, each TP
    rank's gradient from its sequence shard), summed over the TP group; then the two copies of
    a tied embedding (the first stage's input embedding, the last stage's output layer) summed
    over the embedding group, so both apply the same update; last, as Megatron's does, the
    routers' once-a-batch state: the aux-loss-free expert bias (--moe-router-enable-expert-bias)
    from the tokens per expert summed over the tp-dp-cp group (on a virtual cluster one
    process's routers have counted every virtual rank's tokens: the same sum), then the
    per-batch counters reset (the bias's tokens per expert, the global aux loss's tracker)."""
    from megatron.core import parallel_state

    dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    expt_dp_group = parallel_state.get_expert_data_parallel_group()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    for chunk in chunks:
        _sync_grads(chunk, dp_group, expt_dp_group, dist.get_world_size(dp_group))
        if dist.get_world_size(tp_group) > 1:  # norms, routers: each TP rank saw its tokens
            for p in chunk.parameters():
                if p.grad is not None and getattr(p, "sequence_parallel", False):
                    dist.all_reduce(p.grad, group=tp_group)
    _sync_tied_embedding(chunks)
    from megatron.core.distributed.finalize_model_grads import (
        _update_router_expert_bias,
        reset_model_temporary_tensors,
    )

    config = chunks[0].config
    if config.moe_router_enable_expert_bias:
        group = parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
        _update_router_expert_bias(chunks, config, tp_dp_cp_group=group)
    # the tokens per expert of the bias and of the global aux loss start the next batch at 0
    reset_model_temporary_tensors(config, chunks)


def _sync_tied_embedding(chunks) -> None:
    """A tied embedding's two copies (first stage's input, last stage's output layer) summed
    over the embedding group, so both apply the same update."""
    from megatron.core import parallel_state

    group = parallel_state.get_embedding_group(check_initialized=False)
    if group is None or dist.get_world_size(group) == 1:
        return
    if dist.get_rank() not in dist.get_process_group_ranks(group):
        return
    first = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    chunk = chunks[0] if first else chunks[-1]
    if chunk.share_embeddings_and_output_weights:
        weight = chunk.shared_embedding_or_output_weight()
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        dist.all_reduce(weight.grad, group=group)


def _sync_grads(model, dp_group, expt_dp_group, dp_size: int) -> None:
    """The gradient of the mean of every dp-cp rank's loss, as Megatron's DDP makes it: dense
    gradients averaged over ``dp_group`` (the dp-cp group, whose ranks each computed the mean
    over their own tokens); an expert's gradient, which already holds the contributions of
    every rank of its EP group (the All-to-All's backward), scaled by 1 / the dp-cp size
    (``dp_size``) and *summed* over the replicas of that expert (the expert-data-parallel
    group), since each replica saw other ranks' tokens."""
    for p in model.parameters():
        if p.grad is None:
            continue
        if getattr(p, "allreduce", True) is False:  # expert parameters (Megatron's tag)
            p.grad /= dp_size
            if dist.get_world_size(expt_dp_group) > 1:
                dist.all_reduce(p.grad, group=expt_dp_group, op=dist.ReduceOp.SUM)
        elif dp_size > 1:
            dist.all_reduce(p.grad, group=dp_group, op=dist.ReduceOp.AVG)


def _named_parameters(chunks):
    return [(name, p) for chunk in chunks for name, p in chunk.named_parameters()]


def _optimizer(chunks, settings: TrainSettings):
    """(optimizer, Megatron's scheduler or None) for ``settings.optimizer``, over every chunk."""
    o = settings.optimizer
    params = [p for _, p in _named_parameters(chunks)]
    if o is None:
        return torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0), None
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    decay, no_decay = [], []
    for name, p in _named_parameters(chunks):
        if p.requires_grad:
            (no_decay if name.endswith(".bias") or p.dim() == 1 else decay).append(p)
    groups = [
        {"params": params, "wd_mult": mult}
        for params, mult in ((decay, 1.0), (no_decay, 0.0))
        if params
    ]
    betas = (o.adam_beta1, o.adam_beta2)
    opt = torch.optim.AdamW(groups, lr=0.0, betas=betas, eps=o.adam_eps, weight_decay=0.0)
    return opt, OptimizerParamScheduler(opt, **o.scheduler)  # sets each group's lr and decay


def _clip_grads(chunks, max_norm: float) -> float:
    """Megatron's clip_grad_norm: the L2 norm of every gradient of the model (the expert
    parameters' summed over the expert (and expert-tensor) parallel group, whose ranks hold
    different experts; the dense ones are the same on every rank after the dp-cp average,
    summed over the TP group, a TP-replicated one counted on TP rank 0 only; both summed over
    the pipeline stages, the tied embedding's last-stage copy not counted twice), and the
    gradients scaled by max_norm / (norm + 1e-6) where that is below 1. Returns the norm."""
    from megatron.core import parallel_state

    params = [p for _, p in _named_parameters(chunks) if p.grad is not None]
    dense = torch.zeros((), dtype=torch.float64)
    expert = torch.zeros((), dtype=torch.float64)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    for p in params:
        if getattr(p, "shared", False):  # Megatron's mark of the copy
            continue
        sq = p.grad.double().pow(2).sum()
        if getattr(p, "allreduce", True) is False:
            expert += sq
        elif getattr(p, "tensor_model_parallel", False) or tp_rank == 0:  # TP copies once
            dense += sq
    group = parallel_state.get_expert_tensor_and_model_parallel_group()
    if dist.get_world_size(group) > 1:
        dist.all_reduce(expert, group=group)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    if dist.get_world_size(tp_group) > 1:
        dist.all_reduce(dense, group=tp_group)
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    if dist.get_world_size(pp_group) > 1:
        both = torch.stack([dense, expert])
        dist.all_reduce(both, group=pp_group)
        dense, expert = both[0], both[1]
    norm = float((dense + expert).sqrt())
    coeff = max_norm / (norm + 1.0e-6)
    if max_norm > 0 and coeff < 1.0:
        for p in params:
            p.grad.mul_(coeff)
    return norm


def _check_finite(chunks, loss: torch.Tensor, step: int) -> None:
    """Raise on every rank together (one all-reduce of a per-rank flag, so no rank waits for a
    peer that stopped) when the step's loss or one of this rank's gradients is not finite."""
    bad = None if torch.isfinite(loss).all() else f"the loss is {float(loss)}"
    if bad is None:
        for name, p in _named_parameters(chunks):
            if p.grad is not None and not torch.isfinite(p.grad).all():
                bad = f"the gradient of {name} is not finite"
                break
    flags = torch.zeros(dist.get_world_size())
    flags[dist.get_rank()] = bad is not None
    dist.all_reduce(flags)
    if flags.any():
        ranks = flags.nonzero().flatten().tolist()
        raise FloatingPointError(
            f"step {step + 1}: the loss or a gradient is not finite on ranks {ranks}"
            + (f" (here: {bad})" if bad else "")
            + "; lower --lr, add warm-up or gradient clipping, or pass "
            "--no-check-for-nan-in-loss-and-grad to train on regardless"
        )


def _agreed_stop_signal() -> int:
    """The stop signal any rank received (sim.cluster.stop_signal), the same on every rank (one
    all-reduce): ranks signalled a moment apart still stop at the same step."""
    flag = torch.tensor([stop_signal()], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag)


def train_job(ctx, settings: TrainSettings) -> dict:
    """SimCluster job: train ``settings.steps`` steps; return the loss curve and last metrics
    (the same on every rank: the loss comes from the last pipeline stage)."""
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    ctx.topology()
    cluster = VirtualCluster.from_config(settings.locmoe)
    if cluster is not None and ctx.world_size != 1:
        raise ValueError(
            f"the virtual cluster {settings.locmoe.virtual_cluster} trains on one rank; this "
            f"job has {ctx.world_size}: run it on a 1-rank cluster"
        )
    torch.manual_seed(settings.seed)
    chunks = _model_chunks(settings, ctx.layout.ep)
    config = chunks[0].config
    config.finalize_model_grads_func = _finalize_grads
    dp_group = parallel_state.get_data_parallel_group()
    dp_size, dp_rank = dist.get_world_size(dp_group), dist.get_rank(dp_group)
    dp_cp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    ranks_reading = dp_size if cluster is None else cluster.ranks  # data-parallel ranks' data
    num_microbatches = _num_microbatches(settings, ranks_reading)  # CP ranks share samples
    opt, scheduler = _optimizer(chunks, settings)
    samples = settings.steps * num_microbatches * settings.micro_batch_size * ranks_reading
    data_of_rank = _data_of_rank(ctx, settings, samples, cluster)
    data = data_of_rank(dp_rank)
    writer = None
    if settings.tensorboard_dir and ctx.rank == ctx.world_size - 1:  # Megatron's last rank
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(settings.tensorboard_dir)
    wandb_run = _wandb_run(settings) if ctx.rank == ctx.world_size - 1 else None
    tracker = get_moe_metrics_tracker()
    losses, reported = [], {}
    start = 0
    if settings.load_dir:
        start = checkpoint.load(
            chunks,
            opt,
            settings.load_dir,
            optimizer_state=settings.load_optim,
            rng=settings.load_rng,
            iteration=settings.load_iteration,
        )
    if start is None:  # as Megatron's load_checkpoint: start afresh
        start = 0
        if ctx.rank == 0:
            print(f"no checkpoint under {settings.load_dir}: training from scratch", flush=True)
    if not start and settings.init_weights_dir:
        checkpoint.load_model_weights(chunks, settings.init_weights_dir)
    if scheduler is not None and start and settings.load_optim:
        # the schedule where the checkpoint's run left it (Megatron loads the scheduler with
        # the optimizer: --no-load-optim starts both afresh)
        scheduler.step(start * settings.optimizer.samples_per_step)
    applied_lr, grad_norms = [], []
    counts = _RoutingCounts(chunks, config.num_moe_experts)
    last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    saved_at = start

    def stop_if_signalled(done: int) -> None:
        """At the boundary after step ``done``: on a signal, save (--exit-signal-handler) and
        stop every rank."""
        signum = _agreed_stop_signal()
        if signum:
            saved = None
            wants_save = settings.exit_signal_handler and signum == settings.exit_signal
            if settings.save_dir and wants_save and saved_at != done:
                saved = str(checkpoint.save(chunks, opt, done, settings.save_dir))
            if writer is not None:
                writer.close()
            raise StopRequested(signum, done, saved)

    windows = settings.routing_profile.start(ctx, settings) if settings.routing_profile else None
    try:
        step = start - 1
        for step in range(start, settings.steps):
            stop_if_signalled(step)
            counts.active = step >= settings.steps - settings.routing_stats_steps
            if windows is not None:
                windows.at_iteration(step)  # the iterations completed before this one
            step_start = time.perf_counter()
            if cluster is None:
                batches = _step_batches(data, settings, step, num_microbatches, (dp_size, dp_rank))
            else:
                batches = _virtual_step_batches(
                    data_of_rank, settings, step, num_microbatches, cluster
                )
            opt.zero_grad(set_to_none=True)
            outputs = _run_schedule(chunks, settings, batches, forward_only=False)
            # this rank's loss: the mean of its micro-batches' (the last stage holds them)
            local = torch.stack([o["lm loss"] for o in outputs]).mean() if last_stage else None
            if settings.check_for_nan_in_loss_and_grad:
                _check_finite(chunks, local if last_stage else torch.zeros(()), step)
            if scheduler is not None:
                grad_norms.append(_clip_grads(chunks, settings.optimizer.clip_grad))
                applied_lr.append(opt.param_groups[0]["lr"])
            opt.step()
            if scheduler is not None:
                scheduler.step(settings.optimizer.samples_per_step)
            saving = settings.save_interval and (step + 1) % settings.save_interval == 0
            exiting = settings.exit_interval and (step + 1) % settings.exit_interval == 0
            if settings.save_dir and (saving or exiting):
                checkpoint.save(chunks, opt, step + 1, settings.save_dir)
                saved_at = step + 1
            mean = local.clone() if last_stage else torch.zeros(())
            # the mean of every dp-cp rank's own-token mean: the objective the gradients follow
            # (Megatron divides each CP rank's loss by its own token count, then averages over dp-cp)
            dist.all_reduce(mean, group=dp_cp_group, op=dist.ReduceOp.AVG)
            losses.append(float(_from_last_stage(mean)))
            scalars = _CollectingWriter(writer)
            tracker.report(
                1.0 / len(batches),  # the tracker sums the micro-batches' values
                step + 1,
                writer=scalars,
                wandb_writer=wandb_run,
                track_names=["load_balancing_loss"],
                num_layers=config.num_layers,  # as Megatron's training_log passes them
                moe_layer_freq=config.moe_layer_freq,
                mtp_num_layers=config.mtp_num_layers,
                force_initialize=True,
                per_layer_logging=settings.per_layer_logging,
            )
            reported = scalars.values
            if writer is not None:
                writer.add_scalar("lm loss", losses[-1], step + 1)
            if wandb_run is not None:
                wandb_run.log({"lm loss": losses[-1]}, step + 1)
            if settings.progress_path and ctx.rank == ctx.world_size - 1:
                seconds = time.perf_counter() - step_start
                line = {"step": step + 1, "loss": losses[-1], "seconds": seconds}
                with open(settings.progress_path, "a") as f:
                    f.write(json.dumps(line) + "\n")
            if exiting:
                break
        else:
            stop_if_signalled(step + 1)
    except BaseException:
        if windows is not None:  # a failed or stopped run writes no partial window
            windows.discard()
        raise
    if windows is not None:
        windows.close()  # the last window; collective: every rank gathers, rank 0 writes
    counts.active = False
    out = {"losses": losses, "first_step": start + 1, "metrics": reported}
    if scheduler is not None:
        out.update(lr=applied_lr, grad_norm=grad_norms)
    if settings.routing_stats_steps:
        out["tokens_per_expert"] = counts.gathered()
    if settings.eval_batches:
        out.update(_evaluate(ctx, chunks, settings, dp_group, dp_size, dp_rank, cluster))
        tracker.clear()  # the evaluation's router metrics belong to no training step
        heldout = _heldout_scalars(out, settings, cluster, ctx)  # pretrain_gpt's tags
        if writer is not None:  # at the last step, as Megatron's evaluation after training
            for tag, value in heldout.items():
                writer.add_scalar(tag, value, step + 1)
        if wandb_run is not None:
            wandb_run.log(heldout, step + 1)
    if writer is not None:
        writer.close()
    if wandb_run is not None:
        wandb_run.finish()
    counts.remove()
    return out


def _heldout_scalars(out: dict, settings: TrainSettings, cluster, ctx) -> dict[str, float]:
    """The evaluation under pretrain_gpt's tags: ``lm loss validation`` (every rank's held-out
    tokens) and, where nodes read their own held-out corpus (``eval_prefix_per_node``),
    ``lm loss domain d validation`` for each corpus d (numbered by the first node that reads
    it: node k reads domain k mod D), the mean of its readers' losses."""
    scalars = {"lm loss validation": out["eval_loss"]}
    prefixes = settings.eval_prefix_per_node
    if prefixes:
        per_node = cluster.gpus_per_node if cluster is not None else ctx.devices_per_node
        readers: dict[str, list[float]] = {}
        for rank, loss in enumerate(out["eval_loss_per_rank"]):
            readers.setdefault(prefixes[rank // per_node], []).append(loss)
        for prefix, losses in readers.items():
            d = prefixes.index(prefix)
            scalars[f"lm loss domain {d} validation"] = sum(losses) / len(losses)
    return scalars


class _RoutingCounts:
    """Forward hooks on the model's routers summing the assignments they keep (routing map
    and a positive probability: padding slots carry 0) per MoE layer and expert, while active."""

    def __init__(self, chunks, num_experts: int):
        from megatron.core.transformer.moe.router import Router

        routers = [m for chunk in chunks for m in chunk.modules() if isinstance(m, Router)]
        self.layers = {id(m): i for i, m in enumerate(routers)}
        self.sums = torch.zeros(len(routers), num_experts, dtype=torch.float64)
        self.steps = set()
        self.active = False
        self.handles = [m.register_forward_hook(self._hook) for m in routers]

    def _hook(self, module, args, output):
        if self.active and module.training and torch.is_grad_enabled():
            probs_TE, routing_map_TE = output
            kept = (routing_map_TE & (probs_TE > 0)).sum(0).double().cpu()
            self.sums[self.layers[id(module)]] += kept

    def gathered(self) -> list:
        """[ranks][layers][E] summed counts (an all-gather: every rank must call)."""
        parts = [torch.zeros_like(self.sums) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, self.sums)
        return [p.tolist() for p in parts]

    def remove(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def _evaluate(
    ctx, chunks, settings: TrainSettings, dp_group, dp_size: int, dp_rank: int, cluster=None
) -> dict:
    """Mean held-out loss over ``eval_batches`` micro-batches per rank (each data-parallel rank
    its own samples, its node's corpus with ``eval_prefix_per_node``) through the forward-only
    schedule, and every rank's mean (a data-parallel rank's as its last stage computed it; on
    a virtual cluster every virtual rank's)."""
    from megatron.core import parallel_state

    if settings.eval_prefix_per_node:
        settings = replace(settings, data_prefix_per_node=settings.eval_prefix_per_node)
    elif settings.eval_prefix:
        settings = replace(settings, data_prefix=settings.eval_prefix, data_prefix_per_node=None)
    else:
        raise ValueError("eval_batches is set but no eval_prefix / eval_prefix_per_node")
    ranks_reading = dp_size if cluster is None else cluster.ranks
    samples = settings.eval_batches * settings.micro_batch_size * ranks_reading
    data_of_rank = _data_of_rank(ctx, settings, samples, cluster)
    if cluster is None:
        data = data_of_rank(dp_rank)
        batches = [
            _micro_batch(data, (b * dp_size + dp_rank) * settings.micro_batch_size, settings)
            for b in range(settings.eval_batches)
        ]
    else:  # the evaluation's batches of every virtual rank, as step 0 of a training run
        batches = _virtual_step_batches(data_of_rank, settings, 0, settings.eval_batches, cluster)
    for chunk in chunks:
        chunk.eval()
    outputs = _run_schedule(chunks, settings, batches, forward_only=True)
    for chunk in chunks:
        chunk.train()
    total = torch.zeros(2, dtype=torch.float64)
    for o in outputs:  # the last stage's; zeros elsewhere until the broadcast
        total += o["sums"]
    _from_last_stage(total)
    if cluster is not None:
        per_virtual = torch.zeros(cluster.ranks, 2, dtype=torch.float64)
        for (rank, _), o in zip(batches, outputs, strict=True):
            per_virtual[rank] += o["sums"]
        return {
            "eval_loss": float(total[0] / total[1].clamp_min(1)),
            "eval_loss_per_rank": [float(t[0] / t[1].clamp_min(1)) for t in per_virtual],
        }
    per_rank = [torch.zeros_like(total) for _ in range(dist.get_world_size())]
    dist.all_gather(per_rank, total)
    mine = total.clone()
    dist.all_reduce(mine, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    return {
        "eval_loss": float(mine[0] / mine[1].clamp_min(1)),
        "eval_loss_per_rank": [float(t[0] / t[1].clamp_min(1)) for t in per_rank],
    }


def _data_of_rank(ctx, settings: TrainSettings, num_samples: int, cluster=None):
    """``data_of_rank(r)``: the dataset data-parallel rank r reads: ``data_prefix``'s, or its
    node's of ``data_prefix_per_node`` (node = r // devices per node; on a virtual cluster,
    r // its GPUs per node). Every rank builds all of them in the same order, because
    Megatron's builder writes the index cache on rank 0 only (the other ranks wait at a
    barrier, then read it)."""
    prefixes = settings.data_prefix_per_node
    if not prefixes:
        data = _dataset(settings, num_samples)
        return lambda rank: data
    if cluster is None:
        ranks, per_node, mine = ctx.world_size, ctx.devices_per_node, ctx.rank
    else:
        ranks, per_node, mine = cluster.ranks, cluster.gpus_per_node, None
    nodes = ranks // per_node
    if len(prefixes) != nodes:
        raise ValueError(
            f"data_prefix_per_node has {len(prefixes)} prefixes for {nodes} nodes "
            f"({ranks} ranks, {per_node} per node): give one per node"
        )
    built = [_dataset(replace(settings, data_prefix=p), num_samples) for p in prefixes]
    if mine is not None:  # a real rank reads its own node's only, whatever r it is asked for
        return lambda rank: built[mine // per_node]
    return lambda rank: built[rank // per_node]


def _wandb_run(settings: TrainSettings):
    """An offline W&B run on Megatron's logging rank (the last), like Megatron's writer."""
    if not settings.wandb_dir:
        return None
    import os

    import wandb

    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    # wandb's service process starts slowly when several ranks share few cores; its default
    # 30 s wait is the likely cause of offline-run failures seen under heavy load
    os.environ.setdefault("WANDB__SERVICE_WAIT", "300")
    os.makedirs(settings.wandb_dir, exist_ok=True)
    return wandb.init(
        project="megatron-locmoe",
        dir=settings.wandb_dir,
        name=settings.run_name or settings.locmoe.router_type,
        config={"locmoe": vars(settings.locmoe), "steps": settings.steps},
    )


class _CollectingWriter:
    """Passes scalars to a TensorBoard writer (if any) and keeps the last values."""

    def __init__(self, writer):
        self.writer, self.values = writer, {}

    def add_scalar(self, name, value, step):
        self.values[name] = float(value)
        if self.writer is not None:
            self.writer.add_scalar(name, value, step)
