"""Routing people can steer and read, on a real Dovecot and a real SMTP server: conversations
that stay with their department, rules before the model, a reason on every forward, triage
links, and the commands that explain and suggest."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mailrouter.config import Settings, load_settings
from mailrouter.localservers import ImapAccount, SmtpSink
from mailrouter.prediction import ClassifyInput, Prediction
from mailrouter.rules import Rule, as_toml, suggest
from mailrouter.state import State
from tests.fixtures.corrections import AUTHSERV, forwards, run, staff_reply, to
from tests.fixtures.mail import make_email

RULES = [
    {"name": "supplier invoices", "from": "*@fournisseur-exemple.fr",
     "subject": "(?i)facture|invoice", "department": "Finance"},
    {"name": "newsletter", "header": "X-Campaign: .+", "action": "spam"},
    {"name": "unsure", "body": "(?i)urgent.*lawyer", "action": "triage"},
    {"name": "robots", "to": "noreply-*@example.com", "action": "ignore"},
]  # fmt: skip


@dataclass
class Chooser:
    """A classifier whose answer the test chooses, with probabilities for every department."""

    answers: dict[str, float]
    name: str = "chooser"
    seen: list[ClassifyInput] = field(default_factory=list)

    def classify(self, item: ClassifyInput) -> Prediction:
        self.seen.append(item)
        label = max(self.answers, key=self.answers.__getitem__)
        return Prediction(label, self.answers[label], self.name, label, dict(self.answers))


@pytest.fixture
def steer(dataset: Any, make_mail_config: Callable[..., Path]) -> Settings:
    corrections = {"trusted_authserv_id": AUTHSERV}
    return load_settings(make_mail_config(corrections=corrections, rules=RULES))


def mail(subject: str, body: str, sender: str = "client@customer.test", **kw: Any) -> bytes:
    return make_email(subject, body, sender=sender, **kw)


def test_a_follow_up_goes_to_the_conversation_then_where_a_correction_moved_it(
    steer: Settings, imap_account: ImapAccount, smtp_sink: SmtpSink
) -> None:
    first = mail("Commande 42", "Bonjour, où en est ma commande 42 ?", message_id="<c42@cust.test>")
    imap_account.append([first])
    run(steer, Chooser({"Support": 0.9, "Finance": 0.1}))
    (forward,) = forwards(smtp_sink)

    # Its text alone reads as a quote request; the conversation is with Support.
    follow = mail("Re: Commande 42", "Et pouvez-vous me faire un devis pour 10 de plus ?",
                  headers={"In-Reply-To": "<c42@cust.test>"})  # fmt: skip
    chooser = Chooser({"Commercial": 0.95, "Support": 0.05})
    imap_account.append([follow])
    report = run(steer, chooser)
    assert chooser.seen == [], "no classifier call for a follow-up"
    (decision,) = report.decisions
    assert decision.reason.startswith("thread #")
    assert len(to(smtp_sink, "support@example.com")) == 2

    imap_account.append([staff_reply(forward, "Finance")])
    run(steer, chooser)
    later = mail("Re: Re: Commande 42", "Merci, et la facture ?",
                 headers={"References": "<c42@cust.test>"})  # fmt: skip
    imap_account.append([later])
    run(steer, chooser)
    assert chooser.seen == []
    assert len(to(smtp_sink, "finance@example.com")) == 2  # the correction's and the follow-up's


def test_someone_else_naming_a_conversation_is_classified(
    steer: Settings, imap_account: ImapAccount, smtp_sink: SmtpSink
) -> None:
    imap_account.append([mail("Commande 7", "Où en est la commande 7 ?",
                              message_id="<c7@cust.test>")])  # fmt: skip
    run(steer, Chooser({"Support": 0.9}))
    intruder = mail("Re: Commande 7", "Offre spéciale", sender="eve@evil.test",
                    headers={"In-Reply-To": "<c7@cust.test>"})  # fmt: skip
    chooser = Chooser({"SPAM": 0.97})
    imap_account.append([intruder])
    run(steer, chooser)
    assert len(chooser.seen) == 1
    assert len(to(smtp_sink, "support@example.com")) == 1


def test_a_spam_conversation_stays_spam(
    steer: Settings, imap_account: ImapAccount, smtp_sink: SmtpSink
) -> None:
    imap_account.append([mail("Gagnez", "Vous avez gagné", message_id="<s1@cust.test>")])
    run(steer, Chooser({"SPAM": 0.99}))
    imap_account.append([mail("Re: Gagnez", "Alors ?", headers={"In-Reply-To": "<s1@cust.test>"})])
    chooser = Chooser({"Support": 0.99})
    report = run(steer, chooser)
    assert chooser.seen == [] and [d.route for d in report.decisions] == ["spam"]
    assert smtp_sink.delivered() == []


@pytest.mark.parametrize(
    ("raw", "route", "where"),
    [
        (
            mail(
                "Facture 2026-3",
                "Veuillez trouver notre facture.",
                sender="compta@fournisseur-exemple.fr",
            ),
            "department",
            "finance@example.com",
        ),
        (mail("Nouveautés", "Nos offres", headers={"X-Campaign": "winter"}), "spam", None),
        (mail("Help", "This is URGENT, my lawyer says"), "triage", "triage@mailrouter.test"),
        (mail("Ping", "status", to="noreply-42@example.com"), "ignore", None),
    ],
    ids=["department", "spam", "triage", "ignore"],
)
def test_rules_route_as_written_before_the_model(
    raw: bytes,
    route: str,
    where: str | None,
    steer: Settings,
    imap_account: ImapAccount,
    smtp_sink: SmtpSink,
) -> None:
    chooser = Chooser({"Support": 0.99})
    imap_account.append([raw])
    report = run(steer, chooser)
    assert chooser.seen == []
    (decision,) = report.decisions
    assert decision.route == route and decision.reason.startswith('rule "')
    assert [d.rcpt_tos for d in smtp_sink.delivered()] == ([(where,)] if where else [])
    if where:
        assert smtp_sink.delivered()[0].header("X-MailRouter-Reason") == decision.reason


def test_every_forward_says_why_and_a_triaged_one_offers_the_three_likeliest(
    steer: Settings, imap_account: ImapAccount, smtp_sink: SmtpSink
) -> None:
    imap_account.append([mail("Question", "Bonjour, une question sur mon contrat.")])
    run(steer, Chooser({"Support": 0.93, "Finance": 0.05, "RH": 0.02}))
    imap_account.append([mail("Autre", "Bonjour, je ne sais pas à qui écrire.")])
    run(steer, Chooser({"Commercial": 0.41, "Finance": 0.3, "Support": 0.2, "RH": 0.09}))

    routed, triaged = smtp_sink.delivered()
    assert routed.header("X-MailRouter-Reason") == "model 0.93 (next: Finance 0.05)"
    assert triaged.header("X-MailRouter-Reason").startswith("low confidence 0.41")
    text = triaged.message().get_body(("plain",)).get_content()
    likeliest = text.split("Likeliest:")[1].split("Mauvais service")[0]
    found = re.findall(r"^  (\w+) (\d+) % : (mailto:\S+)\r?$", likeliest, re.MULTILINE)
    assert [(n, p) for n, p, _ in found] == [("Commercial", "41"), ("Finance", "30"),
                                             ("Support", "20")]  # fmt: skip
    assert all("%5BMR-" in url for _, _, url in found)


def test_a_click_of_the_triage_person_routes_it(
    steer: Settings, imap_account: ImapAccount, smtp_sink: SmtpSink
) -> None:
    imap_account.append([mail("Autre", "Bonjour, je ne sais pas à qui écrire.")])
    run(steer, Chooser({"Commercial": 0.41, "Finance": 0.3}))
    (triaged,) = smtp_sink.delivered()
    token = triaged.header("X-MailRouter-Token")
    click = make_email(f"[MR-{token}] Finance", "Finance", sender="triage@mailrouter.test",
                       to="router@mailrouter.test")  # fmt: skip
    auth = f"{AUTHSERV}; spf=pass smtp.mailfrom=triage@mailrouter.test"
    imap_account.append([f"Authentication-Results: {auth}\r\n".encode() + click])
    run(steer, Chooser({"Support": 0.99}))
    assert len(to(smtp_sink, "finance@example.com")) == 1


def test_a_malformed_rule_fails_config_check_with_its_name(
    make_mail_config: Callable[..., Path],
) -> None:
    bad = [{"name": "broken invoices", "subject": "(facture", "department": "Finance"}]
    config = make_mail_config(rules=bad)
    done = subprocess.run([sys.executable, "-m", "mailrouter", "--config", str(config), "config",
                           "check"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert "broken invoices" in done.stderr and "Traceback" not in done.stderr


def test_rules_test_names_the_rule_each_email_matches(
    steer: Settings, tmp_path: Path, make_mail_config: Callable[..., Path]
) -> None:
    config = make_mail_config(rules=RULES)
    invoice = tmp_path / "invoice.eml"
    invoice.write_bytes(mail("Facture 9", "Ci-joint", sender="a@fournisseur-exemple.fr"))
    other = tmp_path / "other.eml"
    other.write_bytes(mail("Bonjour", "Une question"))
    done = subprocess.run([sys.executable, "-m", "mailrouter", "--config", str(config), "rules",
                           "test", str(invoice), str(other)], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f'{invoice}: rule "supplier invoices" → Finance' in done.stdout
    assert f"{other}: no rule" in done.stdout


def test_rules_suggest_only_what_corrections_agree_on() -> None:
    corrected = [
        ("a@fournisseur.fr", "Finance"), ("b@fournisseur.fr", "Finance"),
        ("c@fournisseur.fr", "Finance"),  # a domain, three senders, one way: a domain rule
        ("boss@gmail.test", "RH"), ("boss@gmail.test", "RH"), ("boss@gmail.test", "RH"),
        ("x@mixed.test", "Support"), ("x@mixed.test", "Support"), ("x@mixed.test", "Finance"),
        ("y@rare.test", "Support"), ("y@rare.test", "Support"),
    ]  # fmt: skip
    rules = suggest(corrected)
    assert [(r.from_, r.department) for r in rules] == [
        ("*@fournisseur.fr", "Finance"),
        ("boss@gmail.test", "RH"),
    ]
    text = as_toml(rules)
    assert text.count("[[rules]]") == 2 and 'from = "*@fournisseur.fr"' in text
    reread = __import__("tomllib").loads(text)["rules"]
    assert [Rule.model_validate(r).department for r in reread] == ["Finance", "RH"]


def test_history_explains_a_decision(
    steer: Settings, imap_account: ImapAccount, smtp_sink: SmtpSink
) -> None:
    imap_account.append([mail("Contrat", "Bonjour, une question sur mon contrat.")])
    run(steer, Chooser({"Support": 0.93, "Finance": 0.07}))
    with State(steer.state_path) as state:
        (entry, *_) = state.history(5)
    done = subprocess.run([sys.executable, "-m", "mailrouter", "--config", str(steer.source),
                           "history", "--explain", str(entry.message)], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "model 0.93 (next: Finance 0.07)" in out and "Support" in out and "93.0%" in out
    assert "une question sur mon contrat" in out


def test_rules_suggest_reads_the_corrections_history(
    steer: Settings, make_mail_config: Callable[..., Path]
) -> None:
    config = make_mail_config(rules=RULES)
    with State(steer.state_path) as state:
        for i, sender in enumerate(["a@supplier.test", "b@supplier.test", "c@supplier.test"]):
            record = state.add_message("m", 1, i + 1, content_hash=f"h{i}", sender=sender,
                                       route="department", department="Support")  # fmt: skip
            state.add_correction(message=record.id, by="boss@example.com", command="route",
                                 old_label="Support", new_label="Finance",
                                 status="applied")  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "mailrouter", "--config", str(config), "rules",
                           "suggest"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    (suggested,) = __import__("tomllib").loads(done.stdout)["rules"]
    assert (suggested["from"], suggested["department"]) == ("*@supplier.test", "Finance")
