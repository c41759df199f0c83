"""Carry the tokenized corpus to a GPU machine that reaches no registry, in parts of <= 56 MiB.

One device call carries at most 64 MiB of working tree, and the machine's ``/tmp`` lasts while it
is held; so, like ``tools/te_env.sh`` for Transformer Engine, the data travels in parts, one part
a call, staged in ``/tmp`` there and joined when all have arrived::

    here   python -m megatron_locmoe.data.carry pack --data data/realtext --out .data_parts
               [--datasets all | mixture | DOMAIN ...]
           -> .data_parts/carry.json (what is in the parts, every checksum) and
              .data_parts/realtext.partNNN; it prints the device calls, one per part
    there  python -m megatron_locmoe.data.carry stage      (each call: copy the part it carried
               to /tmp/data_stage, checking its sha256)
    there  python -m megatron_locmoe.data.carry unpack     (all parts staged: write the datasets
               to /tmp/realtext, check every file's sha256 and every .bin/.idx whole)

What travels: each dataset's ``.bin``, ``.idx`` and ``_counts.npy``, ``all_counts.npy``, the
tokenizer and ``build.json``, each compressed with xz (LZMA preset 6, blocks of 64 MiB on every
core); measured on the corpus: token files shrink about 2.5x (C code 4.7x, classical Chinese
1.8x), which turns ten raw parts into four, at about two minutes of compression on two cores,
decompression at ~50 MB/s a core (docs/corpus.md). The mixture control is not carried: it is the
domains' documents one after the other, so ``unpack`` writes it again from the domains and checks
it against the sha256 recorded here. So ``--datasets mixture`` carries what ``all`` does.

``--sample F`` carries an evenly spaced fraction F of every domain's training documents
(document i is kept when floor((i + 1) F) > floor(i F)), held-out sets whole, the mixture made of
the sampled domains, and ``carry.json`` says so: for a lease too short to carry the whole corpus
(the study's runs read about 5% of it; ``--sample 0.15`` travels in one call with the code).

The GPU machine has Python, numpy and torch but neither Megatron nor ``transformers``: this module
imports the standard library and numpy alone (and ``indexed``, which is numpy alone), and the
corpus is read there with ``--tokenizer-type NullTokenizer --vocab-size 32768``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

try:  # run as ``python -m megatron_locmoe.data.carry`` or as a file path
    from megatron_locmoe.data import indexed
except ImportError:  # pragma: no cover - ``python megatron_locmoe/data/carry.py``
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from megatron_locmoe.data import indexed

FORMAT = 1
PART_BYTES = 56 << 20
BLOCK_BYTES = 64 << 20
PRESET = 6
BUNDLE = "realtext"
INDEX = "carry.json"
STAGE = Path("/tmp/data_stage")
UNPACKED = Path("/tmp/realtext")


class CarryError(RuntimeError):
    """Something missing or damaged; the message says which part or file, and what to do."""


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# pack (here)


def _selection(build: dict, datasets: list[str] | None) -> tuple[list[str], bool]:
    """The domains to carry and whether the mixture can be written from them."""
    domains = build["domains"]
    if not datasets or datasets == ["all"] or datasets == ["mixture"]:
        return list(domains), True
    unknown = [d for d in datasets if d not in domains and d != "mixture"]
    if unknown:
        raise CarryError(
            f"--datasets {' '.join(unknown)}: not in this corpus; choose from all, mixture, "
            + " ".join(domains)
        )
    if "mixture" in datasets:
        return list(domains), True
    return [d for d in domains if d in datasets], False


def _files(data: Path, domains: list[str]) -> list[Path]:
    """The files that travel, in a fixed order: datasets, hash-router counts, tokenizer, build."""
    files = []
    for name in domains:
        for prefix in (name, f"{name}_valid"):
            files += indexed.dataset_files(data / prefix)
    files.append(data / "all_counts.npy")
    files += sorted((data / "tokenizer").glob("*"))
    files.append(data / "build.json")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CarryError(f"{data} lacks {', '.join(missing)}: build the corpus first")
    return files


class _PartWriter:
    """Writes one byte stream as ``BUNDLE.partNNN`` files of at most ``part_bytes`` each."""

    def __init__(self, out: Path, part_bytes: int):
        self.out, self.part_bytes = out, part_bytes
        self.parts: list[dict] = []
        self.offset = 0
        self._file = None

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._file is None or self._file.tell() == self.part_bytes:
                self._roll()
            room = self.part_bytes - self._file.tell()
            chunk, view = view[:room], view[room:]
            self._file.write(chunk)
            self._digest.update(chunk)
            self.offset += len(chunk)

    def _roll(self) -> None:
        self._finish()
        name = f"{BUNDLE}.part{len(self.parts):03d}"
        self._file = open(self.out / name, "wb")
        self._digest = hashlib.sha256()
        self.parts.append({"name": name})

    def _finish(self) -> None:
        if self._file is not None:
            self.parts[-1].update(bytes=self._file.tell(), sha256=self._digest.hexdigest())
            self._file.close()
            self._file = None

    def close(self) -> list[dict]:
        self._finish()
        return self.parts


def _compress_block(args: tuple[Path, int, int, int]) -> tuple[bytes, int]:
    path, offset, length, preset = args
    with open(path, "rb") as f:
        f.seek(offset)
        raw = f.read(length)
    return lzma.compress(raw, preset=preset), len(raw)


def sample_documents(src: str | Path, dst: str | Path, fraction: float, vocab_size: int) -> dict:
    """Write dataset ``dst`` from an evenly spaced ``fraction`` of dataset ``src``'s documents
    (document i kept when floor((i + 1) fraction) > floor(i fraction)), in order."""
    lengths = indexed.read_lengths(src)
    n = len(lengths)
    i = np.arange(n)
    keep = np.flatnonzero(np.floor((i + 1) * fraction) > np.floor(i * fraction))
    if not len(keep):
        raise CarryError(f"{src}: {n} documents; --sample {fraction} keeps none of them")
    tokens = np.memmap(f"{src}.bin", dtype=np.uint16, mode="r")
    starts = np.concatenate([[0], np.cumsum(lengths)])
    writer = indexed.DatasetWriter(dst, vocab_size)
    for block in np.array_split(keep, max(1, len(keep) // 4096)):
        writer.add(tokens[starts[k] : starts[k + 1]] for k in block)
    return writer.close()


def pack(
    data: str | Path,
    out: str | Path,
    datasets: list[str] | None = None,
    part_bytes: int = PART_BYTES,
    preset: int = PRESET,
    block_bytes: int = BLOCK_BYTES,
    threads: int | None = None,
    sample: float | None = None,
) -> dict:
    """Compress the selected datasets of corpus ``data`` into parts in ``out``; returns the index
    (also written to ``out/carry.json``). Old parts in ``out`` are removed first. ``sample``:
    carry that fraction of every domain's training documents (see the module doc)."""
    if sample is not None and not 0 < sample < 1:
        raise CarryError(f"--sample {sample}: give a fraction in (0, 1), or leave it out")
    data, out = Path(data), Path(out)
    build_file = data / "build.json"
    if not build_file.is_file():
        raise CarryError(
            f"{build_file}: no such file; build the corpus first "
            f"(python -m megatron_locmoe.data.corpus --out {data})"
        )
    if not 0 < part_bytes <= PART_BYTES:
        raise CarryError(
            f"parts of {part_bytes} bytes: at most {PART_BYTES >> 20} MiB travel in a call"
        )
    build = json.loads(build_file.read_text())
    domains, with_mixture = _selection(build, datasets)
    files = _files(data, domains)
    if out.exists() and not out.is_dir():
        raise CarryError(f"--out {out} is a file: give a directory")
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob(f"{BUNDLE}.part*"), out / INDEX]:
        old.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as scratch:
        read = {f: f for f in files}  # what is carried as each file: itself or its sample
        if sample is not None:
            for name in domains:
                sample_documents(data / name, Path(scratch) / name, sample, build["vocab_size"])
                for f in indexed.dataset_files(data / name):
                    read[f] = Path(scratch) / f.name
        index = _pack_files(data, out, files, read, part_bytes, preset, block_bytes, threads)
        index.update(domains=domains, vocab_size=build["vocab_size"], eod=build["eod"])
        index["sample"] = sample
        if with_mixture:
            for name, suffix in (("mixture", ""), ("mixture_valid", "_valid")):
                if sample is None or suffix:
                    source = data / name
                else:  # the sampled domains, one after the other, as unpack writes it
                    source = Path(scratch) / name
                    parts = [Path(scratch) / d for d in domains]
                    indexed.concatenate(source, parts, build["vocab_size"])
                index["derived"][name] = {
                    "from": [f"{d}{suffix}" for d in domains],
                    "sha256": {p.name: _sha256_file(p) for p in indexed.dataset_files(source)},
                }
    (out / INDEX).write_text(json.dumps(index, indent=1) + "\n")
    return index


