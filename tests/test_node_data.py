"""Domain-sharded data (megatron_locmoe.node_data) through Megatron's own pretraining sampler:
every real rank reads its node's domain densely in Megatron's order, nodes that share a domain
read different samples of it; the virtual cluster's one stream is the real ranks' micro-batches
interleaved, each tagged with its rank and domain."""

from __future__ import annotations

import pytest
import torch
from megatron.training.datasets.data_samplers import MegatronPretrainingSampler

from megatron_locmoe.node_data import (
    DOMAIN_KEY,
    VIRTUAL_RANK_KEY,
    DomainDataError,
    NodeShardedDataset,
    RankLayout,
    VirtualRankTagged,
    check_domains,
    domain_loss_report,
)


class Indexed:
    """A domain's dataset whose samples say which domain and index they are."""

    def __init__(self, domain: int, length: int):
        self.domain, self.length = domain, length

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        if not 0 <= i < self.length:
            raise IndexError(f"domain {self.domain}: sample {i} of {self.length}")
        return {"tokens": torch.tensor([self.domain, i])}


def _stream(dataset, rank: int, size: int, mbs: int, steps: int) -> list[list[dict]]:
    """What Megatron's sampler hands data-parallel rank ``rank`` of ``size``: micro-batches."""
    sampler = MegatronPretrainingSampler(len(dataset), 0, mbs, rank, size)
    out = []
    for indices in sampler:
        out.append([dataset[i] for i in indices])
        if len(out) == steps:
            break
    return out


NODES = (0, 0, 1, 1, 2, 2)  # 3 nodes x 2 ranks
MBS, STEPS = 2, 5


def _domains(layout, total):
    per = layout.samples_per_domain(total)
    return [Indexed(d, per) for d in range(layout.num_domains)]


def test_every_real_rank_reads_its_nodes_domain_densely():
    """3 nodes, 2 domains: nodes 0 and 2 share domain 0, their 4 ranks read it in turn."""
    total = MBS * len(NODES) * STEPS
    layout = RankLayout(NODES, MBS, num_domains=2)
    dataset = NodeShardedDataset(_domains(layout, total), layout, total)
    seen: dict[int, list] = {0: [], 1: []}
    for r, node in enumerate(NODES):
        readers = [q for q in range(len(NODES)) if NODES[q] % 2 == node % 2]
        got = _stream(dataset, r, len(NODES), MBS, STEPS)
        assert len(got) == STEPS
        for j, micro in enumerate(got):
            for t, sample in enumerate(micro):
                domain, index = sample["tokens"].tolist()
                assert domain == node % 2  # node k reads domain k mod D
                assert index == (j * len(readers) + readers.index(r)) * MBS + t
                assert int(sample[DOMAIN_KEY]) == domain and VIRTUAL_RANK_KEY not in sample
                seen[domain].append(index)
    for indices in seen.values():  # every sample of a domain read once, none skipped
        assert sorted(indices) == list(range(len(indices)))


def test_the_virtual_stream_is_the_real_ranks_micro_batches_interleaved():
    total = MBS * len(NODES) * STEPS
    real_layout = RankLayout(NODES, MBS, num_domains=2)
    virtual_layout = RankLayout(NODES, MBS, num_domains=2, virtual=True)
    real = NodeShardedDataset(_domains(real_layout, total), real_layout, total)
    virtual = NodeShardedDataset(_domains(virtual_layout, total), virtual_layout, total)
    per_rank = [_stream(real, r, len(NODES), MBS, STEPS) for r in range(len(NODES))]
    one = _stream(virtual, 0, 1, MBS, STEPS * len(NODES))  # one device: DP 1
    for i, micro in enumerate(one):
        rank, j = i % len(NODES), i // len(NODES)
        assert [s["tokens"].tolist() for s in micro] == [
            s["tokens"].tolist() for s in per_rank[rank][j]
        ]
        assert {int(s[VIRTUAL_RANK_KEY]) for s in micro} == {rank}


def test_sizing_covers_every_sample_of_the_run():
    layout = RankLayout((0, 0, 0, 1), MBS, num_domains=2)  # uneven: node 0 has 3 ranks
    total = MBS * 4 * 7
    dataset = NodeShardedDataset(_domains(layout, total), layout, total)
    for g in range(total):
        dataset[g]  # Indexed raises past its end
    shorter = NodeShardedDataset(
        [Indexed(d, layout.samples_per_domain(total) - 1) for d in range(2)], layout, total
    )
    with pytest.raises(IndexError):
        [shorter[g] for g in range(total)]


def test_the_control_is_megatrons_dataset_tagged_with_the_rank():
    base = Indexed(0, 48)
    tagged = VirtualRankTagged(base, ranks=4, micro_batch_size=3)
    for g in range(48):
        assert int(tagged[g][VIRTUAL_RANK_KEY]) == (g // 3) % 4
        assert tagged[g]["tokens"].tolist() == [0, g]


def test_domain_loss_report_counts_each_micro_batch_for_its_domain():
    losses, mask = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1.0, 0.0, 1.0])
    report = domain_loss_report(losses, mask, 1, 3)
    assert report["lm loss domain 1"].tolist() == [5.0, 2.0]
    assert report["lm loss domain 0"].tolist() == [0.0, 0.0] == report["lm loss domain 2"].tolist()
    assert domain_loss_report(losses, mask, None, 3) == {}


def test_domains_read_by_no_node_are_refused():
    check_domains(3, 4)
    with pytest.raises(DomainDataError, match=r"domains \[2, 3\] would be read by no node"):
        check_domains(4, 2)
    with pytest.raises(DomainDataError, match="one held-out prefix per domain"):
        check_domains(2, 2, valid=1)
