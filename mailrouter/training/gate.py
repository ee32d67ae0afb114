"""The promotion gate: may a candidate replace the model in service?

A pure function of three sets of scores measured on the same pinned test set (:mod:`..testpin`),
so the rule can be read, tested and explained on its own. The rules, in the order they are
checked; the first that fails decides, and :attr:`Decision.rule` names it:

``empty_test``
    nothing to judge on: never published.
``baseline``
    the candidate's accuracy reaches the baseline's (TF-IDF + logistic regression) plus
    ``min_baseline_gain``: an LLM that a one-second classifier outperforms is not worth serving.
    Ties pass by default because on a small test set the baseline can score 1.0, which nothing
    could then exceed; a positive ``min_baseline_gain`` demands a strict win.
``accuracy``, ``macro_f1``
    not worse than the model in service (plus ``min_accuracy_gain`` for accuracy).
``recall:<department>``
    no department's recall drops by more than ``max_recall_drop`` against the model in service:
    overall accuracy can rise while a small department is quietly lost.
``false_spam``
    no more real mail (expected label not a spam department) sent to spam than the model in
    service: spam is filed, never forwarded, so that mail reaches nobody.

Without a model in service the decision is ``first_model``; with one and every rule passing it is
``all_rules_pass``. Rules that need a figure the model in service lacks (a record older than
these rules) are skipped, and the reason says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

# Scores are ratios of small integers; this absorbs float noise in "not worse" comparisons.
_EPS = 1e-9


@dataclass(frozen=True)
class Scores:
    """What the gate compares, on the pinned test set.

    ``recall``: per department present in the test set; ``false_spam``: real mail answered as
    spam. Empty / ``None`` when unknown (a model in service recorded before they were measured).
    """

    accuracy: float
    macro_f1: float
    n: int = 0
    recall: Mapping[str, float] = field(default_factory=dict)
    false_spam: int | None = None


@dataclass(frozen=True)
class GateRules:
    """Thresholds from ``[training]``."""

    min_accuracy_gain: float = 0.0
    min_baseline_gain: float = 0.0
    max_recall_drop: float = 0.10


@dataclass(frozen=True)
class Decision:
    """``publish``, the rule that decided, and a one-line reason with the numbers.

    Recorded with the run and shown by ``mailrouter models list`` and ``train --now``.
    """

    publish: bool
    reason: str
    rule: str


def decide(
    candidate: Scores,
    current: Scores | None,
    baseline: Scores | None,
    rules: GateRules = GateRules(),
) -> Decision:
    """Decide on a candidate; ``current``/``baseline`` are ``None`` when there is none."""
    if candidate.n == 0:
        return Decision(
            False, "rejected: the test set is empty, nothing to judge the model on", "empty_test"
        )
    refused = _below_baseline(candidate, baseline, rules)
    if refused is None and current is not None:
        refused = _worse_than_current(candidate, current, rules)
    if refused is not None:
        return refused
    if current is None:
        return Decision(
            True,
            f"published: first model, accuracy {candidate.accuracy:.3f}, "
            f"macro-F1 {candidate.macro_f1:.3f}" + _versus(baseline),
            "first_model",
        )
    return Decision(
        True,
        f"published: accuracy {candidate.accuracy:.3f} (in service {current.accuracy:.3f}), "
        f"macro-F1 {candidate.macro_f1:.3f} (in service {current.macro_f1:.3f})"
        + _spam_versus(candidate, current)
        + _versus(baseline)
        + _unchecked(current),
        "all_rules_pass",
    )


def _below_baseline(
    candidate: Scores, baseline: Scores | None, rules: GateRules
) -> Decision | None:
    if baseline is None:
        return None
    needed = baseline.accuracy + rules.min_baseline_gain
    if candidate.accuracy >= needed - _EPS:
        return None
    margin = (
        f" {rules.min_baseline_gain:+.3f} (min_baseline_gain)" if rules.min_baseline_gain else ""
    )
    return Decision(
        False,
        f"rejected: accuracy {candidate.accuracy:.3f} does not reach the baseline's "
        f"{baseline.accuracy:.3f}{margin}",
        "baseline",
    )


def _worse_than_current(candidate: Scores, current: Scores, rules: GateRules) -> Decision | None:
    """The first rule against the model in service that the candidate fails, if any."""
    needed = current.accuracy + rules.min_accuracy_gain
    if candidate.accuracy < needed - _EPS:
        gain = f" + required gain {rules.min_accuracy_gain:.3f}" if rules.min_accuracy_gain else ""
        return Decision(
            False,
            f"rejected: accuracy {candidate.accuracy:.3f} < {needed:.3f} "
            f"(model in service {current.accuracy:.3f}{gain})",
            "accuracy",
        )
    if candidate.macro_f1 < current.macro_f1 - _EPS:
        return Decision(
            False,
            f"rejected: macro-F1 {candidate.macro_f1:.3f} < {current.macro_f1:.3f} "
            "of the model in service",
            "macro_f1",
        )
    for label, before in current.recall.items():
        after = candidate.recall.get(label, 0.0)
        if after < before - rules.max_recall_drop - _EPS:
            return Decision(
                False,
                f"rejected: recall of {label} {after:.3f} < {before:.3f} of the model in service "
                f"- {rules.max_recall_drop:.3f} (max_recall_drop)",
                f"recall:{label}",
            )
    if (
        candidate.false_spam is not None
        and current.false_spam is not None
        and candidate.false_spam > current.false_spam
    ):
        return Decision(
            False,
            f"rejected: {candidate.false_spam} real email(s) of {candidate.n} sent to spam, "
            f"the model in service sends {current.false_spam}",
            "false_spam",
        )
    return None


def _versus(baseline: Scores | None) -> str:
    return f", baseline {baseline.accuracy:.3f}" if baseline is not None else ""


def _spam_versus(candidate: Scores, current: Scores) -> str:
    if candidate.false_spam is None or current.false_spam is None:
        return ""
    return f", real mail to spam {candidate.false_spam} (in service {current.false_spam})"


def _unchecked(current: Scores) -> str:
    """Rules skipped for lack of the figures in the service model's record."""
    missing = [
        name
        for name, absent in (
            ("recall", not current.recall),
            ("false_spam", current.false_spam is None),
        )
        if absent
    ]
    return (
        f" (not checked, not recorded for the model in service: {', '.join(missing)})"
        if missing
        else ""
    )