def _pack_files(data, out, files, read, part_bytes, preset, block_bytes, threads) -> dict:
    """Compress ``read[f]`` for every file ``f`` (named as ``f`` in ``data``) into the parts."""
    tasks, owners = [], []
    for f in files:
        size = read[f].stat().st_size
        for offset in range(0, max(size, 1), block_bytes):
            tasks.append((read[f], offset, min(block_bytes, size - offset), preset))
            owners.append(f)
    writer = _PartWriter(out, part_bytes)
    entries: dict[Path, dict] = {
        f: {"name": f.relative_to(data).as_posix(), "bytes": read[f].stat().st_size, "blocks": []}
        for f in files
    }
    with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
        for owner, (compressed, raw_length) in zip(
            owners, pool.map(_compress_block, tasks), strict=True
        ):
            entries[owner]["blocks"].append([writer.offset, len(compressed), raw_length])
            writer.write(compressed)
    parts = writer.close()
    for f in files:
        entries[f]["sha256"] = _sha256_file(read[f])
    return {
        "format": FORMAT,
        "bundle": BUNDLE,
        "source": str(data),
        "compression": f"xz-{preset}",
        "raw_bytes": sum(e["bytes"] for e in entries.values()),
        "stream_bytes": writer.offset,
        "files": list(entries.values()),
        "derived": {},
        "parts": parts,
    }


