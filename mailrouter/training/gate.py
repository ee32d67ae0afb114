"""The promotion gate: may a candidate replace the model in service?

A pure function of three sets of scores measured on the same test split, so the rule can be read,
tested and explained on its own. A candidate is published only when it is not worse than the model
in service on accuracy *and* macro-F1 (plus an optional required gain) and when its accuracy reaches
the baseline's (TF-IDF + logistic regression) plus ``min_baseline_gain``: an LLM that a one-second
classifier outperforms is not worth serving. Ties with the baseline pass by default because on a
small test set the baseline can score 1.0, which nothing could then exceed; a positive
``min_baseline_gain`` demands a strict win.
"""

from __future__ import annotations

from dataclasses import dataclass

# Scores are ratios of small integers; this absorbs float noise in "not worse" comparisons.
_EPS = 1e-9


@dataclass(frozen=True)
class Scores:
    """What the gate compares: accuracy and macro-F1 on the test split, and its size."""

    accuracy: float
    macro_f1: float
    n: int = 0


@dataclass(frozen=True)
class GateRules:
    """Thresholds from ``[training]``: required gains over the model in service and the baseline."""

    min_accuracy_gain: float = 0.0
    min_baseline_gain: float = 0.0


@dataclass(frozen=True)
class Decision:
    """``publish`` and a one-line reason recorded with the run and shown by ``models list``."""

    publish: bool
    reason: str


def decide(
    candidate: Scores,
    current: Scores | None,
    baseline: Scores | None,
    rules: GateRules = GateRules(),
) -> Decision:
    """Decide on a candidate; ``current``/``baseline`` are ``None`` when there is none."""
    if candidate.n == 0:
        return Decision(False, "rejected: the test split is empty, nothing to judge the model on")
    if baseline is not None:
        needed = baseline.accuracy + rules.min_baseline_gain
        if candidate.accuracy < needed - _EPS:
            return Decision(
                False,
                f"rejected: accuracy {candidate.accuracy:.3f} does not reach the baseline's "
                f"{baseline.accuracy:.3f}" + _margin(rules.min_baseline_gain),
            )
    if current is not None:
        needed = current.accuracy + rules.min_accuracy_gain
        if candidate.accuracy < needed - _EPS:
            return Decision(
                False,
                f"rejected: accuracy {candidate.accuracy:.3f} < {needed:.3f} "
                f"(model in service {current.accuracy:.3f}"
                + (
                    f" + required gain {rules.min_accuracy_gain:.3f})"
                    if rules.min_accuracy_gain
                    else ")"
                ),
            )
        if candidate.macro_f1 < current.macro_f1 - _EPS:
            return Decision(
                False,
                f"rejected: macro-F1 {candidate.macro_f1:.3f} < {current.macro_f1:.3f} "
                "of the model in service",
            )
        return Decision(
            True,
            f"published: accuracy {candidate.accuracy:.3f} (in service {current.accuracy:.3f}), "
            f"macro-F1 {candidate.macro_f1:.3f} (in service {current.macro_f1:.3f})"
            + _versus(baseline),
        )
    return Decision(
        True,
        f"published: first model, accuracy {candidate.accuracy:.3f}, "
        f"macro-F1 {candidate.macro_f1:.3f}" + _versus(baseline),
    )


def _margin(gain: float) -> str:
    return f" {gain:+.3f} (min_baseline_gain)" if gain else ""


def _versus(baseline: Scores | None) -> str:
    return f", baseline {baseline.accuracy:.3f}" if baseline is not None else ""
