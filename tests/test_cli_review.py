"""`corrections review [accept|reject ID]` and `dataset relabel ID LABEL [--force]`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mailrouter.cli import app
from mailrouter.dataset import Dataset, Example
from mailrouter.errors import DatasetError
from mailrouter.state import State, now_iso

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False, env={"COLUMNS": "200"})


def waiting_row(data_dir: Path, held_id: str) -> int:
    """The corrections row the service writes for a held correction."""
    with State(data_dir / "state.db") as state:
        return state.execute(
            "INSERT INTO corrections (by, command, old_label, new_label, status, created, "
            "example_id) VALUES ('a@example.com', 'route', 'Commercial', 'Finance', 'held', ?, ?)",
            (now_iso(), held_id),
        )


def status(data_dir: Path, row: int) -> tuple[str, str]:
    with State(data_dir / "state.db") as state:
        found = state.query("SELECT status, example_id FROM corrections WHERE id = ?", (row,))
    return found[0]["status"], found[0]["example_id"]


@pytest.fixture
def store(data_dir: Path) -> Dataset:
    store = Dataset(data_dir / "examples.jsonl")
    store.add(
        [
            Example.new("Demande de devis", "Commercial", split="train", source="import"),
            Example.new("Une relance", "Support", split="test", source="import"),
        ]
    )
    return store


def test_review_lists_accepts_and_rejects(store: Dataset, data_dir: Path) -> None:
    assert "no correction waiting" in run("corrections", "review").stdout
    devis = store.upsert_correction(
        text="Demande de devis", label="Finance", mail_key="m1", by="a@example.com"
    )
    relance = store.upsert_correction(
        text="Une relance", label="RH", mail_key="m2", by="b@example.com"
    )
    rows = [waiting_row(data_dir, devis.example.id), waiting_row(data_dir, relance.example.id)]

    listed = run("corrections", "review").stdout
    for expected in ("Demande de devis", "Commercial (train)", "Finance", "a@example.com",
                     "Support (test)", devis.example.id):  # fmt: skip
        assert expected in listed
    as_json = [
        json.loads(line) for line in run("corrections", "review", "--json").stdout.splitlines()
    ]
    assert [(r["current"], r["proposed"]) for r in as_json] == [
        ("Commercial", "Finance"),
        ("Support", "RH"),
    ]

    accepted = run("corrections", "review", "accept", devis.example.id)
    assert accepted.exit_code == 0 and "is now Finance (train)" in accepted.stdout
    example = store.get(Example.new("Demande de devis", "x").id)
    assert example.label == "Finance"
    assert status(data_dir, rows[0]) == ("applied", example.id)

    # The test example cannot be changed by review: the maintainer's command is named.
    with pytest.raises(DatasetError, match=r"mailrouter dataset relabel \w+ RH --force"):
        run("corrections", "review", "accept", relance.example.id)
    assert status(data_dir, rows[1]) == ("held", relance.example.id)
    rejected = run("corrections", "review", "reject", relance.example.id)
    assert rejected.exit_code == 0 and "was not applied" in rejected.stdout
    assert status(data_dir, rows[1])[0] == "rejected"
    assert store.held() == [] and store.get(relance.example.id) is None
    assert store.split("test")[0].label == "Support"


def test_relabel_needs_force_on_a_test_example(store: Dataset) -> None:
    test = store.split("test")[0]
    with pytest.raises(DatasetError, match="--force"):
        run("dataset", "relabel", test.id, "RH")
    done = run("dataset", "relabel", test.id, "hr", "--force")  # an alias names the department
    assert done.exit_code == 0 and f"{test.id}: RH (test)" in done.stdout
    assert "pin-test --force" in done.stderr
    train = store.split("train")[0]
    assert run("dataset", "relabel", train.id, "Finance").exit_code == 0
    assert store.get(train.id).label == "Finance"
