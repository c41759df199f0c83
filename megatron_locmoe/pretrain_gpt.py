"""``python -m megatron_locmoe.pretrain_gpt ARGS``: GPT pretraining on ``megatron.training``.

For machines without a Megatron-LM checkout: ``megatron.training`` ships in the megatron-core
wheel, only Megatron-LM's ``pretrain_gpt.py`` does not. This is the plugin's own short version
of that script on the same Megatron APIs (``pretrain()``, GPTModelConfig, Megatron's GPT
datasets), with the adaptor applied first so ``--moe-router-type`` and the ``--locmoe-*`` flags
work. Launch it with torchrun like Megatron-LM's script.

Batches: every rank of the first and last pipeline stage reads the dataset itself (same seed,
same order on every tensor-parallel rank), so no tensor-parallel broadcast is needed; context
parallelism slices the batch with Megatron's own helper. With ``--moe-router-type hash`` the
other stages read it too and take the tokens only: the hash router routes by token id on every
stage that hosts MoE layers, and the sampler (by data-parallel rank) gives each stage of a
pipeline the same samples in the same order.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch

from megatron_locmoe import adaptor


def _reads_data(vp_stage, args) -> bool:
    """Whether this stage (chunk ``vp_stage``) builds the datasets: the first and last stage
    (embedding, loss), and with the hash router every stage (its token ids)."""
    from megatron.training.utils import is_first_or_last_pipeline_stage

    # the registry imports Megatron's router modules: not before the adaptor's patches
    from megatron_locmoe.routers import router_class

    return (
        is_first_or_last_pipeline_stage(vp_stage)
        or router_class(args.moe_router_type).needs_token_ids
    )


def _dataset_config(args):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    from megatron.training import get_tokenizer
    from megatron.training.utils import get_blend_and_blend_per_split

    from megatron_locmoe.arguments import gpt_dataset_options

    blend, blend_per_split = get_blend_and_blend_per_split(args)
    return GPTDatasetConfig(
        blend=blend,
        blend_per_split=blend_per_split,
        tokenizer=get_tokenizer(),
        **gpt_dataset_options(args),
    )


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    """Megatron's GPT datasets (or its mock dataset with --mock-data); with
    --locmoe-domain-data-path the domain-sharded ones (node k reads domain k mod D); on a
    virtual cluster every sample tagged with the virtual rank it belongs to
    (``megatron_locmoe.node_data``)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset
    from megatron.training import get_args

    from megatron_locmoe.arguments import check_data_args, locmoe_config_from_args
    from megatron_locmoe.node_data import VirtualRankTagged
    from megatron_locmoe.virtual import VirtualCluster

    args = get_args()
    check_data_args(args)  # a clear error naming the file, not one deep in the loader
    cluster = VirtualCluster.from_config(locmoe_config_from_args(args))
    if getattr(args, "locmoe_domain_data_path", None):
        return _domain_datasets(args, train_val_test_num_samples, cluster, vp_stage)
    dataset_type = MockGPTDataset if args.mock_data else GPTDataset
    built = BlendedMegatronDatasetBuilder(
        dataset_type,
        train_val_test_num_samples,
        lambda: _reads_data(vp_stage, args),
        _dataset_config(args),
    ).build()
    held_out = None
    if getattr(args, "locmoe_domain_valid_data_path", None) and train_val_test_num_samples[1]:
        held_out = _held_out_per_domain(args, train_val_test_num_samples[1], cluster, vp_stage)
    if cluster is not None:
        built = [
            None if d is None else VirtualRankTagged(d, cluster.ranks, args.micro_batch_size)
            for d in built
        ]
    if held_out is not None:  # tagged with the domain (and the virtual rank) already
        built = [built[0], held_out, built[2]]
    return built


def _held_out_per_domain(args, samples: int, cluster, vp_stage):
    """The control's held-out data: one dataset per domain of --locmoe-domain-valid-data-path
    (Megatron's own builder, its cache), rank r evaluating domain r mod D."""
    from megatron.core import parallel_state
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset

    from megatron_locmoe.node_data import NodeShardedDataset, RankLayout

    prefixes = args.locmoe_domain_valid_data_path
    ranks = cluster.ranks if cluster is not None else parallel_state.get_data_parallel_world_size()
    layout = RankLayout.round_robin(
        ranks, args.micro_batch_size, len(prefixes), virtual=cluster is not None
    )
    per_domain = layout.samples_per_domain(samples)
    config = _dataset_config(args)
    parts = []
    for prefix in prefixes:
        domain = dataclasses.replace(
            config, blend=None, blend_per_split=[None, ([prefix], None), None], split=None
        )
        parts.append(
            BlendedMegatronDatasetBuilder(
                GPTDataset, [0, per_domain, 0], lambda: _reads_data(vp_stage, args), domain
            ).build()[1]
        )
    return NodeShardedDataset(parts, layout, samples)


