"""The correction block of a forward and the daily spam digest, in text and HTML.

Staff correct a route with one click: each link is a ``mailto:`` to the router whose subject is
``[MR-<token>] <department>``. The HTML uses inline styles and plain tables only, which Apple Mail,
Outlook (Word renderer) and Gmail all display the same way. French first, then English.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import quote

from ..config import Settings
from ..pipeline.compose import ForwardFacts, Notice

SPAM_WORD = "spam"


@dataclass(frozen=True)
class Link:
    label: str
    command: str
    url: str


def mailto(router: str, token: str, command: str) -> str:
    subject = f"[MR-{token}] {command}"
    return f"mailto:{router}?subject={quote(subject)}&body={quote(command)}"


def links(settings: Settings, token: str, current: str | None) -> list[Link]:
    """One link per department other than ``current``, then ``spam`` unless it is current."""
    router = settings.smtp.from_address
    out = []
    spam_names = {d.name for d in settings.departments if d.action == "spam"}
    for dep in settings.departments:
        if dep.name == current or dep.name in spam_names:
            continue
        out.append(Link(dep.name, dep.name, mailto(router, token, dep.name)))
    if current not in spam_names:
        out.append(Link("Spam", SPAM_WORD, mailto(router, token, SPAM_WORD)))
    return out


def _percent(confidence: float | None) -> str:
    return "?" if confidence is None else f"{round(confidence * 100)} %"


def correction_block(
    settings: Settings,
    *,
    token: str,
    department: str | None,
    confidence: float | None,
    model: str,
    reason: str = "",
    likeliest: Sequence[tuple[str, float]] = (),
) -> tuple[str, str]:
    """The block appended to a forward: (plain text, HTML fragment).

    It says why the mail went where it went (``reason``). A mail sent to triage lists the
    likeliest departments first, with their probabilities, so the triage person routes it — and
    teaches the model — with one click.
    """
    where = department or "tri / triage"
    choices = links(settings, token, department)
    top = [] if department else _top_links(choices, likeliest)
    head = (
        f"mailrouter : classé « {where} » (confiance {_percent(confidence)}, modèle {model})",
        f"mailrouter: routed to {where} (confidence {_percent(confidence)}, model {model})",
        f"Raison / Reason : {reason}" if reason else "",
    )
    return _block_text(head, top, choices, token), _block_html(head, top, choices, token)


def _top_links(choices: Sequence[Link], likeliest: Sequence[tuple[str, float]]) -> list[Link]:
    by_label = {link.command: link for link in choices}
    return [
        Link(f"{name} {_percent(p)}", name, by_label[name].url)
        for name, p in likeliest[:3]
        if name in by_label
    ]


def _block_text(
    head: Sequence[str], top: Sequence[Link], choices: Sequence[Link], token: str
) -> str:
    text = ["", "-- ", *(line for line in head if line)]
    if top:
        text += ["Les plus probables / Likeliest:"]
        text += [f"  {link.label} : {link.url}" for link in top]
    text += [
        "Mauvais service ? Répondez avec le bon service, ou cliquez :",
        "Wrong department? Reply with the right one, or click:",
    ]
    text += [f"  {link.label} : {link.url}" for link in choices]
    text += [f"Réf. / Ref. [MR-{token}]", ""]
    return "\n".join(text)


def _buttons(choices: Sequence[Link]) -> str:
    return " ".join(
        f'<a href="{html.escape(link.url)}" style="display:inline-block;padding:4px 10px;'
        f"margin:2px;border:1px solid #8a8a8a;border-radius:4px;color:#1a1a1a;"
        f'text-decoration:none;font-family:Arial,sans-serif;font-size:13px">'
        f"{html.escape(link.label)}</a>"
        for link in choices
    )


def _block_html(
    head: Sequence[str], top: Sequence[Link], choices: Sequence[Link], token: str
) -> str:
    lines = "".join(f"{html.escape(line)}<br>" for line in head if line)
    likeliest = f"<b>Les plus probables / Likeliest:</b> {_buttons(top)}<br>" if top else ""
    return (
        '<table role="presentation" cellpadding="8" cellspacing="0" border="0" '
        'style="margin-top:16px;border-top:1px solid #cccccc;font-family:Arial,sans-serif;'
        f'font-size:13px;color:#444444"><tr><td>{lines}{likeliest}'
        "Mauvais service ? Répondez avec le bon service, ou cliquez : / "
        "Wrong department? Reply with the right one, or click:<br>"
        f"{_buttons(choices)}<br>"
        f'<span style="color:#888888;font-size:11px">Réf. [MR-{html.escape(token)}]</span>'
        "</td></tr></table>"
    )


@dataclass(frozen=True)
class DigestItem:
    token: str
    sender: str
    subject: str
    date: datetime | None


def spam_digest(settings: Settings, items: Sequence[DigestItem]) -> tuple[str, str, str]:
    """The daily digest of mail filed as spam: (subject, plain text, HTML)."""
    subject = f"mailrouter : {len(items)} courriel(s) classé(s) spam / filed as spam"
    text = [
        "Courriels classés spam depuis le dernier résumé. "
        "Pas un spam ? Cliquez sur le bon service.",
        "Mail filed as spam since the last digest. Not spam? Click the right department.",
        "",
    ]
    rows = []
    for item in items:
        when = item.date.strftime("%Y-%m-%d %H:%M") if item.date else ""
        choices = links(settings, item.token, current=_spam_name(settings))
        text.append(f"* {when} {item.sender} — {item.subject}")
        text += [f"    {link.label} : {link.url}" for link in choices]
        cells = " ".join(
            f'<a href="{html.escape(link.url)}">{html.escape(link.label)}</a>' for link in choices
        )
        rows.append(
            f"<tr><td>{html.escape(when)}</td><td>{html.escape(item.sender)}</td>"
            f"<td>{html.escape(item.subject)}</td><td>{cells}</td></tr>"
        )
    body = (
        '<p style="font-family:Arial,sans-serif">Courriels classés spam. Pas un spam ? '
        "Cliquez sur le bon service. / Not spam? Click the right department.</p>"
        '<table border="1" cellpadding="4" cellspacing="0" style="border-collapse:collapse;'
        'font-family:Arial,sans-serif;font-size:13px"><tr><th>Date</th><th>De / From</th>'
        "<th>Objet / Subject</th><th>Pas un spam → / Not spam →</th></tr>"
        + "".join(rows)
        + "</table>"
    )
    return subject, "\n".join(text) + "\n", body


def _spam_name(settings: Settings) -> str | None:
    return next((d.name for d in settings.departments if d.action == "spam"), None)


def forward_notice(settings: Settings, facts: ForwardFacts) -> Notice:
    """The correction block of every forward (the pipeline's ``notice`` seam)."""
    text, html = correction_block(
        settings,
        token=facts.token,
        department=facts.department,
        confidence=facts.confidence,
        model=facts.model or "?",
        reason=facts.reason,
        likeliest=facts.likeliest,
    )
    return Notice(text=text, html=html)
