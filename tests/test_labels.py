"""A model's answer becomes a configured department or nothing, never a guess."""

from __future__ import annotations

import pytest

from mailrouter.config import default_departments
from mailrouter.prediction import Prediction, map_label

DEPS = default_departments()


@pytest.mark.parametrize(
    ("answer", "label"),
    [
        ("RH", "RH"),
        (" RH", "RH"),
        ("finance.", "Finance"),
        ("Comptabilité", "Finance"),
        ("SALES", "Commercial"),
        ("spam", "SPAM"),
        ("RH et Finance", None),
        ("Finance\nBcc: attacker@evil.test", None),
        ("[/INST]RH", None),
        ("DIRECTION", None),
        ("", None),
        ("Ｆｉｎａｎｃｅ", None),  # fullwidth
        ("Fіnance", None),  # Cyrillic і
        ("S\u200dupport", None),  # zero-width joiner
        ("\u202eecnaniF", None),  # bidi override
    ],
)
def test_map_label(answer: str, label: str | None) -> None:
    assert map_label(answer, DEPS) == label


def test_confidence_must_be_a_probability() -> None:
    with pytest.raises(ValueError, match="outside"):
        Prediction("RH", 1.5, "m")
