"""Megatron-Core's indexed dataset (``PREFIX.bin`` / ``PREFIX.idx``), written and checked with numpy.

Why not Megatron's ``IndexedDatasetBuilder``: it takes one document at a time as a torch tensor
and writes about 2 MB of text per second per core; the corpus has a quarter of a billion tokens.
:class:`DatasetWriter` writes the same bytes from whole arrays (``tests/test_corpus.py`` compares
them with the builder's), and this module imports numpy alone, so ``carry`` can rebuild and check
datasets on a machine that has no Megatron.

The format (``megatron/core/datasets/indexed_dataset.py``, ``_IndexWriter``): ``PREFIX.bin`` is the
tokens of every document back to back; ``PREFIX.idx`` is ::

    b"MMIDIDX\\x00\\x00"  <Q 1 (version)  <B dtype code (8: uint16)
    <Q N sequences  <Q N + 1 document indices
    int32[N] sequence lengths  int64[N] byte offsets of the sequences in .bin
    int64[N + 1] document indices 0, 1, ..., N (one sequence per document)

Next to each dataset, ``PREFIX_counts.npy`` holds its token counts (int64, one per vocabulary id),
the convention of ``megatron_locmoe.sim.data`` that the hash router's frequency-balanced map reads.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
DTYPE = np.uint16
DTYPE_CODE = 8
"""Megatron's code for uint16 (``DType.uint16``); ids up to 65535, enough for a 32K vocabulary."""

SUFFIXES = ("_counts.npy", ".bin", ".idx")
"""The files of one dataset, in the order a writer moves them into place (the index last: an
index present means its .bin is complete)."""


class DatasetError(ValueError):
    """A dataset that Megatron would fail on (or silently misread); the message names the file."""


def dataset_files(prefix: str | Path) -> list[Path]:
    """The three files of dataset ``prefix``."""
    return [Path(f"{prefix}{suffix}") for suffix in SUFFIXES]


def index_bytes(lengths: np.ndarray) -> bytes:
    """The ``.idx`` file of documents of these token lengths, byte for byte as Megatron writes it."""
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    pointers = np.zeros(n, dtype=np.int64)
    np.cumsum(lengths[:-1] * DTYPE().itemsize, out=pointers[1:])
    return b"".join(
        [
            INDEX_HEADER,
            struct.pack("<Q", 1),
            struct.pack("<B", DTYPE_CODE),
            struct.pack("<Q", n),
            struct.pack("<Q", n + 1),
            lengths.astype(np.int32).tobytes(),
            pointers.tobytes(),
            np.arange(n + 1, dtype=np.int64).tobytes(),
        ]
    )


class DatasetWriter:
    """Append documents (uint16 token arrays, the end-of-document id included) to ``PREFIX.bin``;
    :meth:`close` writes ``PREFIX.idx`` and ``PREFIX_counts.npy``.

    Files are written under temporary names and renamed into place by :meth:`close`, the index
    last, so an interrupted build never leaves an index that describes a short ``.bin``."""

    def __init__(self, prefix: str | Path, vocab_size: int):
        self.prefix = Path(prefix)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self.vocab_size = vocab_size
        self.lengths: list[int] = []
        self.counts = np.zeros(vocab_size, dtype=np.int64)
        self._bin = open(f"{self.prefix}.bin.tmp", "wb")

    def add(self, documents: Iterable[np.ndarray]) -> None:
        """Append documents; each is one sequence and one document for Megatron."""
        documents = [np.asarray(d, dtype=DTYPE) for d in documents]
        if not documents:
            return
        flat = np.concatenate(documents)
        if flat.size and int(flat.max()) >= self.vocab_size:
            raise DatasetError(
                f"{self.prefix}: token id {int(flat.max())} >= vocabulary size {self.vocab_size}"
            )
        self._bin.write(flat.tobytes())
        self.lengths.extend(len(d) for d in documents)
        self.counts += np.bincount(flat, minlength=self.vocab_size)

    def close(self) -> dict:
        """Finish the dataset; returns ``{"prefix", "documents", "tokens"}``."""
        if not self.lengths:
            self._bin.close()
            os.unlink(self._bin.name)
            raise DatasetError(f"{self.prefix}: no documents to write")
        self._bin.close()
        tmp_idx, tmp_counts = f"{self.prefix}.idx.tmp", f"{self.prefix}_counts.npy.tmp"
        Path(tmp_idx).write_bytes(index_bytes(np.array(self.lengths)))
        with open(tmp_counts, "wb") as f:
            np.save(f, self.counts)
        counts_file, bin_file, idx_file = dataset_files(self.prefix)
        os.replace(tmp_counts, counts_file)
        os.replace(self._bin.name, bin_file)
        os.replace(tmp_idx, idx_file)
        return {
            "prefix": str(self.prefix),
            "documents": len(self.lengths),
            "tokens": int(self.counts.sum()),
        }


def read_lengths(prefix: str | Path) -> np.ndarray:
    """The token length of every document of dataset ``prefix`` (checked by :func:`check_dataset`)."""
    check_dataset(prefix)
    raw = Path(f"{prefix}.idx").read_bytes()
    (n,) = struct.unpack("<Q", raw[18:26])
    return np.frombuffer(raw, dtype=np.int32, count=n, offset=34).astype(np.int64)


MEGATRON_ITEM_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}
"""Bytes per token of every dtype code of Megatron's ``DType`` (uint8 1, int8 2, int16 3, int32 4,
int64 5, float64 6, float32 7, uint16 8), so that any Megatron dataset is checked without Megatron."""


