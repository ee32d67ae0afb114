"""The malformed-mail corpus (``tests/data/mime/``, plus a 15 MB message) through the pipeline.

No message may crash the loop or be lost: each ends forwarded (to a department or to triage) or
filed as spam or ignored (machine-sent), with its original out of INBOX.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from mailrouter.config import load_settings
from mailrouter.localservers import ImapAccount, SmtpSink
from mailrouter.state import State
from mailrouter.wiring import build_pipeline
from tests.conftest import TEST_DATA
from tests.sample_examples import write_sample_dataset


def _corpus() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mime_corpus", TEST_DATA / "mime" / "corpus.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_malformed_corpus_is_routed_without_a_crash(
    data_dir: Path,
    imap_account: ImapAccount,
    smtp_sink: SmtpSink,
    make_mail_config: Callable[..., Path],
) -> None:
    corpus = _corpus()
    files = corpus.corpus_files()
    assert len(files) >= 30
    mails = [p.read_bytes() for p in files] + [corpus.huge_message()]
    client = imap_account.client()
    appended = 0
    for raw in mails:
        try:
            client.append("INBOX", raw)
            appended += 1
        except Exception as exc:  # an IMAP server may refuse what is not a message at all
            assert not raw.strip(), f"Dovecot refused a non-empty message: {exc}"
    client.logout()
    write_sample_dataset(data_dir / "examples.jsonl")
    # One sender wrote most of the corpus: no per-sender forward limit here.
    settings = load_settings(make_mail_config(mailbox={"max_forwards_per_sender_per_hour": 0}))

    pipeline = build_pipeline(settings)
    try:
        report = pipeline.run_once()
    finally:
        pipeline.close()

    assert report.seen == appended, report
    assert report.waiting == 0, report
    with State(settings.state_path) as state:
        assert state.pending() == []
        rows = state.query("SELECT state, route, reason FROM messages")
    assert len(rows) == appended
    assert not [r["reason"] for r in rows if r["route"] == "error"]
    assert {r["state"] for r in rows} <= {"filed", "triaged", "spam", "ignored"}
    forwarded = [r for r in rows if r["state"] in ("filed", "triaged")]
    delivered = smtp_sink.delivered()
    assert len(delivered) == len(forwarded) == report.forwarded
    for d in delivered:  # every forward carries its original
        assert b"Content-Type: message/rfc822\r\n" in d.data
    assert max(len(d.data) for d in delivered) > 15 * 1024 * 1024
    client = imap_account.client()
    try:
        assert client.select_folder("INBOX")[b"EXISTS"] == 0
    finally:
        client.logout()
