"""A real text corpus that needs no download: the documentation that ships with Python.

Documents: every help topic of ``pydoc_data.topics`` (the language reference, ~465 KB of
English prose) and the docstrings of the standard library's modules, classes and functions, in
a fixed order, so every machine builds the same corpus. Tokens are UTF-8 bytes (ids 0..255)
and one end-of-document id 256, which is Megatron's NullTokenizer with ``--vocab-size 257``
(its eod is vocab_size - 1): no tokenizer file, no network.

The corpus is written with Megatron's own IndexedDatasetBuilder, so Megatron's GPTDataset
reads it with ``--data-path PREFIX``; the token counts (for the hash router's frequency-
balanced map) go next to it as ``PREFIX_counts.npy``.

Domains. Locality-aware routing can only keep tokens on their node when the data is
node-correlated (a domain-sharded loader, as in PanGu-Sigma): with the same distribution on
every rank no router beats 1/nodes node-local share on average. ``domain_shards(n)`` cuts the
corpus into n domains - the help topics (language-reference prose) and n - 1 contiguous slices
of the standard-library docstrings in file-path order (so each slice is a few packages' API
prose) - and ``build_domain_datasets`` writes one indexed dataset per domain for the trainer's
``data_prefix_per_node``, plus the token counts of the whole corpus (the hash router's map must
be the same on every node).

Held-out data (``held_out_every=K``): every K-th document of the corpus (its place in the fixed
corpus order, so the split does not depend on the number of domains) is held out of training
and written per domain (``OUT/domain<k>_valid``) for an evaluation loss; the control
``OUT/mixture`` (+ ``_valid``) is every domain's training (held-out) documents together, for a
loader that gives every node the same mixture.

    python -m megatron_locmoe.sim.data --out data/pydoc
    python -m megatron_locmoe.sim.data --out data/domains --domains 2
    python -m megatron_locmoe.sim.data --out data/domains16 --domains 16 --held-out-every 20
"""

from __future__ import annotations

import argparse
import ast
import sysconfig
from pathlib import Path

import numpy as np

from megatron_locmoe.data.indexed import DatasetError, check_dataset

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


def topic_documents() -> list[str]:
    """Python's help topics (``pydoc_data.topics``), sorted by name."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def stdlib_files(max_stdlib_files: int | None = None) -> list[Path]:
    """The standard library's non-test source files in path order (deterministic).

    Installed packages (``site-packages``, ``dist-packages``) under the stdlib directory are
    skipped: they differ between machines and would change the corpus."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "site-packages", "dist-packages"}
    files = sorted(p for p in stdlib.rglob("*.py") if not skip & set(p.relative_to(stdlib).parts))
    return files[:max_stdlib_files]


def documents(max_stdlib_files: int | None = None) -> list[str]:
    """The corpus: Python's help topics, then standard-library docstrings (deterministic)."""
    docs = topic_documents()
    for path in stdlib_files(max_stdlib_files):
        docs.extend(_docstrings(path))
    return docs


def domain_shards(num_domains: int, max_stdlib_files: int | None = None) -> dict[str, list[str]]:
    """The corpus cut into ``num_domains`` domains: {name: documents}, names in node order.

    Domain 0 is the help topics; the docstrings of the standard library are cut into
    ``num_domains - 1`` slices of consecutive files (path order) with about equal bytes, named
    by their first and last file (e.g. ``docstrings:__future__..zoneinfo``).
    """
    if num_domains < 2:
        raise ValueError(
            f"num_domains={num_domains}: domains are per node and need at least 2 (one per node)"
        )
    per_file = [(p, _docstrings(p)) for p in stdlib_files(max_stdlib_files)]
    per_file = [(p, d) for p, d in per_file if d]
    slices = num_domains - 1
    if len(per_file) < slices:
        raise ValueError(
            f"{len(per_file)} standard-library files with docstrings cannot fill {slices} "
            "docstring domains: raise max_stdlib_files or use fewer domains"
        )
    sizes = np.array([sum(len(x) for x in d) for _, d in per_file], dtype=np.float64)
    # cut where the cumulative size crosses k/slices of the total (at least one file per slice)
    cuts = np.searchsorted(np.cumsum(sizes), sizes.sum() * np.arange(1, slices) / slices)
    bounds = [0, *[int(c) + 1 for c in cuts], len(per_file)]
    for k in range(1, len(bounds)):
        bounds[k] = min(max(bounds[k], bounds[k - 1] + 1), len(per_file) - (len(bounds) - 1 - k))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    shards = {"topics": topic_documents()}
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        first, last = (per_file[i][0].relative_to(stdlib).with_suffix("") for i in (lo, hi - 1))
        name = f"docstrings:{first.as_posix()}..{last.as_posix()}"
        shards[name] = [doc for _, docs in per_file[lo:hi] for doc in docs]
    return shards


def encode(text: str) -> np.ndarray:
    """UTF-8 bytes and the end-of-document id."""
    return np.append(np.frombuffer(text.encode("utf-8"), dtype=np.uint8), EOD).astype(np.uint16)


