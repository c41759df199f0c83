"""The run-log reader: TensorBoard scalars read back by step, and quietly (TensorBoard logs each
step of its reading at INFO, which Megatron's logging setup prints: a dozen lines a run around
the demo's table)."""

from __future__ import annotations

import logging

import numpy as np

from megatron_locmoe.analysis.runlog import read_scalars


def test_read_scalars_reads_every_point_without_tensorboards_info_lines(tmp_path, caplog):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "tb"))
    for step in (3, 1, 2):
        writer.add_scalar("lm loss", 10.0 - step, step)
    writer.close()
    tb_logger = logging.getLogger("tensorboard")
    before = tb_logger.level
    with caplog.at_level(logging.INFO):  # as Megatron configures logging
        scalars = read_scalars(tmp_path / "tb")
    steps, values = scalars["lm loss"]
    assert steps.tolist() == [1, 2, 3] and np.allclose(values, [9.0, 8.0, 7.0])
    assert not [r for r in caplog.records if r.name.startswith("tensorboard")]
    assert tb_logger.level == before
