"""Correction tokens: a short HMAC of a forward's id.

The token is printed in the forward (``X-MailRouter-Token`` and the ``[MR-<token>]`` subjects of
the correction links). It names the forward and proves that whoever writes it received the
forward: without the key nobody can make a valid token for another forward id.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable

from ..config import Settings, token_key

TOKEN_LENGTH = 12  # hex digits: 48 bits


def make_token(key: bytes, forward_id: str, length: int = TOKEN_LENGTH) -> str:
    """``hmac-sha256(key, forward_id)`` as lower-case hex, cut to ``length`` digits."""
    return hmac.new(key, forward_id.encode(), hashlib.sha256).hexdigest()[:length]


def check_token(key: bytes, forward_id: str, token: str) -> bool:
    """Whether ``token`` is the token of ``forward_id`` (constant-time comparison)."""
    expected = make_token(key, forward_id, len(token) or TOKEN_LENGTH)
    return len(token) >= 8 and hmac.compare_digest(expected, token.lower())


def token_maker(settings: Settings) -> Callable[[str], str]:
    """``forward_id -> token`` with the configured key (read once)."""
    key = token_key(settings)
    return lambda forward_id: make_token(key, forward_id)
