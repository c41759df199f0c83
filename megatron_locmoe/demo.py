"""`make demo`: the main job on the CPU, on a simulated 2-node x 4-rank cluster (gloo).

Today it runs Megatron-Core's own MoE layer (TopKRouter, alltoall dispatcher) with EP=8 across
both simulated nodes and reports how the routing uses the nodes: the share of token-expert
assignments that stay on the sender's node (what LocMoE raises) and the assignments that cross.
The router comparison (megatron, hash, switch, locmoe) with a report replaces it in a later
change.
"""

from __future__ import annotations

import argparse
import time

import torch

from megatron_locmoe.simcluster import ParallelLayout, SimCluster


def routing_locality_job(ctx, tokens: int, num_experts: int, topk: int):
    from megatron_locmoe.testing import build_moe_layer, moe_config

    topo = ctx.topology()
    config = moe_config(
        ep=ctx.layout.ep,
        num_moe_experts=num_experts,
        moe_router_topk=topk,
        hidden_size=32,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=0.01,
    )
    layer = build_moe_layer(config)
    gen = torch.Generator().manual_seed(ctx.rank)
    x = torch.randn(tokens, 1, config.hidden_size, generator=gen, requires_grad=True)
    out, _ = layer(x)
    out.square().mean().backward()
    with torch.no_grad():
        _, routing_map = layer.router(x.detach())
    expert_node = torch.tensor(topo.expert_nodes(num_experts))
    assigned_nodes = expert_node.expand_as(routing_map)[routing_map]
    local = int((assigned_nodes == topo.node).sum())
    return dict(
        rank=ctx.rank,
        node=topo.node,
        assignments=int(routing_map.sum()),
        node_local=local,
        grad_norm=float(x.grad.norm()),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--ranks-per-node", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256, help="tokens per rank")
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--topk", type=int, default=2)
    args = parser.parse_args(argv)
    world = args.nodes * args.ranks_per_node
    layout = ParallelLayout(devices_per_node=args.ranks_per_node, ep=world)
    print(
        f"simulated cluster: {args.nodes} nodes x {args.ranks_per_node} ranks (gloo, CPU), EP={world}"
    )
    t0 = time.perf_counter()
    with SimCluster(world) as cluster:
        print(f"  ranks up in {time.perf_counter() - t0:.1f} s")
        rows = cluster.run(
            routing_locality_job,
            tokens=args.tokens,
            num_experts=args.experts,
            topk=args.topk,
            layout=layout,
        )
    print(
        f"Megatron TopKRouter (aux loss), {args.experts} experts, top-{args.topk}, "
        f"{args.tokens} tokens per rank, forward+backward through the alltoall dispatcher:"
    )
    print(f"  {'rank':>4} {'node':>4} {'assignments':>11} {'node-local':>10}")
    for r in rows:
        print(f"  {r['rank']:>4} {r['node']:>4} {r['assignments']:>11} {r['node_local']:>10}")
    total = sum(r["assignments"] for r in rows)
    local = sum(r["node_local"] for r in rows)
    print(
        f"  node-local share {local / total:.3f} (uniform routing gives {1 / args.nodes:.3f}); "
        f"{total - local} of {total} assignments cross a node boundary"
    )
    print(
        "The router comparison (megatron / hash / switch / locmoe) and its report arrive in a "
        "later change."
    )
    print(f"done in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
