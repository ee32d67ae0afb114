"""Several classifications in flight at once, for backends that wait on a server.

An LLM server computes several requests at once when it has the slots for them (Ollama's
``OLLAMA_NUM_PARALLEL``); a client that asks one email at a time leaves all but one idle, and a
backlog drains at a fraction of the rate the server could give. A backend that only waits on
such a server says so with a ``concurrency`` attribute (:class:`ConcurrentClassifier`); its
``classify`` is then called from up to that many threads. In-process backends (the baseline,
MLX) have none and are called as before, one email at a time or in one ``classify_many`` batch.

Each request succeeds or fails on its own: a failure is the result of that email only, and the
caller decides what it means (the pipeline waits or triages that email, and stops asking when
the server is unreachable).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol, runtime_checkable

from ..prediction import ClassifyInput, Prediction
from .base import Classifier


@runtime_checkable
class ConcurrentClassifier(Protocol):
    """A backend whose ``classify`` may run on several threads at once, at most
    ``concurrency`` of them (the requests in flight to its server)."""

    concurrency: int

    def classify(self, item: ClassifyInput) -> Prediction: ...


def concurrency_of(classifier: Classifier) -> int:
    """How many ``classify`` calls may run at once: 1 for a backend that does not say."""
    if isinstance(classifier, ConcurrentClassifier):
        return max(1, int(classifier.concurrency))
    return 1


def classify_in_order(
    classifier: Classifier, items: Iterable[ClassifyInput]
) -> Iterator[Prediction]:
    """Predictions for ``items`` in their order, up to :func:`concurrency_of` computed at once.

    The first error, in the items' order, is raised where its prediction would be, as a
    sequential loop would raise it; the requests not started yet are then cancelled.
    """
    width = concurrency_of(classifier)
    if width == 1:
        yield from (classifier.classify(item) for item in items)
        return
    pool = ThreadPoolExecutor(width, thread_name_prefix="mailrouter-classify")
    try:
        futures = [pool.submit(classifier.classify, item) for item in items]
        for future in futures:
            yield future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class Lookahead:
    """Classifications asked for before the decisions that use them, keyed by message.

    The pipeline submits a batch's emails as soon as it has read them, and takes each result
    when it decides that email, in UID order; meanwhile up to ``concurrency`` requests are in
    flight. Nothing here decides anything: a result the pipeline no longer needs (the email was
    a copy, or a handler claimed it) is simply dropped.
    """

    def __init__(self, classifier: Classifier) -> None:
        self.classifier = classifier
        self._pool = ThreadPoolExecutor(
            concurrency_of(classifier), thread_name_prefix="mailrouter-classify"
        )
        self._asked: dict[Hashable, Future[Prediction]] = {}

    def submit(self, key: Hashable, item: ClassifyInput) -> None:
        self._asked[key] = self._pool.submit(self.classifier.classify, item)

    def take(self, key: Hashable) -> Future[Prediction] | None:
        """The request for ``key`` (running, done or cancelled), or ``None`` if none was made."""
        return self._asked.pop(key, None)

    def cancel(self) -> None:
        """Cancel every request not started yet (the server is unreachable: stop asking)."""
        for future in self._asked.values():
            future.cancel()

    def close(self) -> None:
        """Cancel what has not started and let the requests in flight end on their own: a round
        that stops never waits for a slow server's answers it will not use."""
        self.cancel()
        self._asked.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
