"""Plain text out of the formats that Debian packages ship: HTML, roff (man pages), GNU info, dictd
dictionaries; plus the normalisation and document chunking the corpus uses. Standard library only.

Every function here is a pure function of its input, so the corpus build is deterministic.
"""

import html
import html.parser
import re
import unicodedata

# --------------------------------------------------------------------------------------------------
# normalisation and chunking

_CTRL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_TRAIL = re.compile(r"[ \t]+\n")
_BLANKS = re.compile(r"\n{3,}")
_WS = re.compile(r"\s+")


def decode(data):
    """bytes -> str: UTF-8 when it is valid, else Latin-1 (old man pages and TeX files)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def normalise(text):
    """NFC, Unix newlines, no control characters but tab and newline, no trailing blanks, at most one
    blank line in a row, no leading or trailing blank lines."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _CTRL.sub("", text)
    text = _TRAIL.sub("\n", text + "\n")
    text = _BLANKS.sub("\n\n", text)
    return text.strip("\n") + "\n" if text.strip() else ""


def dedup_key(text):
    """The exact-duplicate key: the text with every run of white space made one space."""
    return _WS.sub(" ", text).strip()


def chunk(text, max_chars=65536, part_chars=32768):
    """A text longer than max_chars is cut into parts of at most part_chars characters, at blank lines
    where it can (then at line ends, then anywhere). Returns a list of texts."""
    if len(text) <= max_chars:
        return [text]
    parts, cur, size = [], [], 0

    def flush():
        nonlocal cur, size
        if cur:
            parts.append("".join(cur))
        cur, size = [], 0

    def pieces(t, seps):
        if len(t) <= part_chars:
            yield t
            return
        if not seps:
            for i in range(0, len(t), part_chars):
                yield t[i : i + part_chars]
            return
        sep, rest = seps[0], seps[1:]
        bits = t.split(sep)
        for i, b in enumerate(bits):
            b = b + sep if i < len(bits) - 1 else b
            yield from pieces(b, rest)

    for p in pieces(text, ["\n\n", "\n"]):
        if size + len(p) > part_chars:
            flush()
        cur.append(p)
        size += len(p)
    flush()
    return [normalise(p) for p in parts if p.strip()]


# --------------------------------------------------------------------------------------------------
# HTML

_BLOCK = {
    "p",
    "div",
    "br",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "li",
    "tr",
    "pre",
    "table",
    "dt",
    "dd",
    "dl",
    "ul",
    "ol",
    "blockquote",
    "section",
    "hr",
    "article",
    "header",
    "footer",
    "title",
    "caption",
    "figure",
    "figcaption",
    "tbody",
    "thead",
}
_HEAD = {"h1", "h2", "h3", "h4", "h5", "h6", "title"}
_VOID = {"br", "hr", "img", "meta", "link", "input", "area", "base", "col", "embed", "param", "source", "track", "wbr"}
_SKIP_TAGS = {"script", "style", "nav", "noscript", "svg", "math", "button", "form", "select", "aside", "footer"}
# navigation bars and footers of the generators these packages use (DocBook, Sphinx, texi2html,
# makeinfo, GAPDoc)
_SKIP_CLASSES = {
    "navheader",
    "navfooter",
    "nav-panel",
    "navigation",
    "related",
    "sphinxsidebar",
    "footer",
    "header",
    "chlinktop",
    "chlinkprevnexttop",
    "chlinkprevnextbot",
    "chlinkbot",
    "copy_link",
    "toc",
    "contents",
    "mjx-chtml",
    "MathJax_Preview",
    "headerlink",
    "viewcode-link",
    "viewcode-back",
    "sidebar-drawer",
    "toc-drawer",
    "mobile-header",
    "visually-hidden",
    "toctree-checkbox",
    "skip-to-content",
    "announcement",
    "back-to-top",
}


