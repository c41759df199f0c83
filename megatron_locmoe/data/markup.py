"""Plain text out of the markup that packages ship: man pages (roff), HTML, the Brown corpus's
word/TAG pairs, e-mail, terminal colour codes; and the filter that keeps real source files.

A model trained on the corpus should see prose and code, not typesetting requests, so each
format is reduced to the text a reader sees (the rules are ``../shared/CORPUS.md``'s, measured on
these packages): roff request lines go, the text arguments of the font and heading macros stay,
escapes become the characters they print; HTML keeps its text without scripts, styles, the head
and navigation; code files are kept only when they look written by people (200 B to 200 kB, not
minified, no line over 1,000 characters near the top, valid UTF-8).
"""

from __future__ import annotations

import email
import email.policy
import re
from html.parser import HTMLParser

# ---------------------------------------------------------------------------------------------
# roff (man pages)

_SPECIAL = {
    "em": "—",
    "en": "–",
    "bu": "•",
    "aq": "'",
    "dq": '"',
    "lq": "“",
    "rq": "”",
    "oq": "‘",
    "cq": "’",
    "co": "©",
    "rg": "®",
    "tm": "™",
    "hy": "-",
    "mi": "-",
    "pl": "+",
    "ti": "~",
    "ha": "^",
    "rs": "\\",
    "sl": "/",
    "ba": "|",
    "br": "|",
    "ul": "_",
    "ru": "_",
    "<=": "≤",
    ">=": "≥",
    "!=": "≠",
    "==": "≡",
    "mu": "×",
    "di": "÷",
    "de": "°",
    "+-": "±",
    "ga": "`",
    "aa": "´",
    "->": "→",
    "<-": "←",
    "ua": "↑",
    "da": "↓",
    "Fo": "«",
    "Fc": "»",
    "fo": "‹",
    "fc": "›",
    "sq": "□",
    "ss": "ß",
    "ct": "¢",
    "Po": "£",
    "Ye": "¥",
    "Eu": "€",
    "eu": "€",
    "ps": "¶",
    "sc": "§",
    "dg": "†",
    "lh": "☜",
    "rh": "☞",
    "pc": "·",
    "at": "@",
    "sh": "#",
    "Do": "$",
    "bs": "\\",
    "tno": "~",
    "ti~": "~",
}
_STRINGS = {"lq": "“", "rq": "”", "R": "®", "Tm": "™", "Lq": "“", "Rq": "”", "aq": "'"}
_ESCAPE = re.compile(
    r"""\\(?:
        (?P<comment>["\#].*$)                                  # \" comment to the end of line
      | f(?:\[[^\]]*\]|\(..|.)                               # font change
      | s(?:\[[^\]]*\]|\(\d\d|[+-]?\d)                       # size change
      | n(?:\[[^\]]*\]|\(..|.)                               # number register
      | [hvwXNDlLRbox]'[^']*'                                # motions, widths, device controls
      | \((?P<special2>..)                                   # \(xx special character
      | \[(?P<special>[^\]]*)\]                              # \[name] special character
      | \*(?:\[(?P<string>[^\]]*)\]|\((?P<string2>..)|(?P<string1>.))  # predefined strings
      | (?P<space>[\ ~0])                                    # unbreakable spaces
      | (?P<minus>-)
      | (?P<backslash>[e\\])
      | (?P<acute>')
      | (?P<grave>`)
      | [&|^%c:/,{})udtpk]                                   # zero-width controls
      | (?P<other>.)
    )""",
    re.VERBOSE,
)


def _unescape_match(m: re.Match) -> str:
    if m.group("comment") is not None:
        return ""
    special = m.group("special2") or m.group("special")
    if special is not None:
        if special.startswith("u") and re.fullmatch(r"u[0-9A-Fa-f]{4,6}", special):
            return chr(int(special[1:], 16))
        return _SPECIAL.get(special, "")
    string = m.group("string") or m.group("string2") or m.group("string1")
    if string is not None:
        return _STRINGS.get(string, "")
    if m.group("space"):
        return " "
    if m.group("minus"):
        return "-"
    if m.group("backslash"):
        return "\\"
    if m.group("acute"):
        return "´"
    if m.group("grave"):
        return "`"
    return m.group("other") or ""


def roff_unescape(text: str) -> str:
    """A roff text line with its escapes replaced by what they print."""
    return _ESCAPE.sub(_unescape_match, text)


