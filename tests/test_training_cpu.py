"""End to end on the CPU: a tiny GPT-MoE (Megatron-Core GPTModel with the plugin's layers and
the hierarchical dispatcher) trains on the offline corpus for each router on 2 simulated nodes
x 2 ranks (EP=4); the loss falls and the plugin's metrics land in TensorBoard event files and
in W&B offline run files."""

from __future__ import annotations

import math
import time
from dataclasses import replace

import pytest

from megatron_locmoe.config import LocMoEConfig
from megatron_locmoe.metrics import PLUGIN_METRICS
from megatron_locmoe.sim import data
from megatron_locmoe.sim.cluster import ParallelLayout
from megatron_locmoe.sim.trainer import TrainSettings, tiny_model, train_job
from tests.tiny_settings import tiny_settings


def _tensorboard_tags(logdir) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return set(acc.Tags()["scalars"])


def built_sizes_job(ctx, settings) -> dict:
    """The sizes of the model the loop builds for ``settings``, read off its modules."""
    from megatron_locmoe.sim import trainer

    ctx.topology()
    (model,) = trainer._model_chunks(settings, ctx.layout.ep)
    layers = model.decoder.layers
    mlp = layers[0].mlp
    return dict(
        num_layers=len(layers),
        hidden_size=model.embedding.word_embeddings.weight.shape[1],
        num_attention_heads=layers[0].self_attention.num_attention_heads_per_partition,
        num_moe_experts=mlp.router.weight.shape[0],
        moe_router_topk=mlp.router.topk,
        moe_ffn_hidden_size=mlp.experts.local_experts[0].linear_fc2.weight.shape[1],
    )


def test_the_loop_builds_the_settings_model(cluster_factory):
    """The model that trains is the settings' model: every size :func:`tiny_model` is given
    (none of them its default) is the built module's; a model for another layout is refused."""
    from megatron_locmoe.sim.cluster import ClusterJobError
    from megatron_locmoe.sim.trainer import TINY_MODEL

    layout = ParallelLayout(devices_per_node=1, ep=2)
    sizes = dict(num_layers=3, hidden_size=32, num_attention_heads=2, num_moe_experts=6)
    sizes.update(moe_router_topk=2, moe_ffn_hidden_size=40)
    assert all(TINY_MODEL.get(k) != v for k, v in sizes.items())
    settings = TrainSettings(
        data_prefix="",
        locmoe=LocMoEConfig(dispatcher="hierarchical"),
        model=tiny_model("megatron", layout, **sizes),
    )
    cluster = cluster_factory(2)
    assert cluster.run(built_sizes_job, settings, layout=layout)[0] == sizes
    other = ParallelLayout(devices_per_node=1, ep=1)
    with pytest.raises(ClusterJobError, match="expert parallel size 2 is not the cluster lay"):
        cluster.run(built_sizes_job, settings, layout=other)


@pytest.mark.parametrize("router_type", ["megatron", "locmoe", "locmoe_plus", "hash", "switch"])
@pytest.mark.slow
def test_training_reduces_loss_and_logs_metrics(cluster_factory, corpus, tmp_path, router_type):
    cluster = cluster_factory(4)
    layout = ParallelLayout(devices_per_node=2, ep=4)
    settings = TrainSettings(
        data_prefix=corpus,
        locmoe=LocMoEConfig(router_type=router_type, dispatcher="hierarchical"),
        model=tiny_model(router_type, layout),
        steps=15,
        tensorboard_dir=str(tmp_path / "tb"),
        wandb_dir=str(tmp_path / "wb"),
    )
    results = cluster.run(train_job, settings, layout=layout)
    losses = results[0]["losses"]
    assert all(r["losses"] == losses for r in results)  # data-parallel mean, same on all ranks
    assert len(losses) == 15
    # byte-level loss: ~5.56 -> ~3.5 in the last 5 of 15 steps (all five routers; 30 steps: ~3.3)
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, losses
    metrics = results[-1]["metrics"]
    assert set(PLUGIN_METRICS) <= set(metrics)
    assert metrics["inter_node_bytes"] > 0 and metrics["intra_node_bytes"] > 0
    if router_type in ("switch", "locmoe_plus"):
        assert metrics["expert_capacity"] > 0
    tags = _tensorboard_tags(tmp_path / "tb")
    assert {"lm loss", *PLUGIN_METRICS} <= tags
    # W&B offline run file (binary records; metric names are stored as strings). W&B's service
    # process writes it: under load its last records can land just after the rank's finish()
    # returned (seen once in a full run on 2 loaded cores), so read it again for a while.
    (run_file,) = (tmp_path / "wb").glob("wandb/offline-run-*/run-*.wandb")
    names = ("lm loss", *PLUGIN_METRICS)
    deadline = time.monotonic() + 30
    while missing := [n for n in names if n.encode() not in run_file.read_bytes()]:
        assert time.monotonic() < deadline, f"not in the W&B run file: {missing}"
        time.sleep(0.5)


