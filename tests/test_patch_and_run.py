"""Ways into Megatron-LM: the one-line patch of pretrain_gpt.py (applied to a fixture with the
script's structure, idempotent, unknown files refused) and the runpy runner for unpatched
scripts, which must parse the plugin's flags inside Megatron's own parser."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_locmoe.patch_megatron_lm import LINE, PatchError, main, patch_megatron_lm

FIXTURE = Path(__file__).parent / "fixtures" / "pretrain_gpt_core_v0.19.0.py"
ROOT = Path(__file__).resolve().parents[1]
ARGS = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 128 "
    "--max-position-embeddings 128 --micro-batch-size 1 --global-batch-size 8 --num-experts 8 "
    "--moe-router-topk 1 --moe-router-pre-softmax --moe-token-dispatcher-type alltoall "
    "--transformer-impl local --lr 1e-4 --train-iters 10 --mock-data --vocab-size 128 "
    "--moe-router-type locmoe --locmoe-dispatcher hierarchical"
).split()


@pytest.fixture
def checkout(tmp_path):
    shutil.copy(FIXTURE, tmp_path / "pretrain_gpt.py")
    return tmp_path


def test_patch_inserts_one_line_after_docstring_and_is_idempotent(checkout):
    original = (checkout / "pretrain_gpt.py").read_text()
    assert patch_megatron_lm(checkout) is True
    patched = (checkout / "pretrain_gpt.py").read_text()
    assert patched.count(LINE) == 1
    added = [line for line in patched.splitlines(keepends=True) if line not in original]
    assert added == [LINE]
    # the adaptor line comes before the first megatron import, after the docstring
    assert patched.index(LINE) < patched.index("from megatron.training")
    assert patched.index("__main__ block that parses") < patched.index(LINE)
    assert patch_megatron_lm(checkout) is False
    assert (checkout / "pretrain_gpt.py").read_text() == patched


def test_unknown_file_refused(tmp_path, capsys):
    (tmp_path / "pretrain_gpt.py").write_text('"""Something else."""\nprint("hi")\n')
    with pytest.raises(PatchError, match="does not look like Megatron-LM's pretrain_gpt.py"):
        patch_megatron_lm(tmp_path)
    assert main([str(tmp_path)]) == 2
    assert "megatron_locmoe.run" in capsys.readouterr().err
    assert main([str(tmp_path / "nowhere")]) == 2


def test_patch_keeps_mode_and_leaves_the_script_whole_when_interrupted(checkout, monkeypatch):
    script = checkout / "pretrain_gpt.py"
    script.chmod(0o755)
    original = script.read_text()

    def interrupted(src, dst):
        raise KeyboardInterrupt  # the rename never happens

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        patch_megatron_lm(checkout)
    assert script.read_text() == original  # untouched, and no temporary file left beside it
    assert sorted(p.name for p in checkout.iterdir()) == ["pretrain_gpt.py"]
    monkeypatch.undo()
    assert patch_megatron_lm(checkout) is True
    assert script.stat().st_mode & 0o777 == 0o755


def test_non_utf8_file_refused(tmp_path, capsys):
    (tmp_path / "pretrain_gpt.py").write_bytes(b"\xff\xfe not python")
    assert main([str(tmp_path)]) == 2
    assert "megatron-locmoe-patch: error: " in (err := capsys.readouterr().err)
    assert "is not UTF-8 text" in err


def _run(cmd, cwd):
    env = dict(
        os.environ,
        WORLD_SIZE="1",
        RANK="0",
        LOCMOE_DEVICE="cpu",
        CUDA_VISIBLE_DEVICES="",
        PYTHONPATH=str(ROOT),
    )
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_patched_script_and_runner_parse_plugin_flags(checkout):
    script = checkout / "pretrain_gpt.py"
    # unpatched, plain python: Megatron's parser rejects the plugin flags
    plain = _run([sys.executable, str(script), *ARGS], checkout)
    assert plain.returncode != 0 and "unrecognized arguments: --moe-router-type" in plain.stderr
    # unpatched through the runner: parsed and validated
    ran = _run([sys.executable, "-m", "megatron_locmoe.run", str(script), *ARGS], checkout)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert "ROUTER=locmoe DISPATCHER=hierarchical" in ran.stdout
    # patched, plain python
    patch_megatron_lm(checkout)
    patched = _run([sys.executable, str(script), *ARGS], checkout)
    assert patched.returncode == 0, patched.stderr[-2000:]
    assert "ROUTER=locmoe DISPATCHER=hierarchical" in patched.stdout
