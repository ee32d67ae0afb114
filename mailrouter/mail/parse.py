"""RFC 5322 bytes → :class:`Email`: the one parsed view of a message every module uses.

:func:`parse_email` never raises: what cannot be parsed is listed in ``defects`` and whatever text
can be recovered is kept, so broken mail reaches triage instead of crashing the loop.

The stdlib parser runs with ``compat32``: it keeps raw header strings (8-bit bytes survive as
surrogate escapes) and never feeds them to the stricter header parser of ``policy.default``, so
header decoding (RFC 2047, raw 8-bit, unknown charsets) is done here, leniently.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import policy
from email.message import Message
from email.parser import BytesParser
from email.utils import getaddresses, parsedate_to_datetime
from html import unescape
from typing import TypedDict

from mailparser_reply.parser import EmailMessage as ReplyParser

from ..message import Email

log = logging.getLogger(__name__)

#: Body text kept for the classifier and the forward; longer text is cut and ``truncated`` is set.
MAX_BODY_CHARS = 100_000
#: HTML read from one part: ample for a mail's words, and it bounds BeautifulSoup's time (seconds).
MAX_HTML_CHARS = 200_000
#: Deeper HTML is reduced to text by a tag stripper instead of BeautifulSoup.
MAX_HTML_DEPTH = 500
#: Text parts read from one message; more is a crafted message, not correspondence.
MAX_TEXT_PARTS = 100
#: A broken multipart's payload searched for its real boundary.
MAX_PART_CHARS = 1_000_000
#: Over ``max_bytes``, only the headers and this much of the body are parsed.
TRUNCATED_BODY_BYTES = 1_000_000
#: One header value is cut at this length (a 200 kB header is an attack, not information).
MAX_HEADER_CHARS = 16_000
#: Deeper MIME nesting is not searched for text.
MAX_DEPTH = 30
MAX_DEFECTS = 50
# text/* types that are data, not words someone wrote; other text/* parts are read as plain text.
_NOT_BODY = frozenset(
    {"text/calendar", "text/vcard", "text/x-vcard", "text/rfc822-headers", "text/csv", "text/xml"}
)

_FALLBACK_CHARSETS = ("utf-8", "cp1252", "latin-1")
# Declared charsets that utf-8 text is often mislabelled as; valid non-ASCII utf-8 wins over them.
_LATIN_LABELS = frozenset(
    {
        "us-ascii",
        "ascii",
        "iso-8859-1",
        "latin-1",
        "latin1",
        "iso-8859-15",
        "windows-1252",
        "cp1252",
    }
)


# --------------------------------------------------------------------------- entry point


def parse_email(raw: bytes, *, max_bytes: int = 25 * 1024 * 1024) -> Email:
    """Parse ``raw``; never raises.

    Over ``max_bytes`` the headers and the first :data:`TRUNCATED_BODY_BYTES` of the body are parsed
    and ``truncated`` is set: the beginning of a huge message is what says where it should go.
    """
    defects = _Defects()
    try:
        data = _as_bytes(raw)
    except Exception as exc:  # an object we cannot even read: keep going with nothing
        defects.add(f"unreadable input: {type(exc).__name__}")
        data = b""
    size = len(data)
    digest = hashlib.sha256(data).hexdigest()
    truncated = False
    if size > max_bytes:
        truncated = True
        defects.add(f"message of {size} bytes over the {max_bytes}-byte limit: body cut")
        data = _head_and_start(data, max_bytes)
    msg, complete = _parse(data, defects)
    fields: _HeaderFields = {}
    try:
        fields = _header_fields(msg, defects)
    except Exception as exc:
        defects.add(f"header decoding failed: {type(exc).__name__}")
    full_text = ""
    try:
        if complete:
            full_text, cut = _body_text(msg, defects)
            truncated = truncated or cut
    except Exception as exc:
        defects.add(f"body extraction failed: {type(exc).__name__}")
        complete = False
    if not complete:
        full_text = _fallback_text(data)
    try:
        body = strip_quoted(full_text) or _unquote(full_text)
    except Exception as exc:
        defects.add(f"quote stripping failed: {type(exc).__name__}")
        body = full_text
    try:
        _collect_parser_defects(msg, defects)
    except Exception as exc:
        defects.add(f"defect collection failed: {type(exc).__name__}")
    return Email(
        raw_size=size,
        content_hash=digest,
        body=body,
        full_text=full_text,
        defects=defects.items(),
        truncated=truncated,
        **fields,
    )


def parse_safely(raw: bytes, limit: int) -> Email:
    """:func:`parse_email`, with a last line of defence for the loop that reads the mailbox:
    never an exception out of parsing."""
    try:
        return parse_email(raw, max_bytes=limit)
    except Exception:  # parse_email never raises; if it ever does, the mail goes to triage
        log.exception("parse_email raised")
        return Email(raw_size=len(raw), content_hash=hashlib.sha256(raw).hexdigest(),
                     defects=("unparseable",))  # fmt: skip


def _parse(data: bytes, defects: _Defects) -> tuple[Message, bool]:
    """(message, whether its MIME tree is complete).

    When the stdlib parser gives up (it recurses per nesting level: 1000 nested multiparts raise
    RecursionError), the headers alone are parsed and the body is read as raw text.
    """
    parser = BytesParser(policy=policy.compat32)
    try:
        return parser.parsebytes(data), True
    except Exception as exc:
        defects.add(f"MIME parse failed: {type(exc).__name__}")
    try:
        return parser.parsebytes(data, headersonly=True), False
    except Exception as exc:
        defects.add(f"header parse failed: {type(exc).__name__}")
        return Message(), False


class _Defects:
    """Ordered, de-duplicated, bounded list of what went wrong."""

    def __init__(self) -> None:
        self._items: dict[str, None] = {}

    def add(self, text: str) -> None:
        if len(self._items) < MAX_DEFECTS:
            self._items[text] = None

    def items(self) -> tuple[str, ...]:
        return tuple(self._items)


def _as_bytes(raw: object) -> bytes:
    if isinstance(raw, bytes):
        return raw
    if isinstance(raw, bytearray | memoryview):
        return bytes(raw)
    if isinstance(raw, str):
        return raw.encode("utf-8", "surrogateescape")
    raise TypeError(f"expected bytes, got {type(raw).__name__}")


def _head_and_start(data: bytes, max_bytes: int) -> bytes:
    """The header section (itself capped at ``max_bytes``) and the start of the body."""
    ends = [
        i
        for i in (data.find(b"\r\n\r\n", 0, max_bytes), data.find(b"\n\n", 0, max_bytes))
        if i >= 0
    ]
    head_end = min(ends) if ends else min(len(data), max_bytes)
    return data[: head_end + TRUNCATED_BODY_BYTES]


def _fallback_text(data: bytes) -> str:
    """Whatever follows the first blank line, decoded as best we can, without MIME scaffolding."""
    normalized = data[:MAX_PART_CHARS].replace(b"\r\n", b"\n")
    _, sep, body = normalized.partition(b"\n\n")
    text = _MIME_SCAFFOLDING.sub("", decode_bytes(body if sep else normalized)[0])
    return _clean_text(text)[:MAX_BODY_CHARS]


# --------------------------------------------------------------------------- charsets


def decode_bytes(data: bytes, charset: str | None = None) -> tuple[str, str]:
    """Decode with the declared charset, then utf-8, cp1252 and latin-1; returns (text, codec used).

    A latin-family label on valid non-ASCII utf-8 is a mislabel: utf-8 wins. latin-1 decodes any
    byte string, so this always returns.
    """
    label = (charset or "").strip().strip("\"'").lower()
    tried: list[str] = []
    if label in _LATIN_LABELS and not data.isascii():
        tried.append("utf-8")
    if label:
        tried.append(label)
    tried.extend(_FALLBACK_CHARSETS)
    for name in tried:
        try:
            return data.decode(name), name
        except (LookupError, UnicodeError, ValueError, TypeError):
            continue
    return data.decode("latin-1", "replace"), "latin-1"  # pragma: no cover - latin-1 never fails


def _known_charset(label: str) -> bool:
    try:
        b"a".decode(label)  # LookupError also for codecs that are not text encodings (zlib)
    except UnicodeError:  # a real charset that cannot decode one "a" (utf-16)
        return True
    except (LookupError, ValueError, TypeError):
        return False
    return True


# --------------------------------------------------------------------------- headers

_ENCODED_WORD = re.compile(r"=\?([^?\s]{1,80})\?([bBqQ])\?([^?\s]*)\?=")
_QP_ESCAPE = re.compile(rb"=([0-9A-Fa-f]{2})")
_FOLD = re.compile(r"\r?\n(?=[ \t])")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_MIME_SCAFFOLDING = re.compile(
    r"^(?:--[^\s]{1,80}|content-[\w-]+:.*|mime-version:.*)\n?", re.IGNORECASE | re.MULTILINE
)
_MSGID = re.compile(r"<[^<>\s]{1,998}>")


def decode_header_value(value: str, defects: _Defects | None = None) -> str:
    """Unfold and decode a raw header value: raw 8-bit bytes and RFC 2047 encoded words.

    Lenient where :func:`email.header.decode_header` raises: bad base64 padding, unknown or
    wrong charsets, encoded words glued to text. Adjacent encoded words in one charset are decoded
    together, since a multi-byte character may be split between them.
    """
    sink = defects if defects is not None else _Defects()
    text = _raw_header_text(value, sink)
    text = _FOLD.sub("", text)
    if "=?" in text:
        text = _decode_encoded_words(text, sink)
    text = _CONTROL.sub(" ", text.replace("\r", " ").replace("\n", " "))
    return text.strip()


def _raw_header_text(value: str, defects: _Defects) -> str:
    """compat32 keeps 8-bit header bytes as surrogate escapes: turn them back and decode them."""
    try:
        data = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return value.encode("utf-8", "replace").decode("utf-8")
    if data.isascii():
        return value
    text, codec = decode_bytes(data)
    defects.add(f"raw 8-bit header decoded as {codec}")
    return text


def _decode_encoded_words(text: str, defects: _Defects) -> str:
    out: list[str] = []
    run: list[tuple[str, bytes]] = []  # consecutive encoded words: (charset, bytes)
    pos = 0
    for match in _ENCODED_WORD.finditer(text):
        gap = text[pos : match.start()]
        if run and gap.strip():  # only whitespace between encoded words is dropped (RFC 2047 §6.2)
            out.append(_decode_run(run, defects))
            run = []
        if not run:
            out.append(gap)
        charset, encoding, payload = match.groups()
        charset = charset.partition("*")[0]  # RFC 2231 language suffix
        try:
            run.append((charset, _decode_word_payload(encoding, payload)))
        except (binascii.Error, ValueError):
            defects.add("undecodable RFC 2047 encoded word")
            out.append(_decode_run(run, defects) + match.group(0))
            run = []
        pos = match.end()
    out.append(_decode_run(run, defects))
    out.append(text[pos:])
    return "".join(out)


def _decode_word_payload(encoding: str, payload: str) -> bytes:
    if encoding in "bB":
        cleaned = re.sub(r"[^A-Za-z0-9+/]", "", payload)
        cleaned = cleaned[: len(cleaned) - len(cleaned) % 4] if len(cleaned) % 4 == 1 else cleaned
        return base64.b64decode(cleaned + "=" * (-len(cleaned) % 4))
    raw = payload.replace("_", " ").encode("ascii", "surrogateescape")
    return _QP_ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), raw)


def _decode_run(run: list[tuple[str, bytes]], defects: _Defects) -> str:
    parts: list[str] = []
    i = 0
    while i < len(run):
        charset = run[i][0].lower()
        chunk = b""
        while i < len(run) and run[i][0].lower() == charset:
            chunk += run[i][1]
            i += 1
        if not _known_charset(charset):
            defects.add(f"unknown charset {charset[:40]!r} in header")
        parts.append(decode_bytes(chunk, charset)[0])
    return "".join(parts)


class _HeaderFields(TypedDict, total=False):
    """The fields of :class:`Email` read from the headers (none when they cannot be decoded)."""

    headers: tuple[tuple[str, str], ...]
    message_id: str
    sender: str
    sender_name: str
    to: tuple[str, ...]
    subject: str
    date: datetime | None
    in_reply_to: str
    references: tuple[str, ...]
    auth_results: tuple[str, ...]


def _header_fields(msg: Message, defects: _Defects) -> _HeaderFields:
    """Every header decoded once; the fields the router reads are taken from that list."""
    headers: list[tuple[str, str]] = []
    for name, value in msg.raw_items():
        key = _raw_header_text(str(name), defects).strip().lower()
        text = decode_header_value(str(value), defects)
        if len(text) > MAX_HEADER_CHARS:
            defects.add(f"header {key[:40]!r} of {len(text)} characters cut")
            text = text[:MAX_HEADER_CHARS]
        headers.append((key, text))
    if not headers:
        defects.add("no headers")
    raw_values: dict[str, list[str]] = {}
    for name, value in msg.raw_items():
        raw_values.setdefault(str(name).strip().lower(), []).append(str(value))

    def first(name: str) -> str:
        return next((v for k, v in headers if k == name), "")

    from_values = raw_values.get("from") or raw_values.get("sender") or []
    if not raw_values.get("from"):
        defects.add("no From header")
    elif len(raw_values["from"]) > 1:
        defects.add("several From headers: the first is used")
    sender, sender_name = ("", "")
    if from_values:
        addresses = parse_addresses(from_values[:1], defects)
        if addresses:
            sender_name, sender = addresses[0]
    to = tuple(addr for _, addr in parse_addresses(raw_values.get("to", []), defects) if addr)
    references = tuple(
        dict.fromkeys(_MSGID.findall(" ".join(v for k, v in headers if k == "references")))
    )
    return {
        "headers": tuple(headers),
        "message_id": _first_id(first("message-id")),
        "sender": sender,
        "sender_name": sender_name,
        "to": to,
        "subject": first("subject"),
        "date": _parse_date(first("date"), defects),
        "in_reply_to": _first_id(first("in-reply-to")),
        "references": references,
        "auth_results": tuple(
            str(value)
            for name, value in msg.raw_items()
            if str(name).lower() == "authentication-results"
        ),
    }


def parse_addresses(
    values: Iterable[str], defects: _Defects | None = None
) -> list[tuple[str, str]]:
    """(decoded display name, lower-cased address) pairs from raw address header values.

    Encoded words are set aside while addresses are split, so a comma some mailers leave inside
    an encoded name (``=?utf-8?q?Dupont,_Jean?=``) splits nothing.
    """
    sink = defects if defects is not None else _Defects()
    pairs: list[tuple[str, str]] = []
    for value in values:
        words: list[str] = []

        def set_aside(match: re.Match[str], words: list[str] = words) -> str:
            words.append(match.group(0))
            return f"\ue010{len(words) - 1}\ue011"

        def restore(text: str, words: list[str] = words) -> str:
            return re.sub("\ue010(\\d+)\ue011", lambda m: words[int(m.group(1))], text)

        text = _FOLD.sub("", _raw_header_text(value, sink))[:MAX_HEADER_CHARS]
        protected = _ENCODED_WORD.sub(set_aside, text.replace("\ue010", "").replace("\ue011", ""))
        try:
            found = [(n, a) for n, a in getaddresses([protected]) if "@" in a or n]
        except Exception:
            found = []
        if not found:
            found = [("", a) for a in re.findall(r"[\w.+'-]+@[\w-]+(?:\.[\w-]+)+", text)]
            if "@" in text:  # an empty group (``undisclosed-recipients:;``) is no defect
                sink.add("unparseable address header")
        for name, addr in found:
            clean = restore(addr).strip().strip("<>").lower()
            pairs.append((decode_header_value(restore(name), sink), clean))
    return pairs


def _first_id(value: str) -> str:
    """The first ``<id>``; a bare ``left@right`` token is given its missing brackets."""
    match = _MSGID.search(value)
    if match:
        return match.group(0)
    bare = next((t.strip("<>") for t in value.split() if "@" in t.strip("<>")), "")
    return f"<{bare}>" if bare else ""


def _parse_date(value: str, defects: _Defects) -> datetime | None:
    if not value:
        return None
    try:
        parsed = parsedate_to_datetime(value)
    except Exception:
        defects.add("unparseable Date header")
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


# --------------------------------------------------------------------------- body


@dataclass
class _Walk:
    """What one body extraction gathers besides text."""

    defects: _Defects
    into_messages: bool = False
    attachments: list[str] = field(default_factory=list)
    cut: bool = False
    text_parts: int = 0
    chars: int = 0


def _body_text(msg: Message, defects: _Defects) -> tuple[str, bool]:
    """Text of the outer message; a forwarded message's text only when the outer has none."""
    walk = _Walk(defects)
    text = _text_of(msg, 0, walk)
    if not text.strip():
        walk.into_messages, walk.text_parts = True, 0
        text = _text_of(msg, 0, walk)
    if not text.strip() and walk.attachments:
        defects.add("no text part: attachment names used as text")
        text = "\n".join(dict.fromkeys(walk.attachments))
    elif not text.strip():
        defects.add("no text body")
    text = _clean_text(text)
    if len(text) > MAX_BODY_CHARS:
        defects.add(f"body text cut to {MAX_BODY_CHARS} characters")
        return text[:MAX_BODY_CHARS], True
    return text, walk.cut


