"""The corpus manifest: what a rebuild must download and what it must come out as.

``megatron_locmoe/data/realtext_manifest.json`` (committed; the text never is) records

- ``settings``: vocabulary size, held-out rate, the per-domain token cap, the tokenizer sample;
- ``packages``: registry, version, file name, size and sha256 of every package;
- ``tokenizer``: the sha256 of ``tokenizer.json``, its vocabulary size and end-of-document id;
- ``domains``: per domain the documents, tokens and text bytes of the training and held-out
  sets and the sha256 of their ``.bin`` files;
- ``built_with``: the versions of Python and ``tokenizers`` that measured it.

A rebuild fetches exactly these package versions (a cached file with the pinned sha256 is used
without asking the registry), then checks every measured number against the manifest as soon as
it is known, and stops at the first difference with a message that names it. ``--update-manifest``
accepts what the registries serve now and what the build measures, and rewrites the file.
"""

from __future__ import annotations

import json
from pathlib import Path

DEFAULT_PATH = Path(__file__).with_name("realtext_manifest.json")
FORMAT = 1


class ManifestError(RuntimeError):
    """The build differs from the manifest, or the manifest cannot be used."""


UPDATE_HINT = (
    "If the change is intended (new package versions, a changed extraction rule or tokenizers "
    "version), rebuild with --update-manifest and commit the rewritten manifest."
)


def empty() -> dict:
    return {"format": FORMAT, "settings": {}, "packages": {}, "tokenizer": {}, "domains": {}}


def load(path: str | Path) -> dict | None:
    """The manifest at ``path``, or None if there is none."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON ({e}); restore it from git") from None
    if manifest.get("format") != FORMAT:
        raise ManifestError(f"{path}: format {manifest.get('format')}, this code reads {FORMAT}")
    for section in ("settings", "packages", "tokenizer", "domains"):
        manifest.setdefault(section, {})
    return manifest


def save(path: str | Path, manifest: dict) -> None:
    Path(path).write_text(
        json.dumps(manifest, indent=1, sort_keys=False, ensure_ascii=False) + "\n"
    )


def check(what: str, expected: dict | None, measured: dict, path: str | Path) -> None:
    """Raise :class:`ManifestError` if ``measured`` differs from the manifest's ``expected`` in
    any key the manifest has (``what`` names the record, e.g. ``domain code_c``)."""
    if expected is None:
        raise ManifestError(
            f"{path} has no record of {what}: build once with --update-manifest to record it"
        )
    diffs = [
        f"{key}: manifest {expected[key]!r}, this build {measured.get(key)!r}"
        for key in expected
        if key in measured and measured[key] != expected[key]
    ]
    if diffs:
        raise ManifestError(
            f"{what} differs from {path}:\n  " + "\n  ".join(diffs) + f"\n{UPDATE_HINT}"
        )
