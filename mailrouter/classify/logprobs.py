"""From a server's generated tokens and their log-probabilities to a label and a confidence.

Every backend that asks an LLM server for a completion (Ollama's ``/api/generate``, an
OpenAI-compatible ``/v1/completions``) gets the same things back in different shapes: the answer's
text and, for each generated token, its log-probability and the alternatives at that position.
Each backend turns its server's shape into :class:`TokenChoice` steps; what they mean is decided
here, once, so the same answer with the same probabilities gives the same prediction whichever
server computed it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..config import Department, fold
from ..prediction import Prediction, map_label


@dataclass(frozen=True)
class TokenChoice:
    """One generated token and the alternatives the server reported for its position."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...]

    @classmethod
    def from_api(cls, entry: Any) -> TokenChoice:
        """From ``{"token", "logprob", "top_logprobs": [{"token", "logprob"}, ...]}`` (Ollama's
        ``/api/generate``, OpenAI's chat ``logprobs.content``), a dict or a client's model."""
        top = tuple(
            (_get(t, "token") or "", float(_get(t, "logprob")))
            for t in _get(entry, "top_logprobs") or []
        )
        return cls(token=_get(entry, "token") or "", logprob=float(_get(entry, "logprob")), top=top)


def _get(obj: Any, key: str) -> Any:
    """A field of a JSON object or of a client library's response model."""
    return obj.get(key) if isinstance(obj, Mapping) else getattr(obj, key, None)


def label_confidence(
    steps: Sequence[TokenChoice], chosen: str, departments: Sequence[Department]
) -> float | None:
    """Probability that the answer names ``chosen``, from the generated tokens' alternatives.

    At the first token this is the probability of the chosen label's first tokens among the
    first tokens of all labels (names and aliases, case and accents ignored), renormalised over
    those: tokens that start no label do not count. Labels can share a first token ("S" starts
    both Support and SPAM): the generated token's share is then resolved by the next token, which
    the server computed after it, and a shared alternative that was not generated is split evenly
    between the labels it could start. ``None`` when the server sent no usable alternatives.
    """
    forms = tuple((d.name, frozenset({fold(d.name), *map(fold, d.aliases)})) for d in departments)

    def starts(prefix: str) -> frozenset[str]:
        return _labels_starting(forms, prefix)

    def share(i: int, prefix: str) -> float | None:
        if i >= len(steps):
            # No token to resolve a shared one (the answer stopped at a newline, say): split.
            return 1.0 if i == 0 else 1.0 / len(starts(prefix))
        step = steps[i]
        alive = starts(prefix)
        if alive == {chosen}:
            return 1.0
        alternatives = step.top or ((step.token, step.logprob),)
        total = mine = 0.0
        seen_generated = False
        for token, logprob in alternatives:
            deps = starts(prefix + token) & alive
            if not deps:
                continue
            p = math.exp(logprob)
            total += p
            if chosen not in deps:
                continue
            if token == step.token and not seen_generated:
                seen_generated = True
                rest = 1.0 if deps == {chosen} else share(i + 1, prefix + token)
                if rest is None:
                    return None
                mine += p * rest
            else:
                mine += p / len(deps)
        if total == 0.0:
            return None
        return min(1.0, mine / total)

    return share(0, "")


@functools.lru_cache(maxsize=4096)
def _labels_starting(forms: tuple[tuple[str, frozenset[str]], ...], prefix: str) -> frozenset[str]:
    """The labels one of whose forms starts with ``prefix`` (case and accents ignored). Cached:
    every answer's alternatives are the same few tokens, looked up for every department."""
    key = fold(prefix.replace("\u2581", " "))  # SentencePiece's word mark, where a server shows it
    return frozenset(name for name, words in forms if any(w.startswith(key) for w in words))


@dataclass(frozen=True)
class Reading:
    """What a completion says: its answer, the label chosen (``None``: none) and, when the server
    sent usable alternatives, the label's confidence and every department's probability.

    ``greedy`` is the label the answer's text names through :func:`map_label` (``None``: none),
    the cross-check of a label chosen from the probabilities.
    """

    answer: str
    label: str | None
    confidence: float | None = None
    probabilities: Mapping[str, float] = field(default_factory=dict)
    greedy: str | None = None


