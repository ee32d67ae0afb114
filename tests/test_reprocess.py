"""``mailrouter reprocess`` on a real Dovecot and a real SMTP sink, with the baseline.

The mailbox is made the way a service leaves it: mail routed from the inbox into the routed,
triage and spam folders, plus mail that reached the routed folder without the router (an
earlier install, a person moving it) and old mail received before ``--since``. Then the config
changes (a rule), so that some decisions differ from the recorded ones.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from mailrouter.cli import app
from mailrouter.config import load_settings
from mailrouter.localservers import ImapAccount, SmtpSink
from mailrouter.state import State
from mailrouter.wiring import build_pipeline
from tests.fixtures.mail import examples_for_mail, make_email

ROUTED, TRIAGE, SPAM = "MailRouter/Routed", "MailRouter/Triage", "MailRouter/Spam"
FOLDERS = ("INBOX", ROUTED, TRIAGE, SPAM)
#: The config change after routing: the mail of client1 and client10-19 goes to RH, whatever
#: it says (client1 is among the mail put in the routed folder by hand, client10-14 were routed).
RULE = {"name": "some clients", "from": "client1*@*", "department": "RH"}

Snapshot = dict[str, Any]


def _mailbox(account: ImapAccount) -> dict[str, list[tuple[int, tuple[bytes, ...]]]]:
    """Every folder's UIDs and flags, read read-only."""
    client = account.client()
    try:
        out = {}
        for folder in FOLDERS:
            if not client.folder_exists(folder):
                out[folder] = []
                continue
            client.select_folder(folder, readonly=True)
            flags = client.get_flags(client.search(["ALL"]))
            out[folder] = sorted((int(u), tuple(sorted(f))) for u, f in flags.items())
            client.unselect_folder()
        return out
    finally:
        client.logout()


def _state(path: Path) -> Snapshot:
    with State(path) as state:
        return {
            table: [tuple(row) for row in state.query(f"SELECT * FROM {table} ORDER BY 1")]
            for table in ("messages", "decisions", "forwards", "kv")
        }


def _forwards(sink: SmtpSink) -> list[str]:
    return [d.header("X-MailRouter-Forward-Id") or "" for d in sink.delivered()]


@pytest.fixture
def routed_mailbox(
    starter_data: Path,
    imap_account: ImapAccount,
    smtp_sink: SmtpSink,
    make_mail_config: Callable[..., Path],
) -> dict[str, Any]:
    """The test split routed by the service (but three mails), three mails put in the routed
    folder by hand (one of them read, \\Seen), one old mail there, then a config with a rule."""
    mails = [raw for _, raw in examples_for_mail(starter_data.parent, "test")]
    routed, by_hand = mails[3:15], mails[:3]
    imap_account.append(routed)
    settings = load_settings(make_mail_config())
    pipeline = build_pipeline(settings)
    try:
        first = pipeline.run_once()
    finally:
        pipeline.close()
    assert first.forwarded and len(first.decisions) == len(routed)
    imap_account.append(by_hand[:2], folder=ROUTED)
    imap_account.append(by_hand[2:], folder=ROUTED, flags=["\\Seen"])
    client = imap_account.client()
    try:
        old = make_email("Ancienne demande", "Bonjour, une vieille question.", sender="old@x.org")
        client.append(ROUTED, old, msg_time=datetime.now() - timedelta(days=40))
    finally:
        client.logout()
    config = make_mail_config("after.toml", rules=[RULE])
    return {"config": config, "settings": load_settings(config), "routed": first}


def _reprocess(config: Path, *args: str) -> str:
    result = CliRunner().invoke(
        app,
        ["--config", str(config), "reprocess", "--since", date.today().isoformat(), *args],
        catch_exceptions=False,
        env={"COLUMNS": "250"},
    )
    assert result.exit_code == 0, result.output
    return " ".join(result.stdout.split())


def test_reprocess_changes_nothing_and_prints_the_differences(
    routed_mailbox: dict[str, Any], imap_account: ImapAccount, smtp_sink: SmtpSink
) -> None:
    settings = routed_mailbox["settings"]
    mailbox, state, sent = _mailbox(imap_account), _state(settings.state_path), _forwards(smtp_sink)
    assert len(mailbox[ROUTED]) >= 4

    out = _reprocess(routed_mailbox["config"])

    assert _mailbox(imap_account) == mailbox  # contents and flags, \\Seen and its absence
    assert _state(settings.state_path) == state
    assert _forwards(smtp_sink) == sent
    # The old mail is left out; the three put there by hand are new to the router.
    in_routed = [d for d in routed_mailbox["routed"].decisions if d.route == "department"]
    ruled = [d for d in in_routed if d.sender.startswith("client1")]
    changed = [d for d in ruled if d.department != "RH"]
    assert changed, "the rule moves some routed mail"
    assert f"{len(in_routed) + 3} message(s) in {ROUTED} since {date.today().isoformat()}:" in out
    assert f"{len(changed)} would change, {len(in_routed) - len(changed)} unchanged" in out
    assert "3 never routed" in out
    assert out.count("never routed") == 4  # three rows and the summary
    assert out.count('rule "some clients"') == len(changed) + 1  # and client1, by hand
    for d in changed:
        assert f"{d.sender} " in out
        assert f"{d.department} {d.confidence:.2f} │ RH │" in out, out  # was → now


def test_forward_routes_the_never_routed_once(
    routed_mailbox: dict[str, Any], imap_account: ImapAccount, smtp_sink: SmtpSink
) -> None:
    settings = routed_mailbox["settings"]
    before = len(smtp_sink.delivered())
    routed_before = _mailbox(imap_account)[ROUTED]
    with State(settings.state_path) as state:
        known = state.counts()

    out = _reprocess(routed_mailbox["config"], "--forward")

    assert "routed 3 never-routed message(s)" in out
    new = smtp_sink.delivered()[before:]
    ids = [d.header("X-MailRouter-Forward-Id") for d in new]
    key = f"{settings.mailbox.username}/{ROUTED}"
    with State(settings.state_path) as state:
        mine = [r for r in state.query("SELECT * FROM messages") if r["mailbox"] == key]
        assert sum(state.counts().values()) == sum(known.values()) + 3
    assert len(mine) == 3
    assert all(r["state"] in ("filed", "triaged", "spam") for r in mine)
    forwarded = [r for r in mine if r["route"] in ("department", "triage")]
    assert len(ids) == len(set(ids)) == len(forwarded)
    ruled = next(r for r in mine if r["sender"].startswith("client1@"))
    assert (ruled["route"], ruled["department"]) == ("department", "RH")
    # Routed to a department: still where it was; to triage or spam: filed there.
    mailbox = _mailbox(imap_account)
    assert len(mailbox[ROUTED]) == len(routed_before) - sum(
        r["route"] in ("triage", "spam") for r in mine
    )

    again = _reprocess(routed_mailbox["config"], "--forward")

    assert "routed 0 never-routed message(s)" in again
    assert "0 never routed" in again
    assert len(smtp_sink.delivered()) == before + len(ids)
    assert _mailbox(imap_account) == mailbox
