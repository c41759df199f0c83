"""The virtual cluster through ``megatron_locmoe.pretrain_gpt``'s own pieces on one CPU rank:
Megatron's parser, the plugin's datasets provider (the mixture tagged with virtual ranks, and
domain-sharded data), Megatron's data loader and sampler, and pretrain_gpt's forward_step and
loss_func on the plugin's GPT model. (Megatron's ``pretrain()`` itself is not a CPU target; the
GPU run of docs/virtual_cluster.md uses it.) Every micro-batch is routed as the virtual rank
Megatron's sample order gives it, the held-out loss is reported per domain, and a model that is
not told the rank refuses to route rather than count every micro-batch as rank 0."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

from megatron_locmoe.sim import data
from megatron_locmoe.sim.cluster import ParallelLayout

ONE = ParallelLayout(devices_per_node=1)
FLAGS = (
    "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 32 "
    "--max-position-embeddings 32 --micro-batch-size 2 --global-batch-size 16 --num-experts 16 "
    "--moe-router-topk 1 --moe-router-pre-softmax --moe-token-dispatcher-type alltoall "
    "--transformer-impl local --lr 1e-4 --train-iters 4 --eval-iters 1 --eval-interval 2 "
    "--tokenizer-type NullTokenizer --vocab-size 257 --moe-router-type locmoe "
    "--locmoe-virtual-cluster 4x2 --no-rope-fusion --split 90,10,0 --num-workers 0"
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    return data.build_domain_datasets(out, 4, max_stdlib_files=40, held_out_every=10)


def pretrain_path_job(
    ctx, extra: list[str], enter: bool = True, base: str = FLAGS, iterations: int = 1
):
    """Megatron's args from the command line, the plugin's datasets through Megatron's loader,
    then pretrain_gpt's forward_step on ``iterations`` x 8 micro-batches of training (one per
    virtual rank an iteration, Megatron's ``curr_iteration`` set as its loop does) and 8 of
    evaluation, with --locmoe-routing-profile's windows as main() binds them; returns the
    virtual ranks the layers counted, and the loss reports."""
    import megatron.training.global_vars as gv
    from megatron.training import arguments
    from megatron.training.datasets.data_samplers import build_pretraining_data_loader

    from megatron_locmoe import adaptor, pretrain_gpt, virtual
    from megatron_locmoe.arguments import locmoe_config_from_args
    from megatron_locmoe.layer import LocMoELayer
    from megatron_locmoe.sim.trainer import TrainSettings, _model, tiny_model

    adaptor.apply()
    sys.argv = ["pretrain_gpt.py", *base.split(), *extra]
    args = arguments.validate_args(arguments.parse_args())
    saved = gv._GLOBAL_ARGS, gv._GLOBAL_TOKENIZER
    right, entering = LocMoELayer.enter_virtual_rank, virtual.enter
    gv._GLOBAL_ARGS, gv._GLOBAL_TOKENIZER = args, gv._build_tokenizer(args)
    try:
        train, valid, _ = pretrain_gpt.train_valid_test_datasets_provider([64, 16, 0])
        locmoe = locmoe_config_from_args(args)
        settings = TrainSettings(
            data_prefix="",
            locmoe=locmoe,
            model=tiny_model(locmoe.router_type, ctx.layout, hidden_size=32, num_moe_experts=16),
            seq_length=32,
            micro_batch_size=2,
        )
        model = _model(settings, ep=1)
        layers = [m for m in model.modules() if isinstance(m, LocMoELayer)]
        seen: list[int] = []

        def spy(self, rank):
            if self is layers[0]:
                seen.append(rank)
            right(self, rank)

        LocMoELayer.enter_virtual_rank = spy
        if not enter:
            virtual.enter = lambda model, rank: None
        reports = []
        profile = pretrain_gpt.routing_profile(args)
        for dataset, training in ((train, True), (valid, False)):
            model.train(training)
            loader = iter(build_pretraining_data_loader(dataset, 0))
            for i in range(8 * iterations if training else 8):
                if training:
                    args.curr_iteration = i // 8
                output, loss_func = pretrain_gpt.forward_step(loader, model, profile=profile)
                loss, _, report = loss_func(output)
                if training:
                    loss.backward()
                reports.append({k: v.tolist() for k, v in report.items()})
        if profile is not None:
            profile.close()
        return seen, reports
    finally:
        LocMoELayer.enter_virtual_rank, virtual.enter = right, entering
        gv._GLOBAL_ARGS, gv._GLOBAL_TOKENIZER = saved


def test_the_mixture_is_routed_rank_by_rank(cluster_factory, corpus):
    seen, reports = cluster_factory(1).run(
        pretrain_path_job, ["--data-path", corpus["mixture"]], layout=ONE, timeout_s=240
    )[0]
    assert seen == list(range(8)) * 2  # training, then evaluation: i mod 8 both times
    assert all(set(r) == {"lm loss"} for r in reports)


def test_domain_data_is_read_by_node_and_reported_per_domain(cluster_factory, corpus):
    flags = ["--locmoe-domain-data-path", *corpus["prefixes"]]
    flags += ["--locmoe-domain-valid-data-path", *corpus["valid_prefixes"], "--split", "100,0,0"]
    seen, reports = cluster_factory(1).run(pretrain_path_job, flags, layout=ONE, timeout_s=240)[0]
    assert seen == list(range(8)) * 2
    for i, report in enumerate(reports):
        domain = (i % 8) // 2  # virtual rank i mod 8 sits on node (i mod 8) // 2
        tokens = [report[f"lm loss domain {d}"][1] for d in range(4)]
        assert tokens[domain] > 0 and sum(tokens) == tokens[domain] == report["lm loss"][1]


def test_domain_training_evaluates_one_held_out_set_on_every_rank(cluster_factory, corpus):
    """--locmoe-domain-data-path with one --valid-data-path (no --split): node k trains on
    the whole domain k, and every rank evaluates the mixture's held-out documents, where a
    token's node says nothing of its domain (so no domain is reported in evaluation)."""
    flags = ["--locmoe-domain-data-path", *corpus["prefixes"]]
    flags += ["--valid-data-path", corpus["mixture_valid"]]
    base = FLAGS.replace("--split 90,10,0", "")
    seen, reports = cluster_factory(1).run(
        pretrain_path_job, flags, base=base, layout=ONE, timeout_s=240
    )[0]
    assert seen == list(range(8)) * 2
    for i, report in enumerate(reports[:8]):  # training: virtual rank i on node i // 2
        tokens = [report[f"lm loss domain {d}"][1] for d in range(4)]
        assert tokens[i // 2] > 0 and sum(tokens) == tokens[i // 2] == report["lm loss"][1]
    assert all(set(r) == {"lm loss"} and r["lm loss"][1] > 0 for r in reports[8:])


def test_the_control_reports_every_domains_held_out_loss(cluster_factory, corpus):
    """Training on the mixture (Megatron's usual loader), held out per domain: evaluation
    micro-batch i is virtual rank i mod 8's and holds domain (i mod 8) mod 4's held-out tokens,
    so every domain is evaluated on ranks of two nodes; training reports the mixture alone."""
    flags = ["--train-data-path", corpus["mixture"]]  # per-split paths: no --split
    flags += ["--locmoe-domain-valid-data-path", *corpus["valid_prefixes"]]
    base = FLAGS.replace("--split 90,10,0", "")
    seen, reports = cluster_factory(1).run(
        pretrain_path_job, flags, base=base, layout=ONE, timeout_s=240
    )[0]
    assert seen == list(range(8)) * 2
    assert all(set(r) == {"lm loss"} for r in reports[:8])
    for i, report in enumerate(reports[8:]):
        tokens = [report[f"lm loss domain {d}"][1] for d in range(4)]
        assert tokens[i % 4] > 0 and sum(tokens) == tokens[i % 4] == report["lm loss"][1]


@pytest.mark.parametrize(
    "interval, windows", [(1, ["0000001-0000001", "0000002-0000002"]), (0, ["0000001-0000002"])]
)
def test_the_routing_profile_counts_each_nodes_training_tokens_by_window(
    cluster_factory, corpus, tmp_path, interval, windows
):
    """--locmoe-routing-profile on the virtual cluster 4x2: each window holds its iterations'
    training routing (evaluation left out), every virtual rank's tokens on its own node (2 ranks
    x 2 x 32 tokens a node and iteration), the cluster's shape, one kept expert a token."""
    from megatron_locmoe.analysis.placement import RoutingProfile

    out = tmp_path / "profile"
    flags = ["--data-path", corpus["mixture"], "--moe-router-type", "megatron"]
    flags += ["--locmoe-routing-profile", str(out)]
    flags += ["--locmoe-routing-profile-interval", str(interval)]
    cluster_factory(1).run(pretrain_path_job, flags, layout=ONE, timeout_s=240, iterations=2)
    assert sorted(p.name for p in out.iterdir()) == [f"profile_iter{w}.npz" for w in windows]
    for path in out.iterdir():
        profile = RoutingProfile.load(path)
        per_iteration = 2 * 2 * 32 * (2 if interval == 0 else 1)
        assert (profile.ep_size, profile.num_nodes, profile.num_experts) == (8, 4, 16)
        assert profile.router_type == "megatron" and len(profile.layers) == 2
        assert (profile.tokens == per_iteration).all(), profile.tokens
        assert (profile.source_counts.sum(-1) == per_iteration).all()  # top-1, dropless


def test_routing_profile_settings_are_refused_where_they_cannot_work(cluster_factory, corpus):
    from megatron_locmoe import pretrain_gpt
    from megatron_locmoe.config import ConfigError

    with pytest.raises(ConfigError, match="without --locmoe-routing-profile"):
        pretrain_gpt.routing_profile(
            SimpleNamespace(locmoe_routing_profile=None, locmoe_routing_profile_interval=4)
        )
    with pytest.raises(ConfigError, match="give --num-experts"):
        pretrain_gpt.routing_profile(
            SimpleNamespace(
                locmoe_routing_profile="x", locmoe_routing_profile_interval=0, num_experts=None
            )
        )


def test_a_model_not_told_its_rank_refuses_to_route(cluster_factory, corpus):
    with pytest.raises(Exception, match="without its virtual rank"):
        cluster_factory(1).run(
            pretrain_path_job,
            ["--data-path", corpus["mixture"]],
            enter=False,
            layout=ONE,
            timeout_s=240,
        )


REAL_FLAGS = FLAGS.replace("--locmoe-virtual-cluster 4x2", "").replace(
    "--global-batch-size 16", "--global-batch-size 32 --expert-model-parallel-size 8"
)


def real_domain_data_job(ctx, prefixes: list[str]):
    """On a real (simulated) cluster of 4 nodes x 2 ranks: Megatron's args, the plugin's
    domain-sharded datasets and Megatron's loader on every rank; returns this rank's first two
    micro-batches as (domain tag, first token ids of each sample)."""
    import os

    import megatron.training.global_vars as gv
    from megatron.training import arguments
    from megatron.training.datasets.data_samplers import build_pretraining_data_loader

    from megatron_locmoe import adaptor, pretrain_gpt

    adaptor.apply()
    os.environ.update(WORLD_SIZE=str(ctx.world_size), RANK=str(ctx.rank), LOCAL_WORLD_SIZE="2")
    sys.argv = ["pretrain_gpt.py", *REAL_FLAGS.split(), "--locmoe-domain-data-path", *prefixes]
    args = arguments.validate_args(arguments.parse_args())
    saved = gv._GLOBAL_ARGS, gv._GLOBAL_TOKENIZER
    gv._GLOBAL_ARGS, gv._GLOBAL_TOKENIZER = args, gv._build_tokenizer(args)
    try:
        train, _, _ = pretrain_gpt.train_valid_test_datasets_provider([128, 0, 0])
        tagged = pretrain_gpt._Tags(iter(build_pretraining_data_loader(train, 0)))
        out = []
        for _ in range(2):
            batch = next(tagged)
            out.append((tagged.tags["locmoe_domain"], batch["tokens"][:, :4].tolist()))
        return out
    finally:
        gv._GLOBAL_ARGS, gv._GLOBAL_TOKENIZER = saved


def test_a_real_cluster_reads_one_domain_per_node(cluster8, corpus):
    """The ranks' nodes come from the data-parallel group (gathered), each rank of node k reads
    domain k mod 3 (4 nodes, 3 domains: nodes 0 and 3 share domain 0), every rank of a domain
    reads other samples, and no virtual rank is tagged on a real cluster."""
    results = cluster8.run(
        real_domain_data_job,
        corpus["prefixes"][:3],
        layout=ParallelLayout(devices_per_node=2, ep=8),
        timeout_s=240,
    )
    for rank, micro_batches in enumerate(results):
        assert [domain for domain, _ in micro_batches] == [(rank // 2) % 3] * 2
    samples = [tuple(map(tuple, tokens)) for r in results for _, tokens in r]
    assert len(set(samples)) == len(samples)  # nodes 0 and 3 share domain 0, not its samples
