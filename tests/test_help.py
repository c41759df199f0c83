"""Users type ``--help`` first: every entry point prints its help and exits 0, Megatron's own
parser included (0.19.2 has a help string with a bare '%' that crashes argparse)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from megatron_locmoe.arguments import mend_help_strings

ENTRIES = {
    # module: a text its help must show
    "megatron_locmoe.pretrain_gpt": "--locmoe-dispatcher {auto,alltoall,hierarchical}",
    # (its help also prints the flag whose help string needed mending)
    "megatron_locmoe.run": "PATH/pretrain_gpt.py",
    "megatron_locmoe.launch": "usage:",
    "megatron_locmoe.analysis.demo": "usage:",
    "megatron_locmoe.analysis.report": "usage:",
    "megatron_locmoe.analysis.costmodel": "usage:",
    "megatron_locmoe.analysis.dashboard": "usage:",
    "megatron_locmoe.patch_megatron_lm": "usage:",
    "megatron_locmoe.adaptor": "usage:",
    "megatron_locmoe.sim.data": "usage:",
}


@pytest.mark.slow
def test_every_entry_prints_help():
    procs = {
        module: subprocess.Popen(
            [sys.executable, "-m", module, "--help"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for module in ENTRIES
    }
    for module, proc in procs.items():
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, (module, err[-2000:])
        assert ENTRIES[module] in out, (module, out[:500])


def test_mend_help_strings_escapes_only_what_argparse_cannot_format():
    parser = argparse.ArgumentParser(prog="x")
    parser.add_argument("--a", default=3, help="10% more (default: %(default)s)")
    parser.add_argument("--b", help="100%% fine")
    parser.add_argument("--c", help="plain")
    assert mend_help_strings(parser) == ["--a"]
    text = parser.format_help()
    assert "10% more (default: 3)" in text and "100% fine" in text
    assert mend_help_strings(parser) == []  # idempotent
