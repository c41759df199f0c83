"""Faults, each with the message it must give and every rank failing on its own (none left
waiting for a peer): a damaged or truncated
checkpoint shard, a non-finite router input. (A rank that dies or raises while its peers wait:
tests/test_simcluster.py; ranks without tokens: tests/test_zero_tokens.py; a non-finite loss:
tests/test_training_cpu.py.)"""

from __future__ import annotations

import pytest
import torch

from megatron_locmoe.config import LocMoEConfig
from megatron_locmoe.sim.cluster import ClusterJobError, ParallelLayout
from megatron_locmoe.sim.testing import build_moe_layer, moe_config
from megatron_locmoe.sim.trainer import tiny_model, train_job
from tests.tiny_settings import tiny_settings

LAYOUT = ParallelLayout(devices_per_node=1, ep=2)


def _saved_checkpoint(cluster, corpus, root):
    settings = tiny_settings(corpus, LAYOUT, steps=2, save_interval=2, save_dir=str(root))
    cluster.run(train_job, settings, layout=LAYOUT)
    shards = sorted((root / "iter_0000002").glob("*.distcp"))
    assert shards, "torch_dist wrote no shard files"
    return settings, shards


def _damage(shard, how):
    raw = bytearray(shard.read_bytes())
    if how == "corrupted":  # 4 KiB overwritten in the middle, the size unchanged
        mid = len(raw) // 2
        raw[mid : mid + 4096] = bytes(4096)
    else:  # truncated to half
        raw = raw[: len(raw) // 2]
    shard.write_bytes(bytes(raw))


@pytest.mark.parametrize("how", ["corrupted", "truncated"])
@pytest.mark.slow
def test_a_damaged_shard_stops_every_rank_before_training(cluster_factory, corpus, tmp_path, how):
    cluster = cluster_factory(2)
    settings, shards = _saved_checkpoint(cluster, corpus, tmp_path / "ckpt")
    _damage(shards[-1], how)
    settings.steps, settings.load_dir, settings.save_interval = 4, settings.save_dir, 0
    with pytest.raises(ClusterJobError) as e:
        cluster.run(train_job, settings, layout=LAYOUT)
    message = str(e.value)
    assert "were stopped" not in message  # every rank raised itself; none was left waiting
    assert "iter_0000002 is damaged: 1 file(s) fail the checksums written at save" in message
    assert f"{shards[-1].name} does not match its checksum" in message


REFUSED_SETTINGS = [
    ("hash", 8, False, "saved with router locmoe, this run has router hash: resume with the "
     "checkpoint's settings (--moe-router-type locmoe)"),
    ("locmoe", 4, False, "saved with expert count 8, this run has expert count 4: resume "
     "with the checkpoint's settings (--num-experts 8)"),
    ("switch", 4, True, "saved with router locmoe, expert count 8, this run has router "
     "switch, expert count 4"),
]  # fmt: skip


@pytest.mark.slow
def test_a_checkpoint_of_other_settings_is_refused_in_one_line(cluster_factory, corpus, tmp_path):
    """Resuming with another router trained on (hash: no parameters to miss) or failed with a
    500-character KeyError (switch); another expert count with Megatron's shape traceback. The
    checkpoint records the router, the expert count and the plugin version; both loads (resume
    and --finetune's weights) refuse a mismatch naming both values and the fix."""
    import json

    from megatron_locmoe import __version__

    cluster = cluster_factory(2)
    settings, _ = _saved_checkpoint(cluster, corpus, tmp_path / "ckpt")
    recorded = json.loads((tmp_path / "ckpt" / "iter_0000002" / "locmoe_settings.json").read_text())
    assert recorded == dict(
        router_type="locmoe",
        num_experts=8,
        plugin_version=__version__,
        num_groups=None,  # what `placement apply` refuses (docs/placement.md)
        node_map_settings={},
    )
    settings.steps, settings.save_dir, settings.save_interval = 4, None, 0
    for router_type, num_experts, weights_only, message in REFUSED_SETTINGS:
        settings.locmoe = LocMoEConfig(router_type=router_type)
        settings.model = tiny_model(router_type, LAYOUT, num_moe_experts=num_experts)
        settings.load_dir = None if weights_only else str(tmp_path / "ckpt")
        settings.init_weights_dir = str(tmp_path / "ckpt") if weights_only else None
        with pytest.raises(ClusterJobError) as e:
            cluster.run(train_job, settings, layout=LAYOUT)
        text = str(e.value)
        assert "were stopped" not in text  # every rank refused on its own
        # rank 0's traceback ends with it, the other ranks' summary repeats it: one message
        (line,) = {ln.split("ValueError: ", 1)[1] for ln in text.splitlines() if message in ln}
        assert "start fresh without --load (another --save directory)" in line


def nan_input_job(ctx, router_type, check):
    from megatron_locmoe.routers import router_builder

    ctx.topology()
    lm = LocMoEConfig(router_type=router_type, check_router_input=check)
    config = moe_config(ep=2, num_moe_experts=4, hidden_size=16, moe_router_topk=1)
    if router_type == "switch":
        config.moe_expert_capacity_factor = 1.0
    layer = build_moe_layer(config, router=router_builder(lm)).to(ctx.device)
    x = torch.randn(6, 2, 16, device=ctx.device, requires_grad=True)
    if ctx.rank == 1:
        x.data[3, 1, 5] = float("nan")
    try:
        out, _ = layer(x)
        out.sum().backward()
    except FloatingPointError as e:
        return str(e)
    return bool(torch.isfinite(x.grad).all())


@pytest.mark.parametrize("router_type", ["locmoe", "switch", "megatron"])
def test_a_nan_router_input_is_named_when_checked(cluster_factory, router_type):
    cluster = cluster_factory(2)
    # both ranks return (a rank left waiting in the dispatcher would fail the job instead)
    checked = cluster.run(nan_input_job, router_type, True, layout=LAYOUT)
    # both ranks stop in the router (rank 0 would otherwise wait for rank 1 in the dispatcher)
    assert "1 of 12 router input tokens on rank 1 are not finite (first: token 7)" in checked[1]
    assert (
        "router inputs on other ranks are not finite (1 tokens; rank 0's are finite)"
        in (checked[0])
    )
    unchecked = cluster.run(nan_input_job, router_type, False, layout=LAYOUT)
    assert unchecked[1] is False  # silently NaN: what the check is for
