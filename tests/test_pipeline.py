"""The pipeline against a real Dovecot and a real SMTP server, with the baseline classifier."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from mailrouter.classify import make_classifier
from mailrouter.cli import app
from mailrouter.config import Settings, load_settings
from mailrouter.localservers import (
    DovecotServer,
    ImapAccount,
    PymapServer,
    SmtpSink,
    free_port,
    local_config,
    write_toml,
)
from mailrouter.mail.parse import parse_email
from mailrouter.pipeline.types import Context, Incoming, RoundReport
from mailrouter.prediction import ClassifyInput
from mailrouter.router import decide
from mailrouter.state import MessageState, State
from mailrouter.wiring import build_pipeline
from tests.conftest import require
from tests.fixtures.mail import attached, examples_for_mail, make_email
from tests.sample_examples import write_sample_dataset


@pytest.fixture
def dataset(data_dir: Path) -> Path:
    write_sample_dataset(data_dir / "examples.jsonl")
    return data_dir / "examples.jsonl"


def _folder_count(account: ImapAccount, folder: str) -> int:
    client = account.client()
    try:
        if not client.folder_exists(folder):
            return 0
        return int(client.select_folder(folder, readonly=True)[b"EXISTS"])
    finally:
        client.logout()


def test_starter_test_split_is_routed_once_each_where_the_baseline_says(
    starter_data: Path, imap_account: ImapAccount, smtp_sink: SmtpSink, mail_config: Path
) -> None:
    settings = load_settings(mail_config)
    mails = examples_for_mail(settings.data_dir, "test")
    assert len(mails) >= 20
    imap_account.append(raw for _, raw in mails)
    classifier = make_classifier(settings, "baseline")

    pipeline = build_pipeline(settings)
    try:
        report = pipeline.run_once()
        again = pipeline.run_once()
    finally:
        pipeline.close()

    assert report.seen == len(mails)
    assert again.seen == 0
    delivered = smtp_sink.delivered()
    forwards = [d for d in delivered if d.header("X-MailRouter-Forward-Id")]
    assert len(forwards) == len({d.header("X-MailRouter-Forward-Id") for d in forwards})
    assert len(delivered) == report.forwarded
    with State(settings.state_path) as state:
        records = state.pending()
        assert records == []
        counts = state.counts()
    assert sum(counts.values()) == len(mails)
    # Every forward went where the baseline sends that email.
    by_sender = {attached(d)["From"]: d for d in forwards}  # one sender per test email
    assert len(by_sender) == len(forwards)
    for _label, raw in mails:
        email = parse_email(raw)
        input_ = ClassifyInput(email.body, email.subject, email.sender_domain)
        route = decide(classifier.classify(input_), email, settings)
        if route.forwards:
            assert by_sender[email.sender].rcpt_tos == (route.address,)
        else:
            assert email.sender not in by_sender
    assert _folder_count(imap_account, "INBOX") == 0
    filed = sum(
        _folder_count(imap_account, f)
        for f in ("MailRouter/Routed", "MailRouter/Triage", "MailRouter/Spam")
    )
    assert filed == len(mails)


def _route_of(settings: Settings, raw: bytes) -> str | None:
    email = parse_email(raw)
    input_ = ClassifyInput(email.body, email.subject, email.sender_domain)
    return decide(make_classifier(settings, "baseline").classify(input_), email, settings).address


QUOTE = make_email(
    "Demande de devis licences",
    "Bonjour, pourriez-vous nous envoyer un devis pour 30 licences ? Quels sont vos tarifs ?",
)


def _run(settings: Settings, **kwargs: Any) -> RoundReport:
    pipeline = build_pipeline(settings, **kwargs)
    try:
        return pipeline.run_once()
    finally:
        pipeline.close()


def _states(settings: Settings) -> dict[str, int]:
    with State(settings.state_path) as state:
        return state.counts()


@pytest.mark.parametrize("code", ["421 4.3.2 Busy, try later", "451 4.3.0 Try again later"])
def test_temporary_smtp_failures_then_one_delivery(
    dataset: Path, imap_account: ImapAccount, smtp_sink: SmtpSink, mail_config: Path, code: str
) -> None:
    settings = load_settings(mail_config)
    imap_account.append([QUOTE])
    smtp_sink.fail_temporarily(2, code)
    report = _run(settings)
    assert report.forwarded == 1
    assert len(smtp_sink.delivered()) == 1
    assert smtp_sink.attempts == 3
    assert _states(settings) == {"filed": 1}


def test_deferred_forward_is_resent_later_with_the_same_message_id(
    dataset: Path, imap_account: ImapAccount, smtp_sink: SmtpSink, make_mail_config: Any
) -> None:
    settings = load_settings(make_mail_config(smtp={"max_attempts": 2, "defer_seconds": 0}))
    imap_account.append([QUOTE])
    smtp_sink.fail_temporarily(3)
    first = _run(settings)
    assert first.deferred == 1 and smtp_sink.delivered() == []
    assert _folder_count(imap_account, "INBOX") == 1
    with State(settings.state_path) as state:
        (pending,) = state.pending()
        (forward,) = state.forwards_of(pending.id)
    assert pending.state == MessageState.FORWARDING
    second = _run(settings)
    assert second.forwarded == 1
    (delivered,) = smtp_sink.delivered()
    assert delivered.header("Message-ID") == forward.message_id
    assert _states(settings) == {"filed": 1}
    assert _folder_count(imap_account, "INBOX") == 0


def test_permanent_refusal_goes_to_triage_and_nothing_is_lost(
    dataset: Path, imap_account: ImapAccount, smtp_sink: SmtpSink, mail_config: Path
) -> None:
    settings = load_settings(mail_config)
    address = _route_of(settings, QUOTE)
    assert address and address != settings.smtp.triage_address
    smtp_sink.reject(address)
    imap_account.append([QUOTE])
    report = _run(settings)
    assert report.failed == 1
    (delivered,) = smtp_sink.delivered()
    assert delivered.rcpt_tos == (settings.smtp.triage_address,)
    assert "550" in delivered.message().get_body(("plain",)).get_content()
    assert attached(delivered)["Subject"] == "Demande de devis licences"
    assert _states(settings) == {"failed": 1}
    assert _folder_count(imap_account, "MailRouter/Triage") == 1


@pytest.mark.parametrize("how", ["kick", "restart"])
def test_imap_connection_dropped_mid_run_reconnects_and_finishes(
    dataset: Path,
    dovecot: DovecotServer,
    imap_account: ImapAccount,
    smtp_sink: SmtpSink,
    make_mail_config: Any,
    how: str,
) -> None:
    settings = load_settings(make_mail_config(mailbox={"batch_size": 4}))
    mails = [raw for _, raw in examples_for_mail(settings.data_dir, "train")[:12]]
    imap_account.append(mails)
    seen: list[int] = []

    def drop_connection(context: Context, incoming: Incoming) -> None:
        seen.append(incoming.uid)
        if len(seen) in (3, 9):
            dovecot.kick(imap_account.username) if how == "kick" else dovecot.restart()

    pipeline = build_pipeline(settings, handlers=[drop_connection])
    try:
        report = pipeline.run_once()
        assert pipeline.mailbox.reconnects >= 1
    finally:
        pipeline.close()
    assert report.seen == len(mails)
    assert sum(_states(settings).values()) == len(mails)
    assert _folder_count(imap_account, "INBOX") == 0
    ids = [d.header("X-MailRouter-Forward-Id") for d in smtp_sink.delivered()]
    assert len(ids) == len(set(ids)) == report.forwarded


def test_uidvalidity_change_never_forwards_again(
    dataset: Path,
    dovecot: DovecotServer,
    imap_account: ImapAccount,
    smtp_sink: SmtpSink,
    mail_config: Path,
) -> None:
    settings = load_settings(mail_config)
    mails = [raw for _, raw in examples_for_mail(settings.data_dir, "train")[:8]]
    imap_account.append(mails)
    first = _run(settings)
    sent = len(smtp_sink.delivered())
    assert first.seen == len(mails) and sent == first.forwarded
    # The mailbox is recreated: the same mail back in INBOX under a new UIDVALIDITY.
    client = imap_account.client()
    old = client.select_folder("INBOX")[b"UIDVALIDITY"]
    client.logout()
    dovecot.reset_uidvalidity(imap_account.username)
    imap_account.append(mails)
    client = imap_account.client()
    assert client.select_folder("INBOX")[b"UIDVALIDITY"] != old
    client.logout()
    second = _run(settings)
    assert second.seen == len(mails)
    assert second.duplicates == len(mails)
    assert len(smtp_sink.delivered()) == sent
    assert _folder_count(imap_account, "INBOX") == 0


def test_keywords_mode_leaves_mail_in_place_and_tags_it(
    dataset: Path, imap_account: ImapAccount, smtp_sink: SmtpSink, make_mail_config: Any
) -> None:
    settings = load_settings(make_mail_config(mailbox={"use_folders": False}))
    imap_account.append([QUOTE])
    assert _run(settings).forwarded == 1
    assert _run(settings).seen == 0
    client = imap_account.client()
    client.select_folder("INBOX")
    flags = next(iter(client.get_flags(client.search()).values()))
    client.logout()
    assert b"$MailRouterRouted" in flags and b"\\Seen" not in flags
    assert len(smtp_sink.delivered()) == 1


def test_dry_run_changes_nothing(
    dataset: Path, imap_account: ImapAccount, smtp_sink: SmtpSink, mail_config: Path
) -> None:
    settings = load_settings(mail_config)
    imap_account.append([QUOTE])
    report = _run(settings, dry_run=True)
    (decision,) = report.decisions
    assert decision.route == "department" and decision.address == _route_of(settings, QUOTE)
    assert smtp_sink.delivered() == [] and smtp_sink.attempts == 0
    assert _states(settings) == {}
    assert _folder_count(imap_account, "INBOX") == 1
    client = imap_account.client()
    client.select_folder("INBOX")
    assert client.search("UNSEEN")
    client.logout()


def test_automated_and_own_mail_is_never_forwarded(
    dataset: Path, imap_account: ImapAccount, smtp_sink: SmtpSink, mail_config: Path
) -> None:
    settings = load_settings(mail_config)
    own = make_email("[RH] Candidature", "x", headers={"X-MailRouter-Forward-Id": "abc"})
    auto = make_email("Absence", "Je suis absent.", headers={"Auto-Submitted": "auto-replied"})
    bulk = make_email("News", "Nouveautes", headers={"Precedence": "bulk"})
    listed = make_email("Liste", "Message de liste", headers={"List-Id": "<l.example.org>"})
    imap_account.append([own, auto, bulk, listed])
    report = _run(settings)
    assert {d.route for d in report.decisions} == {"ignore"}
    assert smtp_sink.delivered() == []
    assert _states(settings) == {"ignored": 4}
    assert _folder_count(imap_account, "MailRouter/Triage") == 4


def test_classifier_down_waits_then_routes(
    dataset: Path, imap_account: ImapAccount, smtp_sink: SmtpSink, make_mail_config: Any
) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    settings = load_settings(
        make_mail_config(classifier={"backend": "ollama", "ollama_host": down})
    )
    imap_account.append([QUOTE])
    report = _run(settings)
    assert report.waiting == 1 and report.decisions == []
    assert _states(settings) == {} and _folder_count(imap_account, "INBOX") == 1
    assert _run(load_settings(make_mail_config("ok.toml"))).forwarded == 1
    assert len(smtp_sink.delivered()) == 1


def test_too_large_mail_goes_to_triage_with_its_headers(
    dataset: Path, imap_account: ImapAccount, smtp_sink: SmtpSink, make_mail_config: Any
) -> None:
    settings = load_settings(make_mail_config(mailbox={"max_message_bytes": 4000}))
    big = make_email("Devis", "Bonjour, un devis svp. " + "x" * 8000)
    imap_account.append([big])
    report = _run(settings)
    assert report.forwarded == 1
    (delivered,) = smtp_sink.delivered()
    assert delivered.rcpt_tos == (settings.smtp.triage_address,)
    assert b"x" * 1000 not in delivered.data
    kinds = [p.get_content_type() for p in delivered.message().walk()]
    assert "text/rfc822-headers" in kinds
    assert _states(settings) == {"triaged": 1}


def test_batches_are_capped_in_bytes_and_all_mail_is_routed(
    dataset: Path,
    imap_account: ImapAccount,
    smtp_sink: SmtpSink,
    make_mail_config: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Three batches are in memory at once: a batch holds at most BATCH_BYTES of mail (a larger
    message alone, a message read by its header for HEADER_BYTES), whatever batch_size says."""
    import mailrouter.pipeline.round as pipeline_module

    monkeypatch.setattr(pipeline_module, "BATCH_BYTES", 6000)
    monkeypatch.setattr(pipeline_module, "HEADER_BYTES", 100)
    settings = load_settings(make_mail_config(mailbox={"max_message_bytes": 20_000}))
    small = [make_email(f"Facture {i}", "Relance facture impayee. " * 40) for i in range(5)]
    mails = [*small[:2], make_email("Devis", "Un devis. " + "y" * 9000), *small[2:]]
    mails.append(make_email("Gros", "z" * 30_000))  # over max_message_bytes: its header only
    imap_account.append(mails)
    pipeline = build_pipeline(settings)
    try:
        pipeline.mailbox.connect()
        batches = [uids for uids, _ in pipeline._batches(pipeline.mailbox.pending_uids())]
        report = pipeline.run_once()
    finally:
        pipeline.close()
    sizes = [len(m) for m in mails]
    assert [u for b in batches for u in b] == list(range(1, 8))
    assert [len(b) for b in batches] == [2, 1, 4]  # 2 small; the large one alone; 3 small + head
    assert all(sum(sizes[u - 1] for u in b if u != 7) <= 6000 for b in batches if len(b) > 1)
    assert report.filed == 7 and report.forwarded == 7
    assert len(smtp_sink.delivered()) == 7


