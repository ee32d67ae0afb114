"""The evaluation report: scores computed by hand-checkable rules, text and HTML renderings."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from mailrouter.calibration import Calibration, Status, Threshold
from mailrouter.classify.baseline import BaselineClassifier
from mailrouter.config import default_departments
from mailrouter.dataset import Example
from mailrouter.prediction import ClassifyInput, Prediction
from mailrouter.training.evaluation import UNKNOWN, evaluate, format_report, render_html, write_html

from .sample_examples import sample_examples

DEPS = default_departments()


@dataclass
class Scripted:
    """A classifier whose answers are given per text: the scores below can be checked by hand."""

    answers: dict[str, tuple[str | None, float]]
    name: str = "scripted@1"

    def classify(self, item: ClassifyInput) -> Prediction:
        label, confidence = self.answers[item.text]
        return Prediction(label=label, confidence=confidence, model=self.name)


def ex(text: str, label: str) -> Example:
    return Example.new(text, label, split="test", source="import")


EXAMPLES = [
    ex("a", "RH"),
    ex("b", "RH"),
    ex("c", "Support"),
    ex("d", "Support"),
    ex("e", "Finance"),
    ex("f", "Legal"),  # not a department: left out
]
ANSWERS = {
    "a": ("RH", 0.9),
    "b": ("Support", 0.8),
    "c": ("Support", 0.3),
    "d": (None, 0.0),
    "e": ("Finance", 0.95),
    "f": ("RH", 0.9),
}


@pytest.fixture
def report():
    return evaluate(Scripted(ANSWERS), EXAMPLES, DEPS, threshold=0.5)


def test_scores(report) -> None:
    assert report.n == 5 and report.skipped == {"Legal": 1}
    assert report.accuracy == pytest.approx(3 / 5)
    rh, support, finance = (report.per_department[k] for k in ("RH", "Support", "Finance"))
    assert (rh.precision, rh.recall, rh.support) == (1.0, 0.5, 2)
    assert (support.precision, support.recall) == (0.5, 0.5)
    assert (finance.precision, finance.recall, finance.f1) == (1.0, 1.0, 1.0)
    # Commercial and SPAM neither occur nor are predicted: they do not dilute macro-F1
    assert report.macro_f1 == pytest.approx((2 / 3 + 0.5 + 1.0) / 3)


def test_confusion_has_an_unknown_column(report) -> None:
    matrix = report.confusion
    assert list(matrix["RH"]) == [*[d.name for d in DEPS], UNKNOWN]
    assert matrix["RH"]["RH"] == 1 and matrix["RH"]["Support"] == 1
    assert matrix["Support"][UNKNOWN] == 1
    assert sum(sum(row.values()) for row in matrix.values()) == report.n


def test_triage_and_routed_accuracy(report) -> None:
    # routed at 0.5: a (ok), b (wrong), e (ok); c is below, d has no label
    assert report.triage_rate == pytest.approx(2 / 5)
    assert report.routed_accuracy == pytest.approx(2 / 3)
    curve = dict((t, (c, a)) for t, c, a in report.curve())
    assert curve[0.0] == (pytest.approx(4 / 5), pytest.approx(3 / 4))
    assert curve[1.0] == (0.0, None)


def test_unknown_label_from_a_backend_counts_as_unknown() -> None:
    rogue = Scripted({"a": ("Legal", 0.99)})
    report = evaluate(rogue, [ex("a", "RH")], DEPS, threshold=0.5)
    assert report.items[0].predicted is None and report.triage_rate == 1.0


def test_text_report(report) -> None:
    text = format_report(report)
    assert "accuracy     0.600" in text and "macro-F1" in text and UNKNOWN in text
    assert re.search(r"^Support\s+0\s+1\s+0\s+0\s+0\s+1$", text, re.M)
    assert "Legal: 1" in text


def test_html_report_is_self_contained_and_escaped(tmp_path: Path) -> None:
    hostile = ex("<script>alert(1)</script>", "RH")
    report = evaluate(
        Scripted({hostile.text: ("Support", 0.7), "a": ("RH", 0.4)}),
        [hostile, ex("a", "RH")],
        DEPS,
        threshold=0.6,
    )
    path = write_html(report, tmp_path / "report.html")
    page = path.read_text(encoding="utf-8")
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")  # nothing fetched
    svgs = re.findall(r"<svg.*?</svg>", page, re.S)
    assert len(svgs) == 3
    for svg in svgs:
        ET.fromstring(svg)  # well-formed
    heat = ET.fromstring(svgs[0])
    cells = [r for r in heat.iter("{http://www.w3.org/2000/svg}rect")]
    assert len(cells) == len(DEPS) * (len(DEPS) + 1)
    curve = ET.fromstring(svgs[1])
    lines = list(curve.iter("{http://www.w3.org/2000/svg}polyline"))
    assert len(lines) == 2 and len(lines[0].get("points").split()) == 101
    reliability = ET.fromstring(svgs[2])
    bars = [r for r in reliability.iter(f"{SVG}rect") if r.get("fill") == "#1f77b4"]
    assert len(bars) == 2  # one answer at 0.7, one at 0.4: two bins
    assert page == render_html(report)


SVG = "{http://www.w3.org/2000/svg}"


@dataclass
class Calibrated(Scripted):
    """Scripted answers from a model version with calibrated thresholds, as a backend gives."""

    calibration: Calibration | None = None

    def classify(self, item: ClassifyInput) -> Prediction:
        answer = super().classify(item)
        assert self.calibration is not None
        return replace(answer, threshold=self.calibration.threshold(answer.label))


def _threshold(status: Status, value: float | None) -> Threshold:
    return Threshold(status, value, n=10, routed=5, precision=0.96)


def test_calibrated_thresholds_decide_the_triage_rate_and_are_reported(tmp_path: Path) -> None:
    calibration = Calibration(
        0.95,
        "valid",
        {
            "RH": _threshold("calibrated", 0.95),
            "Support": _threshold("calibrated", 0.25),
            "Finance": _threshold("unreachable", 1.0),
            "SPAM": _threshold("few", None),
        },
    )
    report = evaluate(Calibrated(ANSWERS, calibration=calibration), EXAMPLES, DEPS, 0.5)
    # a: RH 0.9 < 0.95; b, c: Support ≥ 0.25 (b wrong); d: no answer; e: Finance < 1.0
    assert [i.predicted for i in report.routed()] == ["Support", "Support"]
    assert report.triage_rate == pytest.approx(3 / 5)
    assert report.global_triage_rate == pytest.approx(2 / 5)  # c and d at 0.5
    rows = {r.department: r for r in report.thresholds}
    assert (rows["Support"].threshold, rows["Support"].routed, rows["Support"].precision) == (
        0.25,
        2,
        0.5,
    )
    assert (rows["RH"].routed, rows["RH"].triaged) == (0, 1)
    assert (rows["SPAM"].threshold, rows["SPAM"].source) == (0.5, "few")
    assert (rows["Commercial"].threshold, rows["Commercial"].source) == (0.5, "global")
    text = format_report(report)
    assert "calibrated on the valid split for precision 0.95" in text
    assert "triage rate  0.600 with the calibrated thresholds (0.400 at the global 0.50)" in text
    assert re.search(r"^Support\s+0\.25\s+2\s+0\.500\s+0\s", text, re.M)
    data = report.to_dict()
    assert data["calibration"]["departments"]["Support"]["threshold"] == 0.25
    assert data["triage_rate"] == pytest.approx(0.6)
    page = render_html(report)
    assert "<td>Finance</td><td>1.00</td><td>unreachable</td>" in page


def test_without_calibration_the_global_threshold_is_reported(report) -> None:
    assert report.calibration is None
    assert report.triage_rate == report.global_triage_rate
    assert "global (this model version has no calibration)" in format_report(report)


def test_baseline_beats_chance_on_held_out_sample() -> None:
    examples = sample_examples()
    held_out = examples[::4]
    train = [e for e in examples if e not in held_out]
    model = BaselineClassifier.fit(train, DEPS)
    report = evaluate(model, held_out, DEPS, threshold=0.0)
    assert report.accuracy >= 0.6  # five classes: chance is 0.2
    assert report.triage_rate == 0.0
