"""The malformed-mail corpus: every ``*.eml`` here, plus a 15 MB message built on demand.

The 15 MB message is not committed; :func:`huge_message` inflates the attachment of
``large-attachment.eml`` to the size asked for, so parsing and pipeline tests share one recipe.
"""

from __future__ import annotations

import base64
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "large-attachment.eml"


def corpus_files() -> list[Path]:
    return sorted(HERE.glob("*.eml"))


def huge_message(size: int = 15 * 1024 * 1024) -> bytes:
    """``large-attachment.eml`` with its base64 attachment grown to ``size`` bytes of message."""
    head, sep, tail = TEMPLATE.read_bytes().partition(b"Content-Transfer-Encoding: base64\n\n")
    _, _, closing = tail.partition(b"--big--")
    line = base64.encodebytes(bytes(range(256)) * 4)[:77]  # one 76-character base64 line + "\n"
    room = max(size - len(head) - len(sep) - len(b"--big--") - len(closing), 0)
    return head + sep + line * (room // len(line)) + b"--big--" + closing
