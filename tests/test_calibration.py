"""Calibrated thresholds: the pure function on hand-made predictions, and its storage."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mailrouter.calibration import (
    MIN_EXAMPLES,
    UNREACHABLE,
    Calibration,
    Scored,
    calibrate,
    department_threshold,
    load,
    ollama_path,
    save,
)
from mailrouter.classify.baseline import BaselineClassifier
from mailrouter.cli import app
from mailrouter.config import Settings, load_settings
from mailrouter.dataset import Dataset
from mailrouter.message import Email
from mailrouter.prediction import Prediction
from mailrouter.router import decide


def _answers(*pairs: tuple[float, bool]) -> list[tuple[float, bool]]:
    return list(pairs)


def test_the_lowest_threshold_reaching_the_target() -> None:
    # 0.9 ✓, 0.8 ✓, 0.7 ✗, 0.6 ✓, 0.5 ✓ … at 0.8: 2/2; at 0.7: 2/3; at 0.5: 4/5 = 0.8.
    found = department_threshold(
        _answers((0.9, True), (0.8, True), (0.7, False), (0.6, True), (0.5, True)), target=0.8
    )
    assert found.status == "calibrated"
    assert found.threshold == 0.5
    assert (found.routed, found.n) == (5, 5)
    assert found.precision == pytest.approx(0.8)


def test_precision_is_not_monotonic_every_level_is_tried() -> None:
    # From the top: 1/1, 1/2, 2/3, 3/4, 4/5, 5/6: the target 0.8 is met at 0.9 and again at 0.4
    # (0.5 → 4/5 = 0.8, 0.4 → 5/6 = 0.83): the lowest level meeting it wins.
    answers = _answers(
        (0.9, True), (0.8, False), (0.7, True), (0.6, True), (0.5, True), (0.4, True)
    )
    found = department_threshold(answers, target=0.8)
    assert found.threshold == 0.4
    assert found.routed == 6


def test_ties_are_let_through_together() -> None:
    # Two answers at 0.7, one wrong: a threshold of 0.7 routes both (precision 2/3 with 0.9).
    answers = _answers((0.9, True), (0.7, True), (0.7, False), (0.6, True), (0.6, True))
    found = department_threshold(answers, target=0.75)
    assert found.threshold == 0.6
    assert found.precision == pytest.approx(4 / 5)
    strict = department_threshold(answers, target=0.9)
    assert strict.threshold == 0.9
    assert strict.routed == 1


def test_too_few_predictions_fall_back_to_the_global_threshold() -> None:
    found = department_threshold([(0.9, True)] * (MIN_EXAMPLES - 1), target=0.95)
    assert found.status == "few"
    assert found.threshold is None
    assert "global threshold" in found.note


def test_an_unreachable_target_routes_only_certain_answers() -> None:
    # The most confident answer is already wrong: no level reaches 0.95.
    answers = _answers((0.99, False), (0.9, True), (0.8, True), (0.7, True), (0.6, True))
    found = department_threshold(answers, target=0.95)
    assert found.status == "unreachable"
    assert found.threshold == UNREACHABLE
    assert found.precision == pytest.approx(0.8)  # the best met, at 0.6
    assert "not reached" in found.note


def test_calibrate_scores_each_department_on_its_own_predictions() -> None:
    scored = [Scored("A", c, "A") for c in (0.9, 0.8, 0.7, 0.6, 0.5)]
    scored += [Scored("A", 0.55, "B")]  # a B mistaken for A, between 0.6 and 0.5
    scored += [Scored("B", 0.4, "B")] * 2  # too few
    scored += [Scored(None, 0.0, "B")]  # no answer: nobody's prediction
    found = calibrate(scored, ["A", "B", "C"], target=0.95)
    assert found.threshold("A") == 0.6
    assert found.departments["A"].n == 6
    assert found.threshold("B") is None
    assert found.departments["C"].n == 0
    assert found.threshold("not a department") is None
    assert found.threshold(None) is None


def test_a_calibration_round_trips_and_a_damaged_one_is_none(tmp_path: Path) -> None:
    found = calibrate(
        [Scored("A", c, "A") for c in (0.9, 0.8, 0.7, 0.6, 0.5)], ["A", "B"], target=0.9
    )
    path = tmp_path / "c.json"
    save(path, found)
    assert load(path) == found
    path.write_text('{"target": 0.9, "departments": {"A": {"threshold": "x"}}}')
    assert load(path) is None
    assert load(tmp_path / "missing.json") is None
    assert Calibration.from_dict([1, 2]) is None


def test_the_ollama_path_is_keyed_by_the_digest_alone(tmp_path: Path) -> None:
    digest = "sha256:" + "ab" * 32
    assert ollama_path(tmp_path, digest) == ollama_path(tmp_path, "AB" * 32)
    assert ollama_path(tmp_path, "../../etc/passwd").parent == tmp_path / "calibration"


def test_the_router_takes_the_threshold_the_prediction_carries() -> None:
    settings = Settings()
    email = Email(raw_size=40, content_hash="0" * 64, sender="client@example.org", body="Bonjour")
    llm = Prediction("Support", 0.5, "mailrouter:latest@0123456789ab")
    assert decide(llm, email, settings).kind == "triage"  # global confidence_threshold 0.6
    assert decide(replace(llm, threshold=0.45), email, settings).kind == "department"
    sure = Prediction("Support", 0.9, "baseline@01234567", threshold=0.95)
    route = decide(sure, email, settings)
    assert route.kind == "triage"
    assert "0.90 (Support < 0.95)" in route.reason
    assert decide(replace(sure, threshold=None), email, settings).kind == "department"


def test_calibrated_thresholds_change_the_starter_triage_rate_as_evaluate_says(
    starter_data: Path,
) -> None:
    """The baseline calibrates its thresholds when it is trained; ``evaluate`` reports the
    triage rate they give on the test split, and routing that split through ``router.decide``
    gives exactly that rate, not the one of the global threshold."""
    result = CliRunner().invoke(
        app, ["evaluate", "--backend", "baseline", "--json"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    settings = load_settings()
    calibrated = {
        name: t["threshold"]
        for name, t in report["calibration"]["departments"].items()
        if t["status"] == "calibrated"
    }
    assert calibrated, "the starter data calibrates at least one department"
    assert report["triage_rate"] != report["global_triage_rate"]

    classifier = BaselineClassifier.from_settings(settings)  # the cached model and calibration
    assert classifier.calibration is not None
    assert classifier.calibration.to_dict() == report["calibration"]
    test = Dataset.from_settings(settings).split("test")
    routes = []
    for example, prediction in zip(
        test, classifier.classify_many([e.to_input() for e in test]), strict=True
    ):
        email = Email(raw_size=1, content_hash="0" * 64, sender="client@example.org",
                      subject=example.subject, body=example.text)  # fmt: skip
        routes.append(decide(prediction, email, settings))
    measured = sum(r.kind == "triage" for r in routes) / len(routes)
    assert measured == pytest.approx(report["triage_rate"])
    rows = {r["department"]: r for r in report["thresholds"]}
    for name, threshold in calibrated.items():
        assert rows[name]["threshold"] == threshold
        low = [r for r in routes if r.kind == "triage" and r.department == name]
        assert len(low) == rows[name]["triaged"]


def test_the_baseline_recalibrates_when_the_target_changes(
    starter_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = BaselineClassifier.from_settings(load_settings())
    monkeypatch.setenv("MAILROUTER_CLASSIFIER__TARGET_PRECISION", "0.5")
    second = BaselineClassifier.from_settings(load_settings())
    assert first.calibration is not None and second.calibration is not None
    assert (first.calibration.target, second.calibration.target) == (0.95, 0.5)
    lower = [
        name
        for name in first.calibration.departments
        if (second.calibration.threshold(name) or 0) < (first.calibration.threshold(name) or 0)
    ]
    assert lower, "a lower target lowers some threshold"
    files = list((load_settings().models_dir / "baseline").glob("*.calibration.json"))
    assert len(files) == 1
