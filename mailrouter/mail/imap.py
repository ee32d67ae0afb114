"""The contact mailbox over IMAP (imapclient): fetch, file, wait, reconnect.

* Connections come from a factory (:func:`connect_imap` by default) that tests may replace. TLS
  is verified (system CAs, or ``mailbox.ca_file``); ``security = "none"`` only towards loopback
  unless ``allow_insecure``.
* Messages are identified by (mailbox, UIDVALIDITY, UID); :attr:`Mailbox.uidvalidity` is read at
  every (re)connection and a change is reported, never papered over.
* Bodies are fetched with ``BODY.PEEK[]``: the staff's \\Seen flags stay as they were.
* Filing is a MOVE (or COPY + \\Deleted + ``UID EXPUNGE`` on servers without MOVE) into the
  configured folders, created when missing, or, with ``use_folders = false``, a keyword
  (``$MailRouterRouted``…) on the message left in place.
* Every operation survives a dropped connection: it reconnects with exponential backoff and
  jitter and retries (all operations are idempotent: fetching, searching, moving a UID twice).
* Errors of imapclient, ssl and socket become :class:`~mailrouter.errors.MailboxError` here.
"""

from __future__ import annotations

import contextlib
import hashlib
import imaplib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import date
from typing import Any, TypeVar

from imapclient import IMAPClient
from imapclient import exceptions as imap_exc

from ..backoff import backoff_delay
from ..config import MailboxSettings, Settings, imap_password
from ..errors import MailboxAuthError, MailboxError
from ..logs import event
from .tls import check_plaintext, tls_context

log = logging.getLogger(__name__)

#: What each filing target is called in keyword mode.
KEYWORDS = {
    "routed": "$MailRouterRouted",
    "triage": "$MailRouterTriage",
    "spam": "$MailRouterSpam",
}
TARGETS = tuple(KEYWORDS)

_T = TypeVar("_T")


class MailboxConnectionError(MailboxError):
    """The connection failed or dropped; reconnecting may help."""


class UidValidityChanged(MailboxError):
    """The folder's UIDVALIDITY changed since the round started: UIDs no longer mean the same."""


def _map_error(exc: BaseException, what: str) -> MailboxError:
    if isinstance(exc, MailboxError):
        return exc
    if isinstance(exc, imap_exc.LoginError):
        return MailboxAuthError(
            f"IMAP login refused: {exc}. Check mailbox.username and the password "
            "(MAILROUTER_MAILBOX__PASSWORD or `keyring set mailrouter imap:<username>`); Gmail, "
            "Outlook, iCloud and Fastmail need an app password when two-step verification is on"
        )
    if isinstance(exc, ssl.SSLCertVerificationError):
        return MailboxError(
            f"{what}: the IMAP server's certificate is not trusted ({exc.verify_message}): fix "
            "mailbox.host or set mailbox.ca_file"
        )
    if isinstance(exc, imap_exc.IMAPClientAbortError | imaplib.IMAP4.abort):
        return MailboxConnectionError(f"{what}: connection lost: {exc}")
    if isinstance(exc, OSError | ssl.SSLError | EOFError | socket.timeout):
        return MailboxConnectionError(f"{what}: {type(exc).__name__}: {exc}")
    return MailboxError(f"{what}: {exc}")


def connect_imap(settings: MailboxSettings, password: str) -> IMAPClient:
    """Open and log in: the default connection factory."""
    check_plaintext(settings.host, settings.security, settings.allow_insecure, "mailbox")
    where = f"{settings.host}:{settings.port}"
    try:
        if settings.security == "tls":
            context = tls_context(settings.ca_file)
            client = IMAPClient(
                settings.host,
                port=settings.port,
                ssl=True,
                ssl_context=context,
                timeout=settings.timeout_seconds,
            )
        else:
            client = IMAPClient(
                settings.host, port=settings.port, ssl=False, timeout=settings.timeout_seconds
            )
            if settings.security == "starttls":
                client.starttls(tls_context(settings.ca_file))
        with contextlib.suppress(OSError, AttributeError):
            client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.login(settings.username, password)
    except Exception as exc:
        raise _map_error(exc, f"connecting to {where}") from exc
    return client


Factory = Callable[["MailboxSettings", str], "IMAPClient"]


