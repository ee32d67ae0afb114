"""The dataset, classify and evaluate commands, run without any config file."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from email.message import EmailMessage
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mailrouter.cli import app
from mailrouter.dataset import Dataset

from .conftest import REPO
from .sample_examples import write_sample_dataset

runner = CliRunner()


def run(*args: str, input: str | bytes | None = None):
    result = runner.invoke(app, list(args), input=input, catch_exceptions=False)
    return result


def flat(text: str) -> str:
    """Output with rich's line wrapping undone."""
    return " ".join(text.split())


def mailrouter(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The real console entry point, for exit codes and error messages."""
    return subprocess.run(
        [sys.executable, "-m", "mailrouter", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "120"},
    )


@pytest.fixture
def sample(data_dir: Path) -> Dataset:
    return write_sample_dataset(data_dir / "examples.jsonl")


def eml(path: Path, subject: str, body: str, sender: str = "client@acme.fr") -> Path:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = "contact@example.com"
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{path.stem}@acme.fr>"
    msg.set_content(body)
    path.write_bytes(msg.as_bytes())
    return path


def test_help_lists_the_commands(tmp_path: Path) -> None:
    done = mailrouter("--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for command in ("dataset", "classify", "evaluate", "demo"):
        assert command in done.stdout


def test_stats_table_and_warnings(sample: Dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    result = run("dataset", "stats")
    assert result.exit_code == 0
    assert "Commercial" in result.stdout and "60 examples" in flat(result.stdout)
    assert "warning:" not in result.output
    monkeypatch.setenv("MAILROUTER_TRAINING__BATCH_SIZE", "8")
    warned = run("dataset", "stats")
    assert "split 'valid' has 5 example(s), fewer than training.batch_size=8" in flat(warned.output)
    data = json.loads(run("dataset", "stats", "--json").stdout)
    assert data["total"] == 60 and data["counts"]["RH"] == {"train": 10, "valid": 1, "test": 1}
    assert data["content_hash"] == sample.content_hash()


def test_stats_warns_about_a_missing_label(data_dir: Path) -> None:
    (data_dir / "examples.jsonl").write_text(
        '{"text": "a", "label": "RH", "split": "train"}\n', encoding="utf-8"
    )
    result = run("dataset", "stats")
    assert "'Support' has no example in train" in flat(result.output)


def test_import_export_and_add(data_dir: Path, tmp_path: Path) -> None:
    csv_file = tmp_path / "mails.csv"
    csv_file.write_text(
        "text,label\nUn devis svp,Commercial\nMa facture,Finance\nUn bug,Support\n",
        encoding="utf-8",
    )
    result = run("dataset", "import", str(csv_file))
    assert "read 3: added 3" in result.stdout
    assert "duplicates 3" in run("dataset", "import", str(csv_file)).stdout

    folder = tmp_path / "eml"
    folder.mkdir()
    eml(folder / "1.eml", "Candidature", "Voici mon CV")
    result = run("dataset", "import", str(folder), "--label", "rh")
    assert "added 1" in result.stdout

    assert "added:" in run("dataset", "add", "--label", "SPAM", "Gagnez un iPhone").stdout
    assert "relabelled:" in run("dataset", "add", "--label", "Support", "Ma facture").stdout
    labels = {e.text: e.label for e in Dataset(data_dir / "examples.jsonl").load()}
    assert labels["Ma facture"] == "Support" and labels["Gagnez un iPhone"] == "SPAM"

    out = tmp_path / "mlx"
    result = run("dataset", "export", str(out))
    assert result.exit_code == 0 and "wrote" in result.stdout
    rows = [
        json.loads(line)
        for split in ("train", "valid", "test")
        for line in (out / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert len(rows) == 5 and all("[INST]" not in r["prompt"] for r in rows)


def test_bad_import_is_one_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nhello,Legal\n", encoding="utf-8")
    done = mailrouter("dataset", "import", str(bad), cwd=tmp_path)
    assert done.returncode == 1
    assert "label 'Legal' is not a configured department" in flat(done.stderr)
    assert "Traceback" not in done.stderr


def test_evaluate_baseline(sample: Dataset, tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    result = run("evaluate", "--backend", "baseline", "--report", str(page))
    assert result.exit_code == 0
    assert "accuracy" in result.stdout and "macro-F1" in result.stdout
    assert "unknown" in result.stdout  # the confusion matrix
    assert page.read_text(encoding="utf-8").count("<svg") == 3  # confusion, curve, reliability
    data = json.loads(run("evaluate", "--backend", "baseline", "--json").stdout)
    assert data["split"] == "test" and data["n"] == 5
    assert 0 <= data["accuracy"] <= 1 and set(data["per_department"]) >= {"RH", "SPAM"}


def test_classify_files_stdin_and_failures(sample: Dataset, tmp_path: Path) -> None:
    invoice = eml(tmp_path / "invoice.eml", "Facture 2024-88", "Veuillez regler la facture.")
    job = eml(tmp_path / "job.eml", "Candidature", "Je postule, voici mon CV pour le poste.")
    missing = tmp_path / "missing.eml"

    result = run("classify", "--backend", "baseline", str(invoice), str(missing), str(job))
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    file, department, confidence, backend = lines[0].split("\t")
    assert (file, department) == (str(invoice), "Finance")
    assert 0 <= float(confidence) <= 1 and backend.startswith("baseline@")
    assert lines[1].startswith(f"{missing}\terror:")
    assert lines[2].split("\t")[1] == "RH"

    result = run("classify", "--backend", "baseline", "--json", str(job), str(missing))
    first, second = (json.loads(line) for line in result.stdout.splitlines())
    assert set(first) == {"file", "department", "confidence", "backend"}
    assert first["department"] == "RH" and second["department"] is None and second["error"]

    result = run("classify", "--backend", "baseline", "-", input=invoice.read_bytes())
    assert result.exit_code == 0 and result.stdout.split("\t")[:2] == ["-", "Finance"]


def test_classify_falls_back_to_the_baseline_without_ollama(
    sample: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MAILROUTER_CLASSIFIER__OLLAMA_HOST", f"http://127.0.0.1:{port}")
    job = eml(tmp_path / "job.eml", "Candidature", "Je postule, voici mon CV pour le poste.")
    result = run("classify", str(job))
    assert result.exit_code == 0
    assert "classifying with the baseline" in flat(result.stderr)
    assert result.stdout.split("\t")[1:2] == ["RH"]
