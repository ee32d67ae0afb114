"""Commands: ``classify`` (emails given on the command line) and ``evaluate`` (a dataset split)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..classify import make_classifier
from ..classify.base import Classifier
from ..config import Settings
from ..dataset import SPLITS, Dataset
from ..errors import ClassifierError, DatasetError, MailRouterError
from ..files import NO_DATASET_FIX
from ..mail.parse import parse_email
from ..prediction import ClassifyInput
from ..training.evaluation import evaluate as run_evaluation
from ..training.evaluation import format_report, write_html
from .app import app, err_console, settings

BACKENDS = ("ollama", "mlx", "baseline")


def _backend(name: str | None) -> str | None:
    if name is not None and name not in BACKENDS:
        raise ClassifierError(f"--backend {name!r}: expected one of {', '.join(BACKENDS)}")
    return name


@app.command()
def classify(
    files: Annotated[list[str], typer.Argument(help="Email files (.eml); - reads one from stdin.")],
    backend: Annotated[
        str | None, typer.Option("--backend", "-b", help="ollama|mlx|baseline (default: config).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Print the department of each email: file, department, confidence, backend."""
    current = settings()
    classifier = (
        make_classifier(current, _backend(backend)) if backend else _usable_classifier(current)
    )
    failed = 0
    for name in files:
        try:
            line = _classify_one(classifier, name, current.mailbox.max_message_bytes)
        except (OSError, ClassifierError) as exc:
            failed += 1
            reason = f"cannot read it: {exc.strerror}" if isinstance(exc, OSError) else str(exc)
            line = {
                "file": name,
                "department": None,
                "confidence": None,
                "backend": classifier.name,
                "error": reason,
            }
        if as_json:
            typer.echo(json.dumps(line, ensure_ascii=False))
        elif "error" in line:
            typer.echo(f"{name}\terror: {line['error']}")
        else:
            department = line["department"] or "unknown"
            typer.echo(f"{name}\t{department}\t{line['confidence']:.3f}\t{line['backend']}")
    if failed:
        raise typer.Exit(1)


def _usable_classifier(current: Settings) -> Classifier:
    """The configured backend, or the baseline (with a note) when the configured Ollama cannot
    answer: ``classify`` then works on a machine without Ollama, as the baseline is the fallback."""
    classifier = make_classifier(current)
    if current.classifier.backend != "ollama":
        return classifier
    try:
        classifier.start()  # type: ignore[attr-defined]
        classifier.resolve_model()  # type: ignore[attr-defined]
    except MailRouterError as exc:
        reason = str(exc).splitlines()[0]
        err_console.print(
            f"note: {reason}; classifying with the baseline (--backend chooses)", highlight=False
        )
        return make_classifier(current, "baseline")
    return classifier


def _classify_one(classifier: Classifier, name: str, max_bytes: int) -> dict[str, object]:
    raw = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
    email = parse_email(raw, max_bytes=max_bytes)
    prediction = classifier.classify(ClassifyInput.from_email(email))
    return {
        "file": name,
        "department": prediction.label,
        "confidence": round(prediction.confidence, 4),
        "backend": prediction.model,
    }


@app.command()
def evaluate(
    backend: Annotated[
        str | None, typer.Option("--backend", "-b", help="ollama|mlx|baseline (default: config).")
    ] = None,
    split: Annotated[str, typer.Option(help="train|valid|test.")] = "test",
    report: Annotated[
        Path | None, typer.Option("--report", help="Also write an HTML report here.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Accuracy, macro-F1, per-department scores, confusion matrix and triage rate on a split."""
    if split not in SPLITS:
        raise DatasetError(f"--split {split!r}: expected one of {', '.join(SPLITS)}")
    current = settings()
    examples = Dataset.from_settings(current).split(split)
    if not examples:
        raise DatasetError(
            f"the {split} split of {current.examples_path} is empty"
            + ("" if current.examples_path.exists() else f": {NO_DATASET_FIX}")
        )
    classifier = make_classifier(current, _backend(backend))
    threshold = current.classifier.threshold_for(classifier.name)
    if backend == "baseline" or (backend is None and current.classifier.backend == "baseline"):
        result = run_evaluation(classifier, examples, current.departments, threshold)
    else:
        from rich.progress import Progress

        with Progress(console=err_console, transient=True) as bar:
            task = bar.add_task(f"{classifier.name} on {split}", total=len(examples))
            result = run_evaluation(
                classifier,
                examples,
                current.departments,
                threshold,
                progress=lambda done, _total: bar.update(task, completed=done),
            )
    if as_json:
        typer.echo(json.dumps({"split": split, **result.to_dict()}, ensure_ascii=False))
    else:
        typer.echo(f"split {split}")
        typer.echo(format_report(result))
    if report is not None:
        write_html(result, report)
        err_console.print(f"wrote {report}", highlight=False)
