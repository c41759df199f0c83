"""A run directory as the demo writes it (``run.json`` and TensorBoard events) with constant
routing metrics over 10 steps: known input for the cost model's and report's tests and the fault
drill's tool cases (tools/fault_drill.py), in the package so that no tool imports from tests/."""

from __future__ import annotations

from pathlib import Path

from megatron_locmoe.analysis import costmodel as cm
from megatron_locmoe.analysis.runlog import write_run_record


def synthetic_run(
    tmp_path: str | Path, name, topk, dedup, inter_copies, intra_copies, dropped=0.0, local=0.6
):
    """A run directory as the demo writes it, with constant metrics over 10 steps."""
    from torch.utils.tensorboard import SummaryWriter

    H, T, N, G, E = 64, 256, 2, 4, 16
    hb = H * 4
    inter_copy = cm.copy_bytes(hb, 4, E // N if dedup else None)
    intra_copy = cm.copy_bytes(hb, 4, E // (N * G) if dedup else None)
    run_dir = Path(tmp_path) / name
    writer = SummaryWriter(str(run_dir / "tensorboard"))
    for step in range(1, 11):
        for tag, v in {
            "lm loss": 5.0 - 0.1 * step,
            "node_local_fraction": local,
            "inter_node_bytes": inter_copies * T * inter_copy,
            "flat_inter_node_bytes": inter_copies * T * cm.copy_bytes(hb, 4),
            "intra_node_bytes": intra_copies * T * intra_copy,
            "tokens_dropped": dropped * T,
            "load_cv": 0.5,
        }.items():
            writer.add_scalar(tag, v, step)
    writer.close()
    write_run_record(
        run_dir,
        dict(
            name=name,
            label=name,
            topk=topk,
            num_experts=E,
            nodes=N,
            ranks_per_node=G,
            tokens_per_rank_step=T,
            hidden_size=H,
            hidden_element_bytes=4,
            prob_element_bytes=4,
            dedup=dedup,
            num_layers=2,
            losses=[5.0 - 0.1 * s for s in range(1, 11)],
            tensorboard_dir="tensorboard",
        ),
    )
    return run_dir
