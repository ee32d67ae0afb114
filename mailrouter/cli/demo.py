"""Command: ``demo`` — the baseline classifies the held-out starter emails, in a table."""

from __future__ import annotations

import time

from rich.table import Table
from rich.text import Text

from ..classify.baseline import BaselineClassifier
from ..dataset import Dataset
from ..errors import DatasetError
from ..evaluation import evaluate
from .app import app, console, settings


@app.command()
def demo() -> None:
    """Classify the test-split emails with the baseline and show what it got right."""
    current = settings()
    examples = Dataset.from_settings(current).split("test")
    if not examples:
        raise DatasetError(f"no test examples in {current.examples_path}")
    started = time.monotonic()
    classifier = BaselineClassifier.from_settings(current)
    ready = time.monotonic() - started
    report = evaluate(
        classifier, examples, current.departments, current.classifier.confidence_threshold
    )
    table = Table(title=f"{report.n} held-out emails, classified by {classifier.name}")
    room = max(20, console.width - 45)  # what the other columns leave for the email
    table.add_column("email", no_wrap=True)
    table.add_column("expected", no_wrap=True)
    table.add_column("predicted", no_wrap=True)
    table.add_column("conf.", justify="right", no_wrap=True)
    table.add_column("", justify="center", no_wrap=True)
    for item in report.items:
        table.add_row(
            Text(item.title if len(item.title) <= room else item.title[: room - 1] + "…"),
            item.expected,
            item.predicted or "unknown",
            f"{item.confidence:.2f}",
            "[green]✓[/green]" if item.correct else "[red]✗[/red]",
        )
    console.print(table)
    trained = "trained" if classifier.fit_seconds is not None else "loaded"
    console.print(
        f"accuracy {report.accuracy:.1%} ({sum(i.correct for i in report.items)}/{report.n}), "
        f"macro-F1 {report.macro_f1:.3f}; baseline {trained} in {ready:.1f} s, "
        f"{report.seconds / report.n * 1000:.1f} ms per email",
        highlight=False,
    )