def _text_of(part: Message, depth: int, walk: _Walk) -> str:
    """Readable text of one MIME part: alternatives give one child, other multiparts join all."""
    if depth > MAX_DEPTH:
        walk.defects.add(f"MIME nesting deeper than {MAX_DEPTH}: inner parts ignored")
        return ""
    ctype = part.get_content_type()
    if ctype in ("message/rfc822", "message/global"):
        inner = part.get_payload() if walk.into_messages else None
        if isinstance(inner, list) and inner and isinstance(inner[0], Message):
            return _text_of(inner[0], depth + 1, walk)
        return ""
    readable = ctype.startswith(("multipart/", "text/")) and ctype not in _NOT_BODY
    if _is_attachment(part) or not readable:
        if name := _filename(part):
            walk.attachments.append(name)
        return ""
    if ctype.startswith("text/"):
        return _text_part(part, ctype, walk)
    payload = part.get_payload()
    if not part.is_multipart() or not isinstance(payload, list):
        return _text_of_broken_multipart(part, depth, walk)
    children = [c for c in payload if isinstance(c, Message)]  # all of them, from the parser
    if ctype == "multipart/alternative":
        # The first non-empty text/plain; else the first other rendering that yields text.
        plain = [c for c in children if c.get_content_type() == "text/plain"]
        others = [c for c in children if c.get_content_type() != "text/plain"]
        candidates = (_text_of(c, depth + 1, walk) for c in plain + others)
        return next((t for t in candidates if t.strip()), "")
    texts = [_text_of(c, depth + 1, walk) for c in children]
    return "\n\n".join(t for t in texts if t.strip())