class _HtmlText(html.parser.HTMLParser):
    """Text of an HTML page: skipped elements dropped, block elements on their own lines, white space
    collapsed outside <pre> (whose lines keep their indentation)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out = []
        self.skip = []  # stack of [tag, open count] for skipped elements
        self.pre = 0

    def handle_starttag(self, tag, attrs):
        if tag in _VOID:
            if not self.skip and tag in ("br", "hr"):
                self.out.append("\n")
            elif not self.skip and tag == "img":  # Sphinx imgmath: the TeX source is the alt text
                a = dict(attrs)
                alt = re.sub(r"\s+", " ", a.get("alt") or "").strip()
                if alt and "math" in (a.get("class") or "").split():
                    self.out.append("$" + alt + "$")
                elif alt and "/math/" in (a.get("src") or ""):  # display math
                    self.out.append("\n$$" + alt + "$$\n")
            return
        if self.skip:
            if tag == self.skip[-1][0]:
                self.skip[-1][1] += 1
            return
        classes = set()
        for k, v in attrs:
            if k == "class" and v:
                classes.update(v.split())
        if tag in _SKIP_TAGS or tag == "head" or classes & _SKIP_CLASSES:
            self.skip.append([tag, 1])
            return
        if tag == "pre":
            self.pre += 1
        if tag in _BLOCK:
            self.out.append("\n\n" if tag in _HEAD or tag in ("p", "pre", "table", "dl", "ul", "ol") else "\n")
        elif tag in ("td", "th"):
            self.out.append(" ")

    def handle_endtag(self, tag):
        if tag in _VOID:
            return
        if self.skip:
            if tag == self.skip[-1][0]:
                self.skip[-1][1] -= 1
                if self.skip[-1][1] == 0:
                    self.skip.pop()
            return
        if tag == "pre" and self.pre:
            self.pre -= 1
        if tag in _BLOCK:
            self.out.append("\n\n" if tag in _HEAD or tag in ("p", "pre", "table") else "\n")

    def handle_data(self, data):
        if self.skip:
            return
        if self.pre:
            self.out.append(data.replace("\n", "\x00"))  # marks the line ends inside <pre>
        else:
            self.out.append(re.sub(r"[ \t\r\n]+", " ", data))

    def text(self):
        lines = []
        for l in "".join(self.out).split("\n"):
            if "\x00" in l:
                first, *rest = l.split("\x00")
                lines.append(first.strip())
                lines.extend(r.rstrip() for r in rest)
            else:
                lines.append(l.strip())
        return "\n".join(lines)


def html_to_text(src):
    p = _HtmlText()
    try:
        p.feed(src)
        p.close()
    except Exception:  # malformed markup: keep what was parsed
        pass
    return normalise(p.text())


def drop_boilerplate(docs, min_docs=10, frac=0.3):
    """Lines (stripped, non-empty) found in at least max(min_docs, frac * n) of a package's documents
    are navigation or boilerplate: remove them. docs: list of texts; returns the new list."""
    n = len(docs)
    if n < min_docs:
        return docs
    counts = {}
    for d in docs:
        for line in {l.strip() for l in d.split("\n") if l.strip()}:
            counts[line] = counts.get(line, 0) + 1
    limit = max(min_docs, frac * n)
    common = {l for l, c in counts.items() if c >= limit}
    if not common:
        return docs
    return [normalise("\n".join(l for l in d.split("\n") if l.strip() not in common)) for d in docs]


# --------------------------------------------------------------------------------------------------
# roff (man pages)

_CHARS = {
    "aq": "'",
    "dq": '"',
    "em": "\u2014",
    "en": "\u2013",
    "bu": "\u2022",
    "hy": "-",
    "lq": "\u201c",
    "rq": "\u201d",
    "oq": "\u2018",
    "cq": "\u2019",
    "co": "\u00a9",
    "rg": "\u00ae",
    "tm": "\u2122",
    "mu": "\u00d7",
    "di": "\u00f7",
    "+-": "\u00b1",
    "de": "\u00b0",
    "<=": "\u2264",
    ">=": "\u2265",
    "!=": "\u2260",
    "->": "\u2192",
    "<-": "\u2190",
    "ti": "~",
    "ha": "^",
    "rs": "\\",
    "sl": "/",
    "ga": "`",
    "aa": "\u00b4",
    "lB": "[",
    "rB": "]",
    "lC": "{",
    "rC": "}",
    "ba": "|",
    "or": "|",
    "pl": "+",
    "mi": "-",
    "eq": "=",
    "sq": "\u25a1",
    "dg": "\u2020",
    "fm": "\u2032",
    "ua": "\u2191",
    "da": "\u2193",
    "ss": "\u00df",
    "a:": "\u00e4",
    "o:": "\u00f6",
    "u:": "\u00fc",
    "e'": "\u00e9",
    "e`": "\u00e8",
    "'e": "\u00e9",
    "`e": "\u00e8",
    ":a": "\u00e4",
    ":o": "\u00f6",
    ":u": "\u00fc",
    "ct": "\u00a2",
    "Po": "\u00a3",
    "Eu": "\u20ac",
    "sc": "\u00a7",
    "ps": "\u00b6",
    "lh": "\u261c",
    "rh": "\u261e",
    "at": "@",
    "sh": "#",
    "Fo": "\u00ab",
    "Fc": "\u00bb",
    "fo": "\u2039",
    "fc": "\u203a",
    "Cs": "\u00a4",
    "OK": "\u2713",
    "*a": "\u03b1",
    "*b": "\u03b2",
    "*p": "\u03c0",
    "*m": "\u03bc",
    "12": "\u00bd",
    "14": "\u00bc",
    "34": "\u00be",
    "S1": "\u00b9",
    "S2": "\u00b2",
    "S3": "\u00b3",
    "ff": "ff",
    "fi": "fi",
    "fl": "fl",
    "Fi": "ffi",
    "Fl": "ffl",
    "ul": "_",
    "ru": "_",
    "br": "|",
    "bv": "|",
    "nm": "\u2209",
    "mo": "\u2208",
    "if": "\u221e",
    "sr": "\u221a",
    "pt": "\u221d",
}
_STRINGS = {
    "lq": "\u201c",
    "rq": "\u201d",
    "R": "\u00ae",
    "Tm": "\u2122",
    "aq": "'",
    "dq": '"',
    "Lq": "\u201c",
    "Rq": "\u201d",
    "ga": "`",
    "ha": "^",
    "ti": "~",
}
_SINGLE = {
    "-": "-",
    "e": "\\",
    "\\": "\\",
    " ": " ",
    "~": " ",
    "0": " ",
    "&": "",
    "|": "",
    "^": "",
    "%": "",
    "c": "",
    ":": "",
    ".": ".",
    "'": "'",
    "`": "`",
    "t": "\t",
    "!": "",
    ")": "",
    "/": "",
    ",": "",
    "}": "",
    "{": "",
    "a": "",
    "r": "",
    "d": "",
    "u": "",
    "p": "",
    "E": "\\",
}
_ESC = re.compile(
    r"\\(?:"
    r"(?P<font>f(?:\[[^\]]*\]|\(..|.))"
    r"|(?P<size>s[+-]?(?:\(\d\d|\[\d+\]|'\d+'|\d))"
    r"|\*(?P<str>\[[^\]]*\]|\(..|.)"
    r"|\[(?P<br>[^\]]*)\]"
    r"|\((?P<ch>..)"
    r"|(?P<reg>[nkgmFY](?:\[[^\]]*\]|\(..|.))"
    r"|(?P<arg>[hvwlLDNxXbZoABCRSM])'[^']*'"
    r"|(?P<one>.)"
    r")",
    re.S,
)


def _esc(m):
    if m.group("font") or m.group("size") or m.group("reg") or m.group("arg"):
        if m.group("arg") == "C":  # \C'name' is a named character
            return _CHARS.get(m.group(0)[3:-1], "")
        return ""
    s = m.group("str")
    if s is not None:
        name = s[1:-1] if s.startswith("[") else (s[1:] if s.startswith("(") else s)
        return _STRINGS.get(name, "")
    b = m.group("br")
    if b is not None:
        if re.fullmatch(r"u[0-9A-Fa-f]{4,6}", b):
            try:
                return chr(int(b[1:], 16))
            except ValueError:
                return ""
        return _CHARS.get(b, "")
    c = m.group("ch")
    if c is not None:
        return _CHARS.get(c, "")
    return _SINGLE.get(m.group("one"), m.group("one"))


def roff_inline(s):
    return _ESC.sub(_esc, s)


def _split_args(s):
    """roff request arguments: blank-separated, double quotes group ("" is a literal quote)."""
    args, cur, q, i, any_ = [], [], False, 0, False
    while i < len(s):
        c = s[i]
        if q:
            if c == '"':
                if i + 1 < len(s) and s[i + 1] == '"':
                    cur.append('"')
                    i += 1
                else:
                    q = False
            else:
                cur.append(c)
        elif c == '"':
            q, any_ = True, True
        elif c in " \t":
            if cur or any_:
                args.append("".join(cur))
            cur, any_ = [], False
        else:
            cur.append(c)
        i += 1
    if cur or any_:
        args.append("".join(cur))
    return args


_FONT_ALT = {"BR", "RB", "IR", "RI", "BI", "IB"}
_FONT_ONE = {"B", "I", "SM", "SB", "CW", "CR"}
_BREAK = {
    "PP",
    "LP",
    "P",
    "TP",
    "TQ",
    "HP",
    "sp",
    "br",
    "RS",
    "RE",
    "SY",
    "YS",
    "EX",
    "EE",
    "in",
    "ti",
    "bp",
    "Sp",
    "Ip",
    "nf",
    "fi",
    "UR",
    "UE",
    "MT",
    "ME",
    "ad",
    "na",
    "ce",
}
_SKIP_REQ = {
    "ig",
    "de",
    "de1",
    "am",
    "ds",
    "as",
    "nr",
    "rr",
    "ie",
    "el",
    "if",
    "tr",
    "so",
    "hy",
    "nh",
    "ne",
    "PD",
    "ft",
    "ps",
    "vs",
    "ll",
    "ta",
    "lf",
    "cc",
    "ec",
    "eo",
    "mso",
    "pc",
    "hw",
    "IX",
    "iX",
    "UC",
    "DT",
    "AT",
    "ev",
    "rm",
    "rn",
    "ss",
    "cs",
    "fam",
    "pso",
    "tm",
    "ab",
    "nroff",
    "troff",
    "ns",
    "rs",
    "ul",
    "cu",
    "uf",
    "lt",
    "pl",
    "nx",
    "fl",
    "wh",
    "ch",
    "it",
    "em",
    "fp",
    "fc",
    "lg",
    "kern",
    "ochar",
    "char",
    "tag",
    "mk",
    "rt",
    "di",
    "da",
    "box",
    "boxa",
    "ls",
    "po",
    "c2",
    "shc",
    "nm",
    "nn",
    "sy",
    "pi",
    "cf",
    "psbb",
    "hc",
    "hla",
    "hlm",
    "hpf",
    "hym",
    "hys",
    "Vb",
    "Ve",
    "Sh",
    "Ip",
}


def roff_to_text(src):
    """A man page's roff source -> readable text (None for a `.so` redirect page)."""
    out, para = [], []
    nofill = False
    skip_until = None  # '..' after .de/.ig
    table = 0  # 0 none, 1 options/format lines, 2 data

    def flush():
        if para:
            out.append(" ".join(p for p in para if p))
            para.clear()

    for raw in src.split("\n"):
        line = re.sub(r'(?<!\\)\\".*$', "", raw)  # comments
        if skip_until is not None:
            if raw.strip().startswith(skip_until):
                skip_until = None
            continue
        if table:
            if line.startswith((".TE", "'TE")):
                table = 0
                out.append("")
                continue
            if table == 1:
                if line.rstrip().endswith("."):
                    table = 2
                continue
            if line.startswith((".", "'")):
                continue
            cells = [roff_inline(c.replace("T{", "").replace("T}", "")).strip() for c in line.split("\t")]
            out.append("  ".join(c for c in cells if c))
            continue
        if line[:1] in (".", "'") and not line.startswith(".\\&"):
            body = line[1:].strip()
            if not body:
                continue
            m = re.match(r"(\S+)\s*(.*)$", body)
            req, rest = m.group(1), m.group(2)
            if req == "so":
                return None
            if req in ("de", "de1", "am", "ig"):
                skip_until = ".."
                continue
            if req == "TS":
                flush()
                table = 1
                continue
            if req in ("SH", "SS"):
                flush()
                out.append("")
                out.append(roff_inline(" ".join(_split_args(rest))))
                out.append("")
                continue
            if req == "TH":
                a = _split_args(rest)
                flush()
                if a:
                    out.append(roff_inline(f"{a[0]}({a[1]})" if len(a) > 1 else a[0]))
                    out.append("")
                continue
            if req in _FONT_ALT:
                text = roff_inline("".join(_split_args(rest)))
            elif req in _FONT_ONE:
                text = roff_inline(" ".join(_split_args(rest)))
            elif req in (
                "IP",
                "TP",
                "TQ",
                "HP",
                "LP",
                "PP",
                "P",
                "sp",
                "br",
                "bp",
                "Sp",
                "Ip",
                "EX",
                "EE",
                "nf",
                "fi",
                "RS",
                "RE",
                "SY",
                "YS",
                "UR",
                "UE",
                "MT",
                "ME",
                "OP",
            ):
                flush()
                if req in ("nf", "EX"):
                    nofill = True
                elif req in ("fi", "EE"):
                    nofill = False
                if req in ("PP", "LP", "P", "sp", "TP", "HP", "IP", "Sp", "Ip", "bp"):
                    out.append("")
                if req in ("IP", "Ip") and rest:
                    a = _split_args(rest)
                    if a and a[0]:
                        para.append(roff_inline(a[0]))
                if req == "OP":
                    a = _split_args(rest)
                    para.append("[" + roff_inline(" ".join(a)) + "]")
                if req == "SY" and rest:
                    para.append(roff_inline(" ".join(_split_args(rest))))
                continue
            else:
                continue  # any other request: layout or macro plumbing
        else:
            text = roff_inline(line)
        if nofill:
            flush()
            out.append(text)
        elif not line.strip():
            flush()
            out.append("")
        else:
            para.append(text.strip())
    flush()
    return normalise("\n".join(out))


