"""The baseline's fitted model as plain arrays, and a predictor that needs only NumPy.

scikit-learn, SciPy and their libraries cost the service about 100 MB of memory for what is, once
trained, a dictionary lookup and a dot product. :mod:`.baseline` trains with scikit-learn and
exports the fitted TF-IDF vectorisers and logistic regression here; the service loads only this
file. The predictor re-implements exactly what scikit-learn does with the exported parameters
(lowercasing, accent stripping, the token pattern, word and ``char_wb`` n-grams, sublinear TF,
IDF, the row norm, the softmax or logistic link), so its labels and probabilities are the
pipeline's (a test compares them on every starter email). It refuses a parameter it does not
implement rather than answer differently.

The file is a NumPy ``.npz`` read with ``allow_pickle=False``: unlike the pickle it replaces,
loading it cannot run code, whoever wrote the data folder.
"""

from __future__ import annotations

import functools
import io
import json
import re
import unicodedata
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..dataset import atomic_write_bytes
from ..errors import ClassifierError

#: Bumped when the file's layout changes; an older file is then retrained, not misread.
FORMAT = 1
ANALYZERS = ("word", "char_wb")
ACCENTS = (None, "ascii", "unicode")
NORMS = (None, "l1", "l2")


@dataclass(frozen=True, eq=False)
class Vectorizer:
    """One fitted TF-IDF vectoriser: every parameter its analyser and weighting use, the
    vocabulary (term → column) and the IDF weights (``None`` when it was fitted without)."""

    analyzer: str
    ngram_range: tuple[int, int]
    lowercase: bool
    strip_accents: str | None
    token_pattern: str
    binary: bool
    sublinear_tf: bool
    norm: str | None
    vocabulary: dict[str, int]
    idf: np.ndarray | None

    def __post_init__(self) -> None:
        if self.analyzer not in ANALYZERS:
            raise ClassifierError(f"analyzer {self.analyzer!r} is not one of {ANALYZERS}")
        if self.strip_accents not in ACCENTS or self.norm not in NORMS:
            raise ClassifierError(
                f"strip_accents={self.strip_accents!r}, norm={self.norm!r}: "
                f"expected one of {ACCENTS} and {NORMS}"
            )
        if self.idf is not None and self.idf.shape != (len(self.vocabulary),):
            raise ClassifierError("the IDF weights do not match the vocabulary")

    @functools.cached_property
    def analyze(self) -> Callable[[str], list[str]]:
        """Text → terms, as scikit-learn's ``build_analyzer()`` with these parameters."""
        lower, accents = self.lowercase, _ACCENT_FUNCTIONS[self.strip_accents]
        low, high = self.ngram_range
        if self.analyzer == "char_wb":
            return lambda text: char_wb_grams(_preprocess(text, lower, accents), low, high)
        tokenize = re.compile(self.token_pattern).findall
        return lambda text: word_grams(tokenize(_preprocess(text, lower, accents)), low, high)

    def transform(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """One document's non-zero columns and TF-IDF values."""
        known = [c for c in map(self.vocabulary.get, self.analyze(text)) if c is not None]
        columns, counts = np.unique(np.array(known, dtype=np.intp), return_counts=True)
        values = counts.astype(np.float64)
        if self.binary:
            values.fill(1.0)
        if self.sublinear_tf:
            values = np.log(values) + 1.0
        if self.idf is not None:
            values *= self.idf[columns]
        if self.norm == "l2":
            norm = np.sqrt(np.sum(values * values))
        else:
            norm = np.sum(np.abs(values)) if self.norm == "l1" else 0.0
        return columns, (values / norm if norm > 0 else values)

    def params(self) -> dict[str, Any]:
        """The parameters and vocabulary for the file (terms in column order)."""
        terms = [""] * len(self.vocabulary)
        for term, column in self.vocabulary.items():
            terms[column] = term
        return {
            "analyzer": self.analyzer,
            "ngram_range": list(self.ngram_range),
            "lowercase": self.lowercase,
            "strip_accents": self.strip_accents,
            "token_pattern": self.token_pattern,
            "binary": self.binary,
            "sublinear_tf": self.sublinear_tf,
            "norm": self.norm,
            "terms": terms,
        }


@dataclass(frozen=True, eq=False)
class CompactModel:
    """TF-IDF vectorisers side by side (scikit-learn's ``FeatureUnion``) feeding a logistic
    regression: ``coef`` is ``(n_classes, n_features)``, or ``(1, n_features)`` for two classes."""

    classes: tuple[str, ...]
    vectorizers: tuple[Vectorizer, ...]
    coef: np.ndarray
    intercept: np.ndarray

    def __post_init__(self) -> None:
        rows = 1 if len(self.classes) == 2 else len(self.classes)
        width = sum(len(v.vocabulary) for v in self.vectorizers)
        if len(self.classes) < 2 or self.coef.shape != (rows, width):
            raise ClassifierError(
                f"coefficients of shape {self.coef.shape} for {len(self.classes)} classes and "
                f"{width} features"
            )
        if self.intercept.shape != (rows,):
            raise ClassifierError(f"intercept of shape {self.intercept.shape}, expected {rows}")

    @functools.cached_property
    def _weights(self) -> np.ndarray:
        """The coefficients one row per feature, so a document's rows are gathered at once."""
        return np.ascontiguousarray(self.coef.T)

    def decision(self, text: str) -> np.ndarray:
        """The linear scores of one document (scikit-learn's ``decision_function``)."""
        scores = self.intercept.copy()
        offset = 0
        for vectorizer in self.vectorizers:
            columns, values = vectorizer.transform(text)
            if len(columns):
                scores += values @ self._weights[columns + offset]
            offset += len(vectorizer.vocabulary)
        return scores

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """Class probabilities, one row per text, columns in :attr:`classes` order."""
        out = np.empty((len(texts), len(self.classes)))
        for row, text in enumerate(texts):
            scores = self.decision(text)
            if len(self.classes) == 2:
                positive = 1.0 / (1.0 + np.exp(-scores[0]))
                out[row] = (1.0 - positive, positive)
            else:
                exp = np.exp(scores - scores.max())
                out[row] = exp / exp.sum()
        return out

    def to_bytes(self) -> bytes:
        meta = {
            "format": FORMAT,
            "classes": list(self.classes),
            "vectorizers": [v.params() for v in self.vectorizers],
        }
        arrays = {
            "meta": np.frombuffer(json.dumps(meta, ensure_ascii=False).encode(), dtype=np.uint8),
            "coef": self.coef,
            "intercept": self.intercept,
        }
        for i, vectorizer in enumerate(self.vectorizers):
            if vectorizer.idf is not None:
                arrays[f"idf{i}"] = vectorizer.idf
        buffer = io.BytesIO()
        # numpy's stub matches **arrays against allow_pickle: bool too; every key here is an array
        np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> CompactModel:
        """Raises :class:`ClassifierError` on anything but a file :meth:`to_bytes` wrote."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
                meta = json.loads(arrays["meta"].tobytes().decode())
                if meta.get("format") != FORMAT:
                    raise ClassifierError(f"format {meta.get('format')!r}, expected {FORMAT}")
                vectorizers = tuple(
                    _vectorizer(params, arrays.get(f"idf{i}"))
                    for i, params in enumerate(meta["vectorizers"])
                )
                return cls(
                    classes=tuple(str(c) for c in meta["classes"]),
                    vectorizers=vectorizers,
                    coef=np.asarray(arrays["coef"], dtype=np.float64),
                    intercept=np.asarray(arrays["intercept"], dtype=np.float64),
                )
        except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
            raise ClassifierError(f"not a compact baseline model: {exc}") from exc

    def save(self, path: Path) -> None:
        """Written atomically, ``0600``: the vocabulary holds words of customers' mail."""
        atomic_write_bytes(path, self.to_bytes())

    @classmethod
    def load(cls, path: Path) -> CompactModel:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ClassifierError(f"cannot read {path}: {exc}") from exc
        return cls.from_bytes(data)


def _vectorizer(params: dict[str, Any], idf: np.ndarray | None) -> Vectorizer:
    low, high = params["ngram_range"]
    return Vectorizer(
        analyzer=params["analyzer"],
        ngram_range=(int(low), int(high)),
        lowercase=bool(params["lowercase"]),
        strip_accents=params["strip_accents"],
        token_pattern=str(params["token_pattern"]),
        binary=bool(params["binary"]),
        sublinear_tf=bool(params["sublinear_tf"]),
        norm=params["norm"],
        vocabulary={str(term): i for i, term in enumerate(params["terms"])},
        idf=None if idf is None else np.asarray(idf, dtype=np.float64),
    )


# --- the analysers: scikit-learn's, step for step -------------------------------------------


def _strip_accents_unicode(text: str) -> str:
    if text.isascii():
        return text
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))