def _text_part(part: Message, ctype: str, walk: _Walk) -> str:
    if walk.text_parts >= MAX_TEXT_PARTS:
        walk.defects.add(f"more than {MAX_TEXT_PARTS} text parts: the others are ignored")
        return ""
    if walk.chars > MAX_BODY_CHARS:
        walk.cut = True
        return ""
    walk.text_parts += 1
    if ctype == "text/html":
        text = html_to_text(_decoded_payload(part, MAX_HTML_CHARS, walk))
    else:
        text = _decoded_payload(part, MAX_BODY_CHARS + 1, walk)
    walk.chars += len(text)
    return text


def _text_of_broken_multipart(part: Message, depth: int, walk: _Walk) -> str:
    """A multipart whose declared boundary never appears: guess the boundary from a ``--`` line."""
    payload = part.get_payload()
    if not isinstance(payload, str):
        return ""
    match = re.search(r"^--([^\s]{1,70}?)(?:--)?[ \t]*\r?$", payload[:MAX_PART_CHARS], re.MULTILINE)
    if match and depth < MAX_DEPTH:
        walk.defects.add("multipart boundary guessed from the body")
        rebuilt = (
            f'Content-Type: multipart/mixed; boundary="{match.group(1)}"\n\n'.encode()
            + payload[:MAX_PART_CHARS].encode("ascii", "surrogateescape")
        )
        reparsed = BytesParser(policy=policy.compat32).parsebytes(rebuilt)
        if reparsed.is_multipart():
            return _text_of(reparsed, depth + 1, walk)
    walk.defects.add("multipart without parts: its raw text is kept")
    return _decoded_payload(part, MAX_BODY_CHARS + 1, walk)


