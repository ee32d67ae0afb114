"""Confirmation requests: how a correction that cannot prove its author still gets applied.

A correction whose ``Authentication-Results`` do not show it authentic may come from anyone who
typed a staff address in ``From:``. Instead of trusting it, the router mails the claimed address a
short request carrying a fresh reference, ``[MRC-<ref>]``, and applies the correction only when a
reply carrying that reference comes back from the same address. A spoofer never receives the
request, so never learns the reference.

The reference is an HMAC of the correction's row and mail under the token key: unguessable
without the key, never printed in a forward or anything else someone else receives, and the
same if the request has to be sent again after a crash. Only its hash is stored.

The request says ``Auto-Submitted: auto-generated``, ``Precedence: bulk`` and
``X-Auto-Response-Suppress: All`` so that vacation responders (RFC 3834, Sieve, Exchange) stay
silent: an out-of-office answer must never confirm anything (the router also ignores the
auto-replies it recognises).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from datetime import datetime
from email.policy import SMTP
from urllib.parse import quote

from ..config import Settings, fold
from ..pipeline.compose import notice_message

#: ``[MRC-<32 hex digits>]``: 128 bits, distinct from the forwards' ``[MR-…]`` tokens.
REF_RE = re.compile(r"\[MRC-([0-9A-Fa-f]{32})\]")
REF_LENGTH = 32
#: Answers that decline; any other answer (``oui``, ``ok``, ``yes``, or any text) confirms.
_DECLINE = {"non", "no", "nope", "annuler", "annule", "cancel", "refuse", "refuser", "stop"}


def make_ref(key: bytes, correction_id: int, mail_id: str) -> str:
    """The reference of one correction's confirmation request (lower-case hex)."""
    seed = f"confirm\0{correction_id}\0{mail_id}".encode()
    return hmac.new(key, seed, hashlib.sha256).hexdigest()[:REF_LENGTH]


def ref_hash(ref: str) -> str:
    """What the state database keeps of a reference."""
    return hashlib.sha256(ref.lower().encode()).hexdigest()


def find_refs(*texts: str) -> list[str]:
    """Every ``[MRC-…]`` reference in ``texts``, lower-cased, in order, without duplicates."""
    seen: dict[str, None] = {}
    for text in texts:
        for match in REF_RE.finditer(text or ""):
            seen.setdefault(match.group(1).lower(), None)
    return list(seen)


def declines(first_line: str) -> bool:
    """Whether the answer's first own line says no (``non``, ``no``, ``annuler``, ``cancel``)."""
    words = re.sub(r"[^\w' ]+", " ", fold(first_line)).split()
    return bool(words) and words[0] in _DECLINE


def request_text(
    *, subject: str, sender: str, old: str | None, new: str, kind: str, expires: datetime
) -> str:
    """The body of a confirmation request: what will change, and how to confirm (FR, then EN)."""
    was = old or "tri / triage"
    until = expires.strftime("%Y-%m-%d")
    if kind == "confirm":
        change_fr = f"confirmer que « {subject} » (de {sender}) relève bien de {new}"
        change_en = f"confirm that “{subject}” (from {sender}) belongs to {new}"
    else:
        change_fr = f"renvoyer « {subject} » (de {sender}) à {new} (il était chez {was})"
        change_en = f"re-forward “{subject}” (from {sender}) to {new} (it was with {was})"
    return (
        f"Une correction envoyée sous votre adresse demande de {change_fr}.\n"
        f"Si elle vient bien de vous, répondez simplement à ce message (par exemple « oui ») "
        f"avant le {until}. Sinon, ignorez-le : rien ne changera. Répondez « non » pour "
        "l'annuler.\n\n"
        f"A correction sent under your address asks to {change_en}.\n"
        f"If you sent it, just reply to this message (for example “yes”) before {until}. "
        "Otherwise ignore it: nothing will change. Reply “no” to cancel it.\n"
    )


def compose_request(settings: Settings, *, to: str, ref: str, text: str, subject: str) -> bytes:
    """The confirmation request mail, addressed to the claimed author only."""
    router = settings.smtp.from_address
    short = " ".join(subject.split())[:80] or "(sans objet)"
    msg = notice_message(
        settings,
        to=to,
        subject=f"[MRC-{ref}] Confirmer la correction / Confirm the correction: {short}",
        notice="confirmation-request",
    )
    msg["Precedence"] = "bulk"
    msg["X-Auto-Response-Suppress"] = "All"
    link = f"mailto:{router}?subject={quote(f'[MRC-{ref}] oui')}&body=oui"
    msg.set_content(
        f"{text}\nUn clic pour confirmer / One click to confirm: {link}\n",
        charset="utf-8",
        cte="quoted-printable",
    )
    return msg.as_bytes(policy=SMTP)
