"""Real mail servers on loopback, for the tests, the demo and the benchmarks.

* :class:`DovecotServer` runs the system's ``dovecot`` from a throw-away configuration on a free
  port (plain IMAP, loopback only) with users created on demand.
* :class:`PymapServer` runs the pure-Python ``pymap`` server where Dovecot is not installed (the
  demo on macOS). It keeps no custom keywords and changes UIDVALIDITY at every start: use the
  folder mode with it.
* :class:`SmtpSink` is an aiosmtpd server that records every message it accepts and can be told
  to fail: answer 421/451 a number of times, answer 550, or drop the connection.

Every server is a context manager and stops its processes and threads in ``stop()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import importlib.util
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from email import policy
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imapclient import IMAPClient

from .files import write_private

if TYPE_CHECKING:
    from aiosmtpd.smtp import SMTP, Envelope, Session

DOVECOT_CANDIDATES = ("/usr/sbin/dovecot", "/usr/local/sbin/dovecot", "/opt/homebrew/sbin/dovecot")
LOOPBACK = "127.0.0.1"


def find_dovecot() -> str | None:
    """The ``dovecot`` binary, or ``None`` when it is not installed."""
    found = shutil.which("dovecot")
    if found:
        return found
    return next((p for p in DOVECOT_CANDIDATES if os.access(p, os.X_OK)), None)


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nobody listens on right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"nothing listens on {host}:{port} after {timeout:.0f}s"
                ) from None
            time.sleep(0.05)


def stop_group(proc: subprocess.Popen[Any] | None) -> None:
    """Stop a server started in its own process group: SIGTERM, then SIGKILL after 10 s."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def imap_client(host: str, port: int, username: str, password: str, *, timeout: float = 30) -> Any:
    """A logged-in plain-IMAP imapclient connection (loopback servers only)."""
    client = IMAPClient(host, port=port, ssl=False, timeout=timeout)
    with contextlib.suppress(OSError):
        client._imap.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.login(username, password)
    return client


@dataclass
class ImapAccount:
    """Where a test mailbox lives and how to log in."""

    host: str
    port: int
    username: str
    password: str

    def client(self) -> Any:
        return imap_client(self.host, self.port, self.username, self.password)

    def append(
        self, messages: Iterable[bytes], folder: str = "INBOX", flags: Sequence[str] = ()
    ) -> int:
        """Append raw messages (MULTIAPPEND when offered, in chunks); returns how many."""
        return append_messages(self.client(), messages, folder=folder, flags=flags, close=True)


def append_messages(
    client: Any,
    messages: Iterable[bytes],
    *,
    folder: str = "INBOX",
    flags: Sequence[str] = (),
    close: bool = False,
) -> int:
    count = 0
    try:
        if not client.folder_exists(folder):
            client.create_folder(folder)
        multi = b"MULTIAPPEND" in client.capabilities()
        chunk: list[bytes] = []
        size = 0

        def flush() -> None:
            nonlocal chunk, size
            if not chunk:
                return
            if multi and len(chunk) > 1:
                client.multiappend(folder, [{"msg": m, "flags": list(flags)} for m in chunk])
            else:
                for msg in chunk:
                    client.append(folder, msg, flags=list(flags))
            chunk, size = [], 0

        for msg in messages:
            chunk.append(msg)
            size += len(msg)
            count += 1
            if len(chunk) >= 100 or size > 8_000_000:
                flush()
        flush()
    finally:
        if close:
            with contextlib.suppress(Exception):
                client.logout()
    return count


# --- Dovecot ---------------------------------------------------------------------------------

_CONF = """\
# generated by mailrouter.localservers: a throw-away loopback IMAP server
protocols = imap
listen = {host}
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
info_log_path = {root}/dovecot.log
instance_name = mailrouter-{port}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_fsync = never
mail_location = maildir:~/Maildir
default_internal_user = {internal_user}
default_login_user = {login_user}
first_valid_uid = 1
first_valid_gid = 1
mail_max_userip_connections = 100
imap_idle_notify_interval = 1 secs
passdb {{
  driver = static
  args = password={password}
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={root}/home/%u
}}
namespace inbox {{
  inbox = yes
  separator = /
  mailbox Drafts {{
    special_use = \\Drafts
  }}
  mailbox Junk {{
    special_use = \\Junk
  }}
  mailbox Sent {{
    special_use = \\Sent
  }}
  mailbox Trash {{
    special_use = \\Trash
  }}
}}
service imap-login {{
  inet_listener imap {{
    address = {host}
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
{login_chroot}}}
service anvil {{
{anvil_chroot}}}
service stats {{
  unix_listener stats-reader {{
    mode = 0666
  }}
  unix_listener stats-writer {{
    mode = 0666
  }}
}}
"""


