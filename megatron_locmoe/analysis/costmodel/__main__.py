"""``python -m megatron_locmoe.analysis.costmodel``: the cost model's command line (cli.py)."""

import sys
from pathlib import Path

from megatron_locmoe.analysis.costmodel.cli import main
from megatron_locmoe.analysis.errors import run_tool

if __name__ == "__main__":
    # The tool keeps the name it had as one file, costmodel.py: argparse's usage line and
    # run_tool's "costmodel: error: ..." read it from sys.argv[0] (.../costmodel/__main__.py).
    sys.argv[0] = str(Path(__file__).parent.with_suffix(".py"))
    raise SystemExit(run_tool(main))