def device_calls(
    index: dict, parts_dir: str, stage: Path = STAGE, unpacked: Path = UNPACKED
) -> list[dict]:
    """The device calls that carry the parts: one per part (``carry`` = the index and that part),
    the last one also unpacking."""
    calls = []
    for k, part in enumerate(index["parts"]):
        command = "python3 -m megatron_locmoe.data.carry stage"
        if parts_dir != ".data_parts":
            command += f" --parts {parts_dir}"
        if stage != STAGE:
            command += f" --stage {stage}"
        if k == len(index["parts"]) - 1:
            command += " && python3 -m megatron_locmoe.data.carry unpack"
            if unpacked != UNPACKED:
                command += f" --out {unpacked}"
        calls.append(
            {"carry": [f"{parts_dir}/{INDEX}", f"{parts_dir}/{part['name']}"], "command": command}
        )
    return calls


# ---------------------------------------------------------------------------------------------
# stage and unpack (there)


def _load_index(folder: Path) -> dict:
    path = folder / INDEX
    if not path.is_file():
        raise CarryError(
            f"{path}: no such file; carry {INDEX} with the parts (it travels in every call)"
        )
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT:
        raise CarryError(f"{path}: format {index.get('format')}, this code reads {FORMAT}")
    return index


def stage(parts: str | Path, stage_dir: str | Path = STAGE) -> dict:
    """Copy the index and whatever parts this call carried from ``parts`` to ``stage_dir``,
    checking each part's sha256. Returns ``{"staged": [...], "missing": [...]}`` for the whole
    bundle; a new bundle (another index) clears the stage first."""
    parts, stage_dir = Path(parts), Path(stage_dir)
    index = _load_index(parts)
    stage_dir.mkdir(parents=True, exist_ok=True)
    if (stage_dir / INDEX).is_file() and _load_index(stage_dir) != index:
        for old in stage_dir.glob(f"{BUNDLE}.part*"):
            old.unlink()
    shutil.copyfile(parts / INDEX, stage_dir / INDEX)
    copied = []
    for part in index["parts"]:
        source, target = parts / part["name"], stage_dir / part["name"]
        if target.is_file() or not source.is_file():
            continue
        if source.stat().st_size != part["bytes"] or _sha256_file(source) != part["sha256"]:
            raise CarryError(
                f"{source}: damaged in transit (size or sha256 differs): carry it again"
            )
        shutil.copyfile(source, f"{target}.tmp")
        os.replace(f"{target}.tmp", target)
        copied.append(part["name"])
    staged = [p["name"] for p in index["parts"] if (stage_dir / p["name"]).is_file()]
    missing = [p["name"] for p in index["parts"] if p["name"] not in staged]
    return {"copied": copied, "staged": staged, "missing": missing}


