"""Inter-node bytes per token: flat All-to-All vs hierarchical vs hierarchical + per-node dedup.

Counts, not times, on the CPU in one process. Routing comes from Megatron-Core's own TopKRouter
(softmax, aux loss, trained for a few steps on the aux loss alone so it is balanced the way
training balances it); the bytes come from ``megatron_locmoe.dispatch.traffic.traffic_from_counts``,
the function the dispatcher itself uses, fed with the real routing maps of every simulated EP
rank (``source_counts``). No collective runs.

Setup: 64 experts, 8 GPUs per node, EP = 8 x nodes (2, 4, 8 nodes -> 4, 2, 1 experts per GPU),
T tokens per GPU. Bytes are for a bf16 hidden size of 4096 (fp32 probs), forward pass only
(dispatch + combine; the backward mirrors it).

Hidden states (the router's input, width 256):
- random: i.i.d. N(0, 1);
- text: bytes of Python standard-library sources (real text, tokenised bytewise), each byte a
  fixed random embedding, averaged over a causal window of 8 bytes (some context), then a fixed
  random linear map. Real byte frequencies are skewed, so routing is less uniform than random.
Every GPU gets its own contiguous slice of the token stream.

Run: ``.venv/bin/python benchmarks/dispatch_traffic.py [--tokens 256] [--aux-steps 20]``.
"""

from __future__ import annotations

import argparse
import os
import sysconfig
import tempfile
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

NUM_EXPERTS, GPUS_PER_NODE, ROUTER_DIM = 64, 8, 256
MODEL_HIDDEN, HIDDEN_BYTES, PROB_BYTES = 4096, 2, 4


def text_states(num_tokens: int, dim: int, seed: int = 0) -> torch.Tensor:
    """``[num_tokens, dim]`` states of real text: bytewise tokens of stdlib sources."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    data = bytearray()
    for path in sorted(stdlib.glob("*.py")):
        data += path.read_bytes()
        if len(data) >= num_tokens + 8:
            break
    ids = torch.tensor(list(data[: num_tokens + 7]), dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(256, dim, generator=gen)
    window = emb[ids].unfold(0, 8, 1).mean(-1)  # [num_tokens, dim]: causal 8-byte average
    mix = torch.randn(dim, dim, generator=gen) / dim**0.5
    h = window @ mix
    return (h - h.mean(0)) / h.std(0)


def make_router(topk: int, aux_steps: int, states: torch.Tensor):
    """Megatron's TopKRouter with aux loss, trained ``aux_steps`` SGD steps on the aux loss."""
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_locmoe.sim.testing import moe_config, solo_pg_collection

    config = moe_config(
        ep=1,
        hidden_size=ROUTER_DIM,
        num_moe_experts=NUM_EXPERTS,
        moe_router_topk=topk,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=1e-2,
    )
    router = TopKRouter(config=config, pg_collection=solo_pg_collection())
    torch.manual_seed(0)
    router.weight.data.normal_(0, 0.02)
    router.train()
    for _ in range(aux_steps):
        router.zero_grad()
        probs, _ = router(states[:4096].unsqueeze(1))
        (probs * 0).sum().backward()  # the aux loss rides on probs' backward
        router.weight.data -= 10.0 * router.weight.grad
    router.eval()
    return router


def traffic(routing_map: torch.Tensor, nodes: int, tokens: int) -> dict[str, float]:
    """Inter/intra bytes per token of the three schemes for one routing ``[EP*T, E]``."""
    from megatron_locmoe.dispatch.traffic import source_counts, traffic_from_counts

    ep = nodes * GPUS_PER_NODE
    counts = torch.stack(
        [source_counts(m, nodes, GPUS_PER_NODE) for m in routing_map.split(tokens)]
    )
    out = {}
    for dedup in (False, True):
        plan = traffic_from_counts(
            counts,
            nodes,
            GPUS_PER_NODE,
            NUM_EXPERTS,
            dedup,
            MODEL_HIDDEN * HIDDEN_BYTES,
            PROB_BYTES,
        )
        n = ep * tokens
        if not dedup:
            out["flat_inter"] = sum(t.inter_node_bytes for t in plan["flat"]) / n
            out["flat_intra"] = sum(t.intra_node_bytes for t in plan["flat"]) / n
        key = "dedup" if dedup else "hier"
        out[f"{key}_inter"] = sum(t.inter_node_bytes for t in plan["hier"]) / n
        out[f"{key}_intra"] = sum(t.intra_node_bytes for t in plan["hier"]) / n
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256, help="tokens per GPU")
    parser.add_argument("--aux-steps", type=int, default=20, help="aux-loss SGD steps")
    parser.add_argument("--topk", type=int, nargs="+", default=[1, 2, 4, 8])
    args = parser.parse_args(argv)

    from megatron_locmoe import adaptor

    with tempfile.NamedTemporaryFile() as store:
        dist.init_process_group("gloo", init_method=f"file://{store.name}", rank=0, world_size=1)
        adaptor.apply()
        total = 8 * GPUS_PER_NODE * args.tokens
        states = {
            "random": torch.randn(total, ROUTER_DIM, generator=torch.Generator().manual_seed(1)),
            "text": text_states(total, ROUTER_DIM),
        }
        kib = 1024
        print(
            f"{NUM_EXPERTS} experts, {GPUS_PER_NODE} GPUs/node, {args.tokens} tokens/GPU, "
            f"bf16 hidden {MODEL_HIDDEN}; KiB per token, forward (dispatch + combine)"
        )
        print(
            "| nodes | top-k | states | inter flat | inter hier | inter hier+dedup | dedup saves "
            "| intra flat | intra hier | intra hier+dedup |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        for topk in args.topk:
            for kind, h in states.items():
                router = make_router(topk, args.aux_steps, h)
                with torch.no_grad():
                    _, routing_map = router(h.unsqueeze(1))
                for nodes in (2, 4, 8):
                    n = nodes * GPUS_PER_NODE * args.tokens
                    t = traffic(routing_map[:n], nodes, args.tokens)
                    saves = 1 - t["dedup_inter"] / t["flat_inter"] if t["flat_inter"] else 0.0
                    print(
                        f"| {nodes} | {topk} | {kind} | {t['flat_inter'] / kib:.2f} | "
                        f"{t['hier_inter'] / kib:.2f} | {t['dedup_inter'] / kib:.2f} | "
                        f"{saves:.1%} | {t['flat_intra'] / kib:.2f} | {t['hier_intra'] / kib:.2f} "
                        f"| {t['dedup_intra'] / kib:.2f} |"
                    )
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
