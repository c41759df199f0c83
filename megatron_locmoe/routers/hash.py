"""Hash Layers baseline (Roller et al. 2021): the expert is a fixed function of the token id.

Two fixed maps, both seeded and identical on every rank. Without token statistics a random
permutation of the vocabulary is cut into E equal slices (every expert owns V/E ids). Real text
is Zipfian, so that map is badly unbalanced on a real stream (max/mean expert load 2-3.7 on
Python source text, E = 8-16); given token counts from the training corpus, the "balanced"
assignment of Hash Layers places ids from most to least frequent on the least-loaded expert.
With k > 1 a token goes to experts (h(id) + j) mod E, j < k. No parameters, no aux loss.

Token ids come from the GPT model's input ids: ``attach_token_ids(model)`` registers a forward
pre-hook that hands each forward's ids to the model's hash routers. The ids live on the router
module for that forward only: they are replaced by the next forward's and never shared between
model chunks. Under pipeline parallelism every stage that hosts hash routers needs the ids,
not only the first: the CPU loop hands every chunk its micro-batch's tokens, and the plugin's
``megatron_locmoe.pretrain_gpt`` reads the tokens on such stages too (Megatron-LM's get_batch
gives them to the first stage only). A forward without ids raises
MissingTokenIdsError; activation recompute of MoE layers is rejected at check time.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from megatron.core.transformer.moe.router import TopKRouter

from megatron_locmoe.config import ConfigError, LocMoEConfig
from megatron_locmoe.graphs import graphs_capture_router
from megatron_locmoe.routers.base import PluginRouterMixin, megatron_router_args


class MissingTokenIdsError(RuntimeError):
    """The hash router was called without the input ids of this forward."""


def balanced_hash_table(vocab_size: int, num_experts: int, seed: int) -> torch.Tensor:
    """[V] expert of every token id: a random permutation cut into E equal slices."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(vocab_size, generator=gen)
    table = torch.empty(vocab_size, dtype=torch.long)
    table[perm] = torch.arange(vocab_size) * num_experts // vocab_size
    return table


def frequency_balanced_hash_table(
    token_counts: torch.Tensor, num_experts: int, seed: int
) -> torch.Tensor:
    """[V] expert of every id: ids from most to least frequent go to the least-loaded expert
    (greedy longest-processing-time; a seeded shuffle breaks ties among equal counts)."""
    V = token_counts.numel()
    gen = torch.Generator().manual_seed(seed)
    shuffled = torch.randperm(V, generator=gen)
    order = shuffled[torch.argsort(token_counts[shuffled].double(), descending=True, stable=True)]
    loads = [0.0] * num_experts
    owned = [0] * num_experts
    table = torch.empty(V, dtype=torch.long)
    counts = token_counts.double().tolist()
    for v in order.tolist():
        e = min(range(num_experts), key=lambda i: (loads[i], owned[i]))
        table[v] = e
        loads[e] += counts[v]
        owned[e] += 1
    return table


def load_token_counts(path: str, vocab_size: int | None = None) -> np.ndarray:
    """The corpus count of every token id (``megatron_locmoe.sim.data`` writes PREFIX_counts.npy),
    checked: a readable .npy, one non-negative count per id, no more ids than the vocabulary
    (``vocab_size``, when known) has. Read at parse time and again at model build."""
    fix = "give the PREFIX_counts.npy that python -m megatron_locmoe.sim.data wrote for this corpus"
    if not os.path.isfile(path):
        raise ConfigError(f"--locmoe-hash-token-counts {path}: no such file; {fix}")
    try:
        counts = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"--locmoe-hash-token-counts {path}: not a .npy array ({e}); {fix}"
        ) from None
    if counts.ndim != 1 or counts.size == 0 or not np.issubdtype(counts.dtype, np.number):
        raise ConfigError(
            f"--locmoe-hash-token-counts {path}: expected one count per token id, got an array "
            f"of shape {counts.shape} and type {counts.dtype}; {fix}"
        )
    if (counts < 0).any() or not np.isfinite(counts).all():
        raise ConfigError(f"--locmoe-hash-token-counts {path}: counts must be finite and >= 0")
    if vocab_size is not None and counts.size > vocab_size:
        raise ConfigError(
            f"--locmoe-hash-token-counts {path} counts {counts.size} token ids, more than the "
            f"model's vocabulary of {vocab_size}: it belongs to another tokenizer"
        )
    return counts