def _is_attachment(part: Message) -> bool:
    disposition = str(part.get("content-disposition", "")).split(";")[0].strip().lower()
    return disposition == "attachment"


def _filename(part: Message) -> str:
    try:
        name = part.get_filename() or part.get_param("name") or ""
    except Exception:
        return ""
    if isinstance(name, tuple):  # RFC 2231 value the stdlib could not decode
        name = name[2]
    return decode_header_value(str(name))[:200]


def _decoded_payload(part: Message, max_chars: int, walk: _Walk) -> str:
    """At most ``max_chars`` of text, transfer-decoding only the start of a huge payload."""
    payload = part.get_payload()
    if not isinstance(payload, str):  # a list of parts: not a text payload
        return ""
    charset, ctype = _declared_charset(part), part.get_content_type()
    if len(payload) > 3 * max_chars:  # quoted-printable takes at most 3 characters per byte
        piece = Message()
        piece["Content-Transfer-Encoding"] = part.get("content-transfer-encoding", "7bit")
        piece.set_payload(payload[: 3 * max_chars])
        part = piece
    data = part.get_payload(decode=True)
    if not isinstance(data, bytes):
        return ""
    text, codec = decode_bytes(data, charset)
    if charset and codec != charset and not (charset in _LATIN_LABELS and codec == "utf-8"):
        label = "unknown" if not _known_charset(charset) else "wrong"
        walk.defects.add(f"{label} charset {charset[:40]!r}: text decoded as {codec}")
    if len(text) > max_chars:
        walk.defects.add(f"{ctype} part cut to {max_chars} characters")
        walk.cut = True
        return text[:max_chars]
    return text


