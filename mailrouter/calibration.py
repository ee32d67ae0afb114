"""Per-department confidence thresholds, calibrated for a target precision — pure.

A global threshold says little: 0.6 of one model is not 0.6 of another, and a department the
model rarely confuses can be trusted lower than one it often does. So after each training (and
each retrain of the baseline) every department gets the **lowest** threshold at which the
predictions of that department with at least that confidence were right at least
``classifier.target_precision`` of the time on the validation split. The router sends an answer
below its department's threshold to triage.

Three outcomes for a department, each said in the report:

* ``calibrated``: a threshold reaches the target; it is the lowest one that does.
* ``few``: fewer than :data:`MIN_EXAMPLES` predictions of it on the split say nothing about its
  precision; the configured global threshold applies (:meth:`Calibration.threshold` is ``None``).
* ``unreachable``: enough predictions, and none of their confidence levels reaches the target:
  the threshold is 1.0, so only certain answers are routed and the rest goes to a person (triage
  is the safe route; a wrong forward is not).

A calibration is stored with the model version it belongs to (the baseline's next to its cached
model, a published LLM's with its registry record and under its Ollama digest), and travels with
each of that model's predictions as :attr:`mailrouter.prediction.Prediction.threshold`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from .dataset import atomic_write_text
from .tokens import digest_key

#: Fewer predictions of a department than this on the validation split: the global threshold.
MIN_EXAMPLES = 5
#: The threshold of a department whose target precision no confidence level reaches.
UNREACHABLE = 1.0

Status = Literal["calibrated", "few", "unreachable"]


@dataclass(frozen=True)
class Scored:
    """One prediction on the calibration split: what the model said, how sure, what was right."""

    predicted: str | None
    confidence: float
    expected: str


@dataclass(frozen=True)
class Threshold:
    """A department's calibrated threshold and the evidence behind it."""

    status: Status
    threshold: float | None  # None: the global threshold applies (status ``few``)
    n: int  # predictions of this department on the calibration split
    routed: int  # how many of them the threshold lets through
    precision: float | None  # their precision at the threshold (None: none let through)

    @property
    def note(self) -> str:
        """Why this threshold, in a few words (what ``evaluate`` prints)."""
        if self.status == "few":
            return f"{self.n} prediction(s) < {MIN_EXAMPLES}: global threshold"
        if self.status == "unreachable":
            best = "-" if self.precision is None else f"{self.precision:.2f}"
            return f"target not reached (precision {best} at best): only certain answers routed"
        return f"{self.routed}/{self.n} routed at precision {self.precision:.2f}"


@dataclass(frozen=True)
class Calibration:
    """The thresholds of one model version, by department."""

    target: float
    split: str
    departments: Mapping[str, Threshold]

    def threshold(self, department: str | None) -> float | None:
        """The calibrated threshold of ``department``; ``None`` when the global one applies."""
        found = self.departments.get(department or "")
        return found.threshold if found is not None else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "split": self.split,
            "departments": {k: asdict(v) for k, v in self.departments.items()},
        }

    @classmethod
    def from_dict(cls, data: Any) -> Calibration | None:
        """The calibration recorded as ``data``; ``None`` when it is not one (then the global
        thresholds apply: a damaged record never stops routing)."""
        try:
            departments = {
                str(name): Threshold(**fields) for name, fields in data["departments"].items()
            }
            return cls(float(data["target"]), str(data["split"]), departments)
        except (KeyError, TypeError, ValueError, AttributeError):
            return None


def calibrate(
    scored: Iterable[Scored],
    departments: Sequence[str],
    *,
    target: float,
    split: str = "valid",
    min_examples: int = MIN_EXAMPLES,
) -> Calibration:
    """Each department's lowest threshold reaching ``target`` precision on ``scored``."""
    rows = list(scored)
    found = {
        name: department_threshold(
            [(s.confidence, s.expected == name) for s in rows if s.predicted == name],
            target=target,
            min_examples=min_examples,
        )
        for name in departments
    }
    return Calibration(target, split, found)


def department_threshold(
    answers: Sequence[tuple[float, bool]], *, target: float, min_examples: int = MIN_EXAMPLES
) -> Threshold:
    """The lowest confidence ``t`` among ``answers`` (confidence, right?) such that the answers
    at ``t`` or above are right at least ``target`` of the time.

    Candidates are the confidences seen: between two of them nothing changes on this split, and
    below the lowest there is no evidence. Precision is not monotonic in the threshold, so every
    level is tried, from the most confident down.
    """
    n = len(answers)
    if n < min_examples:
        return Threshold("few", None, n, 0, None)
    ranked = sorted(answers, key=lambda a: -a[0])
    right = 0
    best: tuple[float, int, float] | None = None  # threshold, routed, precision
    top = 0.0  # the best precision met at any level, for the "unreachable" note
    for i, (confidence, correct) in enumerate(ranked):
        right += correct
        if i + 1 < n and ranked[i + 1][0] == confidence:
            continue  # a threshold lets through every answer of the same confidence
        precision = right / (i + 1)
        top = max(top, precision)
        if precision >= target - 1e-12:
            best = (confidence, i + 1, precision)
    if best is None:
        return Threshold("unreachable", UNREACHABLE, n, 0, top)
    threshold, routed, precision = best
    return Threshold("calibrated", threshold, n, routed, precision)


# --- storage -----------------------------------------------------------------------------------


def save(path: Path, calibration: Calibration) -> None:
    """Write ``calibration`` as JSON, atomically (the service may be reading it)."""
    atomic_write_text(path, json.dumps(calibration.to_dict(), indent=1, sort_keys=True) + "\n")


def load(path: Path) -> Calibration | None:
    """The calibration stored at ``path``; ``None`` when there is none or it is unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return Calibration.from_dict(data)


def ollama_path(models_dir: Path, digest: str) -> Path:
    """Where the calibration of the Ollama model with ``digest`` lives (:func:`digest_key`)."""
    return models_dir / "calibration" / f"{digest_key(digest)}.json"
