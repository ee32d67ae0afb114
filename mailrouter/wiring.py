"""The one place the pipeline gets its parts: the handlers that claim mail before
classification (bounces of our forwards, then staff corrections), the correction links of every
forward and the token they carry.

The pipeline knows none of these by name, and they know the pipeline only through the narrow
types of :mod:`mailrouter.pipeline.types`; the service, ``serve --once``, the demo, the
benchmarks and the tests all build their pipeline here, so they run the same router.
"""

from __future__ import annotations

from typing import Any

from .config import Settings
from .corrections.handler import CorrectionHandler
from .corrections.links import forward_notice
from .corrections.tokens import token_maker
from .pipeline.bounces import BounceHandler
from .pipeline.round import Pipeline
from .pipeline.types import Handler


def handlers(settings: Settings) -> list[Handler]:
    """The pre-classification handlers, in the order they are tried."""
    return [BounceHandler(settings), CorrectionHandler(settings)]


def build_pipeline(settings: Settings, *, dry_run: bool = False, **parts: Any) -> Pipeline:
    """A pipeline with the service's handlers, notice and tokens; ``parts`` override any of
    them or give the pipeline's other collaborators (``classifier``, ``mailbox``, ``sender``,
    ``state``)."""
    parts.setdefault("handlers", handlers(settings))
    parts.setdefault("notice", forward_notice)
    parts.setdefault("token", token_maker(settings))
    return Pipeline(settings, dry_run=dry_run, **parts)
