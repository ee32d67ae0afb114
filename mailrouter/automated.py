"""Is this mail sent by a machine? Pure functions over an :class:`Email`, no I/O.

The router must never forward what a machine sent in answer to it: an out-of-office reply from
a department answers our forward, comes back to the contact address and, forwarded again,
triggers the next reply (a mail loop). Many auto-replies say what they are in a header
(RFC 3834 ``Auto-Submitted``, Exchange's ``X-Auto-Response-Suppress``, ``Precedence``); some
don't, and only their subject tells. Bounces and list mail are machine mail too.

**The subject rule** (:func:`autoreply_subject`, :func:`bounce_subject`): the subject is folded
(accents removed, case ignored, spaces collapsed), reply prefixes (``Re:``, ``RE :``, ``AW:``,
``Antw:``, ``SV:``, ``VS:``, ``Réf:``…) and bracketed tags (``[EXTERNAL]``) are removed from its
start, and what is left must *begin* with a known phrase followed by nothing, by a separator
(``:``, ``-``, ``–``, ``—``, ``(``, ``[``, ``|``, ``/``) or by a word that continues an absence
notice (``until``, ``jusqu'au``, ``bis``, ``hasta``…). So "Réponse automatique : Devis",
"AW: Abwesenheitsnotiz" and "Out of office until 5 May" are auto-replies, while "Question about
your automatic reply settings" and "Automatic reply settings" are not: a customer may write
about auto-replies, a machine names itself first. Bounce subjects are the fixed phrasings of
mail servers ("Undelivered Mail Returned to Sender", "Non remis : …") and take no reply prefix.
"""

from __future__ import annotations

import re
import unicodedata

from .message import Email

#: ``Precedence`` / ``X-Precedence`` values of machine mail.
AUTOMATED_PRECEDENCE = frozenset({"bulk", "list", "junk", "auto_reply", "auto-reply"})
#: Headers whose mere presence marks an auto-reply (unless their value is a plain "no").
AUTOREPLY_HEADERS = (
    "x-autoreply",
    "x-autorespond",
    "x-autoresponder",
    "x-autoreply-from",
    "x-mail-autoreply",
)
#: Local parts of the addresses bounces come from (``MicrosoftExchange<hex>`` too: Exchange NDRs).
BOUNCE_SENDERS = frozenset({"mailer-daemon", "mailerdaemon", "postmaster", "mail-daemon"})

# Phrases are written folded (no accents, lower case); the longest are tried first.
AUTOREPLY_PHRASES = (
    # French
    "reponse automatique d'absence",
    "reponse automatique",
    "reponse d'absence",
    "message automatique",
    "message d'absence",
    "absent du bureau",
    "absente du bureau",
    "absence du bureau",
    "en conge",
    "en conges",
    # English
    "out of office autoreply",
    "out of office auto reply",
    "out of office",
    "out of the office",
    "automatic reply",
    "auto reply",
    "auto-reply",
    "autoreply",
    "auto response",
    "auto-response",
    "automatic response",
    "away from the office",
    "away from office",
    # German
    "automatische antwort",
    "automatische abwesenheitsnotiz",
    "abwesenheitsnotiz",
    "abwesenheitsmeldung",
    "abwesenheit",
    "abwesend",
    "auto-antwort",
    # Spanish
    "respuesta automatica",
    "respuesta de ausencia",
    "mensaje automatico",
    "fuera de la oficina",
    "fuera de oficina",
    "ausente",
    "ausencia",
)
#: Words that may follow a phrase after a space: "Out of office until…", "Abwesend bis…".
CONTINUATIONS = (
    "until", "till", "from", "through", "autoreply", "auto-reply", "reply",
    "du", "jusqu", "a partir",
    "bis", "vom", "von", "ab",
    "hasta", "desde", "del",
)  # fmt: skip

#: Subjects of bounces, whole (``$``) or as a prefix the server puts before the original subject.
BOUNCE_SUBJECTS = (
    r"undelivered mail( returned to sender$|\s*:)",
    r"undeliverable( mail)?\s*:",
    r"undeliverable message$",
    r"delivery status notification \((failure|delay|echec)\)$",
    r"delivery (status )?notification: delivery has (failed|been delayed)$",
    r"mail delivery failed(: returning message to sender)?$",
    r"mail delivery failure$",
    r"delivery failure(\s*:|$)",
    r"failure notice$",
    r"returned mail\s*:",
    r"mail system error - returned mail$",
    r"warning: could not send message",
    r"delayed mail \(still being retried\)$",
    r"non remis\s*:",
    r"non distribuable\s*:",
    r"notification d'etat de (la )?(remise|distribution) \((echec|retard)\)$",
    r"echec de (la )?(remise|distribution)(\s*:|$)",
    r"unzustellbar\s*:",
    r"nicht zustellbar\s*:",
    r"benachrichtigung zum (zustellstatus|ubermittlungsstatus) \((fehler|verzogerung)\)$",
    r"no se puede entregar\s*:",
    r"no se pudo entregar\s*:",
    r"notificacion de estado de (la )?entrega \((error|fallo|retraso)\)$",
)
_BOUNCE_RE = re.compile("|".join(f"(?:{p})" for p in BOUNCE_SUBJECTS))