def _declared_charset(part: Message) -> str | None:
    try:
        charset = part.get_content_charset()
    except Exception:
        return None
    return str(charset).strip().strip("\"'").lower() if charset else None


def _collect_parser_defects(msg: Message, defects: _Defects) -> None:
    stack: list[tuple[Message, int]] = [(msg, 0)]
    while stack:
        part, depth = stack.pop()
        for defect in getattr(part, "defects", []):
            defects.add(type(defect).__name__)
        payload = part.get_payload()
        if isinstance(payload, list) and depth < MAX_DEPTH:
            stack.extend((p, depth + 1) for p in reversed(payload) if isinstance(p, Message))


# --------------------------------------------------------------------------- HTML

_QUOTE_START, _QUOTE_END = "\ue000", "\ue001"
_QUOTE_START_MARK, _QUOTE_END_MARK = f"\n{_QUOTE_START}\n", f"\n{_QUOTE_END}\n"
_BLOCKS = frozenset(
    {"p", "div", "tr", "li", "ul", "ol", "table", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "hr",
     "section", "article", "header", "footer", "dl", "dt", "dd", "address"}
)  # fmt: skip
_DROPPED = frozenset({"script", "style", "head", "title", "noscript", "template"})
_VOID = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track",
     "wbr", "param", "!doctype"}
)  # fmt: skip
_UNCLOSED_TAG = re.compile(r"<(?=[^<>]*(?:<|$))")
_TAG = re.compile(r"<(/?)([A-Za-z!][^\s/<>]*)[^<>]*?(/?)>")  # [^<>]: linear on unclosed tags


