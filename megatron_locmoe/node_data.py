"""Domain-sharded data in Megatron's training path: node k reads domain k mod D.

Locality-aware routing keeps tokens on their node only where the data is node-correlated (the
paper's PanGu-Sigma setting); with the same mixture on every rank (Megatron's usual loader, the
control) no router keeps more than 1/nodes on average. ``--locmoe-domain-data-path P0 .. P(D-1)``
makes every rank of node k read domain k mod D, for real clusters and the virtual one alike.

How. Megatron's pretraining sampler gives data-parallel rank r of R the samples
g = (j R + r) mbs + t of its one dataset (micro step j, t < mbs). ``NodeShardedDataset`` is that
one dataset: it sends sample g to the dataset of rank r's domain, at the index the domain's
readers would use if they alone read it (the i-th of the n ranks, over every node that reads
the domain, takes (j n + i) mbs + t), so each domain is read densely, in Megatron's order, and
two nodes that share a domain (more nodes than domains) read different samples of it. The
ranks' nodes come from the topology (real cluster) or from ``virtual.VirtualCluster`` (rank r on
node r // GPUS). Each sample also carries ``locmoe_domain`` (the per-domain loss report) and, on
a virtual cluster, ``locmoe_virtual_rank`` (the rank the model routes it as): tags in the data,
so resuming, evaluation and reruns can never lose count of whose micro-batch is whose.

Held-out data: ``--locmoe-domain-valid-data-path`` (one per domain: the corpus builders' held-out
documents), else each domain's ``--split`` validation part; the evaluation reports the loss of
every domain (``lm loss domain k``) beside the mixture's. Given without
``--locmoe-domain-data-path`` (the control: every rank trains on Megatron's usual mixture), it
is the held-out data alone: rank r evaluates domain r mod D (``RankLayout.round_robin``), so
control and domain-sharded runs report the same per-domain held-out losses.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

DOMAIN_KEY = "locmoe_domain"
VIRTUAL_RANK_KEY = "locmoe_virtual_rank"


class DomainDataError(ValueError):
    """Domain-sharded data that cannot mean what it says; the message says what to change."""


@dataclass(frozen=True)
class RankLayout:
    """The data-parallel ranks that read data: the node of each, the number of domains (node k
    reads domain k mod D) and the micro batch size."""

    node_of_rank: tuple[int, ...]
    micro_batch_size: int
    num_domains: int
    virtual: bool = False
    """Whether the ranks are a virtual cluster's (then samples carry the virtual rank)."""

    @property
    def ranks(self) -> int:
        return len(self.node_of_rank)

    def domain_of_rank(self, rank: int) -> int:
        return self.node_of_rank[rank] % self.num_domains

    @cached_property
    def _readers(self) -> list[tuple[int, int]]:
        """(this rank's index among its domain's readers, their number), per rank: the ranks of
        every node that reads a domain share it, each reading other samples."""
        domains = [self.domain_of_rank(r) for r in range(self.ranks)]
        return [(domains[:r].count(d), domains.count(d)) for r, d in enumerate(domains)]

    def place(self, g: int) -> tuple[int, int, int]:
        """(rank, domain, index in the domain's dense stream) of Megatron's sample ``g``."""
        mbs, R = self.micro_batch_size, self.ranks
        i, t = divmod(g, mbs)
        j, r = divmod(i, R)
        index, readers = self._readers[r]
        return r, self.domain_of_rank(r), (j * readers + index) * mbs + t

    @classmethod
    def round_robin(
        cls, ranks: int, micro_batch_size: int, num_domains: int, virtual: bool = False
    ) -> RankLayout:
        """Held-out data of every domain under the control (one mixture for training): rank r
        evaluates domain r mod D, so each domain is evaluated on ranks of every node (the
        layout's "node" of rank r is r itself)."""
        return cls(tuple(range(ranks)), micro_batch_size, num_domains, virtual)

    def samples_per_domain(self, total: int) -> int:
        """Samples the most-read domain's dataset must hold when the ranks read ``total``."""
        most = max(count for _, count in self._readers)
        steps = -(-total // (self.micro_batch_size * self.ranks))
        return steps * most * self.micro_batch_size


def check_domains(num_domains: int, nodes: int, valid: int | None = None) -> None:
    """Parse-time rule: every domain is read by some node, and held-out sets match domains."""
    if num_domains < 1:
        raise DomainDataError("--locmoe-domain-data-path needs at least one dataset prefix")
    if num_domains > nodes:
        raise DomainDataError(
            f"{num_domains} domains for {nodes} nodes: node k reads domain k mod {num_domains}, so "
            f"domains {list(range(nodes, num_domains))} would be read by no node; give at most "
            f"{nodes} domain prefixes (or run on more nodes)"
        )
    if valid is not None and valid != num_domains:
        raise DomainDataError(
            f"--locmoe-domain-valid-data-path has {valid} prefixes for {num_domains} domains: "
            "give one held-out prefix per domain, in the same order"
        )


class NodeShardedDataset(torch.utils.data.Dataset):
    """One dataset over the domains' datasets for Megatron's sampler (see the module doc).
    ``domains[d]``: domain d's dataset (samples are dicts of tensors, as GPTDataset's)."""

    def __init__(self, domains: list, layout: RankLayout, length: int):
        if len(domains) != layout.num_domains:
            raise DomainDataError(
                f"{len(domains)} domain datasets for a layout of {layout.num_domains} domains"
            )
        self.domains, self.layout, self.length = domains, layout, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, g: int) -> dict:
        rank, domain, index = self.layout.place(int(g))
        sample = dict(self.domains[domain][index])
        sample[DOMAIN_KEY] = torch.tensor(domain)
        if self.layout.virtual:
            sample[VIRTUAL_RANK_KEY] = torch.tensor(rank)
        return sample


class VirtualRankTagged(torch.utils.data.Dataset):
    """Megatron's usual dataset (the control: one mixture for every rank) with the virtual rank
    of each sample: micro-batch i = g // mbs belongs to virtual rank i mod V."""

    def __init__(self, dataset, ranks: int, micro_batch_size: int):
        self.dataset, self.ranks, self.micro_batch_size = dataset, ranks, micro_batch_size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, g: int) -> dict:
        sample = dict(self.dataset[g])
        sample[VIRTUAL_RANK_KEY] = torch.tensor((int(g) // self.micro_batch_size) % self.ranks)
        return sample


def domain_loss_report(
    losses_T: torch.Tensor, mask_T: torch.Tensor, domain: int | None, num_domains: int
) -> dict:
    """``lm loss domain d``: [loss sum, tokens] of this micro-batch for its domain and [0, 0]
    for the others (every rank and micro-batch reports every key; Megatron sums the pairs over
    micro-batches and data-parallel ranks, then divides)."""
    if domain is None:
        return {}
    kept = torch.stack([(losses_T * mask_T).sum(), mask_T.sum()]).float().detach()
    zero = torch.zeros_like(kept)
    return {f"lm loss domain {d}": kept if d == domain else zero for d in range(num_domains)}