_PREFIX_RE = re.compile(
    r"^(?:(?:re|aw|antw|antwort|sv|vs|ref|rif|odp|r)\s*(?:\[\d+\]|\(\d+\))?\s*:\s*"
    r"|\[[^\[\]]{0,60}\]\s*"
    r"|\((?:ext|external|externe|extern)\)\s*)",
)
_SEPARATORS = ":-–—([|/"
_PHRASES_LONGEST_FIRST = tuple(sorted(AUTOREPLY_PHRASES, key=len, reverse=True))
_APOSTROPHES = str.maketrans({"’": "'", "‘": "'", "`": "'", "´": "'", "\u00a0": " "})


def fold(text: str) -> str:
    """Lower case, no accents, straight apostrophes, single spaces."""
    decomposed = unicodedata.normalize("NFKD", text.translate(_APOSTROPHES))
    plain = "".join(c for c in decomposed if not unicodedata.combining(c))
    return " ".join(plain.casefold().split())


def strip_prefixes(folded: str) -> str:
    """``folded`` without its leading reply prefixes and bracketed tags."""
    while True:
        match = _PREFIX_RE.match(folded)
        if match is None or not match.group(0):
            return folded
        folded = folded[match.end() :].lstrip()


def autoreply_subject(subject: str) -> str | None:
    """The auto-reply phrase the subject starts with (see the module docstring), or ``None``."""
    text = strip_prefixes(fold(subject))
    for phrase in _PHRASES_LONGEST_FIRST:
        if not text.startswith(phrase):
            continue
        rest = text[len(phrase) :]
        bare = rest.rstrip(" .!")
        if not bare or bare.lstrip()[0] in _SEPARATORS:
            return phrase
        if rest[0] == " " and any(_starts_word(rest[1:], word) for word in CONTINUATIONS):
            return phrase
    return None


def _starts_word(text: str, word: str) -> bool:
    """``text`` starts with the whole ``word`` (``jusqu`` may run into its apostrophe)."""
    if not text.startswith(word):
        return False
    after = text[len(word) : len(word) + 1]
    return not after or not after.isalnum()


def bounce_subject(subject: str) -> str | None:
    """The bounce phrasing the subject starts with, or ``None``. No reply prefix is allowed:
    a person answering about a bounce is not a bounce."""
    match = _BOUNCE_RE.match(fold(subject))
    return match.group(0).rstrip(" :") if match else None


def _is_no(value: str) -> bool:
    return value.strip().lower() in ("no", "false", "0")


def header_reason(email: Email) -> str | None:
    """Why the headers say a machine sent this (auto-reply, list, loop marker), or ``None``."""
    auto = email.header("auto-submitted")
    if auto is not None:
        kind = auto.split(";")[0].strip().lower()
        if kind not in ("", "no"):
            return f"auto-submitted: {kind}"
    for name in ("precedence", "x-precedence"):
        value = (email.header(name) or "").strip().lower()
        if value in AUTOMATED_PRECEDENCE:
            return f"{name}: {value}"
    for name in AUTOREPLY_HEADERS:
        header = email.header(name)
        if header is not None and not _is_no(header):
            return f"auto-reply ({name})"
    if (email.header("x-autogenerated") or "").strip().lower() == "reply":
        return "auto-reply (x-autogenerated: reply)"
    suppress = (email.header("x-auto-response-suppress") or "").lower()
    if {"oof", "all"} & set(re.split(r"[\s,;]+", suppress)):
        return f"auto-reply (x-auto-response-suppress: {suppress.strip()[:40]})"
    if email.header("x-ms-exchange-inbox-rules-loop") is not None:
        return "sent on by a mailbox rule (x-ms-exchange-inbox-rules-loop)"
    if email.header("x-loop") is not None:
        return "loop marker (x-loop)"
    if email.header("list-id") is not None:
        return "mailing list"
    if email.header("list-unsubscribe") is not None:
        return "mailing list (list-unsubscribe)"
    return None


def is_delivery_report(email: Email) -> bool:
    """A DSN: ``multipart/report; report-type=delivery-status`` (RFC 3464)."""
    content_type = (email.header("content-type") or "").lower()
    if not content_type.strip().startswith("multipart/report"):
        return False
    match = re.search(r"report-type\s*=\s*\"?([a-z0-9-]+)", content_type)
    return match is None or match.group(1) == "delivery-status"


def bounce_signal(email: Email) -> str | None:
    """Why this looks like a bounce (a DSN, a mail server's sender, an empty return path or a
    server's subject), or ``None``."""
    content_type = (email.header("content-type") or "").strip().lower()
    if content_type.startswith("multipart/report"):
        return (
            "bounce (delivery report)"
            if is_delivery_report(email)
            else "report (read receipt or other)"
        )
    return_path = email.header("return-path")
    if return_path is not None and return_path.strip() in ("<>", ""):
        return "bounce (empty return path)"
    local = email.sender.partition("@")[0]
    if local in BOUNCE_SENDERS or (local.startswith("microsoftexchange") and len(local) > 20):
        return f"bounce ({email.sender})"
    phrase = bounce_subject(email.subject)
    if phrase is not None:
        return f"bounce (subject: {phrase})"
    return None


def automated_reason(email: Email) -> str | None:
    """Why this mail was sent by a machine (headers, bounce, subject), or ``None`` for a person."""
    why = header_reason(email) or bounce_signal(email)
    if why is not None:
        return why
    phrase = autoreply_subject(email.subject)
    return f"auto-reply (subject: {phrase})" if phrase is not None else None
