"""Classifier backends behind one protocol; the baseline (array code) is imported only when
asked for, and the MLX backend loads MLX only when built."""

from __future__ import annotations

from ..config import Settings
from ..prediction import ClassifyInput, Prediction, map_label
from .base import Classifier
from .mlx import MlxClassifier
from .ollama import OllamaClassifier
from .openai import OpenAIClassifier

__all__ = ["Classifier", "ClassifyInput", "Prediction", "make_classifier", "map_label"]


def make_classifier(settings: Settings, backend: str | None = None) -> Classifier:
    """Build the configured backend (``ollama``, ``baseline``, ``mlx`` or ``openai``)."""
    name = backend or settings.classifier.backend
    if name == "baseline":
        from .baseline import BaselineClassifier  # numpy: heavy for a service that never uses it

        return BaselineClassifier.from_settings(settings)
    if name == "ollama":
        return OllamaClassifier.from_settings(settings)
    if name == "mlx":
        return MlxClassifier.from_settings(settings)
    if name == "openai":
        return OpenAIClassifier.from_settings(settings)
    raise ValueError(f"unknown backend {name!r}: expected ollama, baseline, mlx or openai")
