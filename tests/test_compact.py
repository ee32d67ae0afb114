"""The compact baseline: NumPy alone answers exactly as the scikit-learn pipeline it was exported
from, the file is private and safe to load, and classifying never imports scikit-learn."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailrouter.classify.baseline import (
    BaselineClassifier,
    _train_in_child,
    email_text,
    export,
    train_pipeline,
)
from mailrouter.classify.compact import CompactModel
from mailrouter.config import default_departments, load_settings
from mailrouter.dataset import Dataset
from mailrouter.errors import ClassifierError
from mailrouter.prediction import ClassifyInput

REPO = Path(__file__).resolve().parent.parent
STARTER = REPO / "data" / "examples.jsonl"
DEPS = default_departments()


@pytest.fixture(scope="module")
def starter() -> tuple[list[str], list[str], list[str]]:
    """Every starter email's text as the baseline reads it, its label and its split."""
    examples = Dataset(STARTER).load()
    texts = [email_text(e.to_input(), DEPS) for e in examples]
    return texts, [e.label for e in examples], [e.split for e in examples]


def assert_same_answers(pipeline: object, model: CompactModel, texts: list[str]) -> None:
    expected = pipeline.predict_proba(texts)  # type: ignore[attr-defined]
    got = model.predict_proba(texts)
    assert list(model.classes) == [str(c) for c in pipeline.classes_]  # type: ignore[attr-defined]
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-9
    assert (got.argmax(axis=1) == expected.argmax(axis=1)).all()


def test_same_labels_and_probabilities_on_every_starter_email(
    starter: tuple[list[str], list[str], list[str]], tmp_path: Path
) -> None:
    """Trained as the service trains it (train + valid), asked about all 336 emails of every
    split, through the file: the same label and the same probabilities as scikit-learn."""
    texts, labels, splits = starter
    assert set(splits) == {"train", "valid", "test"} and len(texts) > 300
    train = [i for i, s in enumerate(splits) if s in ("train", "valid")]
    pipeline = train_pipeline([texts[i] for i in train], [labels[i] for i in train])
    export(pipeline).save(tmp_path / "model.npz")
    assert_same_answers(pipeline, CompactModel.load(tmp_path / "model.npz"), texts)


def test_two_classes_use_the_logistic_link(
    starter: tuple[list[str], list[str], list[str]],
) -> None:
    texts, labels, _ = starter
    pair = [i for i, label in enumerate(labels) if label in ("RH", "Finance")]
    pipeline = train_pipeline([texts[i] for i in pair], [labels[i] for i in pair])
    model = export(pipeline)
    assert model.coef.shape[0] == 1
    assert_same_answers(pipeline, model, texts)


