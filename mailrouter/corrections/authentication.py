"""Reading ``Authentication-Results`` (RFC 8601) the way an attacker would write them.

Anyone can add an ``Authentication-Results`` header naming our receiving server. What counts is
only what that server wrote: the topmost run of such headers carrying its authserv-id, above
every header anyone else added (RFC 8601 §5: the server adds its own on top and removes copies
of its id from incoming mail). Inside a header, comments ``(…)`` and quoted strings can hold
anything that looks like a result, so the value is tokenized by the §2.2 grammar, never matched
with a regular expression, and anything unreadable inside a result makes the whole header count
for nothing.

The values must be the raw header text (unfolded or not), never RFC 2047-decoded: decoding would
let an encoded word the sender chose for an address, such as
``=?us-ascii?q?x=3B_dkim=3Dpass_header.d=3Dexample.com_x.y=3D?=@evil.test``, become a result.

Pure functions: the IMAP side is :meth:`mailrouter.mail.imap.Mailbox.newest_headers`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.policy import compat32

#: ``trusted_authserv_id`` for Microsoft 365 / Outlook.com, whose header names no server
#: (``Authentication-Results: spf=pass (sender IP is …) smtp.mailfrom=…``). Parentheses cannot
#: appear in a real authserv-id, so no server can claim this one; only the topmost header counts.
MISSING_ID = "(missing)"

_WSP = frozenset(" \t\r\n")
#: RFC 2045 token: no space, control or tspecial.
_TOKEN = re.compile(r'[^\x00-\x20\x7f()<>@,;:\\"/\[\]?=]+')
#: A method may carry a dot (Gmail writes ``gateway.spf=pass``); results and names may not.
_METHOD = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_DIGITS = re.compile(r"[0-9]+")
#: An unquoted property value: ``example.com``, ``@example.com``, ``user=x@example.com``…
_PVALUE = re.compile(r'[^\s;()"\\]*')
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


@dataclass(frozen=True)
class Result:
    """One ``method=result`` with its properties (``header.d``, ``smtp.mailfrom``…), lower-cased
    names; ``reason`` is the ``reason=`` text."""

    method: str
    result: str
    props: Mapping[str, str] = field(default_factory=dict)
    reason: str = ""


@dataclass(frozen=True)
class AuthResults:
    """One parsed header. ``authserv_id`` is ``""`` when the header names no server (Microsoft)
    or when it could not be read; ``problem`` says why the header yields no usable result."""

    authserv_id: str
    results: tuple[Result, ...] = ()
    problem: str = ""


@dataclass(frozen=True)
class Verdict:
    """Whether a mail is shown authentic for its ``From:`` domain; ``reason`` is logged and
    shown in ``status``."""

    ok: bool
    reason: str


@dataclass(frozen=True)
class Detection:
    """The authserv-id on top of most of the newest messages: ``count`` of ``total`` carry it."""

    authserv_id: str
    count: int
    total: int


class _Malformed(Exception):
    """Raised inside the parser only: :func:`parse` turns it into ``AuthResults.problem``."""


# --- tokenizer --------------------------------------------------------------------------------


class _Scanner:
    """A cursor over one header value that knows CFWS, comments and quoted strings."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def at_end_of_element(self) -> bool:
        self.cfws()
        return self.peek() in ("", ";")

    def cfws(self) -> None:
        """Skip folding white space and comments, which may nest and hold quoted-pairs."""
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char in _WSP:
                self.pos += 1
            elif char == "(":
                self._comment()
            else:
                return

    def _comment(self) -> None:
        depth = 0
        while self.pos < len(self.text):
            char = self.text[self.pos]
            self.pos += 1
            if char == "\\":
                self.pos += 1
            elif char == "(":
                depth += 1
            elif char == ")":
                depth -= 1
                if depth == 0:
                    return
        raise _Malformed("unterminated comment")

    def quoted(self) -> str:
        """The content of the quoted string that starts here, quoted-pairs resolved."""
        out: list[str] = []
        self.pos += 1
        while self.pos < len(self.text):
            char = self.text[self.pos]
            self.pos += 1
            if char == '"':
                return "".join(out)
            if char == "\\" and self.pos < len(self.text):
                char = self.text[self.pos]
                self.pos += 1
            out.append(char)
        raise _Malformed("unterminated quoted string")

    def match(self, pattern: re.Pattern[str]) -> str:
        found = pattern.match(self.text, self.pos)
        if found is None:
            return ""
        self.pos = found.end()
        return found.group()

    def expect(self, char: str, after: str) -> None:
        self.cfws()
        if self.peek() != char:
            raise _Malformed(f"expected {char!r} after {after!r} at character {self.pos}")
        self.pos += 1

    def value(self, what: str) -> str:
        """RFC 2045 ``value``: a token or a quoted string."""
        self.cfws()
        if self.peek() == '"':
            return self.quoted()
        token = self.match(_TOKEN)
        if not token:
            raise _Malformed(f"no {what} at character {self.pos}")
        return token

    def pvalue(self) -> str:
        """A property value: a quoted string (maybe a quoted local-part before ``@domain``), an
        address, a domain or a token. Empty is tolerated (Microsoft writes ``header.from=;``)."""
        self.cfws()
        if self.peek() == '"':
            content = self.quoted()
            if self.peek() != "@":
                return content
            local = content.replace("\\", "\\\\").replace('"', '\\"')
            return f'"{local}"' + self.match(_PVALUE)
        return self.match(_PVALUE)