def html_to_text(html: str) -> str:
    """HTML → plain text: scripts and styles dropped, line breaks kept, blockquotes as ``> ``.

    Quoted replies in HTML mail are blockquotes; marking them like plain-text quotes lets
    :func:`strip_quoted` handle both the same way.
    """
    html = _defuse(html.replace(_QUOTE_START, "").replace(_QUOTE_END, ""))
    try:
        if _nesting_depth(html) > MAX_HTML_DEPTH:
            raise ValueError("HTML nested too deeply")  # BeautifulSoup slows down superlinearly
        text = _soup_text(html)
    except Exception:  # pathological markup: a tag stripper still keeps the words and line breaks
        text = re.sub(r"(?is)<(script|style)\b.*?</\1\s*>", " ", html)
        text = re.sub(r"(?i)<(?:br|/p|/div|/tr|/li|/h\d)\b[^>]*>", "\n", text)
        text = unescape(re.sub(r"<[^>]*>", " ", text))
    return _apply_quote_marks(text)


def _defuse(html: str) -> str:
    """Remove what makes the stdlib HTML parser (under BeautifulSoup) quadratic.

    Each unterminated comment, CDATA section or tag sends it scanning to the end of the input
    again; comments and marked sections are dropped here in one pass (an unterminated one runs to
    the end, as in a browser) and a ``<`` that no ``>`` closes becomes text.
    """
    for start, end in (("<!--", "-->"), ("<![", "]]>")):
        pieces: list[str] = []
        pos = 0
        while (found := html.find(start, pos)) != -1:
            pieces.append(html[pos:found])
            close = html.find(end, found + len(start))
            pos = len(html) if close == -1 else close + len(end)
        pieces.append(html[pos:])
        html = "".join(pieces)
    return _UNCLOSED_TAG.sub("&lt;", html)


