"""Save and resume through Megatron's own checkpointing (torch_dist) with the plugin's layers,
on ``pretrain()``: the resumed run's losses against the uninterrupted run's, step by step.

    python benchmarks/resume_check.py --data "--data-path data/pydoc --tokenizer-type \
        NullTokenizer --vocab-size 257" --out benchmarks/results/resume_h100.json

Three runs of the e2e model with the locmoe router (fused path, grouped experts, capacity from
the bound, so the router's capacity state matters), all with ``--train-iters STEPS``:
uninterrupted; stopped at the midpoint by ``--exit-interval`` after saving there; resumed from
that checkpoint. ``--deterministic-mode``
(Megatron's: deterministic algorithms, NCCL ring, fixed cuBLAS workspace) makes the comparison
bitwise where the kernels allow.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil  # noqa: E402
import e2e_routers  # noqa: E402

ROUTER = "locmoe"
EXTRA = (
    "--locmoe-capacity-mode bound --moe-expert-capacity-factor 2.0 --deterministic-mode "
    "--no-gradient-accumulation-fusion"
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40, help="more than the 20 warm-up steps")
    p.add_argument(
        "--data", default="--mock-data --tokenizer-type NullTokenizer --vocab-size 32000"
    )
    p.add_argument("--out", default=None)
    a = p.parse_args()
    half = a.steps // 2
    ckpt = tempfile.mkdtemp(prefix="locmoe-resume-")
    run = lambda steps, extra: e2e_routers.run(ROUTER, steps, 1, a.data, 1, f"{EXTRA} {extra}")  # noqa: E731
    full = run(a.steps, "")
    # the same --train-iters (same LR schedule), stopped at the midpoint by Megatron's exit
    first = run(a.steps, f"--save {ckpt} --save-interval {half} --exit-interval {half}")
    resumed = run(a.steps, f"--load {ckpt}")
    saved = sorted(os.listdir(ckpt))
    steps = range(half + 1, a.steps + 1)
    diffs = {i: abs(resumed["loss"][i] - full["loss"][i]) for i in steps}
    result = {
        "router": ROUTER,
        "extra": EXTRA,
        "checkpoint_dir_entries": saved,
        "losses_full": full["loss"],
        "losses_first_half": first["loss"],
        "losses_resumed": resumed["loss"],
        "first_half_equal": all(first["loss"][i] == full["loss"][i] for i in range(1, half + 1)),
        "resumed_equal": all(d == 0.0 for d in diffs.values()),
        "resumed_max_abs_diff": max(diffs.values()),
    }
    print(f"checkpoint {ckpt}: {saved}")
    print(f"{'step':>5} {'uninterrupted':>14} {'resumed':>10}")
    for i in steps:
        print(f"{i:>5} {full['loss'][i]:>14.6f} {resumed['loss'][i]:>10.6f}")
    print(
        f"first half equal: {result['first_half_equal']}; resumed equal: "
        f"{result['resumed_equal']} (max |diff| {result['resumed_max_abs_diff']:.3g})"
    )
    import torch

    benchutil.save(a.out, {**benchutil.record(torch.device("cuda")), **result})


if __name__ == "__main__":
    main()
