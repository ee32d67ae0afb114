"""What every classifier returns, what it reads, and the one place a model's answer becomes a
label.

Whatever text a model produces, only :func:`map_label` turns it into a department name, and only
if it names a configured department or one of its aliases; anything else is ``None`` (the router
sends it to triage, never a guess).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .config import Department, fold
from .message import Email
from .prompt import PromptOptions, build_prompt

_LATIN_END = 0x24F  # end of Latin Extended-B: accented letters of European languages


@dataclass(frozen=True)
class Prediction:
    """A classifier's answer. ``label`` is a configured department name or ``None`` (unknown)."""

    label: str | None
    confidence: float
    model: str
    raw: str = ""
    #: Each department's probability, when the backend can tell (what a reason, the triage
    #: links and ``history --explain`` show); empty otherwise.
    probabilities: Mapping[str, float] = field(default_factory=dict)
    #: The threshold this model version calibrated for ``label`` (see
    #: :mod:`mailrouter.calibration`); ``None``: the configured global threshold applies.
    threshold: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.confidence <= 1.0:
            raise ValueError(f"confidence {self.confidence} is outside [0, 1]")

    def likeliest(self, n: int = 3) -> list[tuple[str, float]]:
        """The ``n`` likeliest departments, most probable first."""
        ranked = sorted(self.probabilities.items(), key=lambda kv: (-kv[1], kv[0]))
        return ranked[:n]


@dataclass(frozen=True)
class ClassifyInput:
    """What a classifier reads: the same fields :func:`mailrouter.prompt.build_prompt` takes."""

    text: str
    subject: str = ""
    sender_domain: str = ""

    @classmethod
    def from_email(cls, email: Email) -> ClassifyInput:
        """What is read of a live email; a correction records the same fields as its example."""
        return cls(
            text=email.body or email.full_text,
            subject=email.subject,
            sender_domain=email.sender_domain,
        )

    def prompt(
        self,
        departments: Sequence[Department],
        options: PromptOptions = PromptOptions(),  # noqa: B008 - frozen dataclass
    ) -> str:
        """The one prompt for this input; training export and every backend call this."""
        return build_prompt(
            self.text,
            departments,
            subject=self.subject,
            sender_domain=self.sender_domain,
            options=options,
        )


def map_label(answer: str, departments: Sequence[Department]) -> str | None:
    """Map a model's answer onto a department name (case, accents, aliases); ``None`` otherwise.

    The answer is stripped (llama.cpp answers ``" RH"`` where MLX answers ``"RH"``), trailing
    punctuation is ignored, and only an exact name or alias counts: "RH et Finance" is not a label.
    Letters outside the Latin script (fullwidth ``Ｆ``, Cyrillic ``і``, zero-width joiners) are
    refused rather than folded: a look-alike of a department is not that department.
    """
    if any(ord(c) > _LATIN_END or unicodedata.category(c) == "Cf" for c in answer):
        return None
    key = fold(answer).strip(" \t\r\n.:;,!?\"'`*")
    if not key:
        return None
    for dep in departments:
        if key == fold(dep.name) or key in {fold(a) for a in dep.aliases}:
            return dep.name
    return None
