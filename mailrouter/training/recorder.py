"""Raw answers of an evaluation, kept to compare two runtimes answer by answer.

Accuracy can match while answers differ (two different wrong labels, or two different strings
that map to no label). Publishing checks that llama.cpp behind Ollama gives MLX's greedy answer
for every test email, so both evaluations go through a :class:`Recorder`.
"""

from __future__ import annotations

from ..classify.base import Classifier
from ..prediction import ClassifyInput, Prediction


class Recorder:
    """A classifier that remembers each raw answer (stripped), in the order it was asked."""

    def __init__(self, inner: Classifier) -> None:
        self.inner = inner
        self.answers: list[str] = []

    @property
    def name(self) -> str:
        return self.inner.name

    def classify(self, item: ClassifyInput) -> Prediction:
        prediction = self.inner.classify(item)
        self.answers.append(prediction.raw.strip())
        return prediction


def agreement(a: list[str], b: list[str]) -> float:
    """Share of positions where both runtimes gave the same answer (1.0 for two empty lists)."""
    if len(a) != len(b):
        return 0.0
    return round(sum(x == y for x, y in zip(a, b, strict=True)) / len(a), 4) if a else 1.0


def differences(a: list[str], b: list[str], limit: int = 5) -> list[tuple[str, str]]:
    return [(x, y) for x, y in zip(a, b, strict=False) if x != y][:limit]
