"""Command: ``evaluate`` — scores of a classifier on a split of the dataset."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress

from ..classify import make_classifier
from ..dataset import SPLITS, Dataset
from ..errors import DatasetError
from ..files import NO_DATASET_FIX
from ..training.evaluation import evaluate as run_evaluation
from ..training.evaluation import format_report, write_html
from .app import BackendOption, check_backend, err_console, settings


def evaluate(
    backend: BackendOption = None,
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
    classifier = make_classifier(current, check_backend(backend))
    threshold = current.classifier.threshold_for(classifier.name)
    if backend == "baseline" or (backend is None and current.classifier.backend == "baseline"):
        result = run_evaluation(classifier, examples, current.departments, threshold)
    else:
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
