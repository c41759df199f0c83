"""A real text corpus that needs no download: the documentation that ships with Python.

Documents: every help topic of ``pydoc_data.topics`` (the language reference, ~465 KB of
English prose) and the docstrings of the standard library's modules, classes and functions, in
a fixed order, so every machine builds the same corpus. Tokens are UTF-8 bytes (ids 0..255)
and one end-of-document id 256, which is Megatron's NullTokenizer with ``--vocab-size 257``
(its eod is vocab_size - 1): no tokenizer file, no network.

The corpus is written with Megatron's own IndexedDatasetBuilder, so Megatron's GPTDataset
reads it with ``--data-path PREFIX``; the token counts (for the hash router's frequency-
balanced map) go next to it as ``PREFIX_counts.npy``.

    python -m megatron_locmoe.data --out data/pydoc
"""

from __future__ import annotations

import argparse
import ast
import sysconfig
from pathlib import Path

import numpy as np

VOCAB_SIZE = 257
"""256 byte ids plus the end-of-document id: train with --vocab-size 257."""
EOD = VOCAB_SIZE - 1


def _docstrings(path: Path) -> list[str]:
    """Module, class and function docstrings of one source file, in file order."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except SyntaxError:
        return []
    nodes = [tree] + [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    ]
    docs = (ast.get_docstring(n) for n in nodes)
    return [d for d in docs if d and len(d) >= 200]  # skip one-liners


def documents(max_stdlib_files: int | None = None) -> list[str]:
    """The corpus: Python's help topics, then standard-library docstrings (deterministic)."""
    from pydoc_data.topics import topics

    docs = [topics[name] for name in sorted(topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if "test" not in p.parts)
    for path in files[:max_stdlib_files]:
        docs.extend(_docstrings(path))
    return docs


def encode(text: str) -> np.ndarray:
    """UTF-8 bytes and the end-of-document id."""
    return np.append(np.frombuffer(text.encode("utf-8"), dtype=np.uint8), EOD).astype(np.uint16)


def build_indexed_dataset(prefix: str | Path, max_stdlib_files: int | None = None) -> dict:
    """Write PREFIX.bin / PREFIX.idx (Megatron's format) and PREFIX_counts.npy; return stats."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    counts = np.zeros(VOCAB_SIZE, dtype=np.int64)
    docs = documents(max_stdlib_files)
    for text in docs:
        ids = encode(text)
        counts += np.bincount(ids, minlength=VOCAB_SIZE)
        builder.add_item(torch.from_numpy(ids.astype(np.int64)))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    np.save(f"{prefix}_counts.npy", counts)
    return {"documents": len(docs), "tokens": int(counts.sum()), "prefix": str(prefix)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/pydoc", help="output prefix (no extension)")
    parser.add_argument("--max-stdlib-files", type=int, default=None)
    args = parser.parse_args(argv)
    stats = build_indexed_dataset(args.out, args.max_stdlib_files)
    print(
        f"{stats['documents']} documents, {stats['tokens']:,} tokens -> {stats['prefix']}.bin/.idx "
        f"(train with --data-path {stats['prefix']} --tokenizer-type NullTokenizer "
        f"--vocab-size {VOCAB_SIZE})"
    )


if __name__ == "__main__":
    main()
