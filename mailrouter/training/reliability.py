"""What an evaluation says about confidence: the calibrated thresholds at work, and whether the
model's confidence means what it says (the reliability diagram).

For each department, the threshold the router applies to its answers (the model version's
calibrated one, else the global one), and what it does on the split evaluated: how many of its
answers it lets through, how many of those are right (the precision the calibration aimed at,
now measured on other mail), and how many go to triage. The figures are computed from the same
per-answer thresholds the router uses (:attr:`~mailrouter.prediction.Prediction.threshold`), so
the triage rate printed is the one routing this split would give.

The reliability diagram bins the answers by confidence and shows, per bin, how often they were
right: a calibrated model's bars follow the diagonal.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ..calibration import Calibration

BINS = 10


class Answer(Protocol):
    """One evaluated answer (:class:`~.evaluation.Item`)."""

    @property
    def expected(self) -> str: ...

    @property
    def predicted(self) -> str | None: ...

    @property
    def confidence(self) -> float: ...

    @property
    def threshold(self) -> float | None: ...


@dataclass(frozen=True)
class DepartmentRow:
    """A department's threshold and what it does on the split evaluated."""

    department: str
    threshold: float
    source: str  # "calibrated", "few", "unreachable" or "global"
    predicted: int  # answers naming the department
    routed: int  # of those, at or above the threshold
    correct: int  # of the routed, right
    note: str

    @property
    def precision(self) -> float | None:
        return self.correct / self.routed if self.routed else None

    @property
    def triaged(self) -> int:
        return self.predicted - self.routed


@dataclass(frozen=True)
class Bin:
    low: float
    high: float
    count: int
    confidence: float  # mean confidence of the answers in the bin
    accuracy: float  # share of them that were right


def applied(answer: Answer, default: float) -> float:
    """The threshold the router applies to ``answer``: its model version's, else ``default``."""
    return answer.threshold if answer.threshold is not None else default


def department_rows(
    answers: Sequence[Answer],
    labels: Sequence[str],
    calibration: Calibration | None,
    default: float,
) -> list[DepartmentRow]:
    rows = []
    for label in labels:
        mine = [a for a in answers if a.predicted == label]
        found = calibration.departments.get(label) if calibration is not None else None
        threshold = found.threshold if found is not None else None
        threshold = default if threshold is None else threshold
        routed = [a for a in mine if a.confidence >= applied(a, default)]
        rows.append(
            DepartmentRow(
                department=label,
                threshold=threshold,
                source=found.status if found is not None else "global",
                predicted=len(mine),
                routed=len(routed),
                correct=sum(a.expected == label for a in routed),
                note=f"{calibration.split}: {found.note}"
                if calibration is not None and found is not None
                else "no calibration: global threshold",
            )
        )
    return rows


def bins(answers: Sequence[Answer], count: int = BINS) -> list[Bin]:
    """Answers that named a department, binned by confidence (the last bin holds 1.0)."""
    named = [a for a in answers if a.predicted is not None]
    out = []
    for k in range(count):
        low, high = k / count, (k + 1) / count
        last = k == count - 1
        inside = [a for a in named if low <= a.confidence < high or (last and a.confidence == 1)]
        if inside:
            mean = sum(a.confidence for a in inside) / len(inside)
            right = sum(a.predicted == a.expected for a in inside) / len(inside)
            out.append(Bin(low, high, len(inside), mean, right))
    return out


# --- text ----------------------------------------------------------------------------------------


def calibration_lines(rows: Sequence[DepartmentRow], calibration: Calibration | None) -> list[str]:
    """The thresholds section of ``evaluate``'s text report."""
    if calibration is None:
        head = "thresholds   global (this model version has no calibration)"
    else:
        head = (
            f"thresholds   calibrated on the {calibration.split} split for precision "
            f"{calibration.target:.2f}"
        )
    lines = [head]
    width = max(len(r.department) for r in rows) + 2 if rows else 12
    lines.append(
        f"{'department':<{width}}{'threshold':>10}{'routed':>8}{'precision':>10}{'triaged':>8}  why"
    )
    for r in rows:
        precision = "-" if r.precision is None else f"{r.precision:.3f}"
        lines.append(
            f"{r.department:<{width}}{r.threshold:>10.2f}{r.routed:>8}{precision:>10}"
            f"{r.triaged:>8}  {r.note}"
        )
    return lines


