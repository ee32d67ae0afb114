"""A published version's thresholds: calibrated on the valid split from its answers **through
Ollama** (the confidences the router will compare with them, quantisation and all), before it
goes into service.

They are recorded twice, by one function: in the version's registry record
(``models.metrics.calibration``, with the Ollama ``digest`` it was measured on), which is what
``models list`` and a person read; and as a file keyed by that digest
(:func:`mailrouter.calibration.ollama_path`), which is what the service's classifier looks up
when it sees which model answers: ``latest`` is a copy of ``vN`` and has its digest, a rollback
brings back the older digest and so its thresholds, and a model replaced by hand has a digest
nothing knows, so the global threshold applies to it.
"""

from __future__ import annotations

from ..calibration import Calibration, Scored, calibrate, ollama_path, save
from ..config import Settings
from ..state import State
from . import registry
from .evaluation import Report


def from_report(report: Report | None, labels: list[str], target: float) -> Calibration:
    """Thresholds from an evaluation on the valid split (``None``: no valid example, so every
    department keeps the global threshold)."""
    items = report.items if report is not None else []
    scored = [Scored(i.predicted, i.confidence, i.expected) for i in items]
    return calibrate(scored, labels, target=target, split="valid")


def record(
    settings: Settings, state: State, version: str, digest: str, calibration: Calibration
) -> None:
    """Store ``calibration`` with ``version``'s registry record and under its digest (when
    Ollama gave one)."""
    if digest:
        save(ollama_path(settings.models_dir, digest), calibration)
    registry.set_status(state, version, "retired", calibration=calibration.to_dict(), digest=digest)