def _nesting_depth(html: str) -> int:
    """Deepest element nesting, counting unclosed tags as BeautifulSoup would nest them."""
    depth = deepest = 0
    for match in _TAG.finditer(html):
        closing, name = match.group(1), match.group(2).lower()
        if closing:
            depth = max(depth - 1, 0)
        elif name not in _VOID and not match.group(3):
            depth += 1
            deepest = max(deepest, depth)
    return deepest


def _soup_text(html: str) -> str:
    """Walk the tree with an explicit stack: linear time, and no recursion on deep markup."""
    from bs4 import BeautifulSoup, NavigableString  # imported here: only HTML mail needs it

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bs4 warns about input that looks like a URL or XML
        soup = BeautifulSoup(html, "html.parser")
    out: list[str] = []
    stack: list[tuple[object, bool]] = [(soup, False)]
    while stack:
        node, closing = stack.pop()
        if isinstance(node, NavigableString):
            if type(node) is NavigableString:  # not a comment, doctype or CDATA
                out.append(str(node))
            continue
        name = getattr(node, "name", "")
        if closing:
            out.append(
                _QUOTE_END_MARK if name == "blockquote" else "\n" if name in _BLOCKS else " "
            )
            continue
        if name in _DROPPED:
            continue
        if name == "br":
            out.append("\n")
            continue
        if name == "blockquote":
            out.append(_QUOTE_START_MARK)
        elif name in _BLOCKS:
            out.append("\n")
        if name in _BLOCKS or name in ("blockquote", "td", "th"):
            stack.append((node, True))
        stack.extend((child, False) for child in reversed(getattr(node, "contents", [])))
    return "".join(out)


def _apply_quote_marks(text: str) -> str:
    lines: list[str] = []
    depth = 0
    for line in text.split("\n"):
        depth += line.count(_QUOTE_START) - line.count(_QUOTE_END)
        line = line.replace(_QUOTE_START, "").replace(_QUOTE_END, "").strip()
        if line:
            lines.append("> " * min(max(depth, 0), 3) + line)
        elif not lines or lines[-1]:
            lines.append("")
    return "\n".join(lines)