class _Stream:
    """The staged parts read as one byte stream (offsets of ``carry.json``)."""

    def __init__(self, folder: Path, parts: list[dict]):
        self.folder, self.parts = folder, parts
        self.starts = [0]
        for p in parts:
            self.starts.append(self.starts[-1] + p["bytes"])

    def read(self, offset: int, length: int) -> bytes:
        chunks = []
        for k, p in enumerate(self.parts):
            lo, hi = self.starts[k], self.starts[k + 1]
            if hi <= offset or lo >= offset + length:
                continue
            with open(self.folder / p["name"], "rb") as f:
                f.seek(max(offset - lo, 0))
                chunks.append(f.read(min(hi, offset + length) - max(offset, lo)))
        return b"".join(chunks)


def unpack(
    stage_dir: str | Path = STAGE, out: str | Path = UNPACKED, threads: int | None = None
) -> dict:
    """Join the staged parts into the corpus in ``out``: every part's and every file's sha256
    checked, the mixture written again from the domains and checked, every dataset checked whole.
    Returns ``{"datasets": {prefix: {"documents", "tokens"}}, "out": ...}``."""
    stage_dir, out = Path(stage_dir), Path(out)
    index = _load_index(stage_dir)
    missing = [p["name"] for p in index["parts"] if not (stage_dir / p["name"]).is_file()]
    if missing:
        raise CarryError(
            f"{len(missing)} of {len(index['parts'])} parts not staged in {stage_dir}: "
            f"{', '.join(missing)}; carry each (with {INDEX}) and run `stage` first"
        )
    for p in index["parts"]:
        if _sha256_file(stage_dir / p["name"]) != p["sha256"]:
            raise CarryError(
                f"{stage_dir / p['name']}: sha256 differs from {INDEX}: carry it again"
            )
    out.mkdir(parents=True, exist_ok=True)
    stream = _Stream(stage_dir, index["parts"])

    def decompress(block):
        offset, length, raw_length = block
        raw = lzma.decompress(stream.read(offset, length))
        if len(raw) != raw_length:
            raise CarryError(f"a block at stream offset {offset} decompresses to the wrong size")
        return raw

    with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
        for entry in index["files"]:
            target = out / entry["name"]
            target.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256()
            with open(f"{target}.tmp", "wb") as f:
                for raw in pool.map(decompress, entry["blocks"]):
                    f.write(raw)
                    digest.update(raw)
            if digest.hexdigest() != entry["sha256"]:
                raise CarryError(f"{entry['name']}: sha256 after unpacking differs from {INDEX}")
            os.replace(f"{target}.tmp", target)
    for name, recipe in index["derived"].items():
        indexed.concatenate(out / name, [out / p for p in recipe["from"]], index["vocab_size"])
        for file_name, sha in recipe["sha256"].items():
            if _sha256_file(out / file_name) != sha:
                raise CarryError(f"{out / file_name}: rebuilt from the domains, its sha256 differs")
    shutil.copyfile(stage_dir / INDEX, out / INDEX)
    return {"out": str(out), "datasets": check(out, index["vocab_size"])}