class HashRouter(PluginRouterMixin, TopKRouter):
    """Routes each token by a fixed balanced hash of its id (MoESubmodules.router)."""

    name = "hash"
    label = "Hash"
    needs_token_ids = True
    builder_args = ("vocab_size", "token_counts")
    probs_have_grad = False
    placement_obstacle = (
        "its token -> expert table is rebuilt from --locmoe-hash-seed at model build (not saved "
        "in the checkpoint) and top-k > 1 takes consecutive experts"
    )

    @classmethod
    def check_model(cls, locmoe: LocMoEConfig, tc) -> None:
        super().check_model(locmoe, tc)
        if getattr(tc, "moe_router_fusion", False):
            raise ConfigError(
                "--moe-router-fusion fuses a gate's top-k, score function and aux loss; the hash "
                "router has none of them (one table lookup per token): drop --moe-router-fusion"
            )
        if tc.moe_expert_capacity_factor is not None:
            raise ConfigError(
                "the hash router is dropless by construction; remove --moe-expert-capacity-factor"
            )
        if "moe" in (tc.recompute_modules or []) and tc.recompute_granularity == "selective":
            raise ConfigError(
                "the hash router reads this forward's token ids, which activation recompute of "
                "MoE layers would replay out of order: remove 'moe' from --recompute-modules"
            )

    def __init__(
        self,
        config,
        pg_collection=None,
        is_mtp_layer=False,
        layer_number=None,
        *,
        locmoe=None,
        vocab_size,
        token_counts=None,
    ):
        super().__init__(**megatron_router_args(config, pg_collection, is_mtp_layer, layer_number))
        self._init_plugin(locmoe, layer_number)
        del self.weight, self.bias  # no parameters: Hash Layers learn nothing in the router
        self.weight = self.bias = None
        self.vocab_size = vocab_size
        E, seed = config.num_moe_experts, self.locmoe.hash_seed
        if token_counts is None:
            table = balanced_hash_table(vocab_size, E, seed)
        else:
            if token_counts.numel() != vocab_size:
                raise ValueError(
                    f"token counts cover {token_counts.numel()} ids, the vocabulary {vocab_size}"
                )
            table = frequency_balanced_hash_table(token_counts, E, seed)
        self.register_buffer("hash_table", table, persistent=False)
        self._token_ids_BS: torch.Tensor | None = None
        self._init_virtual()

    def set_token_ids(self, token_ids_BS: torch.Tensor | None) -> None:
        """The input ids [B, S] of the forward about to run (S as seen by this model chunk)."""
        self._token_ids_BS = token_ids_BS

    def reset_parameters(self):
        pass

    def _ids_for_input(
        self, input_SBH: torch.Tensor, ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[T] ids aligned with the flattened [S/TP, B] tokens of this rank: ``ids`` [B, S]
        when the caller hands them over (Megatron-LM dev's MoELayer passes input_ids), else
        those ``attach_token_ids`` set for this forward."""
        ids = self._token_ids_BS if ids is None else ids
        if ids is None:
            raise MissingTokenIdsError(
                "the hash router needs the input token ids of this forward: wrap the GPT model "
                "with megatron_locmoe.routers.hash.attach_token_ids(model) (the plugin's model "
                "builder does) and pass the ids to every pipeline stage that hosts hash routers; "
                "Megatron-LM's pretrain_gpt.py gives them to the first stage only: train with "
                "python -m megatron_locmoe.pretrain_gpt (or the CPU loop), which gives them to "
                "every such stage, or with --pipeline-model-parallel-size 1"
            )
        S_local, B = input_SBH.shape[:2]
        ids_SB = ids.t()
        if ids_SB.shape[1] != B:
            raise MissingTokenIdsError(
                f"token ids have batch {ids_SB.shape[1]} but the hidden states {B}"
            )
        if ids_SB.shape[0] != S_local:
            tp = self.tp_group.size() if self.tp_group is not None else 1
            if not self.config.sequence_parallel or ids_SB.shape[0] != S_local * tp:
                raise MissingTokenIdsError(
                    f"token ids cover {ids_SB.shape[0]} positions, the hidden states {S_local}"
                )
            r = self.tp_group.rank()
            ids_SB = ids_SB[r * S_local : (r + 1) * S_local]  # this rank's sequence shard
        return ids_SB.reshape(-1)

    def route_tokens(self, input, padding_mask, input_ids, packed_seq_params):
        """probs [T, E] (1/k on the k hashed experts), routing_map [T, E]; padding tokens left
        out. ``input_ids`` [B, S], where Megatron passes them, are this forward's token ids;
        ``packed_seq_params`` is not read (a token's expert depends on its id alone)."""
        del packed_seq_params
        E, k = self.config.num_moe_experts, self.topk
        # ids were looked up in the same vocabulary by the embedding: no range check (a host sync)
        ids_T = self._ids_for_input(input, input_ids).to(self.hash_table.device)
        first_T = self.hash_table[ids_T]
        experts_TK = (first_T[:, None] + torch.arange(k, device=first_T.device)) % E
        routing_map_TE = torch.zeros(ids_T.numel(), E, dtype=torch.bool, device=input.device)
        routing_map_TE.scatter_(1, experts_TK.to(input.device), True)
        probs_TE = routing_map_TE.float() / k
        if padding_mask is not None:
            valid_T = ~padding_mask.reshape(-1).to(input.device, torch.bool)
            routing_map_TE &= valid_T[:, None]
            probs_TE = probs_TE * valid_T[:, None]
        self.record_routing_metrics(probs_TE, routing_map_TE)
        return probs_TE, routing_map_TE


def hosts_hash_router(model: torch.nn.Module) -> bool:
    """Whether ``model`` (a chunk, wrapped or not) has hash routers: its stage needs the ids."""
    return any(isinstance(m, HashRouter) for m in model.modules())


def attach_token_ids(model: torch.nn.Module) -> torch.utils.hooks.RemovableHandle | None:
    """Hand each forward's input ids to the model's hash routers (GPTModel forward pre-hook).

    When Megatron's CUDA graphs capture the routers, a replay reads the memory the capture
    read, not this forward's ids: the hook then copies every forward's ids into one buffer
    that stays put (one copy per forward for all routers), and the routers read that."""
    routers = [m for m in model.modules() if isinstance(m, HashRouter)]
    if not routers:
        return None
    static = any(graphs_capture_router(r.config) for r in routers)
    buffer: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if static and ids is not None:
            if not buffer or buffer[0].shape != ids.shape or buffer[0].device != ids.device:
                buffer[:] = [torch.empty_like(ids)]  # before capture: shapes are fixed after
            ids = buffer[0].copy_(ids)
        for router in routers:
            router.set_token_ids(ids)

    return model.register_forward_pre_hook(hook, with_kwargs=True)