def test_cli_serve_once_dry_run_and_history(
    dataset: Path, imap_account: ImapAccount, smtp_sink: SmtpSink, mail_config: Path
) -> None:
    imap_account.append([QUOTE])
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        _cli_round_trip(mail_config, smtp_sink)
    finally:  # the CLI logs to the runner's stream, closed after each invocation
        root.handlers[:] = handlers
        root.setLevel(level)


def _cli_round_trip(mail_config: Path, smtp_sink: SmtpSink) -> None:
    runner = CliRunner()
    base = ["--config", str(mail_config)]
    dry = runner.invoke(app, [*base, "serve", "--once", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "would route 1 of 1" in dry.output
    assert smtp_sink.delivered() == []
    done = runner.invoke(app, [*base, "serve", "--once"])
    assert done.exit_code == 0, done.output
    assert "forwarded 1" in done.output
    assert len(smtp_sink.delivered()) == 1
    history = runner.invoke(app, [*base, "history", "-n", "2", "--json"])
    assert history.exit_code == 0, history.output
    latest, previous = (json.loads(line) for line in history.output.splitlines())
    assert (latest["state"], previous["state"]) == ("filed", "forwarded")
    assert latest["subject"] == "Demande de devis licences"
    table = runner.invoke(app, [*base, "history"])
    assert table.exit_code == 0 and "filed" in table.output


def test_pymap_fallback_routes_and_idles(
    dataset: Path, smtp_sink: SmtpSink, data_dir: Path
) -> None:
    require(PymapServer.available(), "pymap is not installed")
    with PymapServer() as server:
        account = server.account
        account.append([QUOTE])
        settings = load_settings(
            write_toml(local_config(account, smtp_sink, data_dir), data_dir / "p.toml")
        )
        pipeline = build_pipeline(settings)
        try:
            assert pipeline.run_once().forwarded == 1
            timer = threading.Timer(
                0.5, account.append, [[make_email("Facture", "Facture 12 impayee")]]
            )
            timer.start()
            assert pipeline.wait_for_changes(15) is True
            timer.join()
            assert pipeline.run_once().seen == 1
        finally:
            pipeline.close()
    assert len(smtp_sink.delivered()) == 2


def test_message_in_flight_across_a_uidvalidity_change_is_adopted_and_sent_once(
    dataset: Path,
    dovecot: DovecotServer,
    imap_account: ImapAccount,
    smtp_sink: SmtpSink,
    make_mail_config: Any,
) -> None:
    settings = load_settings(make_mail_config(smtp={"max_attempts": 1, "defer_seconds": 0}))
    imap_account.append([QUOTE])
    smtp_sink.fail_temporarily(1)
    assert _run(settings).deferred == 1
    dovecot.reset_uidvalidity(imap_account.username)  # same message, new UID generation
    report = _run(settings)
    assert report.forwarded == 1 and report.duplicates == 0
    assert len(smtp_sink.delivered()) == 1
    with State(settings.state_path) as state:
        assert state.counts() == {"filed": 1}
    assert _folder_count(imap_account, "INBOX") == 0


def test_backlog_none_routes_only_mail_arriving_after_the_first_start(
    dataset: Path, imap_account: ImapAccount, smtp_sink: SmtpSink, make_mail_config: Any
) -> None:
    settings = load_settings(make_mail_config(mailbox={"backlog": "none"}))
    imap_account.append([make_email("Ancien", "Vieux message"), make_email("Ancien 2", "Vieux")])
    assert _run(settings, dry_run=True).decisions == []
    assert _run(settings).seen == 0
    imap_account.append([QUOTE])
    report = _run(settings)
    assert report.seen == 1 and report.forwarded == 1
    assert _folder_count(imap_account, "INBOX") == 2
