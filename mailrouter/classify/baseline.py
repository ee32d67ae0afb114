"""The baseline: TF-IDF (word 1-2 grams + character 3-4 grams) and logistic regression.

It reads exactly the email part of the one prompt (subject, sender domain, body; truncated and
accents stripped the same way), trains on the train and valid splits in a second or two, and is the
floor every fine-tuned model must beat. Its confidence is the predicted class's probability.

scikit-learn trains it (imported only then); the fitted model is exported to a compact NumPy file
(:mod:`.compact`) under ``models_dir/baseline/``, keyed by the dataset's content hash and the
prompt settings, and every answer comes from that file. :meth:`BaselineClassifier.from_settings`
trains in a child process (``python -m mailrouter.classify.baseline``), only when the data or the
departments changed: scikit-learn and SciPy (about 100 MB) never enter the service.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..calibration import Calibration
from ..config import BASELINE_MODEL_PREFIX, Department, Settings, default_departments
from ..dataset import Dataset, Example
from ..errors import ClassifierError
from ..files import NO_DATASET_FIX
from ..logs import event
from ..prediction import ClassifyInput, Prediction
from ..prompt import PromptOptions, prefix
from . import compact
from .compact import CompactModel, Vectorizer
from .thresholds import baseline_calibration

if TYPE_CHECKING:
    from sklearn.pipeline import Pipeline

log = logging.getLogger(__name__)

#: Bumped when the features or the model change, so an old cache is not reused.
MODEL_VERSION = 4
TRAIN_SPLITS = ("train", "valid")
TRAIN_TIMEOUT_S = 1800.0  # a thousand emails train in seconds: this only stops a hung child


def email_text(
    item: ClassifyInput,
    departments: Sequence[Department],
    options: PromptOptions = PromptOptions(),  # noqa: B008 - frozen dataclass
) -> str:
    """The email part of the prompt: the prompt without its fixed prefix, built by prompt.py."""
    prompt = item.prompt(departments, options)
    return prompt[len(prefix(departments, strip_accents=options.strip_accents)) :]


def train_pipeline(texts: Sequence[str], labels: Sequence[str]) -> Pipeline:
    """The fitted scikit-learn pipeline. Character 3-4 grams score like 2-5 grams here (5-fold CV
    0.878 against 0.875 on the starter data) for 0.6 of the cost."""
    # scikit-learn is heavy (about 100 MB with SciPy): imported only to train
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import FeatureUnion, Pipeline

    words = TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True, lowercase=True)
    chars = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 4), sublinear_tf=True)
    model = LogisticRegression(C=10.0, max_iter=2000, class_weight="balanced")
    pipeline = Pipeline(
        [("features", FeatureUnion([("words", words), ("chars", chars)])), ("model", model)]
    )
    _one_thread()
    pipeline.fit(list(texts), list(labels))
    return pipeline


def export(pipeline: Pipeline) -> CompactModel:
    """The fitted pipeline as a :class:`CompactModel`, which answers exactly as it does."""
    union, model = pipeline.named_steps["features"], pipeline.named_steps["model"]
    if union.transformer_weights:
        raise ClassifierError("cannot export a feature union with transformer weights")
    return CompactModel(
        classes=tuple(str(c) for c in model.classes_),
        vectorizers=tuple(_export_vectorizer(v) for _, v in union.transformer_list),
        coef=np.array(model.coef_, dtype=np.float64),
        intercept=np.array(model.intercept_, dtype=np.float64),
    )


def _export_vectorizer(vectorizer: Any) -> Vectorizer:
    """A fitted ``TfidfVectorizer``'s parameters; one the predictor would read differently (a
    custom analyser, preprocessor or tokenizer, stop words, bytes input) is refused."""
    custom = {
        "input": vectorizer.input != "content",
        "preprocessor": vectorizer.preprocessor is not None,
        "tokenizer": vectorizer.tokenizer is not None,
        "stop_words": vectorizer.stop_words is not None,
        "analyzer": not isinstance(vectorizer.analyzer, str),
        "strip_accents": callable(vectorizer.strip_accents),
    }
    if refused := [name for name, is_custom in custom.items() if is_custom]:
        raise ClassifierError(f"cannot export a vectorizer with a custom {', '.join(refused)}")
    idf = getattr(vectorizer, "idf_", None) if vectorizer.use_idf else None
    return Vectorizer(
        analyzer=vectorizer.analyzer,
        ngram_range=(int(vectorizer.ngram_range[0]), int(vectorizer.ngram_range[1])),
        lowercase=bool(vectorizer.lowercase),
        strip_accents=vectorizer.strip_accents or None,
        token_pattern=vectorizer.token_pattern,
        binary=bool(vectorizer.binary),
        sublinear_tf=bool(vectorizer.sublinear_tf),
        norm=vectorizer.norm,
        vocabulary={str(term): int(i) for term, i in vectorizer.vocabulary_.items()},
        idf=None if idf is None else np.array(idf, dtype=np.float64),
    )


@dataclass
class BaselineClassifier:
    """A fitted TF-IDF + logistic regression, answering from its compact export; built by
    :meth:`fit` or :meth:`from_settings`."""

    model: CompactModel
    departments: list[Department]
    options: PromptOptions
    name: str
    fit_seconds: float | None = None  # set when this instance was trained rather than loaded
    calibration: Calibration | None = None  # its thresholds per department (see .thresholds)

    @classmethod
    def fit(
        cls,
        examples: Iterable[Example],
        departments: Sequence[Department] | None = None,
        options: PromptOptions = PromptOptions(),  # noqa: B008 - frozen dataclass
        *,
        name: str | None = None,
        in_child: bool = False,
    ) -> BaselineClassifier:
        """Train on all of ``examples`` (pick the splits first); unconfigured labels are dropped.
        ``in_child`` runs scikit-learn in a child process, leaving this one lean."""
        deps = list(departments) if departments is not None else default_departments()
        names = {d.name for d in deps}
        rows = [e for e in examples if e.label in names]
        labels = sorted({e.label for e in rows})
        if len(labels) < 2:
            raise ClassifierError(
                "the baseline needs examples of at least two departments, "
                f"found {labels or 'none'}; "
                "add some with `mailrouter dataset import`"
            )
        texts, targets = (
            [email_text(e.to_input(), deps, options) for e in rows],
            [e.label for e in rows],
        )
        model = (
            _train_in_child(texts, targets) if in_child else export(train_pipeline(texts, targets))
        )
        if name is None:
            name = _model_name(_rows_hash(rows))
        return cls(model=model, departments=deps, options=options, name=name)

    @classmethod
    def from_settings(cls, settings: Settings) -> BaselineClassifier:
        """The model for the current dataset: loaded from its compact file, or trained (with
        scikit-learn) and exported there when no file matches the data and settings."""
        dataset = Dataset.from_settings(settings)
        options = PromptOptions.from_settings(settings)
        data_hash = dataset.content_hash()
        key = _cache_key(data_hash, settings.departments, options)
        cache = settings.models_dir / "baseline" / f"{key}.npz"
        cached = _load(cache)
        if cached is not None:
            return cls(
                model=cached,
                departments=list(settings.departments),
                options=options,
                name=_model_name(data_hash),
                calibration=_calibration(cache, settings, dataset, options),
            )
        examples = [e for e in dataset.load() if e.split in TRAIN_SPLITS]
        if not examples:
            raise ClassifierError(f"{dataset.path} has no training examples: {NO_DATASET_FIX}")
        started = time.monotonic()
        model = cls.fit(
            examples, settings.departments, options, name=_model_name(data_hash), in_child=True
        )
        model.fit_seconds = time.monotonic() - started
        _store(cache, model.model)
        model.calibration = _calibration(cache, settings, dataset, options)
        return model

    def classify(self, item: ClassifyInput) -> Prediction:
        return self.classify_many([item])[0]

    def classify_many(self, items: Sequence[ClassifyInput]) -> list[Prediction]:
        """One prediction per item, in order (the pipeline batches when a backend offers it)."""
        if not items:
            return []
        texts = [email_text(item, self.departments, self.options) for item in items]
        out = []
        classes = list(self.model.classes)
        for probabilities in self.model.predict_proba(texts):
            best = int(probabilities.argmax())
            label = classes[best]
            confidence = min(1.0, max(0.0, float(probabilities[best])))
            every = {c: float(p) for c, p in zip(classes, probabilities, strict=True)}
            threshold = self.calibration.threshold(label) if self.calibration else None
            out.append(Prediction(label=label, confidence=confidence, model=self.name, raw=label,
                                  probabilities=every, threshold=threshold))  # fmt: skip
        return out


def _calibration(
    cache: Path, settings: Settings, dataset: Dataset, options: PromptOptions
) -> Calibration:
    """The thresholds of the model stored at ``cache``, calibrated when it was trained."""
    return baseline_calibration(
        cache,
        settings,
        dataset.load,
        lambda rows: BaselineClassifier.fit(rows, settings.departments, options, in_child=True),
    )


def _train_in_child(texts: list[str], labels: list[str]) -> CompactModel:
    """:func:`train_pipeline` and :func:`export` in ``python -m mailrouter.classify.baseline``:
    texts and labels in as JSON on its stdin, the compact file's bytes out on its stdout."""
    request = json.dumps({"texts": texts, "labels": labels}).encode()
    command = [sys.executable, "-m", "mailrouter.classify.baseline"]
    try:
        done = subprocess.run(command, input=request, capture_output=True, timeout=TRAIN_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ClassifierError(f"training the baseline in a child process failed: {exc}") from exc
    if done.returncode != 0:
        lines = done.stderr.decode("utf-8", "replace").strip().splitlines() or ["no output"]
        raise ClassifierError(
            f"training the baseline in a child process failed (exit status {done.returncode}): "
            f"{lines[-1]}; run `mailrouter classify --backend baseline` to see it all"
        )
    return CompactModel.from_bytes(done.stdout)


def _model_name(digest: str) -> str:
    return f"{BASELINE_MODEL_PREFIX}{digest[:8]}"


@functools.cache
def _one_thread() -> None:
    """BLAS on one thread, set once for the process: on a small problem, extra threads only
    fight the service for the CPU (a 60-email fit takes 0.07 s on one thread and over 1 s with
    two busy cores), and entering the limit around each call costs ~10 ms (it scans the loaded
    libraries every time)."""
    from threadpoolctl import threadpool_limits  # comes with scikit-learn, used with it

    threadpool_limits(limits=1)


def _rows_hash(rows: Sequence[Example]) -> str:
    digest = hashlib.sha256()
    for e in sorted(rows, key=lambda e: e.id):
        digest.update(json.dumps([e.id, e.label, e.text, e.subject, e.sender_domain]).encode())
    return digest.hexdigest()


def _cache_key(data_hash: str, departments: Sequence[Department], options: PromptOptions) -> str:
    """Anything that changes the fitted model changes the key: data, departments, prompt knobs,
    the features and the file's format (not scikit-learn's version: the file does not need it,
    and reading the version would load scikit-learn)."""
    spec = json.dumps(
        [
            MODEL_VERSION,
            compact.FORMAT,
            data_hash,
            [d.model_dump(include={"name", "description"}) for d in departments],
            [
                options.max_chars,
                options.max_prompt_tokens,
                options.measure.name,
                options.strip_accents,
            ],
        ],
        sort_keys=True,
    )
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def _load(path: Path) -> CompactModel | None:
    """The exported model, or ``None`` when missing or unreadable (then it is retrained)."""
    if not path.exists():
        return None
    try:
        return CompactModel.load(path)
    except ClassifierError as exc:
        event(log, "baseline.model.unreadable", logging.WARNING, path=path, error=str(exc))
        return None


def _store(path: Path, model: CompactModel) -> None:
    """Write the file atomically and drop older ones (and the pickles of earlier versions): one
    model per data version is enough."""
    model.save(path)
    for old in path.parent.iterdir():
        if old != path and old.suffix in (".npz", ".pkl"):
            old.unlink(missing_ok=True)


def _train_child() -> None:
    """The child of :func:`_train_in_child`."""
    request = json.load(sys.stdin)
    sys.stdout.buffer.write(export(train_pipeline(request["texts"], request["labels"])).to_bytes())


if __name__ == "__main__":
    _train_child()
