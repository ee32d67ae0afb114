"""The routing decision: a pure function from (prediction, email, settings) to a :class:`Route`.

Two steps, both without I/O:

* :func:`screen` looks at the email alone, before any model runs: the router's own mail, automatic
  replies, bounces and mailing-list mail must never be forwarded (mail loops, noise), and a message
  with no readable text cannot be classified.
* :func:`decide` turns a prediction into a route: a configured department above the confidence
  threshold, else triage. A missing prediction (classifier error) is triage too. Nothing a model
  says can name an address: only a label already checked against the departments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .classify.base import Prediction

if TYPE_CHECKING:
    from .config import Settings
    from .message import Email

RouteKind = Literal["department", "triage", "spam", "ignore"]

AUTOMATED_PRECEDENCE = {"bulk", "list", "junk", "auto_reply"}
AUTOREPLY_HEADERS = ("x-autoreply", "x-autorespond", "x-autoresponder")
BOUNCE_SENDERS = {"mailer-daemon", "postmaster", "mail-daemon"}


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


def _automated(email: Email, settings: Settings) -> str | None:
    """Why this looks like machine-sent mail, or ``None``."""
    auto = email.header("auto-submitted")
    if auto is not None and auto.split(";")[0].strip().lower() not in ("", "no"):
        return f"auto-submitted: {auto.split(';')[0].strip().lower()}"
    precedence = (email.header("precedence") or "").strip().lower()
    if precedence in AUTOMATED_PRECEDENCE:
        return f"precedence: {precedence}"
    for name in AUTOREPLY_HEADERS:
        if email.header(name) is not None:
            return f"auto-reply ({name})"
    content_type = (email.header("content-type") or "").strip().lower()
    if content_type.startswith("multipart/report"):
        return "bounce (delivery report)"
    return_path = email.header("return-path")
    if return_path is not None and return_path.strip() in ("<>", ""):
        return "bounce (empty return path)"
    if email.sender.partition("@")[0] in BOUNCE_SENDERS:
        return f"bounce ({email.sender})"
    if email.header("list-id") is not None:
        return "mailing list"
    return None


def screen(email: Email, settings: Settings) -> Route | None:
    """The route decided before classification, or ``None`` when the email should be classified."""
    ours = next((name for name, _ in email.headers if name.startswith("x-mailrouter-")), None)
    if ours is not None:
        return Route("ignore", None, None, f"sent by the router ({ours})")
    if email.sender and email.sender == settings.smtp.from_address.strip().lower():
        return Route("ignore", None, None, "sent from the router's own address")
    why = _automated(email, settings)
    if why is not None:
        if settings.mailbox.automated == "triage":
            return triage(settings, f"automated mail: {why}")
        return Route("ignore", None, None, f"automated mail: {why}")
    if not (email.body.strip() or email.full_text.strip() or email.subject.strip()):
        defects = f" ({', '.join(email.defects[:3])})" if email.defects else ""
        return triage(settings, f"no readable text{defects}")
    return None


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
    threshold = settings.classifier.threshold_for(prediction.model)
    if prediction.confidence < threshold:
        return triage(
            settings,
            f"low confidence {prediction.confidence:.2f} < {threshold:.2f} for {department.name}",
            department=department.name,
        )
    reason = f"{department.name} with confidence {prediction.confidence:.2f}"
    if department.action == "spam":
        return Route("spam", department.name, None, reason)
    if department.action == "triage":
        return triage(settings, f"{reason} (department sends to triage)", department.name)
    return Route("department", department.name, department.address, reason)
