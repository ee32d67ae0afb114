"""Reading staff corrections: tokens, commands in every phrasing, trust."""

from __future__ import annotations

import pytest

from mailrouter.config import default_departments
from mailrouter.corrections.replies import (
    find_tokens,
    first_command_line,
    is_staff,
    parse_command,
    subject_command,
)

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
    assert not is_staff("paul@paris.example.com", ["example.com"], []), "exact domains only"
    assert is_staff("paul@paris.example.com", ["example.com", "paris.example.com"], [])
    assert not is_staff("eve@example.com.evil.test", ["example.com"], [])
    assert not is_staff("eve@notexample.com", ["example.com"], [])
    assert is_staff("boss@gmail.com", ["example.com"], ["Boss@gmail.com"])
    assert not is_staff("", ["example.com"], [])