def _checkpoint_keys(path) -> set[str]:
    from megatron.core.dist_checkpointing import load_tensors_metadata

    return set(load_tensors_metadata(str(path)))


@pytest.mark.parametrize(
    "router_type, experts", [("locmoe", "loop"), ("locmoe", "grouped"), ("locmoe_plus", "loop")]
)
@pytest.mark.slow
def test_resume_from_torch_dist_checkpoint_gives_identical_losses(
    cluster_factory, corpus, tmp_path, router_type, experts
):
    """Save at step 3 (Megatron torch_dist), resume: steps 4-6 equal the uninterrupted run
    bitwise (model, Adam state, RNG). LocMoE's delta is estimated on the first batch only, so a
    resume that lost the router's state would re-estimate it from step 4's batch (checked: a
    load without the capacity buffers reports delta 0.117 instead of 0.188). LocMoE+
    re-estimates every 2 steps here, so the resumed run must re-estimate at step 4 (the
    schedule's step counter comes from the checkpoint) and not at its own first step."""
    cluster = cluster_factory(4)
    layout = ParallelLayout(devices_per_node=2, ep=4)
    locmoe = LocMoEConfig(
        router_type=router_type,
        dispatcher="hierarchical",
        capacity_mode="bound",
        capacity_floor_factor=0.0,
        capacity_percentile=0.5,
        experts=experts,  # grouped: Adam's moments of the stacked expert weights too
        capacity_reestimate_interval=2 if router_type == "locmoe_plus" else None,
    )

    def run(**kw):
        settings = TrainSettings(
            data_prefix=corpus,
            locmoe=locmoe,
            # dropout: the steps after the load draw random numbers, so a resume that lost the
            # RNG states (torch's and Megatron's model-parallel tracker's) shows in the losses
            model=tiny_model(
                router_type,
                layout,
                moe_expert_capacity_factor=2.0,
                hidden_dropout=0.1,
                attention_dropout=0.1,
            ),
            lr=1e-2,
            **kw,
        )
        return cluster.run(train_job, settings, layout=layout)[0]

    full = run(steps=6)
    saved = run(steps=3, save_interval=3, save_dir=str(tmp_path / "ckpt"))
    assert saved["losses"] == full["losses"][:3]
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "3"
    keys = _checkpoint_keys(tmp_path / "ckpt" / "iter_0000003")
    for name in ("capacity_delta", "capacity_ec_min", "capacity_estimated_step", "routing_step"):
        assert any(k.endswith(f"router.{name}") for k in keys), name
    assert any(k.startswith("optimizer.state.exp_avg_sq.") for k in keys)
    resumed = run(steps=6, load_dir=str(tmp_path / "ckpt"))
    assert resumed["first_step"] == 4
    assert resumed["losses"] == full["losses"][3:], (resumed["losses"], full["losses"])
    assert resumed["metrics"]["capacity_delta"] == full["metrics"]["capacity_delta"]


