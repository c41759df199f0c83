"""The plugin flags inside Megatron's own parser: each parses and lands on the TransformerConfig
(config.locmoe); each invalid combination fails at parse time with its message."""

from __future__ import annotations

import dataclasses
import re
import sys

import pytest

from megatron_locmoe import adaptor
from megatron_locmoe.arguments import dest
from megatron_locmoe.config import ConfigError, LocMoEConfig
from megatron_locmoe.device import DeviceChoice
from megatron_locmoe.validation import changes_megatron

BASE = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 128 "
    "--max-position-embeddings 128 --micro-batch-size 1 --global-batch-size 8 --num-experts 8 "
    "--expert-model-parallel-size 8 --moe-router-topk 1 --moe-router-pre-softmax "
    "--moe-token-dispatcher-type alltoall --transformer-impl local --lr 1e-4 --train-iters 10 "
    "--mock-data --tokenizer-type NullTokenizer --vocab-size 128"
).split()


@pytest.fixture
def megatron_args(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    adaptor.REGISTRY.apply(DeviceChoice("cpu", "gloo"))
    from megatron.training import argument_utils, arguments

    def parse(*extra: str, base=BASE):
        monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py", *base, *extra])
        args = arguments.parse_args()
        return arguments.validate_args(args)

    yield parse, argument_utils.core_transformer_config_from_args
    adaptor.REGISTRY.revert()


EVERY_SETTING = [
    # (flag, what follows it (None: a switch), the LocMoEConfig field, the value it lands as)
    ("--moe-router-type", "locmoe_plus", "router_type", "locmoe_plus"),  # reads all but hash's
    ("--locmoe-aux-loss-coeff", "0.02", "aux_loss_coeff", 0.02),
    ("--locmoe-locality-loss-coeff", "0.3", "locality_loss_coeff", 0.3),
    ("--locmoe-locality-smoothing", "0.01", "locality_smoothing", 0.01),
    ("--locmoe-node-target-share", "0.4", "node_target_share", 0.4),
    ("--locmoe-node-bias-rate", "0.2", "node_bias_rate", 0.2),
    ("--locmoe-node-bias-mode", "selection", "node_bias_mode", "selection"),
    ("--locmoe-node-margin", "0.5", "node_margin", 0.5),
    ("--locmoe-node-fill-mass", "0.9", "node_fill_mass", 0.9),
    ("--locmoe-rank-balance-loss-coeff", "0.01", "rank_balance_loss_coeff", 0.01),
    ("--locmoe-grap-mode", "learnable", "grap_mode", "learnable"),
    ("--locmoe-grap-bias", None, "grap_bias", True),
    ("--locmoe-grap-temperature", "4.0", "grap_temperature", 4.0),
    ("--locmoe-grap-learnable-temperature", None, "grap_learnable_temperature", True),
    ("--locmoe-fused-router", None, "fused_router", True),
    ("--locmoe-capacity-mode", "bound", "capacity_mode", "bound"),
    ("--locmoe-capacity-floor-factor", "0.25", "capacity_floor_factor", 0.25),
    ("--locmoe-capacity-percentile", "0.1", "capacity_percentile", 0.1),
    ("--locmoe-capacity-reestimate-interval", "50", "capacity_reestimate_interval", 50),
    ("--locmoe-plus-capacity-multiplier", "3.0", "plus_capacity_multiplier", 3.0),
    ("--locmoe-plus-affinity-threshold", "0.5", "plus_affinity_threshold", 0.5),
    ("--locmoe-dispatcher", "hierarchical", "dispatcher", "hierarchical"),
    ("--locmoe-dispatcher-dedup", "on", "dispatcher_dedup", "on"),
    ("--locmoe-experts", "grouped", "experts", "grouped"),
    ("--locmoe-check-router-input", None, "check_router_input", True),
    ("--locmoe-devices-per-node", "4", "devices_per_node", 4),
    ("--locmoe-attention", "sdpa", "attention", "sdpa"),
]
SETTINGS_NEED = (
    "--moe-expert-capacity-factor", "1.25", "--disable-bias-linear", "--moe-router-topk", "2"
)  # fmt: skip
"""Megatron's own flags the settings above need: bound capacity a capacity factor, grouped
experts no linear biases, the fewest-nodes fill top-k > 1."""


def test_every_flag_parses_and_lands_in_transformer_config(megatron_args, tmp_path):
    parse, to_config = megatron_args
    typed = [a for flag, value, _, _ in EVERY_SETTING for a in (flag, value) if a is not None]
    args = parse(*typed, *SETTINGS_NEED)
    expected = LocMoEConfig(**{field: value for _, _, field, value in EVERY_SETTING})
    config = to_config(args)
    assert config.locmoe == expected
    # the hash router's settings, which only it reads
    import numpy as np

    np.save(tmp_path / "counts.npy", np.ones(128, dtype=np.int64))
    counts = str(tmp_path / "counts.npy")
    args = parse(
        "--moe-router-type", "hash", "--locmoe-hash-seed", "7", "--locmoe-hash-token-counts", counts
    )
    hashed = LocMoEConfig(router_type="hash", hash_seed=7, hash_token_counts=counts)
    assert to_config(args).locmoe == hashed
    # Megatron's router's own setting, which only it reads (4 nodes of 2 experts for top-2)
    args = parse(
        "--moe-router-topk", "2", "--locmoe-devices-per-node", "2",
        "--locmoe-max-outgoing-fraction", "0.14",
    )  # fmt: skip
    capped = LocMoEConfig(devices_per_node=2, max_outgoing_fraction=0.14)
    assert to_config(args).locmoe == capped
    # every field was set away from its default, so every flag is exercised (the virtual
    # cluster's need one process: test_virtual_cluster_flags_parse)
    for f in dataclasses.fields(LocMoEConfig):
        assert hasattr(args, dest(f.name))
        if f.name in VIRTUAL_FIELDS:
            continue
        assert any(f.default != getattr(c, f.name) for c in (expected, hashed, capped)), f.name


VIRTUAL_FIELDS = ("virtual_cluster", "virtual_ep_size")
VIRTUAL_BASE = [
    a if a != "8" or i != BASE.index("--expert-model-parallel-size") + 1 else "1"
    for i, a in enumerate(BASE)
]


def test_virtual_cluster_flags_parse(megatron_args, monkeypatch):
    parse, to_config = megatron_args
    monkeypatch.setenv("WORLD_SIZE", "1")
    args = parse(
        "--moe-router-type",
        "locmoe",
        "--locmoe-virtual-cluster",
        "4x2",
        "--locmoe-virtual-ep-size",
        "4",
        base=VIRTUAL_BASE,
    )
    locmoe = to_config(args).locmoe
    assert (locmoe.virtual_cluster, locmoe.virtual_ep_size) == ("4x2", 4)
    assert locmoe.virtual_shape == (4, 2) and changes_megatron(locmoe, False)


@pytest.mark.parametrize(
    "extra, world, message",
    [
        (["--locmoe-virtual-cluster", "4by2"], 1, "is not NODESxGPUS"),
        (["--locmoe-virtual-cluster", "4x2"], 8, "launch one rank"),
        (
            ["--locmoe-virtual-cluster", "4x2", "--global-batch-size", "12"],
            1,
            "not a multiple of --micro-batch-size 1 x the virtual cluster's 8 ranks",
        ),
        (
            ["--locmoe-virtual-cluster", "4x4", "--global-batch-size", "16"],
            1,
            "8 experts do not split over the virtual",
        ),
        (
            ["--locmoe-virtual-cluster", "4x2", "--locmoe-virtual-ep-size", "3"],
            1,
            "does not divide the virtual cluster's 8 ranks",
        ),
        (["--locmoe-virtual-ep-size", "4"], 1, "without a virtual cluster"),
        (
            ["--locmoe-virtual-cluster", "4x2", "--locmoe-devices-per-node", "2"],
            1,
            "drop --locmoe-devices-per-node",
        ),
        (
            [
                "--locmoe-virtual-cluster",
                "4x2",
                "--moe-router-load-balancing-type",
                "global_aux_loss",
            ],
            1,
            "global_aux_loss",
        ),
        (
            ["--locmoe-domain-valid-data-path", "x", "y"],
            1,
            "2 held-out domains for 1 data-parallel ranks",
        ),
        (
            [
                "--locmoe-virtual-cluster",
                "4x2",
                "--cuda-graph-impl",
                "local",
                "--cuda-graph-modules",
                "attn",
            ],
            1,
            "--cuda-graph-impl local",
        ),
        (
            ["--locmoe-virtual-cluster", "2x4", "--locmoe-domain-data-path", "a", "b", "c"],
            1,
            "would be read by no node",
        ),
    ],
)
def test_virtual_cluster_and_domain_data_refusals(
    megatron_args, monkeypatch, extra, world, message
):
    parse, _ = megatron_args
    monkeypatch.setenv("WORLD_SIZE", str(world))
    base = VIRTUAL_BASE if world == 1 else BASE
    if "--locmoe-domain-data-path" in extra:
        base = [a for a in base if a != "--mock-data"]
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse("--moe-router-type", "locmoe", *extra, base=base)


def test_defaults_keep_megatron_behaviour(megatron_args):
    parse, to_config = megatron_args
    config = to_config(parse())
    assert config.locmoe == LocMoEConfig()
    assert config.locmoe.router_type == "megatron" and not changes_megatron(config.locmoe, False)
    # the auto settings resolve to stock Megatron's for its own router, on any node map
    from types import SimpleNamespace

    from megatron_locmoe.resolve import resolve

    two_nodes = SimpleNamespace(spans_nodes=True, num_nodes=2, ranks_per_node=4, ep_size=8)
    resolved = resolve(config.locmoe, config, two_nodes, "cuda").config
    assert (resolved.dispatcher, resolved.experts) == ("alltoall", "loop")


INVALID = [
    (  # Megatron's own router: its validation misses this, its first forward then fails
        ["--moe-router-topk", "2", "--moe-router-num-groups", "8", "--moe-router-group-topk", "1"],
        "--moe-router-topk 2 experts cannot come from --moe-router-group-topk 1 of 8 groups of 1",
    ),
    (
        ["--moe-router-type", "locmoe", "--moe-router-topk", "9"],
        "larger than the number of experts",
    ),
    (["--moe-router-type", "locmoe", "--hidden-size", "60"], "hidden size 60 into 8 equal chunks"),
    (["--moe-router-type", "locmoe", "--locmoe-locality-loss-coeff", "-1"], "is negative"),
    (["--moe-router-type", "locmoe", "--locmoe-capacity-percentile", "1.5"], "must lie in (0, 1)"),
    (
        ["--moe-router-type", "locmoe", "--locmoe-capacity-mode", "bound"],
        "set --moe-expert-capacity-factor",
    ),
    (
        [
            "--moe-router-type",
            "locmoe",
            "--locmoe-capacity-mode",
            "bound",
            "--moe-expert-capacity-factor",
            "0.5",
            "--locmoe-capacity-floor-factor",
            "0.8",
        ],
        "above the ceiling",
    ),
    (["--moe-router-type", "switch", "--moe-router-topk", "2"], "the switch router is top-1"),
    (["--moe-router-type", "switch"], "drops overflow at a capacity factor"),
    (["--moe-router-type", "hash", "--moe-expert-capacity-factor", "1.0"], "dropless"),
    (
        ["--locmoe-dispatcher", "hierarchical", "--moe-token-dispatcher-type", "allgather"],
        "--moe-token-dispatcher-type is 'allgather'",
    ),
    (
        [
            "--locmoe-dispatcher",
            "hierarchical",
            "--moe-shared-expert-intermediate-size",
            "64",
            "--moe-shared-expert-overlap",
        ],
        "--moe-shared-expert-overlap (it overlaps inside Megatron's own dispatcher) cannot be combined",
    ),
    (["--train-iters", "0"], "--train-iters 0: a run trains at least 1 step; give --train-iters N"),
    (["--train-iters", "-5"], "--train-iters -5: a run trains at least 1 step"),
    (
        ["--train-iters", "6", "--lr-warmup-iters", "10"],
        "--lr-warmup-iters 10 is not below the 6 iterations the learning rate decays over",
    ),
    (
        ["--train-iters", "60", "--lr-decay-iters", "8", "--lr-warmup-iters", "8"],
        "--lr-warmup-iters 8 is not below the 8 iterations",
    ),
    (
        ["--moe-router-type", "locmoe", "--locmoe-devices-per-node", "3"],
        "world size 8 is not a multiple of 3 devices per node",
    ),
    (
        [
            "--moe-router-type",
            "locmoe",
            "--moe-router-num-groups",
            "2",
            "--moe-router-group-topk",
            "1",
        ],
        "group-limited routing",
    ),
    (
        [
            "--moe-router-type",
            "locmoe",
            "--mtp-num-layers",
            "1",
            "--position-embedding-type",
            "rope",
        ],
        "drop --mtp-num-layers",
    ),
    (["--locmoe-experts", "grouped"], "pass --disable-bias-linear"),
    (["--moe-router-type", "locmoe", "--cuda-graph-impl", "local"], "captures each MoE layer"),
    (
        ["--moe-router-type", "hash", "--cuda-graph-impl", "local", "--cuda-graph-modules", "attn"],
        "add moe_router to --cuda-graph-modules",
    ),
    # before any process starts: top-k of Megatron's own router, non-finite floats, files
    (["--moe-router-topk", "0"], "every token needs at least 1 expert"),
    (["--moe-router-type", "locmoe", "--locmoe-locality-loss-coeff", "nan"], "not a finite"),
    (
        ["--moe-router-type", "hash", "--locmoe-hash-token-counts", "/nonexistent/c.npy"],
        "/nonexistent/c.npy: no such file",
    ),
    (
        ["--locmoe-experts", "grouped", "--disable-bias-linear", "--use-te-activation-func"],
        "the TE activation module",
    ),
]


@pytest.mark.parametrize("extra, message", INVALID, ids=[m for _, m in INVALID])
def test_invalid_combinations_fail_at_parse_time(megatron_args, extra, message):
    parse, _ = megatron_args
    with pytest.raises(ConfigError) as e:
        parse(*extra)
    assert message in str(e.value)


def test_hash_router_parses_with_pipeline_stages(megatron_args):
    """Every stage that hosts hash routers gets the token ids (CPU loop, pretrain_gpt): the
    hash router no longer refuses PP > 1 (tests/test_pipeline_cpu.py trains it)."""
    parse, to_config = megatron_args
    args = parse(
        *("--moe-router-type", "hash", "--pipeline-model-parallel-size", "2"),
        *("--num-layers", "4", "--expert-model-parallel-size", "4"),
    )
    assert to_config(args).pipeline_model_parallel_size == 2


def test_unknown_router_rejected_by_argparse(megatron_args, capsys):
    parse, _ = megatron_args
    with pytest.raises(SystemExit):
        parse("--moe-router-type", "gshard")
    assert "invalid choice: 'gshard'" in capsys.readouterr().err


def test_no_experts(megatron_args):
    parse, _ = megatron_args
    dense = " ".join(BASE).replace("--num-experts 8 --expert-model-parallel-size 8 ", "")
    base = dense.replace("--moe-router-topk 1 --moe-router-pre-softmax ", "").split()
    with pytest.raises(ConfigError, match="need an MoE model: set --num-experts"):
        parse("--moe-router-type", "locmoe", base=base)


def test_tensor_parallel_args_validate_without_a_cuda_device(megatron_args, monkeypatch):
    """With TP > 1 Megatron's validate_args asks the CUDA device's architecture; on CPU/NPU
    ranks the adaptor answers 'not CUDA' (pre-Blackwell rules: CUDA_DEVICE_MAX_CONNECTIONS=1)."""
    parse, _ = megatron_args
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    args = parse("--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "4")
    assert args.tensor_model_parallel_size == 2


def test_hash_counts_file_is_checked_at_parse_time(megatron_args, tmp_path):
    import numpy as np

    parse, _ = megatron_args
    flags = ["--moe-router-type", "hash", "--locmoe-hash-token-counts"]
    bad = {
        "text.npy": (lambda p: p.write_text("not numpy"), "not a .npy array"),
        "2d.npy": (lambda p: np.save(p, np.ones((2, 3))), "of shape (2, 3)"),
        "neg.npy": (lambda p: np.save(p, np.array([1, -1])), "finite and >= 0"),
        "big.npy": (lambda p: np.save(p, np.ones(10**6)), "belongs to another tokenizer"),
    }
    for name, (write, message) in bad.items():
        write(tmp_path / name)
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse(*flags, str(tmp_path / name))
    np.save(tmp_path / "ok.npy", np.arange(100))
    parse(*flags, str(tmp_path / "ok.npy"))


def test_local_graphs_of_the_router_parse(megatron_args):
    """The refusal above is of whole-layer captures only: graphing the router is accepted."""
    parse, _ = megatron_args
    args = parse(
        "--moe-router-type", "locmoe", "--cuda-graph-impl", "local", "--cuda-graph-modules",
        "moe_router",
    )  # fmt: skip
    assert [getattr(m, "name", m) for m in args.cuda_graph_modules] == ["moe_router"]


def test_sdpa_attention_refuses_reset_attention_mask(megatron_args):
    parse, _ = megatron_args
    parse("--moe-router-type", "locmoe", "--locmoe-attention", "sdpa")
    with pytest.raises(ConfigError, match="reset-attention-mask"):
        parse("--moe-router-type", "locmoe", "--locmoe-attention", "sdpa", "--reset-attention-mask")


# one case per router-owned setting (config.ROUTER_SETTINGS): a router that does not read it
OWNED_SETTING_CASES = {
    "aux_loss_coeff": ("hash", ["0.02"]),
    "locality_loss_coeff": ("switch", ["0.3"]),
    "locality_smoothing": ("hash", ["0.01"]),
    "node_target_share": ("switch", ["0.4"]),
    "node_bias_rate": ("hash", ["0.2"]),
    "node_bias_mode": ("switch", ["selection"]),
    "node_margin": ("hash", ["0.5"]),
    "node_fill_mass": ("switch", ["0.9"]),
    "rank_balance_loss_coeff": ("megatron", ["0.01"]),
    "grap_mode": ("switch", ["learnable"]),
    "grap_bias": ("hash", []),
    "grap_temperature": ("switch", ["4.0"]),
    "grap_learnable_temperature": ("megatron", []),
    "capacity_mode": ("megatron", ["bound"]),
    "capacity_floor_factor": ("switch", ["0.25"]),
    "capacity_percentile": ("hash", ["0.1"]),
    "capacity_reestimate_interval": ("switch", ["50"]),
    "plus_capacity_multiplier": ("locmoe", ["3.0"]),
    "plus_affinity_threshold": ("locmoe", ["0.5"]),
    "hash_seed": ("locmoe", ["7"]),
    "hash_token_counts": ("switch", ["counts.npy"]),
    "max_outgoing_fraction": ("locmoe", ["0.14"]),
}


def test_every_router_owned_setting_has_a_refusal_case():
    from megatron_locmoe.config import ROUTER_SETTINGS

    assert set(OWNED_SETTING_CASES) == set(ROUTER_SETTINGS)


@pytest.mark.parametrize("setting", sorted(OWNED_SETTING_CASES))
def test_a_setting_the_router_does_not_read_is_refused_at_parse_time(megatron_args, setting):
    """e.g. --locmoe-grap-mode learnable with --moe-router-type switch trained on silently with
    Switch's gate; now the parse fails naming the router and the flag."""
    parse, _ = megatron_args
    router, value = OWNED_SETTING_CASES[setting]
    flag = "--locmoe-" + setting.replace("_", "-")
    extra = ["--moe-expert-capacity-factor", "1.0"] if router == "switch" else []
    with pytest.raises(ConfigError) as e:
        parse("--moe-router-type", router, flag, *value, *extra)
    assert f"{setting} is a " in str(e.value)
    assert f"the {router} router does not read it ({flag}" in str(e.value)
    # the same setting for a router that reads it parses
    reader = "hash" if setting.startswith("hash") else "locmoe_plus"
    reader_extra = ["--moe-expert-capacity-factor", "1.1"] if reader == "locmoe_plus" else []
    if setting == "max_outgoing_fraction":  # Megatron's router alone reads it
        reader, reader_extra = "megatron", []
    if setting == "node_bias_mode":  # it places the node target's bias
        reader_extra += ["--locmoe-node-target-share", "0.5"]
    if setting == "node_fill_mass":  # it fills k > 1 slots
        reader_extra += ["--moe-router-topk", "2"]
    if setting != "hash_token_counts":
        parse("--moe-router-type", reader, flag, *value, *reader_extra)


def test_per_domain_held_out_data_alone_needs_one_source_and_a_rank_per_domain(megatron_args):
    parse, _ = megatron_args  # 8 ranks: rank r evaluates domain r mod D
    base = [t for t in BASE if t != "--mock-data"] + ["--train-data-path", "t"]
    with pytest.raises(ConfigError, match="both give held-out data"):
        parse("--locmoe-domain-valid-data-path", "d0", "--valid-data-path", "v", base=base)
    with pytest.raises(ConfigError, match="9 held-out domains for 8 data-parallel ranks"):
        parse("--locmoe-domain-valid-data-path", *[f"d{i}" for i in range(9)], base=base)
    with pytest.raises(Exception, match="d0"):  # each prefix a dataset, named when it is not
        parse("--locmoe-domain-valid-data-path", "d0", base=base)