class DovecotServer:
    """A Dovecot instance on a free loopback port, its files in a private temp directory.

    As root the mail is owned by the ``dovecot`` user; as another user, by that user (with the
    login processes unchrooted). Any user name logs in with :attr:`password` (a static passdb),
    so :meth:`add_user` just picks a fresh name: a fresh, empty mailbox.
    """

    def __init__(self, root: Path | None = None, *, host: str = LOOPBACK) -> None:
        binary = find_dovecot()
        if binary is None:
            raise FileNotFoundError(
                "dovecot is not installed (Debian: apt-get install dovecot-imapd)"
            )
        self.binary = binary
        self.host = host
        self.port = 0
        self._own_root = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="mailrouter-dovecot-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen[bytes] | None = None
        self.password = "secret-" + os.urandom(4).hex()
        self._counter = 0
        self._lock = threading.Lock()
        if os.geteuid() == 0:
            entry = pwd.getpwnam("dovecot")
            self._uid, self._gid = entry.pw_uid, entry.pw_gid
            self._internal, self._login, self._chroot = "dovecot", "dovenull", ""
        else:
            entry = pwd.getpwuid(os.geteuid())
            self._uid, self._gid = entry.pw_uid, entry.pw_gid
            self._internal = self._login = entry.pw_name
            self._chroot = "  chroot =\n"

    @property
    def conf(self) -> Path:
        return self.root / "dovecot.conf"

    def _write_config(self) -> None:
        os.chmod(self.root, 0o755)
        for sub in ("run", "state", "home"):
            (self.root / sub).mkdir(exist_ok=True)
        os.chown(self.root / "home", self._uid, self._gid)
        self.conf.write_text(
            _CONF.format(
                host=self.host,
                port=self.port,
                root=self.root,
                uid=self._uid,
                gid=self._gid,
                internal_user=self._internal,
                login_user=self._login,
                login_chroot=self._chroot,
                anvil_chroot=self._chroot,
                password=self.password,
            )
        )

    def start(self, timeout: float = 20.0) -> DovecotServer:
        if not self.port:
            self.port = free_port(self.host)
        self._write_config()
        probe = "mailrouter-probe"
        self.process = subprocess.Popen(
            [self.binary, "-F", "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = (
                    self.process.stderr.read().decode(errors="replace")
                    if self.process.stderr
                    else ""
                )
                raise RuntimeError(
                    f"dovecot exited with {self.process.returncode}: {err}{self.log()}"
                )
            try:
                imap_client(self.host, self.port, probe, self.password, timeout=5).logout()
                return self
            except Exception as exc:  # not ready yet: the login must really work
                last = exc
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(
            f"dovecot did not accept a LOGIN within {timeout}s: {last}\n{self.log()}"
        )

    def log(self) -> str:
        path = self.root / "dovecot.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self, *, remove: bool = True) -> None:
        proc, self.process = self.process, None
        stop_group(proc)
        if proc is not None and proc.stderr:
            proc.stderr.close()
        if remove and self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def restart(self) -> None:
        """Stop and start again on the same port with the same mail (drops every session)."""
        self.stop(remove=False)
        deadline = time.monotonic() + 10
        while True:  # the old listener may linger for a moment
            try:
                self.start()
                return
            except (RuntimeError, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def kick(self, username: str | None = None) -> None:
        """Drop the IMAP sessions of ``username`` (of everyone when ``None``)."""
        doveadm = str(Path(self.binary).with_name("doveadm"))
        if not os.access(doveadm, os.X_OK):
            doveadm = shutil.which("doveadm") or "doveadm"
        who = username or "*"
        subprocess.run(
            [doveadm, "-c", str(self.conf), "kick", who],
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=15,
        )

    def add_user(self, username: str | None = None) -> ImapAccount:
        """A user with an empty mailbox (a fresh name when ``username`` is None).

        Every user shares :attr:`password`; the mailbox is created at the first login.
        """
        with self._lock:
            if username is None:
                self._counter += 1
                username = f"user{self._counter}-{os.getpid()}"
        return ImapAccount(self.host, self.port, username, self.password)

    def maildir(self, username: str) -> Path:
        return self.root / "home" / username / "Maildir"

    def reset_uidvalidity(self, username: str) -> None:
        """Forget INBOX's UID list so Dovecot gives it a new UIDVALIDITY, keeping the messages.

        This is what a restored or migrated mailbox looks like to a client: the same mail under
        new UIDs. Sessions are kicked first so no process holds the old list.
        """
        self.kick(username)
        maildir = self.maildir(username)
        for name in (
            "dovecot-uidlist",
            "dovecot.index",
            "dovecot.index.cache",
            "dovecot.index.log",
        ):
            with contextlib.suppress(FileNotFoundError):
                (maildir / name).unlink()
        # Messages already in cur/ keep their flags in their names; that is fine.

    def __enter__(self) -> DovecotServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- pymap -----------------------------------------------------------------------------------


class PymapServer:
    """The pure-Python ``pymap`` IMAP server with one in-memory demo user, on a free port."""

    def __init__(
        self, username: str = "demo", password: str = "demo", host: str = LOOPBACK
    ) -> None:
        self.host = host
        self.port = 0
        self.username = username
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return importlib.util.find_spec("pymap") is not None

    @property
    def account(self) -> ImapAccount:
        return ImapAccount(self.host, self.port, self.username, self.password)

    def start(self, timeout: float = 20.0) -> PymapServer:
        self.port = free_port(self.host)
        launcher = (
            "import sys; from pymap.main import main; sys.argv[0] = 'pymap'; sys.exit(main())"
        )
        cmd = [sys.executable, "-c", launcher, "--no-tls", "--host", self.host]
        cmd += ["--port", str(self.port), "dict", "--demo-user", self.username]
        cmd += ["--demo-password", self.password]
        self.process = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        try:
            wait_for_port(self.host, self.port, timeout)
            deadline = time.monotonic() + timeout
            while True:
                try:
                    self.account.client().logout()
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        except Exception:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        proc, self.process = self.process, None
        stop_group(proc)

    def __enter__(self) -> PymapServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- SMTP sink -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Delivered:
    """One message the sink accepted."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes

    def message(self) -> Any:
        return email.message_from_bytes(self.data, policy=policy.default)

    def header(self, name: str) -> str | None:
        """A header of the delivered message (raw, unfolded), or ``None``."""
        value = self.message().get(name)
        return None if value is None else str(value)


@dataclass
class _Faults:
    """Failures still to inject, consumed in this order: drops, then temporary, then permanent."""

    drop: int = 0
    temporary: int = 0
    temporary_code: str = "451 4.3.0 Try again later"
    permanent: int = 0
    permanent_code: str = "550 5.1.1 Mailbox unavailable"
    reject_rcpt: set[str] = field(default_factory=set)


class SmtpSink:
    """An aiosmtpd server on a free loopback port that records what it accepts.

    ``fail_temporarily(n, code)`` answers the next ``n`` DATA commands with a 4xx,
    ``fail_permanently(n)`` with a 550, ``drop_connections(n)`` closes the connection at DATA, and
    ``reject(address)`` refuses a recipient with 550 at RCPT until cleared.
    """

    def __init__(self, host: str = LOOPBACK) -> None:
        self.host = host
        self.port = 0
        self.messages: list[Delivered] = []
        self.faults = _Faults()
        self.attempts = 0
        self._lock = threading.Lock()
        self._controller: Any = None

    # failure injection
    def fail_temporarily(self, times: int = 1, code: str = "451 4.3.0 Try again later") -> None:
        with self._lock:
            self.faults.temporary, self.faults.temporary_code = times, code

    def fail_permanently(self, times: int = 1, code: str = "550 5.1.1 Mailbox unavailable") -> None:
        with self._lock:
            self.faults.permanent, self.faults.permanent_code = times, code

    def drop_connections(self, times: int = 1) -> None:
        with self._lock:
            self.faults.drop = times

    def reject(self, address: str) -> None:
        with self._lock:
            self.faults.reject_rcpt.add(address.lower())

    def clear_faults(self) -> None:
        with self._lock:
            self.faults = _Faults()

    # the aiosmtpd handler
    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        with self._lock:
            if address.lower() in self.faults.reject_rcpt:
                return "550 5.1.1 No such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        with self._lock:
            self.attempts += 1
            if self.faults.drop > 0:
                self.faults.drop -= 1
                transport = server.transport  # during DATA, the connection's socket transport
                assert isinstance(transport, asyncio.WriteTransport)
                transport.abort()
                return "421 4.4.2 Connection dropped"
            if self.faults.temporary > 0:
                self.faults.temporary -= 1
                return self.faults.temporary_code
            if self.faults.permanent > 0:
                self.faults.permanent -= 1
                return self.faults.permanent_code
            data = envelope.original_content or envelope.content or b""
            if isinstance(data, str):
                data = data.encode("utf-8", "surrogateescape")
            self.messages.append(
                Delivered(envelope.mail_from or "", tuple(envelope.rcpt_tos), bytes(data))
            )
        return "250 2.0.0 OK queued"

    def start(self) -> SmtpSink:
        from aiosmtpd.controller import Controller  # ~100 ms: only when a sink starts

        self.port = free_port(self.host)
        self._controller = Controller(
            self,
            hostname=self.host,
            port=self.port,
            decode_data=False,
            data_size_limit=64 * 1024 * 1024,
            ready_timeout=15,
        )
        self._controller.start()
        return self

    def stop(self) -> None:
        controller, self._controller = self._controller, None
        if controller is not None:
            with contextlib.suppress(Exception):
                controller.stop()

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # reading what arrived
    def delivered(self) -> list[Delivered]:
        with self._lock:
            return list(self.messages)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Delivered]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.delivered()
            if len(got) >= count or time.monotonic() > deadline:
                return got
            time.sleep(0.02)


# --- a configuration pointing at these servers -----------------------------------------------


def local_config(
    imap: ImapAccount,
    sink: SmtpSink | tuple[str, int],
    data_dir: Path,
    /,
    **sections: Any,
) -> dict[str, Any]:
    """Settings data for a router that talks to these loopback servers (no TLS, no AUTH).

    ``sections`` are merged over the defaults per section, e.g.
    ``classifier={"backend": "ollama"}``.
    The router's own address is ``router@mailrouter.test`` and triage goes to
    ``triage@mailrouter.test``; departments keep their defaults unless ``departments=[...]``.
    """
    smtp_host, smtp_port = (sink.host, sink.port) if isinstance(sink, SmtpSink) else sink
    data: dict[str, Any] = {
        "data_dir": str(data_dir),
        "mailbox": {
            "host": imap.host,
            "port": imap.port,
            "security": "none",
            "username": imap.username,
            "password": imap.password,
            "poll_seconds": 1,
            "timeout_seconds": 20,
        },
        "smtp": {
            "host": smtp_host,
            "port": smtp_port,
            "security": "none",
            "username": "",
            "from_address": "router@mailrouter.test",
            "triage_address": "triage@mailrouter.test",
            "timeout_seconds": 20,
            "max_attempts": 4,
            "backoff_seconds": 0.01,
        },
        "classifier": {"backend": "baseline"},
    }
    for name, values in sections.items():
        if isinstance(values, dict) and isinstance(data.get(name), dict):
            data[name] = {**data[name], **values}
        else:
            data[name] = values
    return data


def write_toml(data: dict[str, Any], path: Path) -> Path:
    """Write settings data as TOML (tables, arrays of tables, scalars and lists of scalars)."""

    def scalar(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int | float):
            return repr(value)
        if isinstance(value, list | tuple):
            return "[" + ", ".join(scalar(v) for v in value) + "]"
        return json.dumps(str(value), ensure_ascii=False)

    def table(values: dict[str, Any]) -> list[str]:
        return [f"{k} = {scalar(v)}" for k, v in values.items() if v is not None]

    top = {k: v for k, v in data.items() if not isinstance(v, dict) and not _is_tables(v)}
    lines = table(top)
    for key, value in data.items():
        if isinstance(value, dict):
            lines += ["", f"[{key}]", *table(value)]
        elif _is_tables(value):
            for item in value:
                lines += ["", f"[[{key}]]", *table(item)]
    return write_private(path, "\n".join(lines) + "\n")  # it holds the test passwords


def _is_tables(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)