# --- parser -----------------------------------------------------------------------------------


def parse(value: str) -> AuthResults:
    """One header value, read by RFC 8601 §2.2. Never raises: bad input gives ``problem``."""
    scanner = _Scanner(value or "")
    authserv_id = ""
    try:
        authserv_id = _authserv_id(scanner)
        if _no_result(scanner):
            return AuthResults(authserv_id)
        return AuthResults(authserv_id, _results(scanner, first=not authserv_id))
    except _Malformed as exc:
        return AuthResults(authserv_id, problem=str(exc))


def _authserv_id(s: _Scanner) -> str:
    """``authserv-id [version]``; ``""`` when the header opens with a result (Microsoft 365)."""
    s.cfws()
    start = s.pos
    if s.peek() == "":
        raise _Malformed("empty header")
    authserv_id = s.value("authserv-id")
    s.cfws()
    if s.peek() == "=":
        s.pos = start
        return ""
    if not authserv_id.strip():
        raise _Malformed("empty authserv-id")
    version = s.match(_DIGITS)
    if version and version.lstrip("0") != "1":
        raise _Malformed(f"unsupported version {version[:8]}")
    return authserv_id


def _no_result(s: _Scanner) -> bool:
    """Whether the rest is ``; none``: the server checked nothing."""
    start = s.pos
    s.cfws()
    if s.peek() == ";":
        s.pos += 1
        s.cfws()
        if s.match(_KEYWORD).lower() == "none":
            s.cfws()
            if s.peek() == "":
                return True
    s.pos = start
    return False


def _results(s: _Scanner, *, first: bool) -> tuple[Result, ...]:
    results: list[Result] = []
    while True:
        if not first:
            s.cfws()
            if s.peek() == "":
                return tuple(results)
            if s.peek() != ";":
                raise _Malformed(f"expected ';' at character {s.pos}")
            s.pos += 1
        first = False
        result = _resinfo(s)
        if result is not None:
            results.append(result)


def _resinfo(s: _Scanner) -> Result | None:
    """``method[/version]=result [reason=…] ptype.property=value…``; ``None`` for an element
    that holds no result: empty (``;;``, a trailing ``;``) or one bare value (Microsoft's
    ``; contoso.com;``). Anything else that is not a result makes the header unusable."""
    if s.at_end_of_element():
        return None
    start = s.pos
    method = s.match(_METHOD)
    s.cfws()
    version = ""
    if method and s.peek() == "/":
        s.pos += 1
        s.cfws()
        version = s.match(_DIGITS)
        if not version:
            raise _Malformed(f"no version after {method[:40]!r}/")
        s.cfws()
    if not method or s.peek() != "=":
        s.pos = start
        s.value("result")
        if not s.at_end_of_element():
            raise _Malformed(f"not a result at character {start}")
        return None
    s.pos += 1
    s.cfws()
    result = s.match(_KEYWORD)
    if not result:
        raise _Malformed(f"no result for {method[:40]!r}")
    if version and version.lstrip("0") != "1":
        raise _Malformed(f"unsupported {method[:40]}/{version[:8]}")
    props, reason = _properties(s, method)
    return Result(method.lower(), result.lower(), props, reason)


