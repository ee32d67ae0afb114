"""One evaluation report for every backend: the promotion gate, the CLI and the HTML page read it.

A prediction counts as correct only when its label equals the expected one; ``None`` (an answer
that named no department) is wrong and shown in its own ``unknown`` column. Triage is what the
router would do at the threshold: no label, or a confidence below it.

Two figures serve the promotion gate beyond accuracy and macro-F1: each department's recall (a
model that gains overall by dropping a small department is refused) and the *false-spam* count,
real mail (expected label not a spam department) answered with a spam department. It counts
answers whatever their confidence: spam is never forwarded, so mail sent there is the costliest
mistake, and the threshold moves with calibration while the answer does not.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..calibration import Calibration
from ..classify.base import Classifier
from ..classify.concurrent import classify_in_order
from ..config import Department
from ..dataset import Example, atomic_write_text
from .reliability import (
    Chart,
    DepartmentRow,
    applied,
    calibration_html,
    calibration_lines,
    department_rows,
    reliability_svg,
)

UNKNOWN = "unknown"


@dataclass(frozen=True)
class Scores:
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class Item:
    """One evaluated example."""

    id: str
    subject: str
    text: str
    expected: str
    predicted: str | None
    confidence: float
    threshold: float | None = None  # its model version's calibrated one; None: the report's

    @property
    def correct(self) -> bool:
        return self.predicted == self.expected

    @property
    def title(self) -> str:
        """The subject, else the start of the text: what a person recognises the email by."""
        return " ".join((self.subject or self.text).split())


@dataclass(frozen=True)
class Report:
    model: str
    labels: list[str]  # configured departments, in config order
    threshold: float
    items: list[Item]
    seconds: float = 0.0
    skipped: dict[str, int] = field(default_factory=dict)  # unconfigured label -> n
    spam_labels: tuple[str, ...] = ()  # departments whose action is spam
    calibration: Calibration | None = None  # the thresholds of the model version evaluated

    @property
    def recall(self) -> dict[str, float]:
        """Recall of each department present in the test set (support > 0)."""
        return {k: s.recall for k, s in self.per_department.items() if s.support}

    @property
    def false_spam(self) -> int:
        """Real mail the model sends to a spam department: answers, whatever the confidence."""
        spam = set(self.spam_labels)
        return sum(i.predicted in spam and i.expected not in spam for i in self.items)

    @property
    def n(self) -> int:
        return len(self.items)

    @property
    def accuracy(self) -> float:
        return sum(i.correct for i in self.items) / self.n if self.items else 0.0

    @property
    def per_department(self) -> dict[str, Scores]:
        out = {}
        for label in self.labels:
            tp = sum(i.expected == label and i.predicted == label for i in self.items)
            predicted = sum(i.predicted == label for i in self.items)
            support = sum(i.expected == label for i in self.items)
            precision = tp / predicted if predicted else 0.0
            recall = tp / support if support else 0.0
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            out[label] = Scores(precision, recall, f1, support)
        return out

    @property
    def macro_f1(self) -> float:
        """Mean F1 over the departments that occur in the truth or the predictions (as sklearn)."""
        scores = self.per_department
        used = [
            label
            for label in self.labels
            if scores[label].support or any(i.predicted == label for i in self.items)
        ]
        return sum(scores[label].f1 for label in used) / len(used) if used else 0.0

    @property
    def confusion(self) -> dict[str, dict[str, int]]:
        """expected -> predicted (departments then ``unknown``) -> count."""
        columns = [*self.labels, UNKNOWN]
        matrix = {label: dict.fromkeys(columns, 0) for label in self.labels}
        for item in self.items:
            matrix[item.expected][item.predicted or UNKNOWN] += 1
        return matrix

    def routed(self, threshold: float | None = None) -> list[Item]:
        """Items the router would send to a department: a label and a confidence at or above
        ``threshold`` when given, else at or above the threshold the router applies to each
        (its model version's calibrated one for that department, else the report's)."""
        return [
            i
            for i in self.items
            if i.predicted is not None
            and i.confidence >= (applied(i, self.threshold) if threshold is None else threshold)
        ]

    @property
    def triage_rate(self) -> float:
        return 1 - len(self.routed()) / self.n if self.items else 0.0

    @property
    def global_triage_rate(self) -> float:
        """The triage rate at the report's single threshold, calibration ignored."""
        return 1 - len(self.routed(self.threshold)) / self.n if self.items else 0.0

    @property
    def thresholds(self) -> list[DepartmentRow]:
        """Each department's threshold and what it does on this split."""
        return department_rows(self.items, self.labels, self.calibration, self.threshold)

    @property
    def routed_accuracy(self) -> float | None:
        routed = self.routed()
        return sum(i.correct for i in routed) / len(routed) if routed else None

    def curve(self, steps: int = 100) -> list[tuple[float, float, float | None]]:
        """(threshold, coverage, accuracy on covered) for thresholds 0..1."""
        points = []
        for k in range(steps + 1):
            t = k / steps
            routed = self.routed(t)
            coverage = len(routed) / self.n if self.items else 0.0
            accuracy = sum(i.correct for i in routed) / len(routed) if routed else None
            points.append((t, coverage, accuracy))
        return points

    def summary(self) -> dict[str, Any]:
        """The figures a training run records and the gate reads back (scores unrounded: a
        tie with a recorded model in service must stay a tie)."""
        return {
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "n": self.n,
            "model": self.model,
            "seconds": round(self.seconds, 2),
            "recall": self.recall,
            "false_spam": self.false_spam,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "n": self.n,
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "false_spam": self.false_spam,
            "threshold": self.threshold,
            "triage_rate": self.triage_rate,
            "global_triage_rate": self.global_triage_rate,
            "calibration": self.calibration.to_dict() if self.calibration else None,
            "thresholds": [
                {**asdict(r), "precision": r.precision, "triaged": r.triaged}
                for r in self.thresholds
            ],
            "routed_accuracy": self.routed_accuracy,
            "seconds": self.seconds,
            "per_department": {k: asdict(v) for k, v in self.per_department.items()},
            "confusion": self.confusion,
            "skipped": self.skipped,
            "predictions": [
                {
                    "id": i.id,
                    "expected": i.expected,
                    "predicted": i.predicted,
                    "confidence": i.confidence,
                }
                for i in self.items
            ],
        }


