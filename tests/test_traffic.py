"""The vectorised traffic accounting (``dispatcher.traffic_from_counts``, one set of tensor ops
for every sender) equals the per-sender loop it replaced, kept here as the readable reference,
on random source counts for 1-8 nodes x 1-8 ranks, with and without dedup."""

from __future__ import annotations

import pytest
import torch

from megatron_locmoe.dispatch.traffic import Traffic, traffic_from_counts


def _reference(counts, N, L, E, dedup, hidden_bytes, prob_bytes):
    """One sender at a time, straight from the definitions (the former implementation)."""
    ep = N * L
    nle, W = E // ep, E // N
    c = counts.to(torch.long)
    per_rank = c[:, :E].view(ep, ep, nle).sum(-1).view(N, L, N, L)
    tok_rank = c[:, E : E + ep].view(N, L, N, L)
    tok_node = c[:, E + ep :].view(N, L, N)
    copy_flat = 2 * hidden_bytes + prob_bytes
    flat, hier, hops = [], [], []
    for a in range(N):
        for i in range(L):
            own = per_rank[a, i, a].sum().item()
            intra = own - per_rank[a, i, a, i].item()
            inter = per_rank[a, i].sum().item() - own
            flat.append(Traffic(intra, inter, intra * copy_flat, inter * copy_flat))
            if not dedup:
                h1 = per_rank[a, i].sum().item() - per_rank[a, i, :, i].sum().item()
                h2 = per_rank[a, :, :, i].sum().item() - per_rank[a, :, a, i].sum().item()
                hops.append({"intra_node": (h1, h1 * copy_flat), "rail": (h2, h2 * copy_flat)})
                hier.append(Traffic(h1, h2, h1 * copy_flat, h2 * copy_flat))
            else:
                row_rank = 2 * hidden_bytes + 2 * nle * prob_bytes
                row_node = 2 * hidden_bytes + 2 * W * prob_bytes
                h1 = tok_rank[a, i, a].sum().item() - tok_rank[a, i, a, i].item()
                h2 = tok_node[a, i].sum().item() - tok_node[a, i, a].item()
                fan = tok_rank[:, i, a].sum(0) - tok_rank[a, i, a]
                h3 = fan.sum().item() - fan[i].item()
                hops.append(
                    {
                        "intra_node": (h1, h1 * row_rank),
                        "rail": (h2, h2 * row_node),
                        "fan_out": (h3, h3 * row_rank),
                    }
                )
                hier.append(Traffic(h1 + h3, h2, (h1 + h3) * row_rank, h2 * row_node))
    return {"flat": flat, "hier": hier, "hops": hops}


@pytest.mark.parametrize("N, L", [(1, 4), (2, 1), (2, 4), (4, 2), (3, 8), (8, 8)])
@pytest.mark.parametrize("dedup", [False, True])
def test_vectorised_traffic_equals_per_sender_reference(N, L, dedup):
    ep = N * L
    E = ep * 2
    gen = torch.Generator().manual_seed(N * 100 + L)
    counts = torch.randint(0, 1000, (ep, E + ep + N), generator=gen)
    args = (counts, N, L, E, dedup, 4096 * 2, 4)
    got, want = traffic_from_counts(*args), _reference(*args)
    assert got == want
    assert all(isinstance(v, int) for t in got["hier"] for v in vars(t).values())


@pytest.mark.parametrize("N, L", [(1, 4), (2, 4), (4, 2), (3, 8)])
def test_every_schemes_bytes_equal_the_per_sender_reference(N, L):
    """``scheme_bytes`` (what the virtual cluster and the two-hop dispatcher record for every
    scheme at once, on the device) gives each sender the reference's flat, two-hop and dedup
    bytes; inter-node bytes go to remote nodes only (0 on one node)."""
    from megatron_locmoe.dispatch.traffic import (
        load_max_over_mean,
        received_tokens,
        scheme_bytes,
        source_counts,
    )

    ep, E = N * L, N * L * 2
    gen = torch.Generator().manual_seed(7 * N + L)
    maps = [torch.rand(16, E, generator=gen) < 0.2 for _ in range(ep)]  # 16 tokens per sender
    counts = torch.stack([source_counts(m, N, L) for m in maps])
    got = scheme_bytes(counts, N, L, E, 4096 * 2, 4)
    plain, dedup = (_reference(counts, N, L, E, d, 4096 * 2, 4) for d in (False, True))
    for name, traffic in (
        ("flat", plain["flat"]),
        ("two_hop", plain["hier"]),
        ("dedup", dedup["hier"]),
    ):
        assert got[f"{name}_intra_node_bytes"].tolist() == [t.intra_node_bytes for t in traffic]
        assert got[f"{name}_inter_node_bytes"].tolist() == [t.inter_node_bytes for t in traffic]
    if N == 1:
        assert all(v.sum() == 0 for k, v in got.items() if "inter" in k)
    received = received_tokens(counts, E)
    want = torch.stack([m.sum(0) for m in maps]).sum(0).view(ep, -1).sum(-1)
    assert received.tolist() == want.tolist()
    assert float(load_max_over_mean(received)) == pytest.approx(
        float(want.max()) / float(want.float().mean())
    )
    assert float(load_max_over_mean(torch.zeros(ep, dtype=torch.long))) == 1.0


def test_source_counts_of_several_sources_at_once():
    """The virtual cluster counts an EP group's maps in one call: [S, T, E] -> [S, E + EP + N],
    each row the single-map result."""
    from megatron_locmoe.dispatch.traffic import source_counts

    maps = torch.rand(5, 16, 8, generator=torch.Generator().manual_seed(3)) < 0.3
    together = source_counts(maps, 2, 2)
    assert together.tolist() == [source_counts(m, 2, 2).tolist() for m in maps]
