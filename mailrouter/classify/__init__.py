"""Classifier backends behind one protocol; heavy ones are imported only when asked for."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..prediction import ClassifyInput, Prediction, map_label
from .base import Classifier

if TYPE_CHECKING:
    from ..config import Settings

__all__ = ["Classifier", "ClassifyInput", "Prediction", "make_classifier", "map_label"]


def make_classifier(settings: Settings, backend: str | None = None) -> Classifier:
    """Build the configured backend (``ollama``, ``baseline`` or ``mlx``)."""
    name = backend or settings.classifier.backend
    if name == "baseline":
        from .baseline import BaselineClassifier

        return BaselineClassifier.from_settings(settings)
    if name == "ollama":
        from .ollama import OllamaClassifier

        return OllamaClassifier.from_settings(settings)
    if name == "mlx":
        from .mlx import MlxClassifier

        return MlxClassifier.from_settings(settings)
    raise ValueError(f"unknown backend {name!r}: expected ollama, baseline or mlx")
