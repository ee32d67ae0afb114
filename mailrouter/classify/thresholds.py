"""The baseline's calibrated thresholds, computed when its model is (re)trained, kept beside it.

The baseline in service learns from the train **and** valid splits, so its own answers on the
valid split are answers on mail it has seen, confident beyond what they deserve. The thresholds
are therefore calibrated on a twin trained on the train split alone, scored on the valid split
(:func:`mailrouter.calibration.calibrate`), and applied to the model in service: the same
features and the same data but a tenth, so its confidence runs alike on new mail.

The calibration is a JSON file next to the cached model (``<key>.calibration.json``, the key
naming the data and the settings), made again when the model is, or when
``classifier.target_precision`` changes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from ..calibration import Calibration, Scored, calibrate, load, save
from ..config import Settings
from ..dataset import Example
from ..logs import event
from ..prediction import ClassifyInput, Prediction

log = logging.getLogger(__name__)

SUFFIX = ".calibration.json"


class Batch(Protocol):
    def classify_many(self, items: Sequence[ClassifyInput]) -> list[Prediction]: ...


def calibration_path(model_path: Path) -> Path:
    """The calibration file of the model stored at ``model_path``."""
    return model_path.with_name(model_path.stem + SUFFIX)


def baseline_calibration(
    model_path: Path,
    settings: Settings,
    examples: Callable[[], Sequence[Example]],
    fit: Callable[[list[Example]], Batch],
) -> Calibration:
    """The calibration stored beside ``model_path`` when it aims at the configured target; else
    calibrated now on ``examples()`` with a twin built by ``fit`` (train split only), stored,
    and older files dropped (one model, one calibration)."""
    path = calibration_path(model_path)
    target = settings.classifier.target_precision
    found = load(path)
    if found is not None and found.target == target:
        return found
    found = held_out_calibration(examples(), settings, fit)
    save(path, found)
    for old in path.parent.glob(f"*{SUFFIX}"):
        if old != path:
            old.unlink(missing_ok=True)
    event(
        log,
        "baseline.calibrated",
        target=target,
        thresholds=" ".join(
            f"{name}={'-' if t.threshold is None else f'{t.threshold:.2f}'}({t.status})"
            for name, t in found.departments.items()
        ),
    )
    return found


def held_out_calibration(
    examples: Sequence[Example], settings: Settings, fit: Callable[[list[Example]], Batch]
) -> Calibration:
    """Thresholds from a twin fitted on the train split and scored on the valid split; every
    department keeps the global threshold when either split cannot make a twin or a score."""
    names = settings.labels
    target = settings.classifier.target_precision
    train = [e for e in examples if e.split == "train" and e.label in names]
    valid = [e for e in examples if e.split == "valid" and e.label in names]
    if not valid or len({e.label for e in train}) < 2:
        return calibrate([], names, target=target)
    twin = fit(train)
    answers = twin.classify_many([e.to_input() for e in valid])
    scored = [Scored(p.label, p.confidence, e.label) for p, e in zip(answers, valid, strict=True)]
    return calibrate(scored, names, target=target)