@pytest.mark.parametrize("dispatcher", ["hierarchical", "alltoall"])
@pytest.mark.slow
def test_fused_router_trains_like_the_reference(cluster_factory, corpus, dispatcher):
    """LocMoE through the fused path (the Triton kernels, in Triton's interpreter here) inside
    the training loop: the same losses and metrics, step by step, as the op-by-op path, behind
    the plugin's dispatcher and Megatron's (whose permutation hands the router a transposed,
    non-contiguous probs gradient)."""
    import torch

    from megatron_locmoe.routers import kernels

    assert kernels.DISABLED or kernels.available(torch.device("cpu")), "no kernels to train with"
    cluster = cluster_factory(4)
    layout = ParallelLayout(devices_per_node=2, ep=4)
    runs = {}
    for fused in (False, True):
        settings = TrainSettings(
            data_prefix=corpus,
            locmoe=LocMoEConfig(
                router_type="locmoe",
                dispatcher=dispatcher,
                fused_router=fused,
                locality_loss_coeff=0.1,
            ),
            model=tiny_model("locmoe", layout, moe_router_topk=2),
            steps=3,
        )
        runs[fused] = cluster.run(train_job, settings, layout=layout)[-1]
    reference, fused = runs[False], runs[True]
    assert fused["losses"] == pytest.approx(reference["losses"], rel=2e-5)
    for name in ("load_balancing_loss", "locality_loss", "node_local_fraction", "load_cv"):
        assert fused["metrics"][name] == pytest.approx(reference["metrics"][name], rel=1e-4), name


@pytest.fixture(scope="module")
def short_docs(tmp_path_factory):
    """Documents of 20-60 bytes: most 64-token windows cross a document boundary."""
    text = " ".join(data.topic_documents()[:5])
    docs, start = [], 0
    while start < len(text) and len(docs) < 3000:
        length = 20 + (len(docs) * 7) % 41
        docs.append(text[start : start + length])
        start += length
    prefix = tmp_path_factory.mktemp("short") / "short"
    data.write_documents(prefix, docs)
    return str(prefix)


def test_dataset_flags_shape_the_loops_batches(short_docs):
    """--eod-mask-loss, --reset-position-ids and --reset-attention-mask reach the loop's
    batches as Megatron's GPT dataset makes them, and --split picks its training documents."""
    import torch

    from megatron_locmoe.sim.trainer import _dataset, _micro_batch

    options = dict(eod_mask_loss=True, reset_position_ids=True, reset_attention_mask=True)
    model = tiny_model("megatron", ParallelLayout(devices_per_node=1))  # (not built here)
    plain = TrainSettings(data_prefix=short_docs, locmoe=LocMoEConfig(), model=model)
    settings = replace(plain, dataset_options=options)
    masked_data, plain_data = _dataset(settings, 400), _dataset(plain, 400)
    hits = 0
    for first in range(0, 400, settings.micro_batch_size):
        tokens, labels, loss_mask, positions, mask = _micro_batch(masked_data, first, settings)
        eod = tokens == data.EOD
        assert torch.equal(loss_mask == 0, eod)  # Megatron masks the positions holding EOD
        assert mask is not None and mask.shape == (4, 1, 64, 64)
        for b, t in zip(*torch.nonzero(tokens == data.EOD, as_tuple=True), strict=True):
            if t + 1 < 64:  # positions restart, and attention stops, after each document
                hits += 1
                assert positions[b, t + 1] == 0
                assert mask[b, 0, t + 1, : t + 1].all()
        p_tokens, _, p_loss_mask, p_positions, p_mask = _micro_batch(plain_data, first, plain)
        assert torch.equal(p_tokens, tokens) and p_mask is None
        assert bool(p_loss_mask.all()) and torch.equal(p_positions[0], torch.arange(64))
    assert hits > 100  # most samples cross document boundaries
    half = replace(plain, dataset_options=dict(split="1,1,0"))
    assert len(_dataset(half, 1).indices) < len(plain_data.indices)  # half the documents