def _clean_text(text: str) -> str:
    """Unix newlines, no NULs or stray controls, no trailing spaces, at most one blank line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\xa0", " ")
    text = _CONTROL.sub("", text.replace("\t", "    "))
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


# --------------------------------------------------------------------------- quotes, signatures

# An attribution line, possibly wrapped over three lines by the sending client.
_ATTRIBUTION = re.compile(
    r"^(?:>\s*)*(?:le\s.{1,300}?\ba\s+[ée]crit|on\s.{1,300}?\bwrote)\s*:\s*$",
    re.IGNORECASE | re.DOTALL,
)
_SEPARATOR = re.compile(
    r"^\s*(?:"
    r"-{2,}\s*(?:original message|message d'origine|message original|forwarded message|"
    r"message transf[ée]r[ée]|mail original)\s*-{2,}"
    r"|d[ée]but du message (?:r[ée]exp[ée]di[ée]|transf[ée]r[ée])\s*:"
    r"|begin forwarded message\s*:"
    r"|_{20,}"
    r")\s*$",
    re.IGNORECASE,
)
_OUTLOOK_FROM = re.compile(r"^\s*\*?\s*(?:de|from)\s*\*?\s*:", re.IGNORECASE)
_OUTLOOK_NEXT = re.compile(
    r"^\s*\*?\s*(?:envoy[ée]|sent|date|[àa]|to|objet|subject|cc)\s*\*?\s*:", re.IGNORECASE
)
_SIGNATURE = re.compile(r"^--\s*$")
# Mobile and webmail taglines ("Envoyé de mon iPhone", "Sent from Mail for Windows").
_SENT_FROM = re.compile(
    r"^\s*(?:(?:envoy[ée] (?:de|depuis|à partir de)|sent from) "
    r"(?:mon|ma|my|outlook|yahoo|mail|courrier|samsung)"
    r"|get outlook for|obtenir outlook pour|t[ée]l[ée]chargez outlook pour)\b.{0,60}$",
    re.IGNORECASE,
)
_QUOTED = re.compile(r"^\s*>")

_lib_header_regex: re.Pattern[str] | None = None


def strip_quoted(text: str) -> str:
    """The new part of a message: quoted replies, forwarded chains and signature removed.

    French and English: ``Le … a écrit :`` / ``On … wrote:`` (even wrapped over lines), Outlook
    header blocks (``De :``/``Envoyé :``, ``From:``/``Sent:``), ``-----Original Message-----`` and
    forward separators, ``>`` lines, the ``-- `` signature delimiter, ``Envoyé de mon iPhone`` /
    ``Sent from my …``. Other languages' reply headers come from mail-parser-reply. Text written
    below or between ``>`` quotes is kept; everything after an unquoted header is dropped. Returns
    ``""`` when nothing new is left (a bare forward), so callers can fall back.
    """
    lines = _clean_text(text[:MAX_BODY_CHARS]).split("\n")
    cut = min(_own_cut(lines), _library_cut(lines))
    kept: list[str] = []
    i = 0
    while i < cut:
        span = _attribution_span(lines, i)
        if span:
            nxt = _next_nonblank(lines, i + span)
            if nxt >= cut or not _QUOTED.match(lines[nxt]):
                break  # an unquoted original follows the attribution: it is all quoted
            i += span
            continue
        if not _QUOTED.match(lines[i]):
            kept.append(lines[i])
        i += 1
    return _clean_text("\n".join(kept))


def _own_cut(lines: list[str]) -> int:
    """Index of the first line from which everything is quoted or signature."""
    for i, line in enumerate(lines):
        if _QUOTED.match(line):
            continue
        if _SIGNATURE.match(line) or _SEPARATOR.match(line) or _SENT_FROM.match(line):
            return i
        if _OUTLOOK_FROM.match(line) and any(
            _OUTLOOK_NEXT.match(nxt) for nxt in lines[i + 1 : i + 4] if nxt.strip()
        ):
            return i
    return len(lines)


def _attribution_span(lines: list[str], i: int) -> int:
    """Number of lines (1-3) forming an attribution starting at ``lines[i]``, 0 if none."""
    head = lines[i].lstrip("> ").lower()
    if not (head.startswith("le ") or head.startswith("on ")) or len(lines[i]) > 300:
        return 0
    for span in (1, 2, 3):
        if i + span <= len(lines) and _ATTRIBUTION.match("\n".join(lines[i : i + span])):
            return span
    return 0


def _next_nonblank(lines: list[str], i: int) -> int:
    while i < len(lines) and not lines[i].strip():
        i += 1
    return i


def _library_cut(lines: list[str]) -> int:
    """First reply header mail-parser-reply knows (its many languages), as a line index."""
    regex = _reply_header_regex()
    if regex is None:
        return len(lines)
    # Its patterns expect stripped lines and backtrack quadratically on long ones: only short lines
    # with a colon (a header line has one) are searched, runs of other lines become one blank line,
    # and the search stops after 30 000 characters.
    index_of: list[int] = []  # line number in ``lines`` of each searched line
    searched: list[str] = []
    size = 0
    for i, line in enumerate(lines):
        if size > 30_000:
            break
        if len(line) <= 200 and ":" in line:
            size += len(line)
            if index_of and index_of[-1] != i - 1:
                index_of.append(-1)
                searched.append("")
            index_of.append(i)
            searched.append(line.strip())
    text = "\n".join(searched)
    for match in regex.finditer(text):
        start = match.start()
        while start < len(text) and text[start] == "\n":
            start += 1
        index = index_of[min(text.count("\n", 0, start), len(index_of) - 1)]
        # Quotes and French/English attributions are the own rules' business (they keep text
        # written between quotes).
        if index >= 0 and not (_QUOTED.match(lines[index]) or _attribution_span(lines, index)):
            return index
    return len(lines)


def _reply_header_regex() -> re.Pattern[str] | None:
    global _lib_header_regex
    if _lib_header_regex is None:
        try:
            languages = ["fr", "en", "de", "es", "it", "nl", "pt", "pl", "sv"]
            _lib_header_regex = ReplyParser(text="", languages=languages).HEADER_REGEX
        except Exception:
            return None
    return _lib_header_regex


def _unquote(text: str) -> str:
    """A bare forward or a fully quoted mail: its text without quote marks, so the content stays."""
    return _clean_text("\n".join(re.sub(r"^(?:\s*>)+ ?", "", line) for line in text.split("\n")))