def check_dataset(
    prefix: str | Path, vocab_size: int | None = None, *, whole: bool = True, fix: str = ""
) -> dict:
    """Check ``PREFIX.idx`` / ``PREFIX.bin`` as Megatron's IndexedDataset would read them, before
    any training step: both present, the index's header and sizes sound, the ``.bin`` exactly as
    long as the index says (a truncated copy otherwise fails at the first sample past its end).

    ``whole`` (the datasets :class:`DatasetWriter` writes): the whole index is read: uint16
    tokens, one sequence per document, every byte offset; with ``vocab_size``, every token id is
    checked to be below it (reads the whole ``.bin``). ``whole=False`` (any dataset Megatron
    reads, e.g. ``--data-path``'s, of any token dtype and document layout): O(1) reads, the last
    sequence's end against the ``.bin``'s length. ``fix`` is appended to every message.

    Returns ``{"documents", "tokens"}``; raises :class:`DatasetError` naming the file."""
    fix = f"; {fix}" if fix else ""
    idx, binf = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    for f in (idx, binf):
        if not f.is_file():
            raise DatasetError(f"{f}: no such file (a dataset is PREFIX.bin + PREFIX.idx){fix}")
    with open(idx, "rb") as stream:
        head = stream.read(34)
        if len(head) < 34 or head[:9] != INDEX_HEADER or struct.unpack("<Q", head[9:17])[0] != 1:
            raise DatasetError(f"{idx} is not a Megatron dataset index (header){fix}")
        itemsize = MEGATRON_ITEM_SIZES.get(head[17])
        if itemsize is None:
            raise DatasetError(f"{idx}: unknown token dtype code {head[17]}{fix}")
        n, n_docs = struct.unpack("<QQ", head[18:34])
        need = 34 + n * (4 + 8) + n_docs * 8
        if idx.stat().st_size < need:
            raise DatasetError(
                f"{idx} is truncated: {idx.stat().st_size} bytes, its header needs {need}{fix}"
            )
        if whole:
            raw = head + stream.read()
        elif n:  # only the last sequence's length and pointer: O(1) reads, however large
            stream.seek(34 + (n - 1) * 4)
            (last_length,) = struct.unpack("<i", stream.read(4))
            stream.seek(34 + n * 4 + (n - 1) * 8)
            (last_pointer,) = struct.unpack("<q", stream.read(8))
    if not whole:
        size = last_pointer + last_length * itemsize if n else 0
        if n and binf.stat().st_size != size:
            raise DatasetError(
                f"{binf} holds {binf.stat().st_size} bytes, its index {idx.name} describes "
                f"{size}: the pair does not belong together or a copy is incomplete{fix}"
            )
        return {"documents": max(n_docs - 1, 0), "tokens": size // itemsize}
    if head[17] != DTYPE_CODE:
        raise DatasetError(
            f"{idx}: token dtype code {head[17]}, expected {DTYPE_CODE} (uint16){fix}"
        )
    if len(raw) != need or n_docs != n + 1:
        raise DatasetError(
            f"{idx}: {len(raw)} bytes for {n} sequences and {n_docs} document indices: truncated "
            f"or not one sequence per document{fix}"
        )
    lengths = np.frombuffer(raw, dtype=np.int32, count=n, offset=34).astype(np.int64)
    pointers = np.frombuffer(raw, dtype=np.int64, count=n, offset=34 + 4 * n)
    documents = np.frombuffer(raw, dtype=np.int64, count=n + 1, offset=34 + 12 * n)
    expected = np.zeros(n, dtype=np.int64)
    np.cumsum(lengths[:-1] * 2, out=expected[1:])
    if (lengths <= 0).any() or not np.array_equal(pointers, expected):
        raise DatasetError(f"{idx}: sequence lengths and byte offsets disagree{fix}")
    if not np.array_equal(documents, np.arange(n + 1)):
        raise DatasetError(f"{idx}: document indices are not 0..{n}{fix}")
    tokens = int(lengths.sum())
    if binf.stat().st_size != 2 * tokens:
        raise DatasetError(
            f"{binf} holds {binf.stat().st_size} bytes, its index {idx.name} describes "
            f"{2 * tokens}: the pair does not belong together or a copy is incomplete{fix}"
        )
    if vocab_size is not None and tokens:
        top = int(np.memmap(binf, dtype=DTYPE, mode="r").max())
        if top >= vocab_size:
            raise DatasetError(f"{binf}: token id {top} >= vocabulary size {vocab_size}{fix}")
    return {"documents": int(n), "tokens": tokens}


def concatenate(prefix: str | Path, parts: list[str | Path], vocab_size: int) -> dict:
    """Write dataset ``prefix`` as the documents of datasets ``parts`` one after the other (the
    mixture control), reading their ``.bin`` files in blocks; counts are the parts' summed."""
    prefix = Path(prefix)
    lengths = [read_lengths(p) for p in parts]
    counts = sum(np.load(f"{p}_counts.npy") for p in parts)
    if len(counts) != vocab_size:
        raise DatasetError(f"{parts[0]}_counts.npy has {len(counts)} ids, expected {vocab_size}")
    tmp = Path(f"{prefix}.bin.tmp")
    with open(tmp, "wb") as out:
        for p in parts:
            with open(f"{p}.bin", "rb") as f:
                while block := f.read(1 << 24):
                    out.write(block)
    all_lengths = np.concatenate(lengths)
    Path(f"{prefix}.idx.tmp").write_bytes(index_bytes(all_lengths))
    with open(f"{prefix}_counts.npy.tmp", "wb") as f:
        np.save(f, counts)
    counts_file, bin_file, idx_file = dataset_files(prefix)
    os.replace(f"{prefix}_counts.npy.tmp", counts_file)
    os.replace(tmp, bin_file)
    os.replace(f"{prefix}.idx.tmp", idx_file)
    return {"prefix": str(prefix), "documents": len(all_lengths), "tokens": int(counts.sum())}