@pytest.mark.slow
def test_loop_trains_with_document_masks(cluster_factory, short_docs):
    """The attention mask of --reset-attention-mask goes through the model, and the masked loss
    is what the loop reports (2 steps, 2 ranks)."""
    no_attention = dict(eod_mask_loss=True, reset_position_ids=True)
    options = dict(no_attention, reset_attention_mask=True)
    runs = {}
    layout = ParallelLayout(devices_per_node=2, ep=2)
    for name, opts in (("masked", options), ("no_attention", no_attention), ("plain", {})):
        settings = tiny_settings(short_docs, layout, steps=2, dataset_options=opts)
        runs[name] = cluster_factory(2).run(train_job, settings, layout=layout)[0]["losses"]
    assert all(v == v and 3.0 < v < 8.0 for v in runs["masked"])  # finite, byte-level scale
    assert runs["masked"] != runs["plain"]
    assert runs["masked"] != runs["no_attention"]  # the attention mask reached the model


@pytest.mark.slow
def test_a_non_finite_loss_stops_every_rank_with_the_step(cluster_factory, corpus):
    """A learning rate of 1e30 makes the weights huge after one step: step 2's loss is not
    finite. Every rank stops at once with the step (none waits out a collective timeout);
    with the check off, the loop trains on, as Megatron's does."""
    from megatron_locmoe.sim.cluster import ClusterJobError

    cluster = cluster_factory(2)
    layout = ParallelLayout(devices_per_node=1, ep=2)
    settings = tiny_settings(corpus, layout, steps=3, lr=1e30)
    with pytest.raises(ClusterJobError) as e:
        cluster.run(train_job, settings, layout=layout)
    assert "step 2: the loss or a gradient is not finite on ranks [0, 1]" in str(e.value)
    assert "were stopped" not in str(e.value)  # every rank raised itself; none was waiting
    settings.check_for_nan_in_loss_and_grad = False
    losses = cluster.run(train_job, settings, layout=layout)[0]["losses"]
    assert len(losses) == 3 and not math.isfinite(losses[-1])


@pytest.mark.slow
def test_the_launchers_cpu_runs_take_megatrons_optimizer_and_schedule(
    cluster_factory, corpus, tmp_path
):
    """The cpu-sim preset with warm-up, cosine decay, weight decay and clipping: each step's
    learning rate is Megatron's schedule for those flags (linear warm-up from 0, then cosine to
    --min-lr), and the clipped norm is the global one: the same on every rank, although each
    rank holds other experts."""
    from megatron_locmoe.launch.plan import Options, build_plan

    lr, min_lr, steps, warmup = 2e-3, 2e-4, 6, 2
    sets = [f"data-path={corpus}", f"train-iters={steps}", f"lr={lr}", f"min-lr={min_lr}"]
    sets += [f"lr-warmup-iters={warmup}", "lr-decay-style=cosine", "weight-decay=0.1"]
    sets += ["clip-grad=0.05"]
    plan = build_plan(Options(config="cpu-sim", sets=sets, runs_dir=str(tmp_path)))
    settings, layout = plan.runs[0].cpu_loop
    assert settings.optimizer.clip_grad == 0.05
    results = cluster_factory(4).run(train_job, settings, layout=layout)
    expected = []
    for i in range(steps):  # Megatron steps the schedule after each iteration
        if i <= warmup:
            expected.append(lr * i / warmup)
        else:
            ratio = (i - warmup) / (steps - warmup)
            expected.append(min_lr + (lr - min_lr) * 0.5 * (math.cos(math.pi * ratio) + 1))
    for r in results:
        assert r["lr"] == pytest.approx(expected, rel=1e-12, abs=1e-15), r["lr"]
        assert r["grad_norm"] == results[0]["grad_norm"]  # one global norm
    assert min(results[0]["grad_norm"]) > 0.05  # clipping was active at every step
    # stopped at step 3 by --exit-interval (saved first) and resumed: the schedule goes on
    ckpt = str(tmp_path / "ckpt")
    cluster = cluster_factory(4)
    stopped = cluster.run(
        train_job, replace(settings, exit_interval=3, save_dir=ckpt), layout=layout
    )
    assert stopped[0]["losses"] == results[0]["losses"][:3]
    resumed = cluster.run(train_job, replace(settings, load_dir=ckpt), layout=layout)[0]
    assert resumed["lr"] == results[0]["lr"][3:]
    assert resumed["losses"] == results[0]["losses"][3:]


