"""The CPU loop's translator (launch/cpu_settings.train_settings) from Megatron's and the
plugin's data and evaluation flags: training data (--locmoe-domain-data-path: node k reads
domain k mod D; --train-data-path), the held-out evaluation (--locmoe-domain-valid-data-path by
node, --valid-data-path, --eval-iters x micro-batches per rank and step), the routing counts of
the last steps, what it refuses, and the ``{nodes}`` placeholder."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_locmoe.analysis.runlog import tail_length
from megatron_locmoe.launch.plan import Options, build_plan
from megatron_locmoe.launch.presets import PresetError
from tests.sweep_equivalence import tiny_corpora


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("cpu-loop-data")
    return root, tiny_corpora(root / "data", (2, 4))


def _demo_plan(tmp_path, corpus, sets, run="locmoe-top1", nodes=None):
    base = ["prepare_data=null", "data-path=null"]
    opts = Options(config="demo", sets=base + sets, runs=[run], runs_dir=str(tmp_path))
    if nodes:
        opts.nodes, opts.devices_per_node = nodes, 8 // nodes
    (rp,) = build_plan(opts).runs
    return rp.cpu_loop[0]


def _list(prefixes):
    return "[" + ", ".join(prefixes) + "]"


def test_domain_data_and_held_out_per_node(corpora, tmp_path):
    """--locmoe-domain-data-path / --locmoe-domain-valid-data-path: node k trains on and
    evaluates domain k mod D; --eval-iters x micro-batches per rank and step are evaluated."""
    _, data = corpora
    d = data[2]
    sets = [
        f"locmoe-domain-data-path={_list(d['prefixes'])}",
        f"locmoe-domain-valid-data-path={_list(d['valid_prefixes'])}",
        "eval-iters=3",
        "global-batch-size=64",  # two micro-batches per rank and step
    ]
    s = _demo_plan(tmp_path, d, sets)
    assert s.data_prefix_per_node == d["prefixes"] and s.data_prefix == d["prefixes"][0]
    assert s.eval_prefix_per_node == d["valid_prefixes"] and s.eval_prefix is None
    assert s.eval_batches == 6
    # Megatron's evaluation batch: --eval-global-batch-size samples an iteration
    s = _demo_plan(tmp_path, d, [*sets, "eval-global-batch-size=96"])
    assert s.eval_batches == 9
    s = _demo_plan(tmp_path, d, [*sets, "eval-interval=101"])  # after the 100 steps: none
    assert s.eval_batches == 6
    # one domain for 4 nodes: every node reads it (k mod 1)
    sets = [
        f"locmoe-domain-data-path=[{d['prefixes'][0]}]",
        f"locmoe-domain-valid-data-path=[{d['valid_prefixes'][0]}]",
    ]
    s = _demo_plan(tmp_path, d, sets, nodes=4)
    assert s.data_prefix_per_node == [d["prefixes"][0]] * 4
    assert s.eval_prefix_per_node == [d["valid_prefixes"][0]] * 4 and s.eval_batches == 100


def test_each_domain_trains_whole_beside_its_held_out_prefix(corpora, tmp_path):
    """With each domain's held-out prefix, the whole training prefix trains (pretrain_gpt's
    blend_per_split), with no --split (the study's domain presets: before 2026-12-08 every
    run of study-cpu-8x8-domains stopped in Megatron's dataset config, "split must be
    provided"); without held-out prefixes, --split is needed, and its absence is refused."""
    from dataclasses import replace

    from megatron_locmoe.sim.trainer import _dataset

    _, data = corpora
    d = data[2]
    domains = f"locmoe-domain-data-path={_list(d['prefixes'])}"
    valid = f"locmoe-domain-valid-data-path={_list(d['valid_prefixes'])}"
    s = _demo_plan(tmp_path, d, [domains, valid, "split=null"])
    assert s.dataset_options["split"] == "100,0,0"
    for prefix in s.data_prefix_per_node:  # Megatron's builder takes them as the loop does
        assert len(_dataset(replace(s, data_prefix=prefix), 4)) >= 4
    with pytest.raises(PresetError, match="splits each domain by --split, which is not set"):
        _demo_plan(tmp_path, d, [domains, "split=null", "eval-iters=0"])
    s = _demo_plan(tmp_path, d, [domains, "split=90,10,0", "eval-iters=0"])
    assert s.dataset_options["split"] == "90,10,0"
    # one held-out set for every rank (the mixture's): the whole domains train
    mixture = f"valid-data-path=[{d['mixture_valid']}]"
    s = _demo_plan(tmp_path, d, [domains, mixture, "split=null", "eval-iters=2"])
    assert s.dataset_options["split"] == "100,0,0" and s.data_prefix_per_node == d["prefixes"]
    assert (s.eval_prefix, s.eval_prefix_per_node) == (d["mixture_valid"], None)
    with pytest.raises(PresetError, match="give one held-out set, each node's domain"):
        _demo_plan(tmp_path, d, [domains, valid, mixture, "split=null"])
    with pytest.raises(PresetError, match="--split 90,10,0 with --valid-data-path: the whole"):
        _demo_plan(tmp_path, d, [domains, mixture, "split=90,10,0", "eval-iters=0"])


def test_a_virtual_cluster_evaluates_megatrons_number_of_samples(tmp_path):
    """On the virtual cluster one process runs every virtual rank's micro-batches: the
    evaluation's micro-batches per rank divide by the virtual data-parallel size, as the
    training's do (they were 64x Megatron's on study-cpu-8x8-control: 16,384 micro-batches
    for 256 samples, 13 GB and minutes before it was stopped)."""
    opts = Options(config="study-cpu-8x8-control", runs=["megatron"], runs_dir=str(tmp_path))
    (rp,) = build_plan(opts).runs
    s = rp.cpu_loop[0]
    ranks = s.locmoe.virtual_shape[0] * s.locmoe.virtual_shape[1]
    assert ranks == 64 and s.micro_batch_size == 1
    # Megatron: --eval-iters 4 iterations of the global batch (64 samples)
    assert s.eval_batches * ranks * s.micro_batch_size == 4 * s.global_batch_size


def test_held_out_mixture_from_per_split_paths(corpora, tmp_path):
    _, data = corpora
    d = data[2]
    sets = [
        f"train-data-path=[{d['mixture']}]",
        f"valid-data-path=[{d['mixture_valid']}]",
        "split=null",
        "eval-iters=2",
    ]
    s = _demo_plan(tmp_path, d, sets)
    assert (s.data_prefix, s.data_prefix_per_node) == (d["mixture"], None)
    assert (s.eval_prefix, s.eval_prefix_per_node, s.eval_batches) == (d["mixture_valid"], None, 2)
    assert s.dataset_options["split"] == "100,0,0"  # the whole --train-data-path trains
    # no held-out data named: nothing to evaluate (Megatron's --eval-iters default is 100)
    s = _demo_plan(tmp_path, d, [f"data-path=[{d['mixture']}]"])
    assert (s.eval_batches, s.eval_prefix, s.eval_prefix_per_node) == (0, None, None)
    s = _demo_plan(tmp_path, d, sets[:3] + ["eval-iters=0"])
    assert s.eval_batches == 0


def test_routing_counts_cover_the_tail_the_reports_average(corpora, tmp_path):
    _, data = corpora
    d = data[2]
    for steps in (3, 100, 200):
        sets = [f"data-path=[{d['mixture']}]", f"train-iters={steps}"]
        assert _demo_plan(tmp_path, d, sets).routing_stats_steps == tail_length(steps)


@pytest.mark.parametrize(
    "sets, refusal",
    [
        (
            ["eval-interval=50", "eval-iters=2"],
            "--eval-interval 50: Megatron would also evaluate during training",
        ),
        (["split=90,10,0", "eval-iters=5"], "does not evaluate --split's validation part"),
        (["eval-micro-batch-size=2"], "--eval-micro-batch-size 2: the CPU loop evaluates"),
        (["full-validation=true"], "--full-validation: the CPU loop evaluates --eval-iters"),
        (["skip-train=true"], "--skip-train: the CPU loop trains, then evaluates"),
    ],
)
def test_refused_evaluation(corpora, tmp_path, sets, refusal):
    _, data = corpora
    d = data[2]
    held_out = [
        f"locmoe-domain-data-path={_list(d['prefixes'])}",
        f"locmoe-domain-valid-data-path={_list(d['valid_prefixes'])}",
    ]
    with pytest.raises(PresetError, match=refusal):
        _demo_plan(tmp_path, d, held_out + sets)


def test_refused_data(corpora, tmp_path):
    _, data = corpora
    d = data[2]
    with pytest.raises(PresetError, match="without --locmoe-domain-data-path: pretrain_gpt"):
        _demo_plan(
            tmp_path,
            d,
            [
                f"data-path=[{d['mixture']}]",
                f"locmoe-domain-valid-data-path={_list(d['prefixes'])}",
            ],
        )
    with pytest.raises(PresetError, match="--split 100,0,0 with --train-data-path"):
        _demo_plan(tmp_path, d, [f"train-data-path=[{d['mixture']}]"])
    with pytest.raises(PresetError, match="the CPU loop evaluates one held-out prefix"):
        two = _list([d["mixture_valid"], d["valid_prefixes"][0]])
        _demo_plan(
            tmp_path,
            d,
            [f"train-data-path=[{d['mixture']}]", f"valid-data-path={two}", "split=null"],
        )
    with pytest.raises(PresetError, match="--test-data-path: the CPU loop evaluates the valid"):
        _demo_plan(
            tmp_path,
            d,
            [
                f"train-data-path=[{d['mixture']}]",
                f"test-data-path=[{d['mixture_valid']}]",
                "split=null",
            ],
        )


def test_nodes_placeholder(corpora, tmp_path):
    _, data = corpora
    d = data[4]
    sets = [
        f"locmoe-domain-data-path={_list(d['prefixes'])}",
        'sweep.megatron-node-limited.moe-router-num-groups="{nodes}"',
    ]
    s = _demo_plan(tmp_path, d, sets, run="megatron-node-limited", nodes=4)
    assert s.model.moe_router_num_groups == 4


def test_the_vocabulary_is_the_corpus_s(corpora, tmp_path):
    """--vocab-size is the training corpus's: 257 for the byte corpora, the one a real-text
    corpus's build.json records (so the loop trains on the 32K corpus with --vocab-size 32768);
    any other, or domains from two vocabularies, is refused before a rank starts."""
    import json
    import shutil

    _, data = corpora
    d = data[2]
    with pytest.raises(
        PresetError, match="--vocab-size 32768: the corpus has byte tokens, use 257"
    ):
        _demo_plan(tmp_path, d, [f"data-path=[{d['mixture']}]", "vocab-size=32768"])
    real = tmp_path / "realtext"
    real.mkdir()
    for f in Path(d["mixture"]).parent.glob("mixture.*"):
        shutil.copy(f, real / f.name)
    (real / "build.json").write_text(json.dumps({"vocab_size": 512}))
    settings = _demo_plan(tmp_path, d, [f"data-path=[{real / 'mixture'}]", "vocab-size=512"])
    assert settings.gpt_model_options["vocab_size"] >= 512
    with pytest.raises(PresetError, match="tokens of its build.json's tokenizer, use 512"):
        _demo_plan(tmp_path, d, [f"data-path=[{real / 'mixture'}]"])
    mixed = _list([d["prefixes"][0], str(real / "mixture")])
    with pytest.raises(PresetError, match="come from different vocabularies"):
        _demo_plan(tmp_path, d, [f"locmoe-domain-data-path={mixed}", "vocab-size=512"])


def test_the_virtual_cluster_s_nodes_read_the_domains(corpora, tmp_path):
    """On one simulated rank, the virtual cluster 4x2: its 4 virtual nodes read (and evaluate)
    domain k mod D, as pretrain_gpt's loader has virtual rank r's micro-batch read its node's
    domain; the simulated cluster's 1 node is not what counts."""
    _, data = corpora
    d = data[4]
    sets = [
        "prepare_data=null",
        "data-path=null",
        "expert-model-parallel-size=1",
        "locmoe-virtual-cluster=4x2",
        "global-batch-size=32",  # 8 virtual ranks x micro-batch 4
        f"locmoe-domain-data-path={_list(d['prefixes'])}",
        f"locmoe-domain-valid-data-path={_list(d['valid_prefixes'])}",
    ]
    opts = Options(config="demo", sets=sets, runs=["locmoe-top1"], runs_dir=str(tmp_path))
    opts.nodes, opts.devices_per_node = 1, 1
    (rp,) = build_plan(opts).runs
    s = rp.cpu_loop[0]
    assert s.data_prefix_per_node == d["prefixes"]
    assert s.eval_prefix_per_node == d["valid_prefixes"]