def check(data: str | Path, vocab_size: int | None = None) -> dict:
    """Every dataset in ``data`` whole (``indexed.check_dataset``: index sound, ``.bin`` as long as
    it says, token ids below the vocabulary) and, where ``carry.json`` lies there, every file's
    sha256 as packed. Returns ``{prefix: {"documents", "tokens"}}``."""
    data = Path(data)
    index = json.loads((data / INDEX).read_text()) if (data / INDEX).is_file() else None
    if index is not None:
        vocab_size = vocab_size or index["vocab_size"]
        for entry in index["files"]:
            path = data / entry["name"]
            if not path.is_file() or _sha256_file(path) != entry["sha256"]:
                raise CarryError(
                    f"{path}: missing or its sha256 differs from {INDEX}; unpack again"
                )
    prefixes = sorted(p.with_suffix("") for p in data.glob("*.idx"))
    if not prefixes:
        raise CarryError(f"{data}: no datasets (*.idx) there")
    return {p.name: indexed.check_dataset(p, vocab_size) for p in prefixes}


# ---------------------------------------------------------------------------------------------
# command line


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_locmoe.data.carry", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("pack", help="here: compress the corpus into parts of <= 56 MiB")
    p.add_argument("--data", default="data/realtext")
    p.add_argument("--out", default=".data_parts")
    p.add_argument("--datasets", nargs="+", help="all (default), mixture, or domain names")
    p.add_argument("--part-mib", type=float, default=PART_BYTES / (1 << 20))
    p.add_argument("--preset", type=int, default=PRESET, help="xz preset 0-9")
    p.add_argument(
        "--sample", type=float, help="carry this fraction of each domain's training documents"
    )
    p = sub.add_parser("stage", help="there: copy the parts this call carried to the stage")
    p.add_argument("--parts", default=".data_parts")
    p.add_argument("--stage", default=str(STAGE))
    p = sub.add_parser("unpack", help="there: join the staged parts, check, write the datasets")
    p.add_argument("--stage", default=str(STAGE))
    p.add_argument("--out", default=str(UNPACKED))
    p = sub.add_parser("check", help="check every dataset of a directory whole")
    p.add_argument("--data", default=str(UNPACKED))
    args = parser.parse_args(argv)
    try:
        if args.verb == "pack":
            part_bytes = int(args.part_mib * (1 << 20))
            if not 0 < part_bytes <= PART_BYTES:
                raise CarryError(f"--part-mib {args.part_mib}: parts must be > 0 and <= 56 MiB")
            if not 0 <= args.preset <= 9:
                raise CarryError(f"--preset {args.preset}: xz presets are 0 to 9")
            index = pack(
                args.data, args.out, args.datasets, part_bytes, args.preset, sample=args.sample
            )
            sampled = (
                ""
                if args.sample is None
                else f" (sample {args.sample:g} of the training documents)"
            )
            print(
                f"{len(index['files'])} files{sampled}, {_mib(index['raw_bytes'])} -> {_mib(index['stream_bytes'])} "
                f"({index['compression']}) in {len(index['parts'])} parts in {args.out}/"
            )
            out = Path(args.out)
            if out.is_absolute() or ".." in out.parts:
                print(f"note: a device call carries paths inside the repository; {out} is not one")
            print("device calls, one after another (the machine's /tmp lasts while it is held):")
            for k, call in enumerate(device_calls(index, out.as_posix())):
                print(
                    f"  {k + 1}. run(carry={json.dumps(call['carry'])}, command={call['command']!r})"
                )
        elif args.verb == "stage":
            result = stage(args.parts, args.stage)
            print(
                f"staged {len(result['staged'])} of {len(result['staged']) + len(result['missing'])} parts "
                f"in {args.stage} (this call: {', '.join(result['copied']) or 'none new'})"
            )
            if result["missing"]:
                print(f"still to carry: {', '.join(result['missing'])}")
        elif args.verb == "unpack":
            result = unpack(args.stage, args.out)
            tokens = sum(s["tokens"] for s in result["datasets"].values())
            print(f"{len(result['datasets'])} datasets whole in {args.out} ({tokens:,} tokens):")
            for name, s in result["datasets"].items():
                print(f"  {name:20s} {s['documents']:>9,} documents {s['tokens']:>12,} tokens")
            index = _load_index(Path(args.out))
            print(
                f"train with --data-path {args.out}/mixture (or per-node domains) "
                f"--tokenizer-type NullTokenizer --vocab-size {index['vocab_size']}"
            )
        else:
            result = check(args.data)
            print(f"{len(result)} datasets whole in {args.data}")
    except (CarryError, indexed.DatasetError, OSError, json.JSONDecodeError) as e:
        print(f"carry: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