def clip_job(ctx, max_norm: float):
    """The loop's clipping on a real model's gradients: afterwards the norm of all gradients
    of the model (expert ones gathered from every rank) is max_norm."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_locmoe.sim import trainer

    ctx.topology()
    settings = TrainSettings(
        data_prefix="",
        locmoe=LocMoEConfig(dispatcher="hierarchical"),
        model=trainer.tiny_model("megatron", ctx.layout),
    )
    torch.manual_seed(0)
    model = trainer._model(settings, ctx.layout.ep)
    tokens = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(ctx.rank))
    positions = torch.arange(16).expand(2, 16)
    loss = model(tokens, positions, None, labels=tokens).float().mean()
    loss.backward()
    before = trainer._clip_grads([model], max_norm)
    group = parallel_state.get_expert_model_parallel_group()
    sq = {"dense": torch.zeros((), dtype=torch.float64), "expert": torch.zeros(())}
    sq["expert"] = sq["expert"].double()
    for p in model.parameters():
        if p.grad is not None:
            key = "expert" if getattr(p, "allreduce", True) is False else "dense"
            sq[key] += p.grad.double().pow(2).sum()
    parts = [torch.zeros((), dtype=torch.float64) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, sq["expert"], group=group)
    return before, float((sq["dense"] + sum(parts)).sqrt())


def test_clipping_uses_the_global_norm(cluster_factory):
    results = cluster_factory(4).run(
        clip_job, 0.01, layout=ParallelLayout(devices_per_node=2, ep=4)
    )
    assert all(before > 0.01 for before, _ in results)
    for _, after in results:
        assert after == pytest.approx(0.01, rel=1e-5)


def _megatron_model_and_tokens(ctx, overrides: dict):
    """The loop's tiny model with Megatron's router (the same weights on every rank) and this
    rank's own tokens [2, 16] with their positions."""
    import torch

    from megatron_locmoe.sim import trainer

    ctx.topology()
    settings = TrainSettings(
        data_prefix="",
        locmoe=LocMoEConfig(router_type="megatron", dispatcher="hierarchical"),
        model=trainer.tiny_model("megatron", ctx.layout, **overrides),
    )
    torch.manual_seed(0)
    model = trainer._model(settings, ctx.layout.ep)
    gen = torch.Generator().manual_seed(ctx.rank)
    tokens = torch.randint(0, 257, (2, 16), generator=gen)
    return model, tokens, torch.arange(16).expand(2, 16)


def gradient_check_job(ctx):
    """The synchronised gradients against finite differences of the global loss (the mean of
    every rank's loss) along them: expert and dense parameters separately. EP 2 on 4 ranks,
    so every expert has two replicas (expert-data-parallel size 2)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_locmoe.sim import trainer

    overrides = dict(moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0)
    model, tokens, positions = _megatron_model_and_tokens(ctx, overrides)

    def global_loss():
        loss = model(tokens, positions, None, labels=tokens).float().mean()
        mean = loss.detach().clone()
        dist.all_reduce(mean, op=dist.ReduceOp.AVG)
        return loss, float(mean)

    loss, _ = global_loss()
    loss.backward()
    dp_group = parallel_state.get_data_parallel_group()
    edp_group = parallel_state.get_expert_data_parallel_group()
    trainer._sync_grads(model, dp_group, edp_group, dist.get_world_size(dp_group))
    out = {"edp": dist.get_world_size(edp_group)}
    for kind, is_expert in (("expert", True), ("dense", False)):
        params = [
            p for p in model.parameters() if (getattr(p, "allreduce", True) is False) == is_expert
        ]
        grads = [p.grad.detach().clone() for p in params]
        sq = torch.stack([g.double().pow(2).sum() for g in grads]).sum()
        if is_expert:  # distinct experts live on the EP ranks; replicas hold the same value
            dist.all_reduce(sq, group=parallel_state.get_expert_model_parallel_group())
        norm = float(sq.sqrt())
        eps = 2e-2  # fp32 losses: a step large enough that rounding stays below 1%
        values = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    p.add_(g, alpha=sign * eps / norm)
                values.append(global_loss()[1])
                for p, g in zip(params, grads, strict=True):
                    p.sub_(g, alpha=sign * eps / norm)
        out[kind] = (norm, (values[0] - values[1]) / (2 * eps))  # the two should agree
    return out


def test_synchronised_gradients_are_the_global_losss(cluster_factory):
    """With replicated experts (EP 2 of 4 ranks) each replica's gradient holds other ranks'
    tokens: summed over the replicas, as Megatron's DDP does (averaging them halved it)."""
    results = cluster_factory(4).run(
        gradient_check_job, layout=ParallelLayout(devices_per_node=2, ep=2)
    )
    for r in results:
        assert r["edp"] == 2
        for kind in ("expert", "dense"):
            norm, slope = r[kind]
            assert slope == pytest.approx(norm, rel=0.02), (kind, norm, slope)


