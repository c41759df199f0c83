"""``megatron-locmoe-patch PATH_TO_MEGATRON_LM``: add the plugin to Megatron-LM's pretrain_gpt.py.

The whole change is one line after the module docstring (MindSpeed-style): import the adaptor
and apply it before the script imports ``megatron.training``, so the script binds the patched
argument parser, validation and GPT model config. Targets Megatron-LM tag ``core_v0.19.0``
(megatron-core 0.19.x); ``patches/pretrain_gpt.patch`` is the same change as a diff. Applying
twice changes nothing; a file that does not look like that pretrain_gpt.py is refused.
"""

from __future__ import annotations

import argparse
import ast
import os
import shutil
import sys
from pathlib import Path

TARGET = "pretrain_gpt.py"
MEGATRON_LM_TAG = "core_v0.19.0"
MARKER = "# megatron-locmoe"
LINE = f"from megatron_locmoe import adaptor; adaptor.apply()  {MARKER}\n"
_EXPECTED_FUNCTIONS = {"forward_step", "train_valid_test_datasets_provider", "loss_func"}


class PatchError(RuntimeError):
    """The file is not a pretrain_gpt.py this patch knows."""


def _check_recognised(source: str, path: Path) -> ast.Module:
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        raise PatchError(f"{path} is not valid Python ({e}); refusing to patch it") from None
    functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    missing = _EXPECTED_FUNCTIONS - functions
    imports_training = any(
        isinstance(n, ast.ImportFrom) and (n.module or "").startswith("megatron.training")
        for n in tree.body
    )
    if missing or not imports_training or "pretrain(" not in source:
        what = f"missing {sorted(missing)}" if missing else "no megatron.training pretrain()"
        raise PatchError(
            f"{path} does not look like Megatron-LM's {TARGET} ({what}); this patch targets "
            f"Megatron-LM {MEGATRON_LM_TAG}. Use `python -m megatron_locmoe.run {path} ...` "
            "instead, which needs no edit."
        )
    return tree


def patch_source(source: str, path: Path = Path(TARGET)) -> str:
    """The patched source (unchanged if already patched)."""
    if MARKER in source:
        return source
    tree = _check_recognised(source, path)
    first = tree.body[0]
    has_docstring = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
    insert_at = first.end_lineno if has_docstring else 0  # after the docstring's last line
    lines = source.splitlines(keepends=True)
    return "".join(lines[:insert_at] + ["\n", LINE] + lines[insert_at:])


def patch_megatron_lm(root: Path) -> bool:
    """Patch ROOT/pretrain_gpt.py in place; True if the file changed."""
    path = Path(root) / TARGET
    if not path.is_file():
        raise PatchError(f"{path} does not exist: give the root of a Megatron-LM checkout")
    try:
        source = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PatchError(f"{path} is not UTF-8 text ({e}): not Megatron-LM's {TARGET}") from None
    patched = patch_source(source, path)
    if patched == source:
        return False
    # next to it, then renamed over it: an interrupted patch leaves the script as it was
    tmp = path.with_name(f".{path.name}.locmoe-{os.getpid()}")
    try:
        tmp.write_text(patched, encoding="utf-8")
        shutil.copymode(path, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("megatron_lm", type=Path, help="root of a Megatron-LM checkout")
    args = parser.parse_args(argv)
    try:
        changed = patch_megatron_lm(args.megatron_lm)
    except PatchError as e:
        print(f"megatron-locmoe-patch: error: {e}", file=sys.stderr)
        return 2
    state = "patched" if changed else "already patched"
    print(f"{args.megatron_lm / TARGET}: {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