# --- HTML ----------------------------------------------------------------------------------------


def calibration_html(rows: Sequence[DepartmentRow], calibration: Calibration | None) -> str:
    """The thresholds table of the HTML report."""
    e = html.escape
    if calibration is None:
        caption = "No calibration for this model version: the global threshold applies."
    else:
        caption = (
            f"Calibrated on the {e(calibration.split)} split for a precision of "
            f"{calibration.target:.2f}; measured here on the split evaluated."
        )
    body = "".join(
        f"<tr><td>{e(r.department)}</td><td>{r.threshold:.2f}</td><td>{e(r.source)}</td>"
        f"<td>{r.predicted}</td><td>{r.routed}</td>"
        f"<td>{'-' if r.precision is None else f'{r.precision:.3f}'}</td>"
        f"<td>{r.triaged}</td><td>{e(r.note)}</td></tr>"
        for r in rows
    )
    return (
        f"<p>{caption}</p><table><tr><th>department</th><th>threshold</th><th>source</th>"
        "<th>answers</th><th>routed</th><th>precision</th><th>to triage</th><th>why</th></tr>"
        f"{body}</table>"
    )


TICKS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


@dataclass(frozen=True)
class Chart:
    """The geometry of the report's 0–1 by 0–1 figures, and their frame (ticks, box)."""

    width: int = 520
    height: int = 300
    pad: int = 45

    def x(self, v: float) -> float:
        return round(self.pad + v * (self.width - 2 * self.pad), 1)

    def y(self, v: float) -> float:
        return round(self.height - self.pad - v * (self.height - 2 * self.pad), 1)

    def svg(self, body: str, *, grid: bool = False) -> str:
        """``body`` framed: tick labels on both axes (with horizontal grid lines), the box."""
        w, h, pad = self.width, self.height, self.pad
        ticks = "".join(
            (f'<line x1="{pad}" y1="{self.y(v)}" x2="{w - pad}" y2="{self.y(v)}" stroke="#eee"/>'
             if grid else "")
            + f'<text x="{pad - 6}" y="{self.y(v) + 4}" text-anchor="end">{v:.1f}</text>'
            f'<text x="{self.x(v)}" y="{h - pad + 16}" text-anchor="middle">{v:.1f}</text>'
            for v in TICKS
        )  # fmt: skip
        return (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
            f'viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">{ticks}{body}'
            f'<rect x="{pad}" y="{pad}" width="{w - 2 * pad}" height="{h - 2 * pad}" '
            'fill="none" stroke="#999"/></svg>'
        )


def reliability_svg(answers: Sequence[Answer], count: int = BINS) -> str:
    """Accuracy against confidence, one bar per bin, with the diagonal of a calibrated model."""
    c = Chart()
    x, y = c.x, c.y
    bars = "".join(
        f'<rect x="{x(b.low) + 2}" y="{y(b.accuracy)}" width="{x(b.high) - x(b.low) - 4}" '
        f'height="{round(y(0) - y(b.accuracy), 1)}" fill="#1f77b4" fill-opacity="0.75">'
        f"<title>confidence {b.low:.1f}–{b.high:.1f}: {b.count} answer(s), mean confidence "
        f"{b.confidence:.2f}, right {b.accuracy:.0%}</title></rect>"
        f'<text x="{(x(b.low) + x(b.high)) / 2}" y="{y(b.accuracy) - 4}" '
        f'text-anchor="middle" font-size="10">{b.count}</text>'
        for b in bins(answers, count)
    )
    return c.svg(
        bars + f'<line x1="{x(0)}" y1="{y(0)}" x2="{x(1)}" y2="{y(1)}" stroke="#d62728" '
        'stroke-dasharray="4 3"/>'
        f'<text x="{c.width / 2}" y="{c.height - 8}" text-anchor="middle">confidence</text>'
        f'<text x="14" y="{c.height / 2}" transform="rotate(-90 14 {c.height / 2})" '
        'text-anchor="middle">share right</text>'
    )
