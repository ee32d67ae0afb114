"""The routing decision: a pure function from (prediction, email, settings) to a :class:`Route`.

Two steps, both without I/O:

* :func:`screen` looks at the email alone, before any model runs: the router's own mail, automatic
  replies, bounces and mailing-list mail (see :mod:`mailrouter.automated`) and mail from our own
  addresses (a department's, the triage address) must never be forwarded (mail loops, noise),
  and a message with no readable text cannot be classified.
* :func:`decide` turns a prediction into a route: a configured department above the confidence
  threshold, else triage. A missing prediction (classifier error) is triage too. Nothing a model
  says can name an address: only a label already checked against the departments.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from .automated import automated_reason
from .config import Department, Settings
from .message import Email
from .prediction import Prediction
from .rules import Rule

RouteKind = Literal["department", "triage", "spam", "ignore"]


@dataclass(frozen=True)
class Route:
    """Where a message goes. ``address`` is set for ``department`` and ``triage`` routes."""

    kind: RouteKind
    department: str | None
    address: str | None
    reason: str

    @property
    def forwards(self) -> bool:
        return self.kind in ("department", "triage")


def triage(settings: Settings, reason: str, department: str | None = None) -> Route:
    return Route("triage", department, settings.smtp.triage_address, reason)


def internal_sender(email: Email, settings: Settings) -> str | None:
    """Which of our own addresses sent this (a department's, the triage address, the contact
    mailbox's), or ``None``. Such mail is never forwarded: a department's auto-reply to its
    forward would come back to it, and answer again."""
    sender = email.sender
    if not sender:
        return None
    if sender == settings.smtp.triage_address.strip().lower():
        return f"the triage address {sender}"
    for department in settings.departments:
        if department.address and sender == department.address.strip().lower():
            return f"the address of department {department.name} ({sender})"
    if "@" in settings.mailbox.username and sender == settings.mailbox.username.strip().lower():
        return f"the contact mailbox's own address {sender}"
    return None


def our_mark(email: Email) -> str | None:
    """The ``X-MailRouter-*`` header that marks mail the router itself sent, or ``None``."""
    return next((name for name, _ in email.headers if name.startswith("x-mailrouter-")), None)


def screen(email: Email, settings: Settings) -> Route | None:
    """The route decided before classification, or ``None`` when the email should be classified."""
    ours = our_mark(email)
    if ours is not None:
        return Route("ignore", None, None, f"sent by the router ({ours})")
    if email.sender and email.sender == settings.smtp.from_address.strip().lower():
        return Route("ignore", None, None, "sent from the router's own address")
    why = automated_reason(email)
    internal = internal_sender(email, settings)
    if why is not None:
        if settings.mailbox.automated == "triage" and internal is None:
            return triage(settings, f"automated mail: {why}")
        return Route("ignore", None, None, f"automated mail: {why}")
    if internal is not None:
        # A person at a department may write here: filed in the triage folder, never sent on.
        return Route("ignore", None, None, f"internal mail from {internal}: filed, not forwarded")
    if not (email.body.strip() or email.full_text.strip() or email.subject.strip()):
        defects = f" ({', '.join(email.defects[:3])})" if email.defects else ""
        return triage(settings, f"no readable text{defects}")
    return None


def limit_rate(route: Route, sender: str, recent: int, settings: Settings) -> Route:
    """``route``, unless it forwards and ``sender``'s mail was already forwarded ``recent``
    times in the last hour, at or over ``mailbox.max_forwards_per_sender_per_hour`` (0: no
    limit): then the mail is filed in the triage folder for a person, not sent. One address
    (a looping auto-responder, a flood) cannot make the router send an unbounded stream."""
    limit = settings.mailbox.max_forwards_per_sender_per_hour
    if not route.forwards or limit == 0 or recent < limit:
        return route
    who = sender or "(no sender)"
    return Route(
        "ignore",
        route.department,
        None,
        f"rate limit: {recent} forwards of mail from {who} in the last hour "
        f"(max_forwards_per_sender_per_hour = {limit}): filed, not forwarded",
    )


def decide(
    prediction: Prediction | None, email: Email, settings: Settings, error: str = ""
) -> Route:
    """The route for a classified email; ``prediction`` is ``None`` when the classifier failed."""
    screened = screen(email, settings)
    if screened is not None:
        return screened
    if prediction is None:
        return triage(settings, f"classifier error: {error or 'no answer'}")
    if prediction.label is None:
        shown = prediction.raw.strip()[:40]
        return triage(settings, f"unknown answer {shown!r}" if shown else "no answer")
    try:
        department = settings.department(prediction.label)
    except KeyError:
        return triage(settings, f"label {prediction.label!r} is not a configured department")
    threshold = settings.classifier.threshold_for(prediction.model, prediction.threshold)
    if prediction.confidence < threshold:
        return triage(
            settings,
            f"low confidence {prediction.confidence:.2f} ({department.name} < {threshold:.2f})",
            department=department.name,
        )
    return department_route(department, model_reason(prediction), settings)


def model_reason(prediction: Prediction) -> str:
    """``model 0.93 (next: Support 0.05)``: the confidence, and the runner-up when known."""
    reason = f"model {prediction.confidence:.2f}"
    runners = [(n, p) for n, p in prediction.likeliest(2) if n != prediction.label]
    if runners:
        reason += f" (next: {runners[0][0]} {runners[0][1]:.2f})"
    return reason


def department_route(department: Department, reason: str, settings: Settings) -> Route:
    """Where mail decided for ``department`` goes: forwarded, filed as spam, or to triage."""
    if department.action == "spam":
        return Route("spam", department.name, None, reason)
    if department.action == "triage":
        return triage(settings, f"{reason} (department sends to triage)", department.name)
    return Route("department", department.name, department.address, reason)


def rule_route(rule: Rule, settings: Settings) -> Route:
    """The route a matching ``[[rules]]`` entry decides, before any model."""
    reason = f'rule "{rule.name}"'
    if rule.department is not None:
        return department_route(settings.department(rule.department), reason, settings)
    if rule.action == "spam":
        spam = next((d.name for d in settings.departments if d.action == "spam"), None)
        return Route("spam", spam, None, reason)
    if rule.action == "ignore":
        return Route("ignore", None, None, reason)
    return triage(settings, reason)


def thread_route(
    email: Email,
    conversation: Sequence[Conversation],
    corrected: str | None,
    settings: Settings,
) -> Route | None:
    """Where a follow-up goes when it answers a conversation the router routed.

    ``conversation`` is what the follow-up's ``In-Reply-To``/``References`` name, newest first;
    ``corrected`` the label of the newest correction of any of it (a correction moves the
    conversation). Those headers are the sender's to write, so they are followed only for the
    conversation's own correspondent (the same address or the same domain): anyone else's mail
    is classified.
    """
    mine = [c for c in conversation if same_correspondent(email.sender, c.sender)]
    if not mine or not settings.routing.follow_threads:
        return None
    label = corrected or mine[0].label
    if label is None:
        return None
    try:
        department = settings.department(label)
    except KeyError:
        return None  # a department since removed from the config: the model decides
    return department_route(department, f"thread #{mine[-1].id}", settings)


@dataclass(frozen=True)
class Conversation:
    """A routed message a follow-up names: who wrote it and where it was routed."""

    id: int
    sender: str
    label: str | None


def same_correspondent(a: str, b: str) -> bool:
    """The same address, or two addresses of the same domain."""
    a, b = a.strip().lower(), b.strip().lower()
    return bool(a and b) and (a == b or (a.rpartition("@")[2] == b.rpartition("@")[2] != ""))