DATASET_SUFFIXES = ("_counts.npy", ".bin", ".idx")
"""The files of one dataset PREFIX, in the order a writer renames them into place (index last)."""


def dataset_files(prefix: str | Path) -> list[str]:
    """The paths :func:`build_indexed_dataset` writes for ``prefix``."""
    return [f"{prefix}{suffix}" for suffix in DATASET_SUFFIXES]


CorpusError = DatasetError
"""An indexed dataset that Megatron would fail on deep inside its loader (the core's
``data.indexed.DatasetError``); the message names the file and how to rebuild it."""


def check_indexed_dataset(prefix: str | Path) -> int:
    """Check PREFIX.idx / PREFIX.bin as Megatron's IndexedDataset reads them (the core's
    ``data.indexed.check_dataset``, O(1) reads), with this corpus's rebuild command in every
    message. Returns the number of documents."""
    fix = f"rebuild it (python -m megatron_locmoe.sim.data --out {prefix})"
    return check_dataset(prefix, whole=False, fix=fix)["documents"]


def build_indexed_dataset(prefix: str | Path, max_stdlib_files: int | None = None) -> dict:
    """Write PREFIX.bin / PREFIX.idx (Megatron's format) and PREFIX_counts.npy; return stats."""
    return write_documents(prefix, documents(max_stdlib_files))


def build_domain_datasets(
    out_dir: str | Path,
    num_domains: int,
    max_stdlib_files: int | None = None,
    held_out_every: int = 0,
) -> dict:
    """One indexed dataset per domain (``OUT/domain<k>``, k in node order) and the token counts
    of all domains together (``OUT/all_counts.npy``, for the hash router).

    Returns ``{"prefixes": [...], "counts": path, "domains": [stats with "name"], "tokens"}``;
    with ``held_out_every`` K > 0 also ``"valid_prefixes"`` (each domain's held-out documents),
    ``"mixture"`` and ``"mixture_valid"`` (the control: all domains' documents together).
    """
    if held_out_every < 0 or held_out_every == 1:
        raise ValueError(
            f"held_out_every={held_out_every}: use 0 (no held-out data) or K >= 2 (every K-th "
            "document held out)"
        )
    out_dir = Path(out_dir)
    stats, valid, train_docs, valid_docs, index = [], [], [], [], 0
    for k, (name, docs) in enumerate(domain_shards(num_domains, max_stdlib_files).items()):
        if held_out_every:
            keep = [(index + i + 1) % held_out_every != 0 for i in range(len(docs))]
            index += len(docs)
            held = [d for d, t in zip(docs, keep, strict=True) if not t]
            docs = [d for d, t in zip(docs, keep, strict=True) if t]
            valid.append(write_documents(out_dir / f"domain{k}_valid", held)["prefix"])
            train_docs += docs
            valid_docs += held
        stats.append({"name": name, **write_documents(out_dir / f"domain{k}", docs)})
    counts = sum(np.load(f"{s['prefix']}_counts.npy") for s in stats)
    np.save(out_dir / "all_counts.npy", counts)
    built = {
        "prefixes": [s["prefix"] for s in stats],
        "counts": str(out_dir / "all_counts.npy"),
        "domains": stats,
        "tokens": int(counts.sum()),
    }
    if held_out_every:
        built["valid_prefixes"] = valid
        built["mixture"] = write_documents(out_dir / "mixture", train_docs)["prefix"]
        built["mixture_valid"] = write_documents(out_dir / "mixture_valid", valid_docs)["prefix"]
        built["held_out_every"] = held_out_every
    return built


def write_documents(prefix: str | Path, docs: list[str]) -> dict:
    """Write ``docs`` as PREFIX.bin / PREFIX.idx and PREFIX_counts.npy; return stats."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    if not docs:
        raise ValueError(f"no documents to write to {prefix}")
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    counts = np.zeros(VOCAB_SIZE, dtype=np.int64)
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
    parser.add_argument(
        "--domains",
        type=int,
        default=0,
        help="write this many per-node domain datasets into the --out directory instead",
    )
    parser.add_argument(
        "--held-out-every",
        type=int,
        default=0,
        help="with --domains: hold every K-th document out (per-domain _valid sets, mixture)",
    )
    args = parser.parse_args(argv)
    if args.domains:
        built = build_domain_datasets(
            args.out, args.domains, args.max_stdlib_files, args.held_out_every
        )
        for d in built["domains"]:
            print(f"{d['prefix']}: {d['name']}, {d['documents']} documents, {d['tokens']:,} tokens")
        print(f"token counts of all domains -> {built['counts']}")
        return
    stats = build_indexed_dataset(args.out, args.max_stdlib_files)
    print(
        f"{stats['documents']} documents, {stats['tokens']:,} tokens -> {stats['prefix']}.bin/.idx "
        f"(train with --data-path {stats['prefix']} --tokenizer-type NullTokenizer "
        f"--vocab-size {VOCAB_SIZE})"
    )


if __name__ == "__main__":
    main()