def _strip_accents_ascii(text: str) -> str:
    return unicodedata.normalize("NFKD", text).encode("ASCII", "ignore").decode("ASCII")


_ACCENT_FUNCTIONS: dict[str | None, Callable[[str], str] | None] = {
    None: None,
    "ascii": _strip_accents_ascii,
    "unicode": _strip_accents_unicode,
}


def _preprocess(text: str, lower: bool, accents: Callable[[str], str] | None) -> str:
    if lower:
        text = text.lower()
    return accents(text) if accents is not None else text


def word_grams(tokens: list[str], low: int, high: int) -> list[str]:
    """Token n-grams from ``low`` to ``high`` words, joined by a space (``_word_ngrams``)."""
    grams = list(tokens) if low == 1 else []
    for n in range(max(low, 2), min(high, len(tokens)) + 1):
        grams.extend(" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    return grams


def char_wb_grams(text: str, low: int, high: int) -> list[str]:
    """Character n-grams within words padded with a space (``_char_wb_ngrams``); each distinct
    word is cut once per process: mail repeats its words, and cutting them was a third of
    classifying."""
    grams: list[str] = []
    for word in text.split():
        grams.extend(_padded_word_grams(word, low, high))
    return grams


@functools.lru_cache(maxsize=4096)  # about 4 MB when full: a service's mail reuses its words
def _padded_word_grams(word: str, low: int, high: int) -> tuple[str, ...]:
    padded = f" {word} "
    grams: list[str] = []
    for n in range(low, high + 1):
        grams.extend(padded[i : i + n] for i in range(max(1, len(padded) - n + 1)))
        if len(padded) <= n:  # a word shorter than n counts once, as scikit-learn does
            break
    return tuple(grams)