def read_answer(
    text: str,
    steps: Sequence[TokenChoice],
    departments: Sequence[Department],
    *,
    from_probabilities: bool = True,
) -> Reading:
    """The label with the largest probability at the answer position, the text as cross-check.

    A fine-tuned model answers a label, and its text and its probabilities agree: the label is
    the one the text names (only through :func:`map_label`) and its confidence is its share among
    the labels (:func:`label_confidence`), as before. A weak zero-shot model often writes prose
    ("La demande concerne…"): the label is then the department whose first tokens are likeliest
    at the answer position, and its confidence is that raw probability, not renormalised over
    the labels, so a model that would rather have written something else (or named another
    department) routes with a low confidence (triage below the threshold) instead of a certain
    one. No label token among the alternatives, or no alternatives at all: only the text counts.

    ``from_probabilities=False`` reads the text alone (a fine-tuned model: its prose is a failure
    to route to triage, not to guess from, and MLX evaluates its candidates the same way).
    """
    answer = text.strip()
    greedy = map_label(answer, departments)
    shares = _shares(steps, departments) if from_probabilities else {}
    if not shares:
        return _read_text(answer, greedy, steps, departments)
    chosen = max(shares, key=lambda name: (shares[name], name == greedy))
    if chosen == greedy:
        return Reading(answer, greedy, shares[greedy], shares, greedy)
    mass = label_mass(steps[0], departments)
    raw = {name: share * mass for name, share in shares.items()}
    return Reading(answer, chosen, raw[chosen], raw, greedy)


def _read_text(
    answer: str, label: str | None, steps: Sequence[TokenChoice], departments: Sequence[Department]
) -> Reading:
    """The label the text names, with its share among the labels when the server sent any."""
    confidence = label_confidence(steps, label, departments) if steps and label else None
    if label is None or confidence is None:
        return Reading(answer=answer, label=label, greedy=label)
    probabilities = {
        d.name: label_confidence(steps, d.name, departments) or 0.0 for d in departments
    }
    return Reading(answer, label, confidence, probabilities, label)


def _shares(steps: Sequence[TokenChoice], departments: Sequence[Department]) -> dict[str, float]:
    """Each department's :func:`label_confidence`; empty when no alternative starts a label."""
    if not steps:
        return {}
    shares = {d.name: label_confidence(steps, d.name, departments) for d in departments}
    if all(share is None for share in shares.values()):
        return {}
    return {name: share or 0.0 for name, share in shares.items()}


def label_mass(step: TokenChoice, departments: Sequence[Department]) -> float:
    """The probability, at one position, of the alternatives that start some label's name or
    alias (``" RH"``, ``"S"``, ``"fin"``): how much of the model's answer could be a label."""
    forms = tuple((d.name, frozenset({fold(d.name), *map(fold, d.aliases)})) for d in departments)
    alternatives = step.top or ((step.token, step.logprob),)
    mass = sum(math.exp(lp) for token, lp in alternatives if _labels_starting(forms, token))
    return min(1.0, mass)


def prediction(
    reading: Reading, *, model: str, no_logprobs: str, threshold: float | None
) -> Prediction:
    """The prediction a reading gives. Without usable log-probabilities the label is kept with
    confidence 1.0 (``classifier.no_logprobs = "accept"``) or sent to triage (``"triage"``)."""
    if reading.label is None or (reading.confidence is None and no_logprobs == "triage"):
        return Prediction(label=None, confidence=0.0, model=model, raw=reading.answer)
    if reading.confidence is None:
        return Prediction(label=reading.label, confidence=1.0, model=model, raw=reading.answer)
    return Prediction(label=reading.label, confidence=reading.confidence, model=model,
                      raw=reading.answer, probabilities=reading.probabilities,
                      threshold=threshold)  # fmt: skip
