"""Reading staff corrections: tokens, commands in every phrasing, trust."""

from __future__ import annotations

import pytest

from mailrouter.commands import (
    authenticated,
    find_tokens,
    first_command_line,
    is_staff,
    parse_command,
    subject_command,
)
from mailrouter.config import default_departments

DEPS = default_departments()


@pytest.mark.parametrize(
    ("text", "kind", "department"),
    [
        ("Finance", "route", "Finance"),
        ("finance", "route", "Finance"),
        ("-> finance", "route", "Finance"),
        ("=> Compta", "route", "Finance"),
        ("pour RH", "route", "RH"),
        ("Pour les ressources humaines, merci", "route", "RH"),
        ("to sales", "route", "Commercial"),
        ("service commercial", "route", "Commercial"),
        ("Service Comptabilité", "route", "Finance"),
        ("SPAM", "spam", "SPAM"),
        ("c'est du spam", "spam", "SPAM"),
        ("ok", "confirm", None),
        ("Correct.", "confirm", None),
        ("bon", "confirm", None),
        ("je ne sais pas, voir avec Paul", "unknown", None),
        ("RH ou Finance", "unknown", None),
        ("", "unknown", None),
    ],
)
def test_parse_command(text: str, kind: str, department: str | None) -> None:
    command = parse_command(text, DEPS)
    assert (command.kind, command.department) == (kind, department)


def test_tokens_in_subjects_and_bodies() -> None:
    assert find_tokens("Re: [MR-abc123XY] Finance [MR-abc123XY] [MR-zz99zz99]") == [
        "abc123XY",
        "zz99zz99",
    ]
    assert find_tokens("[MR-] [MR-a!b] rien") == []
    assert subject_command("RE: [MR-abc123XY] -> Compta") == "-> Compta"
    assert subject_command("Re: [Support] Problème") == ""


def test_first_command_line_skips_greetings() -> None:
    assert first_command_line("Bonjour,\n\nFinance svp\nMarie") == "Finance svp"
    assert first_command_line("Hello Paul,\nto sales") == "to sales"
    assert first_command_line("\n\n") == ""


def test_staff() -> None:
    assert is_staff("Marie.Dupont@example.com", ["example.com"], [])
    assert is_staff("paul@paris.example.com", ["example.com"], [])
    assert not is_staff("eve@example.com.evil.test", ["example.com"], [])
    assert not is_staff("eve@notexample.com", ["example.com"], [])
    assert is_staff("boss@gmail.com", ["example.com"], ["Boss@gmail.com"])
    assert not is_staff("", ["example.com"], [])


def test_authentication_results_must_come_from_the_trusted_server() -> None:
    good = "mx.example.com; dkim=pass header.d=example.com header.s=s1; spf=pass smtp.mailfrom=x"
    forged = "evil.test; dkim=pass header.d=example.com"
    failing = "mx.example.com; dkim=fail header.d=example.com; spf=softfail smtp.mailfrom=a@b.c"
    unaligned = "mx.example.com; dkim=pass header.d=mailer.test"
    spf = "mx.example.com; spf=pass smtp.mailfrom=bounce@example.com"
    assert authenticated([good], "mx.example.com", "example.com")[0]
    assert authenticated([spf], "mx.example.com", "example.com")[0]
    assert authenticated([good], "mx.example.com", "paris.example.com")[0]
    assert not authenticated([forged], "mx.example.com", "example.com")[0]
    assert not authenticated([failing], "mx.example.com", "example.com")[0]
    assert not authenticated([unaligned], "mx.example.com", "example.com")[0]
    assert not authenticated([], "mx.example.com", "example.com")[0]
