"""The pinned test set: the gate's yardstick, checked before every training run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mailrouter.cli import app
from mailrouter.config import Settings, load_settings
from mailrouter.dataset import Dataset, Example
from mailrouter.errors import DatasetError
from mailrouter.state import State
from mailrouter.training import registry
from mailrouter.training.runner import run_training
from mailrouter.training.testpin import (
    PinDiff,
    build_pin,
    check_pin,
    compare,
    pin_path,
    read_pin,
    repin,
)

runner = CliRunner()


def ex(text: str, label: str = "RH", split: str = "test", **kwargs) -> Example:
    return Example.new(text, label, split=split, source="import", **kwargs)


EXAMPLES = [ex("Candidature", "RH"), ex("Facture", "Finance"), ex("Train", split="train")]


def test_pin_holds_hashes_and_labels_of_the_test_split_only(tmp_path: Path) -> None:
    path = tmp_path / "models" / "test-pin.json"
    status = check_pin(path, EXAMPLES)
    assert status.created and status.new == []
    assert set(status.pin.entries) == {EXAMPLES[0].id, EXAMPLES[1].id}
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    text = path.read_text(encoding="utf-8")
    assert "Candidature" not in text and "Facture" not in text  # no customer text, hashes only
    assert json.loads(text)["digest"] == status.pin.digest == read_pin(path).digest
    assert build_pin(reversed(EXAMPLES)).digest == status.pin.digest  # order does not matter
    assert check_pin(path, EXAMPLES) == type(status)(read_pin(path), False, [])


@pytest.mark.parametrize(
    ("tampered", "message"),
    [
        ([ex("Candidature", "Support"), EXAMPLES[1]], "label changed from RH to Support"),
        ([ex("Candidature", "RH", sender_domain="evil.example"), EXAMPLES[1]], "text changed"),
        ([EXAMPLES[1]], "is no longer in the test split"),
        ([ex("Candidature", split="train"), EXAMPLES[1]], "is no longer in the test split"),
    ],
)
def test_a_changed_or_missing_pinned_example_stops_the_check(
    tmp_path: Path, tampered: list[Example], message: str
) -> None:
    path = tmp_path / "test-pin.json"
    check_pin(path, EXAMPLES)
    with pytest.raises(DatasetError) as error:
        check_pin(path, tampered)
    assert EXAMPLES[0].id in str(error.value) and message in str(error.value)
    assert "mailrouter dataset pin-test --force" in str(error.value)


def test_new_test_examples_are_reported_not_pinned(tmp_path: Path) -> None:
    path = tmp_path / "test-pin.json"
    check_pin(path, EXAMPLES)
    grown = [*EXAMPLES, ex("Nouveau", "Support")]
    assert check_pin(path, grown).new == [grown[-1].id]
    assert compare(read_pin(path), grown) == PinDiff([], [], [grown[-1].id])
    # Only the explicit command adds them; changes to pinned ones need --force.
    pin, diff = repin(path, grown)
    assert diff.new == [grown[-1].id] and len(pin.entries) == 3
    assert check_pin(path, grown).new == []
    with pytest.raises(DatasetError, match="pin-test --force"):
        repin(path, EXAMPLES[1:])
    pin, diff = repin(path, EXAMPLES[1:], force=True)
    assert len(diff.missing) == 2 and list(pin.entries) == [EXAMPLES[1].id]


def test_a_hand_edited_pin_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "test-pin.json"
    check_pin(path, EXAMPLES)
    data = json.loads(path.read_text(encoding="utf-8"))
    data["examples"][EXAMPLES[0].id]["label"] = "Support"
    data["examples"][EXAMPLES[0].id]["hash"] = "0" * 64
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(DatasetError, match="digest does not match"):
        check_pin(path, EXAMPLES)
    path.write_text("{oops", encoding="utf-8")
    with pytest.raises(DatasetError, match="unreadable test pin"):
        check_pin(path, EXAMPLES)
    assert repin(path, EXAMPLES, force=True)[0].digest == build_pin(EXAMPLES).digest


# --- before a training run -------------------------------------------------------------------


def _mark_trained(settings: Settings) -> None:
    """Record the dataset as trained on, so a run that passes the pin check skips at once."""
    with State(settings.state_path) as state:
        run = registry.start_run(state)
        digest = Dataset(settings.examples_path).content_hash()
        registry.finish_run(state, run, "rejected", "earlier run", dataset_hash=digest)


def test_a_tampered_test_set_stops_the_training_run(starter_data: Path, data_dir: Path) -> None:
    settings = load_settings(data_dir=data_dir)
    _mark_trained(settings)
    first = run_training(settings)
    assert first.decision == "skipped"  # the pin check passed: it wrote the pin
    pinned = read_pin(pin_path(settings))
    store = Dataset(starter_data)
    assert set(pinned.entries) == {e.id for e in store.split("test")}

    # A test example relabelled (here on purpose, as an attacker would wish to) stops the run.
    target = store.split("test")[3]
    other = next(label for label in settings.labels if label != target.label)
    store.relabel(target.id, other, force=True)
    stopped = run_training(settings)
    assert stopped.decision == "failed"
    assert target.id in stopped.reason and f"from {target.label} to {other}" in stopped.reason
    assert "mailrouter dataset pin-test --force" in stopped.reason
    with State(settings.state_path) as state:
        assert target.id in registry.run(state, stopped.run_id).error

    # Re-pinned on purpose, the run goes on; a test example imported later is reported.
    done = runner.invoke(app, ["dataset", "pin-test", "--force"], catch_exceptions=False)
    assert done.exit_code == 0 and "1 changed" in done.stdout
    store.add([Example.new("Un nouvel email de test", "RH", split="test", source="import")])
    _mark_trained(settings)
    again = run_training(settings)
    assert again.decision == "skipped"
    with State(settings.state_path) as state:
        pin = registry.run(state, again.run_id).metrics["test_pin"]
    assert pin["unpinned"] == [Example.new("Un nouvel email de test", "RH").id]
    assert pin["digest"] == read_pin(pin_path(settings)).digest
