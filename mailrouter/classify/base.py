"""The protocol every classifier backend follows: a small class with one method.

What a backend returns (:class:`~mailrouter.prediction.Prediction`) and the one place a model's
answer becomes a label (:func:`~mailrouter.prediction.map_label`) are core types, so decisions
never import a backend.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from ..prediction import ClassifyInput, Prediction


@runtime_checkable
class Classifier(Protocol):
    """A backend: a plain attribute or a property may give its ``name``."""

    @property
    def name(self) -> str:
        """The model version recorded with every decision."""
        ...

    def classify(self, item: ClassifyInput) -> Prediction: ...