def evaluate(
    classifier: Classifier,
    examples: Iterable[Example],
    departments: Sequence[Department],
    threshold: float,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> Report:
    """Classify every example whose label is a configured department and score the answers
    (with a backend that waits on a server, ``classifier.concurrency`` requests at a time)."""
    names = [d.name for d in departments]
    rows: list[Example] = []
    skipped: dict[str, int] = {}
    for example in examples:
        if example.label in names:
            rows.append(example)
        else:
            skipped[example.label] = skipped.get(example.label, 0) + 1
    items = []
    started = time.monotonic()
    predictions = classify_in_order(classifier, [example.to_input() for example in rows])
    for done, (example, prediction) in enumerate(zip(rows, predictions, strict=True), 1):
        predicted = prediction.label if prediction.label in names else None
        items.append(
            Item(
                id=example.id,
                subject=example.subject,
                text=example.text,
                expected=example.label,
                predicted=predicted,
                confidence=prediction.confidence,
                threshold=prediction.threshold if predicted is not None else None,
            )
        )
        if progress:
            progress(done, len(rows))
    return Report(
        model=classifier.name,
        labels=names,
        threshold=threshold,
        items=items,
        seconds=time.monotonic() - started,
        skipped=skipped,
        spam_labels=tuple(d.name for d in departments if d.action == "spam"),
        calibration=getattr(classifier, "calibration", None),
    )


# --- text ----------------------------------------------------------------------------------


def format_report(report: Report) -> str:
    """A plain-text report: summary, per-department scores, confusion matrix."""
    lines = [
        f"model {report.model}: {report.n} emails",
        f"accuracy     {report.accuracy:.3f}",
        f"macro-F1     {report.macro_f1:.3f}",
        f"triage rate  {report.triage_rate:.3f} "
        + (
            f"with the calibrated thresholds ({report.global_triage_rate:.3f} at the global "
            f"{report.threshold:.2f})"
            if report.calibration
            else f"at threshold {report.threshold:.2f}"
        ),
    ]
    routed = report.routed_accuracy
    lines.append(f"routed acc.  {'-' if routed is None else f'{routed:.3f}'}")
    if report.spam_labels:
        lines.append(f"false spam   {report.false_spam} real email(s) answered as spam")
    if report.n:
        lines.append(f"time         {report.seconds / report.n * 1000:.1f} ms per email")
    lines += ["", *calibration_lines(report.thresholds, report.calibration)]
    if report.skipped:
        left = ", ".join(f"{k}: {v}" for k, v in sorted(report.skipped.items()))
        lines.append(f"left out (not configured departments): {left}")
    width = max([len(x) for x in [*report.labels, UNKNOWN, "department"]]) + 2
    lines += [
        "",
        f"{'department':<{width}}{'precision':>10}{'recall':>10}{'F1':>10}{'support':>10}",
    ]
    for label, s in report.per_department.items():
        lines.append(
            f"{label:<{width}}{s.precision:>10.3f}{s.recall:>10.3f}{s.f1:>10.3f}{s.support:>10}"
        )
    columns = [*report.labels, UNKNOWN]
    cell = max(len(c) for c in columns) + 1
    lines += ["", "confusion (rows: expected, columns: predicted)"]
    lines.append(" " * width + "".join(f"{c:>{cell}}" for c in columns))
    for label, row in report.confusion.items():
        lines.append(f"{label:<{width}}" + "".join(f"{row[c]:>{cell}}" for c in columns))
    return "\n".join(lines)


# --- HTML ----------------------------------------------------------------------------------


def write_html(report: Report, path: Path | str) -> Path:
    """A self-contained page: summary, scores, confusion heat map, threshold curve, mistakes."""
    target = Path(path)
    atomic_write_text(target, render_html(report))
    return target


def render_html(report: Report) -> str:
    e = html.escape
    routed = report.routed_accuracy
    summary = [
        ("emails", str(report.n)),
        ("accuracy", f"{report.accuracy:.3f}"),
        ("macro-F1", f"{report.macro_f1:.3f}"),
        ("triage", f"{report.triage_rate:.1%}"),
        (f"triage at the global {report.threshold:.2f}", f"{report.global_triage_rate:.1%}"),
        ("accuracy when routed", "-" if routed is None else f"{routed:.3f}"),
    ]
    scores = "".join(
        f"<tr><td>{e(k)}</td><td>{s.precision:.3f}</td><td>{s.recall:.3f}</td>"
        f"<td>{s.f1:.3f}</td><td>{s.support}</td></tr>"
        for k, s in report.per_department.items()
    )
    errors = "".join(
        f"<tr><td>{e(i.title[:120])}</td><td>{e(i.expected)}</td>"
        f"<td>{e(i.predicted or UNKNOWN)}</td><td>{i.confidence:.2f}</td></tr>"
        for i in report.items
        if not i.correct
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>mailrouter evaluation: {e(report.model)}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: .25em .6em; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
figure {{ margin: 1.5em 0; }}
</style></head><body>
<h1>Evaluation of {e(report.model)}</h1>
<table>{"".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in summary)}</table>
<h2>Per department</h2>
<table><tr><th>department</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>
{scores}</table>
<h2>Confusion matrix</h2>
<figure>{confusion_svg(report)}<figcaption>Rows: expected department; columns: predicted.
Colour: share of the row.</figcaption></figure>
<h2>Threshold and coverage</h2>
<figure>{curve_svg(report)}<figcaption>For each confidence threshold: the share of emails routed
(coverage) and the accuracy on those. The dashed line is the global threshold; the calibrated
ones, per department, follow.
</figcaption></figure>
<h2>Thresholds</h2>
{calibration_html(report.thresholds, report.calibration)}
<h2>Reliability</h2>
<figure>{reliability_svg(report.items)}<figcaption>Answers binned by confidence: the share of each
bin that was right (bar; the number of answers above it). A model whose confidence means what it
says follows the dashed diagonal.</figcaption></figure>
<h2>Mistakes ({sum(not i.correct for i in report.items)})</h2>
<table><tr><th>email</th><th>expected</th><th>predicted</th><th>confidence</th></tr>
{errors}</table>
</body></html>
"""


def confusion_svg(report: Report) -> str:
    """The confusion matrix as an SVG heat map, each cell shaded by its share of the row."""
    e = html.escape
    columns = [*report.labels, UNKNOWN]
    size, left, top = 56, 110, 90
    # the extra width on the right is room for the last rotated column name
    width, height = left + size * len(columns) + 70, top + size * len(report.labels) + 10
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">'
    ]
    for c, name in enumerate(columns):
        x = left + c * size + size / 2
        parts.append(
            f'<text x="{x}" y="{top - 8}" transform="rotate(-45 {x} {top - 8})">{e(name)}</text>'
        )
    for r, (label, row) in enumerate(report.confusion.items()):
        y = top + r * size
        parts.append(
            f'<text x="{left - 8}" y="{y + size / 2 + 4}" text-anchor="end">{e(label)}</text>'
        )
        total = sum(row.values())
        for c, name in enumerate(columns):
            count = row[name]
            share = count / total if total else 0.0
            hue = 120 if name == label else 0  # diagonal green, mistakes red
            fill = f"hsl({hue}, 60%, {round(97 - 52 * share)}%)"
            x = left + c * size
            parts.append(
                f'<rect x="{x}" y="{y}" width="{size}" height="{size}" fill="{fill}" stroke="#fff">'
                f"<title>{e(label)} → {e(name)}: {count}</title></rect>"
            )
            ink = "#fff" if share > 0.6 else "#222"
            parts.append(
                f'<text x="{x + size / 2}" y="{y + size / 2 + 4}" text-anchor="middle" '
                f'fill="{ink}">{count}</text>'
            )
    parts.append("</svg>")
    return "".join(parts)


def curve_svg(report: Report) -> str:
    """Coverage and accuracy-on-covered against the threshold, as an SVG line chart."""
    c = Chart()
    x, y = c.x, c.y
    points = report.curve()
    coverage = " ".join(f"{x(t)},{y(v)}" for t, v, _ in points)
    accuracy = " ".join(f"{x(t)},{y(a)}" for t, _, a in points if a is not None)
    t = report.threshold
    return c.svg(
        f'<line x1="{x(t)}" y1="{c.pad}" x2="{x(t)}" y2="{c.height - c.pad}" stroke="#555" '
        f'stroke-dasharray="4 3"/>'
        f'<polyline points="{coverage}" fill="none" stroke="#1f77b4" stroke-width="2"/>'
        f'<polyline points="{accuracy}" fill="none" stroke="#d62728" stroke-width="2"/>'
        f'<text x="{c.width / 2}" y="{c.height - 8}" text-anchor="middle">'
        "confidence threshold</text>"
        f'<text x="{c.pad + 8}" y="{c.pad - 22}" fill="#1f77b4">coverage</text>'
        f'<text x="{c.pad + 90}" y="{c.pad - 22}" fill="#d62728">accuracy on covered</text>',
        grid=True,
    )
