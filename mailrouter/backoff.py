"""How long to wait before trying a server again: one rule for IMAP reconnects, SMTP retries and
deferred forwards."""

from __future__ import annotations

import random


def backoff_delay(attempt: int, base: float, cap: float = 300.0) -> float:
    """Exponential backoff with jitter: ``min(cap, base * 2**attempt)`` times 0.5 to 1."""
    return min(cap, base * 2.0**attempt) * random.uniform(0.5, 1.0)