# --------------------------------------------------------------------------------------------------
# GNU info


def info_to_nodes(src):
    """An info file -> the text of each node, the node header line and the tag table dropped."""
    nodes = []
    for n in src.split("\x1f"):
        n = n.lstrip("\n")
        if not n or n.startswith(("Tag Table:", "Indirect:", "End Tag Table", "Local Variables", "\x08[index")):
            continue
        lines = n.split("\n")
        if lines[0].startswith("File:"):
            lines = lines[1:]
        text = "\n".join(lines)
        if text.lstrip().startswith("This is ") and " produced by makeinfo" in text[:300]:
            continue  # the file's preamble
        text = normalise(text.replace("\x7f", "").replace("\x00", ""))
        if text:
            nodes.append(text)
    return nodes


# --------------------------------------------------------------------------------------------------
# dictd dictionaries

_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _b64num(s):
    n = 0
    for c in s:
        n = n * 64 + _B64[c]
    return n


def dictd_entries(index_text, dict_bytes):
    """dictd .index + uncompressed .dict -> the entries' texts, in the order they lie in the file, each
    once (several headwords may point at one entry); the 00-database-* meta entries are dropped."""
    spans = set()
    for line in index_text.split("\n"):
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        head = parts[0]
        if head.startswith(("00-database", "00database")):
            continue
        spans.add((_b64num(parts[1]), _b64num(parts[2])))
    entries = []
    for off, ln in sorted(spans):
        text = normalise(decode(dict_bytes[off : off + ln]))
        if text:
            entries.append(text)
    return entries


def group(texts, target_chars=16384):
    """Consecutive short texts (dictionary entries, info nodes) -> documents of about target_chars."""
    docs, cur, size = [], [], 0
    for t in texts:
        if cur and size + len(t) > target_chars:
            docs.append("\n".join(cur))
            cur, size = [], 0
        cur.append(t)
        size += len(t) + 1
    if cur:
        docs.append("\n".join(cur))
    return [normalise(d) for d in docs]


# --------------------------------------------------------------------------------------------------
# code


def looks_generated(text, max_line=1000, max_mean=200):
    """Generated or data-like source (very long lines): not useful as code text."""
    lines = text.split("\n")
    if not lines:
        return True
    longest = max(len(l) for l in lines)
    mean = sum(len(l) for l in lines) / len(lines)
    return longest > max_line or mean > max_mean