def _properties(s: _Scanner, method: str) -> tuple[dict[str, str], str]:
    """The ``reason=`` and the properties up to the next ``;``. A property named twice with
    two values is refused: which one the server meant cannot be known."""
    props: dict[str, str] = {}
    reason: str | None = None
    while not s.at_end_of_element():
        name = _property_name(s, method)
        s.expect("=", name)
        if name == "reason":
            text = s.value("reason")
            if reason is not None and reason != text:
                raise _Malformed(f"two reasons for {method[:40]!r}")
            reason = text
            continue
        value = s.pvalue()
        if props.setdefault(name, value) != value:
            raise _Malformed(f"{name} given twice for {method[:40]!r}")
    return props, reason or ""


def _property_name(s: _Scanner, method: str) -> str:
    """``ptype.property`` (CFWS allowed around the dot), ``reason``, or a bare keyword such as
    Microsoft's ``action``."""
    ptype = s.match(_KEYWORD)
    if not ptype:
        raise _Malformed(f"unexpected {s.peek()!r} in {method[:40]!r} at character {s.pos}")
    start = s.pos
    s.cfws()
    if s.peek() != ".":
        s.pos = start
        return ptype.lower()
    s.pos += 1
    s.cfws()
    prop = s.match(_KEYWORD)
    if not prop:
        raise _Malformed(f"no property after {ptype[:40]!r}. at character {s.pos}")
    return f"{ptype}.{prop}".lower()


# --- trust ------------------------------------------------------------------------------------


def trusted_ids(authserv_id: str) -> frozenset[str]:
    """The configured authserv-ids, lower-cased: one, or several separated by commas (a comma
    cannot appear in an authserv-id) for a provider whose servers name themselves differently,
    such as Fastmail's ``mx1…``-``mx8.messagingengine.com``."""
    return frozenset(part.strip().lower() for part in authserv_id.split(",") if part.strip())


def trusted_results(
    headers_top_to_bottom: Iterable[str], authserv_id: str
) -> tuple[AuthResults, ...]:
    """The headers the receiving server wrote: the topmost run naming ``authserv_id``.

    The run stops at the first header from anyone else: everything below it may have been added
    by the sender. With :data:`MISSING_ID` (a server that names itself nowhere) only the topmost
    header counts, since a sender's unnamed header right below it would look the same.
    """
    wanted = trusted_ids(authserv_id)
    named = wanted - {MISSING_ID}  # a quoted "(missing)" is a name some sender wrote
    run: list[AuthResults] = []
    for value in headers_top_to_bottom if wanted else ():
        parsed = parse(value)
        if not run and not parsed.authserv_id and MISSING_ID in wanted:
            return (parsed,)
        if parsed.authserv_id.lower() not in named:
            break
        run.append(parsed)
    return tuple(run)


def verdict(headers: Iterable[str], authserv_id: str, from_domain: str) -> Verdict:
    """Whether the trusted headers show the mail authentic for ``from_domain``.

    Authentic: ``dkim=pass`` for an aligned ``header.d`` (``header.i`` when no ``header.d``, as
    Gmail writes), ``dmarc=pass`` for exactly ``from_domain``, or ``spf=pass`` for an aligned
    ``smtp.mailfrom`` (never ``smtp.helo``, a name the sender picks). See :func:`_distrust` for
    what overrides a pass.
    """
    wanted = ", ".join(sorted(trusted_ids(authserv_id)))
    if not wanted:
        return Verdict(False, "no trusted authserv-id configured")
    domain = _domain(from_domain)
    if not domain:
        return Verdict(False, f"no usable From domain ({from_domain[:60]!r})")
    trusted = trusted_results(headers, wanted)
    if not trusted:
        return Verdict(False, f"no Authentication-Results from {wanted} on top")
    server = trusted[0].authserv_id or MISSING_ID
    refusal = _distrust(trusted, server, domain)
    if refusal:
        return Verdict(False, refusal)
    results = [r for header in trusted for r in header.results]
    for result in results:
        passed = _passing_domain(result, domain)
        if passed:
            return Verdict(True, f"{result.method}=pass for {passed} ({server})")
    seen = ", ".join(sorted({f"{r.method}={r.result}" for r in results if r.method in _METHODS}))
    return Verdict(False, f"no aligned pass for {domain} ({seen or 'no DKIM, SPF or DMARC'})")