_ARG = re.compile(r'"((?:[^"]|"")*)"?|(\S+)')
_FONT_ALTERNATING = {"BR", "BI", "IB", "IR", "RB", "RI"}
_FONT_SINGLE = {"B", "I", "SB", "SM", "UR", "MT"}
_HEADINGS = {"SH", "SS", "Sh", "Ss"}
_PARAGRAPH = {"PP", "LP", "P", "sp", "TP", "IP", "HP", "Pp", "Lp", "Bl", "El", "Bd", "Ed", "TQ"}
_BREAK = {"br", "RS", "RE", "in", "ti", "nf", "fi", "EX", "EE", "TH", "Dd", "Dt", "Os", "ne"}
_MDOC_INLINE = {
    "Nm",
    "Nd",
    "Fl",
    "Ar",
    "Pa",
    "Xr",
    "Op",
    "Em",
    "Sy",
    "Cm",
    "Dv",
    "Er",
    "Ev",
    "Fn",
    "Fa",
    "Ft",
    "Va",
    "Li",
    "Ql",
    "Dq",
    "Sq",
    "Pq",
    "Aq",
    "Ic",
    "It",
    "Ux",
    "Bx",
    "At",
    "An",
    "Lb",
    "In",
    "Fd",
    "Vt",
    "St",
    "Ad",
    "Ms",
    "Tn",
    "No",
    "Ns",
    "Qq",
    "D1",
    "Dl",
}
_SKIP_BLOCK = {"de", "de1", "am", "ig", "ds"}


def _args(rest: str) -> list[str]:
    return [
        m.group(1).replace('""', '"') if m.group(1) is not None else m.group(2)
        for m in _ARG.finditer(rest)
    ]


def man_to_text(source: str) -> str:
    """The text a reader sees in a man page (man or mdoc macros): headings and paragraphs kept,
    requests and macro definitions dropped, font and heading macros' arguments kept, lines of a
    paragraph joined (no-fill blocks such as synopses keep their lines)."""
    source = re.sub(r"\\\n", "", source)  # escaped newlines continue the line
    lines: list[str] = []
    words: list[str] = []
    fill, skip_until, tag_next = True, None, False  # tag_next: after .TP, the tag's own line

    def flush():
        if words:
            lines.append(" ".join(w for w in words if w))
            words.clear()

    for raw in source.split("\n"):
        if skip_until is not None:
            if raw.strip() == skip_until:
                skip_until = None
            continue
        if raw[:1] in (".", "'"):
            request = raw[1:].strip()
            if not request or request.startswith(('\\"', "\\#")):
                continue
            name, _, rest = request.partition(" ")
            if name in _SKIP_BLOCK:
                if name != "ds":
                    skip_until = ".."
                continue
            args = [roff_unescape(a) for a in _args(rest)]
            if name in _HEADINGS:
                flush()
                lines.extend(["", " ".join(args)])
            elif name in _FONT_ALTERNATING or name in _FONT_SINGLE or name in _MDOC_INLINE:
                if name == "Xr" and len(args) >= 2:
                    args = [f"{args[0]}({args[1]})", *args[2:]]
                joiner = "" if name in _FONT_ALTERNATING else " "
                words.append(joiner.join(a for a in args if a not in _MDOC_INLINE))
                if not fill or tag_next:
                    flush()
                    tag_next = False
            elif name in _PARAGRAPH:
                flush()
                lines.append("")
                tag_next = name in ("TP", "TQ")
                if name == "IP" and args:
                    lines.append(args[0])
            elif name in _BREAK:
                flush()
                fill = {"nf": False, "EX": False, "fi": True, "EE": True}.get(name, fill)
            continue  # any other request: dropped
        text = roff_unescape(raw)
        if fill and not tag_next:
            words.append(text.strip())
        else:
            tag_next = False
            flush()
            lines.append(text)
    flush()
    return _tidy("\n".join(lines))


def _tidy(text: str) -> str:
    """Trailing spaces off, at most one blank line in a row, no blank start or end."""
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# ---------------------------------------------------------------------------------------------
# HTML

