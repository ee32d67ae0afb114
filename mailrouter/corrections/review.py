"""What ``mailrouter corrections list | revert`` show and do."""

from __future__ import annotations

import logging

from ..config import Settings
from ..dataset import Dataset
from ..logs import event
from ..state import CorrectionRow, State

log = logging.getLogger(__name__)


def list_corrections(state: State, limit: int = 50) -> list[CorrectionRow]:
    return state.correction_rows(limit)


def revert_correction(settings: Settings, state: State, correction_id: int) -> str:
    """Withdraw the example a correction recorded; returns what was done, for the user.

    Only what this correction wrote goes (its held entry, or an example it created): an example
    it merely agreed with (an import, a starter or test example) stays.
    """
    row = state.correction(correction_id)
    if row is None:
        return f"no correction #{correction_id}"
    if row.status == "reverted":
        return f"correction #{correction_id} was already reverted"
    dataset = Dataset.from_settings(settings)
    removed = bool(row.example_id) and dataset.remove_correction(row.example_id or "")
    state.update_correction(correction_id, status="reverted")
    event(log, "correction_reverted", id=correction_id, example=row.example_id)
    if removed:
        return f"reverted correction #{correction_id}: example {row.example_id} removed"
    return f"reverted correction #{correction_id}: it had no example of its own in the dataset"