def router_state_job(ctx, overrides: dict):
    """One forward and backward of the model on each rank, then the loop's finalize: returns
    the routers' expert bias and counters before and after, and the global token counts."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_locmoe.sim import trainer

    model, tokens, positions = _megatron_model_and_tokens(ctx, overrides)
    model(tokens, positions, None, labels=tokens).float().mean().backward()
    routers = [m for m in model.modules() if hasattr(m, "local_tokens_per_expert")]
    out = {"routers": len(routers)}
    if overrides.get("moe_router_enable_expert_bias"):
        counts = torch.stack([r.local_tokens_per_expert.clone() for r in routers])
        dist.all_reduce(counts, group=parallel_state.get_tensor_and_data_parallel_group())
        bias = torch.stack([r.expert_bias.clone() for r in routers])
    else:
        tracked = [r.global_tokens_per_expert.clone() for r in routers]
        out["tracked_before"] = float(sum(t.sum() for t in tracked))
    trainer._finalize_grads([model])
    if overrides.get("moe_router_enable_expert_bias"):
        # Megatron's rule (moe_utils.get_updated_expert_bias): bias += rate * sign(mean - count)
        mean = counts.float().mean(-1, keepdim=True)
        expected = (
            bias + torch.sign(mean - counts.float()) * overrides["moe_router_bias_update_rate"]
        )
        after = torch.stack([r.expert_bias for r in routers])
        out["bias_moved"] = bool((after != bias).any())
        out["bias_as_megatron"] = torch.allclose(after, expected)
        out["counts_reset"] = all(int(r.local_tokens_per_expert.sum()) == 0 for r in routers)
    else:
        out["tracked_reset"] = all(float(r.global_tokens_per_expert.sum()) == 0 for r in routers)
    return out


@pytest.mark.parametrize(
    "overrides",
    [
        dict(
            moe_router_enable_expert_bias=True,
            moe_router_score_function="sigmoid",
            moe_router_bias_update_rate=0.01,
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
        ),
        dict(moe_router_load_balancing_type="global_aux_loss", moe_aux_loss_coeff=0.01),
    ],
    ids=["expert-bias", "global-aux-loss"],
)
def test_the_loop_steps_and_resets_the_routers_batch_state(cluster_factory, overrides):
    """Megatron's finalize_model_grads steps the aux-loss-free expert bias from the tokens per
    expert summed over the data-parallel ranks and resets the per-batch counters; the CPU loop's
    finalize did neither (the bias stayed 0, the global aux loss's tracker grew every step)."""
    results = cluster_factory(2).run(
        router_state_job, overrides, layout=ParallelLayout(devices_per_node=1, ep=2)
    )
    for r in results:
        assert r["routers"] > 0, r
        if "moe_router_enable_expert_bias" in overrides:
            assert r["bias_moved"] and r["bias_as_megatron"] and r["counts_reset"], r
        else:
            assert r["tracked_before"] > 0 and r["tracked_reset"], r