_BLOCK_TAGS = {
    "p",
    "div",
    "br",
    "li",
    "ul",
    "ol",
    "dl",
    "dt",
    "dd",
    "tr",
    "table",
    "pre",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "title",
    "section",
    "article",
    "blockquote",
    "hr",
    "figure",
    "figcaption",
}
_SKIP_TAGS = {"script", "style", "head", "nav"}
_SKIP_CLASSES = {"navheader", "navfooter", "docnav"}  # DocBook/Publican's previous/next links
_SKIP_IDS = {"banner", "title"}  # Publican's page banner (debian-handbook)


class _HTMLText(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip: list[str] = []  # open tags whose content is skipped (nesting of that tag)
        self.pre = 0

    def handle_starttag(self, tag, attrs):
        if self.skip:
            if tag == self.skip[0]:
                self.skip.append(tag)
            return
        attrs = dict(attrs)
        classes = set((attrs.get("class") or "").split())
        if tag in _SKIP_TAGS or classes & _SKIP_CLASSES or attrs.get("id") in _SKIP_IDS:
            self.skip.append(tag)
            return
        if tag == "pre":
            self.pre += 1
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_startendtag(self, tag, attrs):
        if not self.skip and tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if self.skip:
            if tag == self.skip[0]:
                self.skip.pop()
            return
        if tag == "pre":
            self.pre = max(self.pre - 1, 0)
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data):
        if self.skip:
            return
        if not self.pre:
            data = re.sub(r"\s+", " ", data)
            if not self.parts or self.parts[-1].endswith("\n"):
                data = data.lstrip(" ")
        self.parts.append(data)


def html_to_text(source: str) -> str:
    """The visible text of an HTML page (the standard library's parser; scripts, styles, the head,
    navigation and DocBook's navigation bars skipped; block elements start new lines)."""
    parser = _HTMLText()
    parser.feed(source)
    parser.close()
    return _tidy("".join(parser.parts))


# ---------------------------------------------------------------------------------------------
# Other formats


def brown_to_text(source: str) -> str:
    """A Brown corpus file without its part-of-speech tags (``The/at jury/nn`` -> ``The jury``):
    one sentence a line."""
    sentences = []
    for line in source.split("\n"):
        words = [w.rsplit("/", 1)[0] for w in line.split()]
        if words:
            sentences.append(" ".join(words))
    return "\n".join(sentences)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def strip_ansi(text: str) -> str:
    """Text without terminal colour codes (fortunes-zh colours its attributions)."""
    return _ANSI.sub("", text)


def email_to_text(raw: bytes) -> str:
    """An e-mail as its subject line and body text (plain-text parts, else HTML parts as text,
    each decoded by its declared charset); routing headers dropped. A mail the parser rejects
    keeps the text after its headers."""
    try:
        message = email.message_from_bytes(raw, policy=email.policy.default)
        subject = str(message.get("subject", "") or "").strip()
        plain, html = [], []
        for part in message.walk():
            kind = part.get_content_type()
            if kind in ("text/plain", "text/html") and not part.is_attachment():
                try:
                    content = part.get_content()
                except (LookupError, ValueError, AssertionError):
                    content = (part.get_payload(decode=True) or b"").decode("latin-1")
                (plain if kind == "text/plain" else html).append(content)
        body = "\n\n".join(plain) if plain else "\n\n".join(html_to_text(h) for h in html)
    except Exception:  # noqa: BLE001 - malformed mail: fall back to the raw body
        text = raw.decode("latin-1")
        head, _, body = text.partition("\n\n")
        match = re.search(r"^Subject:(.*)$", head, re.MULTILINE | re.IGNORECASE)
        subject = match.group(1).strip() if match else ""
    body = _tidy(body.replace("\r\n", "\n"))
    return f"Subject: {subject}\n\n{body}" if subject else body


# ---------------------------------------------------------------------------------------------
# Code

CODE_MIN_BYTES = 200
CODE_MAX_BYTES = 200_000
CODE_MAX_LINE = 1000
CODE_HEAD_LINES = 50


def code_text(path: str, data: bytes) -> str | None:
    """The source file as text, or None when it is not hand-written code worth training on:
    outside 200 B - 200 kB, minified (``*.min.*``), a line over 1,000 characters among the first
    50 (generated tables, bundles), or not valid UTF-8."""
    if not CODE_MIN_BYTES <= len(data) <= CODE_MAX_BYTES or ".min." in path.rsplit("/", 1)[-1]:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    head = text.split("\n", CODE_HEAD_LINES)[:CODE_HEAD_LINES]
    if any(len(line) > CODE_MAX_LINE for line in head):
        return None
    return text
