"""The in-process MLX backend: the training tokens, a checked label, an exact confidence."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from mailrouter.classify import make_classifier
from mailrouter.config import Department, default_departments, load_settings
from mailrouter.errors import ClassifierError
from mailrouter.prediction import ClassifyInput

EMAIL = ClassifyInput(
    "Bonjour, je vous envoie ma candidature.", subject="Stage", sender_domain="x.fr"
)


@pytest.fixture(scope="module")
def classifier(tiny_model: Path, tiny_adapter: Path):  # type: ignore[no-untyped-def]
    from mailrouter.classify.mlx import MlxClassifier

    return MlxClassifier(tiny_model, default_departments(), adapter_path=tiny_adapter)


def test_classify_returns_a_checked_label(classifier) -> None:  # type: ignore[no-untyped-def]
    prediction = classifier.classify(EMAIL)
    names = {d.name for d in default_departments()}
    assert prediction.label is None or prediction.label in names
    assert 0.0 <= prediction.confidence <= 1.0
    assert prediction.model.startswith("mlx:tiny-mistral-") and prediction.model.endswith(
        "+adapter"
    )
    tokens, text, probs = classifier.answer(classifier.prompt_ids(classifier.render(EMAIL)))
    # An answer may be empty (the model ends its turn at once): then the label is None.
    assert text.strip() == prediction.raw and len(tokens) <= classifier.max_tokens
    assert math.isclose(sum(probs.values()), 1.0) and set(probs) == names
    if prediction.label is not None:
        assert prediction.confidence == probs[prediction.label]


def test_answer_ids_are_the_trained_completion(classifier) -> None:  # type: ignore[no-untyped-def]
    """``RH`` after ``[/INST]`` is ``▁RH`` (ids of the assistant turn), not a bare ``RH``."""
    ids = classifier._answers["RH"]
    assert classifier.tokenizer.decode(ids) == "RH"
    assert ids == classifier.tokenizer.encode(" RH", add_special_tokens=False)[-len(ids) :]


def test_labels_sharing_a_first_token_use_sequence_probability(tiny_model: Path) -> None:
    """Exact value, recomputed without the cache: P(label) ∝ P(first) · P(rest | first)."""
    import mlx.core as mx

    from mailrouter.classify.mlx import MlxClassifier

    departments = [
        Department(name="SPAM", action="spam"),
        Department(name="SPAS", address="spas@example.com"),  # "▁SP" starts both
        Department(name="RH", address="rh@example.com"),
        Department(name="RHX", address="rhx@example.com"),  # "RH" is a prefix of "RHX"
        Department(name="Finance", address="finance@example.com"),
    ]
    mlx = MlxClassifier(tiny_model, departments)
    answers = mlx._answers
    assert answers["SPAM"][0] == answers["SPAS"][0] and answers["RH"] == answers["RHX"][:2]
    prompt = mlx.prompt_ids(mlx.render(EMAIL))
    _tokens, _text, probs = mlx.answer(prompt)

    def log_prob(answer: list[int]) -> float:
        """One uncached pass over prompt + answer; the head only where the answer is read."""
        hidden = mlx.model.model(mx.array(prompt + answer[:-1])[None])[0, len(prompt) - 1 :]
        logits = mlx.model.lm_head(hidden)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return sum(logp[i, t].item() for i, t in enumerate(answer))

    eos = mlx.tokenizer.eos_token_id
    scores = {name: log_prob([*answers[name], eos]) for name in ["SPAM", "SPAS", "RH", "RHX"]}
    scores["Finance"] = log_prob(answers["Finance"][:1])  # a unique first token decides alone
    norm = sum(math.exp(s) for s in scores.values())
    for name, score in scores.items():
        assert probs[name] == pytest.approx(math.exp(score) / norm, rel=1e-3)


def test_from_settings_and_make_classifier(tiny_model: Path, tiny_adapter: Path) -> None:
    from mailrouter.classify.mlx import MlxClassifier

    settings = load_settings(None, training={"base_model": str(tiny_model)})
    base = make_classifier(settings, "mlx")
    assert isinstance(base, MlxClassifier) and base.name == f"mlx:{tiny_model.name}"
    assert base.max_tokens == settings.classifier.num_predict
    tuned = MlxClassifier.from_settings(settings, adapter_path=tiny_adapter)
    assert tuned.classify(EMAIL).model == f"mlx:{tiny_model.name}+adapter"


def test_missing_model_is_a_classifier_error(tmp_path: Path) -> None:
    from mailrouter.classify.mlx import MlxClassifier

    with pytest.raises(ClassifierError, match="cannot load model"):
        MlxClassifier(tmp_path / "absent", default_departments())


def test_package_never_imports_mlx_at_module_level() -> None:
    code = (
        "import sys, mailrouter.classify, mailrouter.classify.mlx, mailrouter.training.gguf\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm')]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