def _rank_layout(args, cluster, domains: int):
    """The node of every data-parallel rank: the virtual cluster's (rank r on node r // GPUS),
    or gathered over the data-parallel group (global rank // devices per node)."""
    from megatron_locmoe.node_data import RankLayout

    if cluster is not None:
        nodes = tuple(r // cluster.gpus_per_node for r in range(cluster.ranks))
        return RankLayout(nodes, args.micro_batch_size, domains, virtual=True)
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_locmoe.arguments import locmoe_config_from_args
    from megatron_locmoe.topology import resolve_devices_per_node

    per_node = resolve_devices_per_node(locmoe_config_from_args(args).devices_per_node)
    group = parallel_state.get_data_parallel_group()
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, dist.get_rank() // per_node, group=group)
    return RankLayout(tuple(gathered), args.micro_batch_size, domains)


def _domain_datasets(args, train_val_test_num_samples, cluster, vp_stage):
    """Per split, one NodeShardedDataset over every domain's GPT dataset, each domain sized for
    its readers (Megatron's own builder per domain: its cache, its --split, or
    the held-out prefixes of --locmoe-domain-valid-data-path as the validation split). With
    one --valid-data-path instead, the whole domains train and every rank evaluates that
    held-out set (the mixture's: what the model does where a token's node says nothing of its
    domain), as Megatron's loader reads it."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset

    from megatron_locmoe.node_data import NodeShardedDataset, VirtualRankTagged

    layout = _rank_layout(args, cluster, len(args.locmoe_domain_data_path))
    per_domain = [layout.samples_per_domain(n) if n else 0 for n in train_val_test_num_samples]
    config = _dataset_config(args)
    valid = args.locmoe_domain_valid_data_path or [None] * len(args.locmoe_domain_data_path)
    mixture_valid = args.valid_data_path  # one held-out set for every rank (parse-time checks)
    if mixture_valid:
        per_domain[1] = 0
    splits = []
    for prefix, held_out in zip(args.locmoe_domain_data_path, valid, strict=True):
        if held_out is None and not mixture_valid:
            domain = dataclasses.replace(config, blend=([prefix], None), blend_per_split=None)
        else:
            domain = dataclasses.replace(
                config,
                blend=None,
                blend_per_split=[([prefix], None), held_out and ([held_out], None), None],
                split=None,
            )
        splits.append(
            BlendedMegatronDatasetBuilder(
                GPTDataset, per_domain, lambda: _reads_data(vp_stage, args), domain
            ).build()
        )
    out = []
    for s, total in enumerate(train_val_test_num_samples):
        parts = [built[s] for built in splits]
        if not total or any(p is None for p in parts):
            out.append(None)
            continue
        out.append(NodeShardedDataset(parts, layout, total))
    if mixture_valid and train_val_test_num_samples[1]:
        held = dataclasses.replace(
            config,
            blend=None,
            blend_per_split=[None, (list(mixture_valid), None), None],
            split=None,
        )
        sizes = [0, train_val_test_num_samples[1], 0]
        out[1] = BlendedMegatronDatasetBuilder(
            GPTDataset, sizes, lambda: _reads_data(vp_stage, args), held
        ).build()[1]
        if cluster is not None:
            out[1] = VirtualRankTagged(out[1], cluster.ranks, args.micro_batch_size)
    return out


train_valid_test_datasets_provider.is_distributed = True


BATCH_KEYS = ("tokens", "labels", "loss_mask", "attention_mask", "position_ids")


def get_batch(data_iterator, vp_stage=None, needs_token_ids=False):
    """(tokens, labels, loss_mask, attention_mask, position_ids) on this rank's device; on a
    middle stage all None, or the tokens alone when ``needs_token_ids`` (hash routers)."""
    from megatron.core import parallel_state
    from megatron.core.utils import get_batch_on_this_cp_rank
    from megatron.training.utils import is_first_or_last_pipeline_stage

    keys = BATCH_KEYS
    if not is_first_or_last_pipeline_stage(vp_stage):
        if not needs_token_ids:
            return None, None, None, None, None
        keys = ("tokens",)  # Megatron's middle stages see no masks or positions: keep that
    device = torch.device(torch.accelerator.current_accelerator(check_available=True) or "cpu")
    batch = next(data_iterator)
    batch = {
        k: batch[k].to(device, non_blocking=True) if batch.get(k) is not None else None
        for k in keys
    }
    if parallel_state.get_context_parallel_world_size() > 1:
        batch = get_batch_on_this_cp_rank(
            batch, is_hybrid_cp=False, cp_group=parallel_state.get_context_parallel_group()
        )
    return tuple(batch.get(k) for k in BATCH_KEYS)


def loss_func(
    loss_mask: torch.Tensor,
    output_tensor: torch.Tensor,
    domain: int | None = None,
    num_domains: int = 0,
):
    """Summed token loss, token count and the 'lm loss' report Megatron's training log expects;
    with domain-sharded data also 'lm loss domain d' of every domain (this micro-batch counts
    for its own)."""
    from megatron_locmoe.node_data import domain_loss_report

    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().detach().to(torch.int)
    report = {"lm loss": torch.cat([loss.detach().view(1), num_tokens.view(1)])}
    report.update(domain_loss_report(losses, mask, domain, num_domains))
    return loss, num_tokens, report


class _Tags:
    """The data iterator with the plugin's per-sample tags taken out of each batch
    (``node_data``: the domain, the virtual rank), so Megatron's batch keys stay its own."""

    def __init__(self, data_iterator):
        self.data_iterator, self.tags = data_iterator, {}

    def __next__(self):
        from megatron_locmoe.node_data import DOMAIN_KEY, VIRTUAL_RANK_KEY

        batch = dict(next(self.data_iterator))
        for key in (DOMAIN_KEY, VIRTUAL_RANK_KEY):
            if key in batch:
                self.tags[key] = int(batch.pop(key).reshape(-1)[0])  # one per micro-batch
        return batch


def routing_profile(args):
    """The ProfileWindows --locmoe-routing-profile asks for, or None (the flags' rules:
    ``ProfileRequest.from_args``); its collector takes the cluster's shape (the virtual
    cluster's, else this rank's topology) at the first micro-batch, once the model is built."""
    from megatron_locmoe.analysis.placement import ProfileRequest
    from megatron_locmoe.arguments import locmoe_config_from_args
    from megatron_locmoe.topology import current_topology
    from megatron_locmoe.virtual import VirtualCluster

    request = ProfileRequest.from_args(args)
    if request is None:
        return None
    cluster = VirtualCluster.from_config(locmoe_config_from_args(args))

    def shape():
        if cluster is not None:
            return args.num_experts, cluster.ep_size, cluster.ep_groups[0].num_nodes
        topo = current_topology()
        return args.num_experts, topo.ep_size, topo.num_nodes

    return request.windows(shape)


def forward_step(data_iterator, model, *, profile=None):
    """One micro-batch: the model returns per-token losses when given labels; a chunk with hash
    routers gets the tokens on every stage (the pre-hook of attach_token_ids hands them over).
    A virtual cluster's micro-batch is routed as the virtual rank it belongs to. ``profile``:
    --locmoe-routing-profile's windows (``routing_profile``), told each micro-batch's
    iteration; ``main`` binds it."""
    from megatron.core.utils import get_attr_wrapped_model
    from megatron.training import get_args

    from megatron_locmoe import virtual
    from megatron_locmoe.node_data import DOMAIN_KEY, VIRTUAL_RANK_KEY
    from megatron_locmoe.routers.hash import hosts_hash_router

    if profile is not None:
        profile.at_iteration(get_args().curr_iteration)
    vp_stage = get_attr_wrapped_model(model, "vp_stage")
    tagged = _Tags(data_iterator) if data_iterator is not None else None
    batch = get_batch(tagged, vp_stage, needs_token_ids=hosts_hash_router(model))
    tags = tagged.tags if tagged is not None else {}
    if VIRTUAL_RANK_KEY in tags:
        virtual.enter(model, tags[VIRTUAL_RANK_KEY])
    tokens, labels, loss_mask, attention_mask, position_ids = batch
    output = model(tokens, position_ids, attention_mask, labels=labels, loss_mask=loss_mask)
    domain = tags.get(DOMAIN_KEY)  # only the plugin's domain datasets tag it (args are set)
    num_domains = 0
    if domain is not None:  # a tag only the plugin's domain datasets write (the args are set)
        args = get_args()
        num_domains = len(args.locmoe_domain_data_path or args.locmoe_domain_valid_data_path)
    return output, partial(loss_func, loss_mask, domain=domain, num_domains=num_domains)


def main() -> None:
    adaptor.apply()  # before megatron.training binds the patched names below
    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import (
        gpt_config_from_args,
        pretrain_cfg_container_from_args,
    )
    from megatron.training.arguments import parse_and_validate_args

    from megatron_locmoe.arguments import ARGS_DEFAULTS

    args = parse_and_validate_args(args_defaults=ARGS_DEFAULTS)
    profile = routing_profile(args)
    step = partial(forward_step, profile=profile)
    model_config = gpt_config_from_args(args)  # the plugin's spec when it is active
    container = pretrain_cfg_container_from_args(args, model_config)
    pretrain(container, train_valid_test_datasets_provider, ModelType.encoder_or_decoder, step)
    if profile is not None:
        profile.close()


if __name__ == "__main__":
    main()
