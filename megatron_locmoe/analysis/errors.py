"""How the analysis tools refuse input they cannot read: one line that names the file and what
to do, exit status 2, no traceback (a bad path or a damaged file is the user's to fix)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


class InputError(ValueError):
    """A file or directory a tool cannot use; the message names it and the fix."""


def read_json(path: str | Path, what: str, fix: str = "") -> Any:
    """``path`` parsed as UTF-8 JSON; InputError naming ``what`` it should have been."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file (expected {what})") from None
    except IsADirectoryError:
        raise InputError(f"{path} is a directory, not {what}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        hint = f"; {fix}" if fix else ""
        raise InputError(f"{path} is not {what} (not UTF-8 JSON: {e}){hint}") from None


def require_keys(record: Any, keys: tuple[str, ...], path: str | Path, what: str) -> None:
    """InputError when ``record`` (read from ``path``) is not a mapping with ``keys``."""
    missing = [k for k in keys if not isinstance(record, dict) or k not in record]
    if missing:
        raise InputError(f"{path} is not {what}: it has no {', '.join(missing)}")


REFUSED = (InputError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
"""What a tool reports in one line instead of a traceback."""


def run_tool(main: Callable[..., Any], argv: list[str] | None = None) -> int:
    """Run a tool's ``main``; bad input becomes ``PROG: error: MESSAGE`` and exit status 2."""
    try:
        main(argv)
    except REFUSED as e:
        prog = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else "tool"
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


def require_types(record: Any, types: dict[str, type | tuple], path: str | Path, what: str) -> None:
    """InputError naming ``path``, the field, its value and the type it should have, for the
    first field of ``record`` present with another type (None passes: "not measured"; a bool
    is not a number)."""
    if not isinstance(record, dict):
        raise InputError(f"{path} is not {what}: it holds a {type(record).__name__}, not an object")
    for key, want in types.items():
        value = record.get(key)
        wants = want if isinstance(want, tuple) else (want,)
        is_bool = isinstance(value, bool) and bool not in wants
        if value is None or (isinstance(value, wants) and not is_bool):
            continue
        names = " or ".join(t.__name__ for t in wants)
        raise InputError(
            f"{path} is not {what}: its field {key!r} is {value!r} ({type(value).__name__}), "
            f"not {names}; rerun the run or fix the file"
        )
