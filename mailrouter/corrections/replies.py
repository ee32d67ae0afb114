"""Reading a staff correction: the token it carries, the command it gives, whether to trust it.

Pure functions only: the caller (``corrections.py``) looks up forwards and sends mail. Keeping the
parsing here lets every reply shape (Apple Mail, Outlook, Gmail, Thunderbird, phones) be tested
without a server.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ..config import Department, fold

#: ``[MR-<token>]`` as written in the subject of the mailto links and in the forward's body.
TOKEN_RE = re.compile(r"\[MR-([A-Za-z0-9]{6,32})\]")

_FILLERS = set(
    [
        "->",
        "=>",
        ">",
        "pour",
        "to",
        "vers",
        "service",
        "au",
        "a",
        "le",
        "la",
        "les",
        "the",
        "dept",
        "department",
        "departement",
        "please",
        "svp",
        "stp",
        "merci",
        "thanks",
        "plutot",
        "instead",
        "c'est",
        "cest",
        "du",
        "its",
        "it's",
        "is",
    ]
)
_CONFIRM = {"ok", "okay", "correct", "bon", "c'est bon", "cest bon", "oui", "yes", "good", "exact"}
_SPAM = {"spam", "indesirable", "junk", "pub", "publicite"}
_GREETING = re.compile(
    r"^(bonjour|bonsoir|hello|hi|salut|coucho?u|hey|dear [\w .-]+|cher [\w .-]+|chere [\w .-]+)"
    r"[\w .-]{0,30}[,!.]?$"
)


@dataclass(frozen=True)
class Command:
    """What a staff reply asks for. ``department`` is set for ``route`` and ``spam``."""

    kind: Literal["route", "spam", "confirm", "unknown"]
    department: str | None = None
    text: str = ""


def find_tokens(text: str) -> list[str]:
    """Every ``[MR-…]`` token in ``text``, in order, without duplicates."""
    seen: dict[str, None] = {}
    for match in TOKEN_RE.finditer(text or ""):
        seen.setdefault(match.group(1), None)
    return list(seen)


def subject_command(subject: str) -> str:
    """The words after the token in a subject (``Re: [MR-x] Finance`` → ``Finance``)."""
    match = TOKEN_RE.search(subject or "")
    return subject[match.end() :].strip() if match else ""


def first_command_line(body: str) -> str:
    """The first line of a reply's own text that is not a greeting.

    ``body`` is already stripped of quoted text and signature by :func:`message.strip_quoted`.
    """
    for line in (body or "").splitlines():
        text = line.strip()
        if not text or text.startswith(">"):
            continue
        if _GREETING.match(fold(text)):
            continue
        return text
    return ""


def parse_command(text: str, departments: Sequence[Department]) -> Command:
    """Read ``Finance``, ``-> compta``, ``pour RH``, ``to sales``, ``service commercial``, ``ok``.

    Case, accents and filler words are ignored; anything else is ``unknown`` and earns the
    sender a help reply, never a guess.
    """
    words = _words(text)
    while words and words[0] in _FILLERS:
        words.pop(0)
    while words and words[-1] in _FILLERS:
        words.pop()
    phrase = " ".join(words)
    if not phrase:
        return Command("unknown", text=text)
    spam_dep = next((d.name for d in departments if d.action == "spam"), None)
    for dep in departments:
        keys = {fold(dep.name), *(fold(a) for a in dep.aliases)}
        if phrase in keys:
            if dep.action == "spam":
                return Command("spam", dep.name, text)
            return Command("route", dep.name, text)
    if phrase in _SPAM and spam_dep:
        return Command("spam", spam_dep, text)
    if phrase in _CONFIRM:
        return Command("confirm", text=text)
    return Command("unknown", text=text)


def _words(text: str) -> list[str]:
    folded = fold(text)
    folded = re.sub(r"[\s:;,.!?()\"*_]+", " ", folded)
    folded = folded.replace("=>", " => ").replace("->", " -> ")
    return [w for w in folded.split() if w]


# --- trust ----------------------------------------------------------------------------------


def is_staff(sender: str, domains: Sequence[str], addresses: Sequence[str]) -> bool:
    """Whether ``sender`` is a staff address or its domain is exactly a staff domain.

    Exact: ``mail.example.com`` is staff only when listed itself, since anyone who can register
    or spoof a subdomain (a marketing tool's ``news.example.com``) must not become staff. This
    only says who *may* correct: the mail still has to prove its author (see corrections).
    """
    sender = sender.strip().lower()
    if not sender or "@" not in sender:
        return False
    if sender in {a.strip().lower() for a in addresses}:
        return True
    domain = sender.rpartition("@")[2]
    return domain in {d.strip().lower() for d in domains if d.strip()}
