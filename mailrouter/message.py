"""The parsed view of a message every module reads: what the router, the prompt and the dataset
know of a mail. Produced from raw bytes by :func:`mailrouter.mail.parse.parse_email`."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class Email:
    """A parsed message. ``body`` is the clean text a classifier reads."""

    raw_size: int
    content_hash: str  # sha256 hex of the raw bytes
    message_id: str = ""  # with angle brackets, as in the header; "" when missing
    sender: str = ""  # bare address, lower-cased
    sender_name: str = ""
    to: tuple[str, ...] = ()
    subject: str = ""  # RFC 2047 decoded
    date: datetime | None = None
    in_reply_to: str = ""
    references: tuple[str, ...] = ()
    body: str = ""  # text/plain, or HTML converted; quoted replies and signature stripped
    full_text: str = ""  # the same text before quote and signature stripping
    headers: tuple[tuple[str, str], ...] = ()  # (lower-cased name, decoded value), in order
    #: Raw ``Authentication-Results`` values, top to bottom: never RFC 2047-decoded, since a
    #: decoded encoded word from a sender's address could read as a result (authresults.py).
    auth_results: tuple[str, ...] = ()
    defects: tuple[str, ...] = field(default=())
    truncated: bool = False

    @property
    def sender_domain(self) -> str:
        return self.sender.rpartition("@")[2] if "@" in self.sender else ""

    def header(self, name: str) -> str | None:
        """First value of header ``name`` (case-insensitive), ``None`` when absent."""
        name = name.lower()
        return next((v for k, v in self.headers if k == name), None)

    def header_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k == name]


def address_domain(address: str) -> str:
    """The domain of a bare address, or a placeholder when it has none."""
    return address.rpartition("@")[2] or "mailrouter.invalid"