def test_every_vectoriser_parameter_is_honoured(
    starter: tuple[list[str], list[str], list[str]],
) -> None:
    """Parameters the baseline does not use today still mean what they mean in scikit-learn."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import FeatureUnion, Pipeline

    texts, labels, _ = starter
    union = FeatureUnion(
        [
            (
                "words",
                TfidfVectorizer(
                    ngram_range=(2, 3),
                    lowercase=False,
                    strip_accents="unicode",
                    token_pattern=r"(?u)\b\w+\b",
                    binary=True,
                    norm="l1",
                ),
            ),
            (
                "chars",
                TfidfVectorizer(
                    analyzer="char_wb", ngram_range=(1, 5), strip_accents="ascii", use_idf=False
                ),
            ),
            ("plain", TfidfVectorizer(norm=None, sublinear_tf=True, smooth_idf=False)),
        ]
    )
    pipeline = Pipeline([("features", union), ("model", LogisticRegression(max_iter=500))])
    pipeline.fit(texts[:200], labels[:200])
    model = CompactModel.from_bytes(export(pipeline).to_bytes())
    assert model.vectorizers[1].idf is None
    assert_same_answers(pipeline, model, [*texts, "", "ÉTÉ  été\tÉté ﬁn Ǆ", "a b"])


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_the_analysers_are_scikit_learns(text: str) -> None:
    from sklearn.feature_extraction.text import TfidfVectorizer

    corpus = ["un deux", text or "x"]
    for params in (
        {"analyzer": "word", "ngram_range": (1, 2)},
        {"analyzer": "char_wb", "ngram_range": (3, 4)},
        {"analyzer": "word", "ngram_range": (1, 3), "strip_accents": "unicode"},
        {"analyzer": "char_wb", "ngram_range": (2, 5), "lowercase": False},
    ):
        reference = TfidfVectorizer(**params).fit(corpus)
        ours = export_vectorizer(reference)
        assert sorted(ours.analyze(text)) == sorted(reference.build_analyzer()(text))


def export_vectorizer(vectorizer: object) -> object:
    from mailrouter.classify.baseline import _export_vectorizer

    return _export_vectorizer(vectorizer)


def test_a_custom_analyser_is_refused() -> None:
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(analyzer=str.split).fit(["a b", "c d"])
    with pytest.raises(ClassifierError, match="custom analyzer"):
        export_vectorizer(vectorizer)


def test_the_file_is_private_and_loads_without_pickle(tmp_path: Path) -> None:
    model = BaselineClassifier.fit(
        [e for e in Dataset(STARTER).load() if e.split == "train"], DEPS
    ).model
    path = tmp_path / "models" / "baseline.npz"
    model.save(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert not list(path.parent.glob("*.tmp"))
    # an array of Python objects would need pickle to load: refused, not run
    evil = tmp_path / "evil.npz"
    np.savez(evil, meta=np.array([{"format": 1}], dtype=object))
    with pytest.raises(ClassifierError, match="not a compact baseline model"):
        CompactModel.load(evil)
    with pytest.raises(ClassifierError, match="cannot read"):
        CompactModel.load(tmp_path / "absent.npz")


def test_a_model_whose_shapes_disagree_is_refused() -> None:
    model = BaselineClassifier.fit(
        [e for e in Dataset(STARTER).load() if e.split == "train"], DEPS
    ).model
    with pytest.raises(ClassifierError, match="coefficients of shape"):
        CompactModel(model.classes, model.vectorizers, model.coef[:, :-1], model.intercept)
    with pytest.raises(ClassifierError, match="intercept of shape"):
        CompactModel(model.classes, model.vectorizers, model.coef, model.intercept[:-1])


CLASSIFY_AND_LIST_MODULES = """
import json, sys
from mailrouter.classify import make_classifier
from mailrouter.config import load_settings
from mailrouter.prediction import ClassifyInput

classifier = make_classifier(load_settings(), "baseline")
prediction = classifier.classify(ClassifyInput(sys.argv[1], sys.argv[2]))
print(json.dumps({
    "label": prediction.label,
    "fit_seconds": classifier.fit_seconds,
    "heavy": sorted(m for m in sys.modules if m.split(".")[0] in ("sklearn", "scipy")),
}))
"""


def test_classifying_with_the_baseline_never_imports_scikit_learn(data_dir: Path) -> None:
    """A fresh process answers with NumPy alone: when it must train first (scikit-learn runs in
    a child process that writes the compact file), and when it loads that file."""
    (data_dir / "examples.jsonl").write_bytes(STARTER.read_bytes())
    text, subject = "La facture 42 reste impayee, merci de regulariser.", "Relance"

    def classify() -> dict[str, object]:
        out = subprocess.run(
            [sys.executable, "-c", CLASSIFY_AND_LIST_MODULES, text, subject],
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
        ).stdout
        return json.loads(out.splitlines()[-1])

    first = classify()
    assert first["fit_seconds"] is not None and first["heavy"] == []
    assert first["label"] == "Finance"
    assert list((data_dir / "models" / "baseline").glob("*.npz"))
    assert classify() == {"label": "Finance", "fit_seconds": None, "heavy": []}
    in_process = BaselineClassifier.from_settings(load_settings())
    assert in_process.classify(ClassifyInput(text, subject)).label == "Finance"


def test_a_failing_training_child_names_its_error() -> None:
    with pytest.raises(ClassifierError, match=r"child process failed .*ValueError"):
        _train_in_child(["un deux", "trois quatre"], ["RH", "RH"])  # one class: sklearn refuses
