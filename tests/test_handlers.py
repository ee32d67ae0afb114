"""Pre-classification handlers meeting a temporary SMTP failure: the message waits, then is
handled exactly once (Dovecot and aiosmtpd, with the staff-correction handler)."""

from __future__ import annotations

from mailrouter.config import Settings
from mailrouter.corrections.review import list_corrections
from mailrouter.dataset import Dataset
from mailrouter.localservers import ImapAccount, SmtpSink
from mailrouter.state import State
from tests.fixtures.corrections import (
    Forced,
    inbox_count,
    route_invoice_to_support,
    run,
    staff_reply,
    to,
)


def test_a_correction_that_cannot_be_sent_yet_waits_then_applies_once(
    settings: Settings,
    imap_account: ImapAccount,
    smtp_sink: SmtpSink,
    dataset: Dataset,
) -> None:
    forward = route_invoice_to_support(settings, imap_account, smtp_sink)
    imap_account.append([staff_reply(forward, "Finance")])
    smtp_sink.fail_temporarily(100)  # 451 to every attempt of this round
    report = run(settings, Forced("Support"))

    assert (report.waiting, report.filed, report.decisions) == (1, 0, [])
    assert to(smtp_sink, "finance@example.com") == []
    assert [e for e in dataset.load() if e.source == "correction"] == []
    assert inbox_count(imap_account) == 1  # the correction mail stays where it arrived
    with State(settings.state_path) as state:
        assert [r.status for r in list_corrections(state)] == ["pending"]
        assert len(state.query("SELECT id FROM messages")) == 1  # only the routed invoice

    smtp_sink.clear_faults()
    report = run(settings, Forced("Support"))
    again = run(settings, Forced("Support"))

    assert report.filed == 1 and report.waiting == 0 and again.seen == 0
    assert len(to(smtp_sink, "finance@example.com")) == 1
    (example,) = [e for e in dataset.load() if e.source == "correction"]
    assert (example.label, example.corrected_from) == ("Finance", "Support")
    assert inbox_count(imap_account) == 0
    with State(settings.state_path) as state:
        assert [r.status for r in list_corrections(state)] == ["applied"]
        kinds = [(f.kind, f.status) for f in state.forwards_of(1)]
    # The deferred re-forward was sent as it was recorded, not replaced by a second one.
    assert kinds == [("route", "sent"), ("correction", "sent")]