def _distrust(trusted: Sequence[AuthResults], server: str, domain: str) -> str:
    """Why the trusted headers cannot vouch for anything, or ``""``.

    * one of them is unreadable: what else the server said cannot be known;
    * DKIM, SPF or DMARC reported in two of them: one server checks a method once, so the
      second is a copy the sender added right below the real one, which a server that does
      not remove copies of its own id (RFC 8601 §5 says it must) lets through;
    * ``dmarc=fail`` for the domain: its owner's own policy refused the mail.
    """
    where: dict[str, int] = {}
    for index, header in enumerate(trusted):
        if header.problem:
            return f"unreadable Authentication-Results from {server}: {header.problem}"
        for method in sorted({r.method for r in header.results if r.method in _METHODS}):
            if where.setdefault(method, index) != index:
                return f"{method} in two headers from {server}: one may be a forged copy"
    for result in (r for header in trusted for r in header.results):
        if result.method == "dmarc" and result.result == "fail":
            target = _domain(result.props.get("header.from", ""))
            if not target or target == domain:
                return f"dmarc=fail for {domain}"
    return ""


_METHODS = ("dkim", "spf", "dmarc")


def _passing_domain(result: Result, from_domain: str) -> str:
    """The authenticated domain when ``result`` is a pass that vouches for ``from_domain``."""
    if result.result != "pass":
        return ""
    props = result.props
    if result.method == "dkim":
        signer = _domain(props["header.d"] if "header.d" in props else props.get("header.i", ""))
        return signer if aligned(signer, from_domain) else ""
    if result.method == "dmarc":
        author = _domain(props.get("header.from", ""))
        return author if author == from_domain else ""
    if result.method == "spf":
        envelope = _domain(props.get("smtp.mailfrom", ""))
        return envelope if aligned(envelope, from_domain) else ""
    return ""


def aligned(auth_domain: str, from_domain: str) -> bool:
    """Relaxed alignment without a public-suffix list: the same domain, or one a subdomain of
    the other when the shorter has at least two labels (``com`` or ``fr`` never aligns)."""
    if not auth_domain or not from_domain:
        return False
    if auth_domain == from_domain:
        return True
    short, long = sorted((auth_domain, from_domain), key=len)
    return "." in short and long.endswith("." + short)


def _domain(value: str) -> str:
    """The domain of an address or domain value, lower-cased, or ``""`` when it is not a
    syntactically valid host name (``evil.test (y) example.com`` is not)."""
    text = value.strip().removeprefix("<").removesuffix(">").rpartition("@")[2].lower()
    text = text.removesuffix(".")
    if not text.isascii():
        try:
            text = text.encode("idna").decode("ascii")
        except UnicodeError:
            return ""
    labels = text.split(".")
    if len(text) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        return ""
    return text


# --- finding the authserv-id ------------------------------------------------------------------


def results_headers(block: bytes | str) -> list[str]:
    """The raw ``Authentication-Results`` values of a header block, top to bottom.

    The name must be exactly ``Authentication-Results`` (any case): a sender's
    ``Authentication-Results :`` that the server would not recognise as a copy of its own is not
    read as one either.
    """
    data = block.encode("utf-8", "surrogateescape") if isinstance(block, str) else block
    message = BytesHeaderParser(policy=compat32).parsebytes(data)
    return [str(v) for k, v in message.raw_items() if k.lower() == "authentication-results"]


def detect_authserv_id(header_blocks: Sequence[bytes | str]) -> Detection | None:
    """The authserv-id of the topmost ``Authentication-Results`` most of the messages carry
    (newest first: a tie goes to the newer), or ``None`` when none carries one."""
    names: dict[str, str] = {}
    counts: Counter[str] = Counter()
    for block in header_blocks:
        values = results_headers(block)
        if not values:
            continue
        top = parse(values[0])
        if not top.authserv_id and top.problem:
            continue
        name = top.authserv_id or MISSING_ID
        names.setdefault(name.lower(), name)
        counts[name.lower()] += 1
    if not counts:
        return None
    key, count = counts.most_common(1)[0]
    return Detection(names[key], count, len(header_blocks))
