"""``python -m megatron_locmoe.run PATH/pretrain_gpt.py ARGS...``: an unpatched script, patched.

Applies the adaptor, then runs the script as ``__main__`` (runpy) with its own folder on
sys.path (Megatron-LM's scripts import sibling modules such as gpt_builders). The script's
``from megatron.training... import ...`` lines run after the patches, so they bind the
plugin's parser, validation and model config; no file is edited.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

from megatron_locmoe import adaptor

USAGE = "usage: python -m megatron_locmoe.run PATH/pretrain_gpt.py [ARGS...]"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(
            f"{USAGE}\n\n{__doc__.strip()}\n\nThe script's own flags: PATH/pretrain_gpt.py --help"
        )
        return
    if not argv or not argv[0].endswith(".py"):
        sys.exit(USAGE)
    script = Path(argv[0]).resolve()
    if not script.is_file():
        sys.exit(f"megatron_locmoe.run: {script} does not exist")
    adaptor.apply()
    sys.path.insert(0, str(script.parent))
    sys.argv = [str(script), *argv[1:]]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