class Mailbox:
    """The watched folder of the contact mailbox."""

    def __init__(
        self,
        settings: MailboxSettings,
        password: str,
        *,
        factory: Factory = connect_imap,
        reconnect_attempts: int = 6,
        reconnect_base: float = 0.5,
        readonly: bool = False,
    ) -> None:
        self.settings = settings
        #: EXAMINE rather than SELECT: nothing in the folder changes, not even ``\\Recent``
        #: (``reprocess`` looks at a folder this way).
        self.readonly = readonly
        self._password = password
        self._factory = factory
        self._client: IMAPClient | None = None
        self._reconnect_attempts = reconnect_attempts
        self._reconnect_base = reconnect_base
        self.uidvalidity: int | None = None
        self.uidnext = 0  # the UID the next message will get, as of the last selection
        self.capabilities: frozenset[str] = frozenset()
        self._delimiter = "/"
        self._ready_folders: set[str] = set()
        self.reconnects = 0
        self._idle_failures = 0  # IDLE waits that broke in a row

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> Mailbox:
        return cls(settings.mailbox, imap_password(settings), **kwargs)

    @property
    def key(self) -> str:
        """The name this mailbox has in the state database."""
        return f"{self.settings.username}/{self.settings.folder}"

    # --- connection -------------------------------------------------------------------------

    def connect(self) -> int:
        """Connect (if needed), select the folder; returns its UIDVALIDITY."""
        if self._client is None:
            self._open()
        assert self.uidvalidity is not None
        return self.uidvalidity

    def _open(self) -> None:
        client = self._factory(self.settings, self._password)
        try:
            caps = {c.decode().upper() for c in client.capabilities()}
            folder = self.settings.folder
            info = client.select_folder(folder, readonly=self.readonly)
            self._delimiter = self._find_delimiter(client)
        except Exception as exc:
            with contextlib.suppress(Exception):
                client.logout()
            raise _map_error(exc, f"selecting {self.settings.folder}") from exc
        uidvalidity = int(info[b"UIDVALIDITY"])
        if not self.settings.use_folders and not self.readonly:
            permanent = info.get(b"PERMANENTFLAGS", ())
            if b"\\*" not in permanent:
                with contextlib.suppress(Exception):
                    client.logout()
                raise MailboxError(
                    f"{self.settings.host} does not keep custom keywords on {folder}: set "
                    "mailbox.use_folders = true"
                )
        self._client = client
        self.capabilities = frozenset(caps)
        if self.uidvalidity is not None and uidvalidity != self.uidvalidity:
            event(
                log,
                "uidvalidity_changed",
                logging.WARNING,
                mailbox=self.key,
                old=self.uidvalidity,
                new=uidvalidity,
            )
        self.uidvalidity = uidvalidity
        self.uidnext = int(info.get(b"UIDNEXT", 0))

    def _find_delimiter(self, client: IMAPClient) -> str:
        with contextlib.suppress(Exception):
            folders = client.list_folders("", self.settings.folder)
            if folders and folders[0][1]:
                delimiter = folders[0][1]
                return delimiter.decode() if isinstance(delimiter, bytes) else str(delimiter)
        return "/"

    def close(self) -> None:
        """Log out; errors are logged, not raised (teardown must not fail)."""
        client, self._client = self._client, None
        if client is None:
            return
        try:
            client.logout()
        except Exception as exc:
            log.debug("IMAP logout failed: %s", exc)
            with contextlib.suppress(Exception):
                client.shutdown()

    def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.shutdown()

    def _call(self, what: str, operation: Callable[[IMAPClient], _T]) -> _T:
        """Run ``operation`` on a live connection, reconnecting with backoff when it drops.

        If the reconnection finds a different UIDVALIDITY, :class:`UidValidityChanged` is raised
        instead of running an operation on UIDs that now name other messages.
        """
        attempt = 0
        while True:
            expected = self.uidvalidity
            try:
                if self._client is None:
                    self._open()
                    if expected is not None and self.uidvalidity != expected:
                        raise UidValidityChanged(
                            f"{self.key}: UIDVALIDITY changed from {expected} to {self.uidvalidity}"
                        )
                assert self._client is not None
                return operation(self._client)
            except UidValidityChanged:
                raise
            except MailboxAuthError:
                raise
            except Exception as exc:
                error = _map_error(exc, what)
                if not isinstance(error, MailboxConnectionError):
                    raise error from exc
                self._drop()
                attempt += 1
                if attempt > self._reconnect_attempts:
                    raise error from exc
                delay = backoff_delay(attempt - 1, self._reconnect_base, cap=30.0)
                self.reconnects += 1
                event(
                    log,
                    "imap_reconnect",
                    logging.WARNING,
                    attempt=attempt,
                    error=str(error),
                    delay_s=round(delay, 2),
                )
                time.sleep(delay)

    # --- reading ----------------------------------------------------------------------------

    def pending_uids(self) -> list[int]:
        """UIDs in the folder that are not filed yet (in keyword mode: without our keywords)."""
        if self.settings.use_folders:
            criteria: list[Any] = ["ALL"]
        else:
            criteria = []
            for keyword in KEYWORDS.values():
                criteria += ["UNKEYWORD", keyword]
        return sorted(int(u) for u in self._call("searching", lambda c: c.search(criteria)))

    def sizes(self, uids: Sequence[int]) -> dict[int, int]:
        if not uids:
            return {}
        data = self._call("fetching sizes", lambda c: c.fetch(list(uids), ["RFC822.SIZE"]))
        return {int(uid): int(item.get(b"RFC822.SIZE", 0)) for uid, item in data.items()}

    def fetch(self, uids: Sequence[int], *, headers_only: bool = False) -> dict[int, bytes]:
        """Raw messages by UID, without setting \\Seen. UIDs that vanished are left out."""
        if not uids:
            return {}
        part = "BODY.PEEK[HEADER]" if headers_only else "BODY.PEEK[]"
        key = b"BODY[HEADER]" if headers_only else b"BODY[]"
        data = self._call("fetching messages", lambda c: c.fetch(list(uids), [part]))
        out: dict[int, bytes] = {}
        for uid, item in data.items():
            body = item.get(key)
            if body is not None:
                out[int(uid)] = bytes(body)
        return out

    def uids_since(self, day: date) -> list[int]:
        """UIDs of the folder's messages received on ``day`` or later (``SEARCH SINCE``: the
        server's internal date, by day, in its time zone), oldest first."""
        found = self._call("searching", lambda c: c.search(["SINCE", day]))
        return sorted(int(u) for u in found)

    def newest_headers(self, count: int) -> list[bytes]:
        """The header blocks of the ``count`` newest messages in the folder, newest first.

        ``BODY.PEEK[HEADER]`` leaves \\Seen alone: ``doctor`` and ``init`` read the receiving
        server's authserv-id from them without touching the staff's view of the mailbox.
        """
        if count <= 0:
            return []
        found = self._call("searching", lambda c: c.search(["ALL"]))
        uids = sorted(int(u) for u in found)[-count:]
        blocks = self.fetch(uids, headers_only=True)
        return [blocks[uid] for uid in reversed(uids) if uid in blocks]

    def fetch_filed(self, target: str, message_id: str, content_hash: str = "") -> bytes | None:
        """A message already filed under ``target``, found by Message-ID (to forward it again).

        Among several matches the one with ``content_hash`` (sha256 of the bytes) wins. The
        watched folder is selected again afterwards.
        """
        if not message_id:
            return None
        folder = self.folder_name(target) if self.settings.use_folders else self.settings.folder

        def find(client: IMAPClient) -> bytes | None:
            try:
                client.select_folder(folder, readonly=True)
                uids = client.search(["HEADER", "Message-ID", message_id])
                data = client.fetch(uids, ["BODY.PEEK[]"]) if uids else {}
            finally:
                info = client.select_folder(self.settings.folder, readonly=self.readonly)
                if int(info[b"UIDVALIDITY"]) != self.uidvalidity:
                    self._drop()
            found = [bytes(d[b"BODY[]"]) for _, d in sorted(data.items()) if b"BODY[]" in d]
            exact = [r for r in found if hashlib.sha256(r).hexdigest() == content_hash]
            return (exact or found)[0] if found else None

        return self._call(f"searching {folder}", find)

    # --- filing -----------------------------------------------------------------------------

    def folder_name(self, target: str) -> str:
        """The server's name of a filing target's folder (``/`` mapped to its delimiter)."""
        configured = {
            "routed": self.settings.routed_folder,
            "triage": self.settings.triage_folder,
            "spam": self.settings.spam_folder,
        }[target]
        return configured.replace("/", self._delimiter) if self._delimiter else configured

    def _ensure_folder(self, client: IMAPClient, folder: str) -> None:
        if folder in self._ready_folders:
            return
        if not client.folder_exists(folder):
            try:
                client.create_folder(folder)
            except Exception as exc:  # created meanwhile by someone else?
                if not client.folder_exists(folder):
                    raise _map_error(exc, f"creating {folder}") from exc
            with contextlib.suppress(Exception):
                client.subscribe_folder(folder)
            event(log, "imap_folder_created", folder=folder)
        self._ready_folders.add(folder)

    def file(self, uids: Iterable[int], target: str) -> None:
        """Move the messages to the target's folder, or tag them with its keyword."""
        uid_list = sorted(set(uids))
        if not uid_list:
            return
        if target not in KEYWORDS:
            raise ValueError(f"unknown filing target {target!r}: expected {', '.join(TARGETS)}")
        if not self.settings.use_folders:
            keyword = KEYWORDS[target]
            self._call("flagging", lambda c: c.add_flags(uid_list, [keyword], silent=True))
            return
        folder = self.folder_name(target)

        def move(client: IMAPClient) -> None:
            self._ensure_folder(client, folder)
            if "MOVE" in self.capabilities:
                client.move(uid_list, folder)
                return
            client.copy(uid_list, folder)
            client.add_flags(uid_list, [b"\\Deleted"], silent=True)
            if "UIDPLUS" in self.capabilities:
                client.uid_expunge(uid_list)
            else:  # without UIDPLUS only a plain EXPUNGE exists
                client.expunge()

        self._call(f"filing to {folder}", move)

    # --- waiting ----------------------------------------------------------------------------

    def wait_for_changes(self, timeout: float, stop_event: threading.Event | None = None) -> bool:
        """Wait until the folder changes, ``timeout`` passes or ``stop`` is set.

        With IDLE (and ``mailbox.idle``) the server tells us; an IDLE lasts at most
        ``idle_seconds`` (servers drop idle clients after 30 minutes; RFC 2177 advises less).
        Without it, this sleeps ``poll_seconds`` and answers True: the caller looks anyway.
        Returns True when the caller should look at the mailbox.
        """
        stop = stop_event or threading.Event()
        self.connect()
        if not (self.settings.idle and "IDLE" in self.capabilities):
            return self._poll(timeout, stop)
        deadline = time.monotonic() + min(timeout, self.settings.idle_seconds)
        assert self._client is not None
        try:
            changed = self._idle(self._client, deadline, stop)
        except Exception as exc:
            # imapclient reads IDLE responses on a non-blocking socket and can lose half a line
            # the server sent in two parts (the change it announced with it): whatever broke,
            # look at the folder rather than wait again. Repeated failures fall back to polling.
            self._drop()
            self._idle_failures += 1
            event(log, "imap_idle_reset", logging.WARNING, failures=self._idle_failures,
                  error=str(_map_error(exc, "waiting (IDLE)")))  # fmt: skip
            return self._poll(timeout, stop) if self._idle_failures >= 3 else not stop.is_set()
        self._idle_failures = 0
        return changed

    def _poll(self, timeout: float, stop: threading.Event) -> bool:
        stop.wait(min(timeout, self.settings.poll_seconds))
        return not stop.is_set()

    @staticmethod
    def _idle(client: IMAPClient, deadline: float, stop: threading.Event) -> bool:
        """IDLE until a change, the deadline or ``stop``; raises when the session breaks."""
        client.idle()
        changed = False
        try:
            while not stop.is_set() and not changed:
                wait = min(1.0, deadline - time.monotonic())
                if wait <= 0:
                    break
                asked = time.monotonic()
                responses = client.idle_check(timeout=wait)
                # Nothing, early: imapclient swallowed an end of file or a cut line.
                if not responses and time.monotonic() - asked < wait / 2:
                    raise ConnectionError("IDLE ended without a response")
                if any(r[:1] == (b"BYE",) for r in responses if isinstance(r, tuple)):
                    raise ConnectionError("the server ended the session during IDLE")
                changed = any(_is_change(r) for r in responses)
        finally:
            client.idle_done()
        return changed


def _is_change(response: Any) -> bool:
    return (
        isinstance(response, tuple)
        and len(response) >= 2
        and response[1]
        in (
            b"EXISTS",
            b"RECENT",
            b"EXPUNGE",
            b"FETCH",
        )
    )
