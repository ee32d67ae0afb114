"""Command group: ``dataset stats|import|export|add|relabel|pin-test``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..dataset import SPLITS, Dataset, Example
from ..errors import DatasetError
from ..files import NO_DATASET_FIX
from ..importers import FORMATS, check_label, is_format, read_examples
from ..prompt import PromptOptions
from ..training.testpin import pin_path, repin
from .app import console, err_console, settings

group = typer.Typer(help="Inspect and grow the labelled examples.", no_args_is_help=True)


@group.command("stats")
def stats(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Label × split table, with warnings about what would make training fail."""
    current = settings()
    dataset = Dataset.from_settings(current)
    counts = dataset.stats()
    warnings = counts.warnings(current.departments, current.training.batch_size)
    if not dataset.path.exists():
        warnings.insert(0, f"{dataset.path} does not exist yet: {NO_DATASET_FIX}")
    if as_json:
        data = {
            "path": str(dataset.path),
            "counts": counts.counts,
            "total": counts.total,
            "content_hash": dataset.content_hash(),
            "warnings": warnings,
        }
        typer.echo(json.dumps(data, ensure_ascii=False))
        return
    labels = [*current.labels, *(x for x in counts.labels if x not in current.labels)]
    table = Table(title=f"{dataset.path} ({counts.total} examples)")
    table.add_column("label")
    for split in SPLITS:
        table.add_column(split, justify="right")
    table.add_column("total", justify="right")
    for label in labels:
        row = counts.counts.get(label, {})
        table.add_row(label, *(str(row.get(s, 0)) for s in SPLITS), str(counts.label_total(label)))
    table.add_row(
        "total", *(str(counts.split_total(s)) for s in SPLITS), str(counts.total), style="bold"
    )
    console.print(table)
    for warning in warnings:
        err_console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)


@group.command("import")
def import_(
    source: Annotated[Path, typer.Argument(help="A file or folder to import.")],
    fmt: Annotated[
        str | None,
        typer.Option("--format", "-f", help=f"{'|'.join(FORMATS)} (default: from the name)."),
    ] = None,
    label: Annotated[
        str | None, typer.Option("--label", "-l", help="Department of every email (eml, mbox).")
    ] = None,
) -> None:
    """Add labelled emails; duplicates are merged and new ones get a lasting split."""
    if fmt is not None and not is_format(fmt):
        raise DatasetError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    current = settings()
    examples = read_examples(source, current.departments, fmt=fmt, label=label)
    result = Dataset.from_settings(current).add(examples)
    splits = ", ".join(f"{s} {result.splits[s]}" for s in SPLITS if result.splits[s])
    console.print(
        f"read {len(examples)}: added {len(result.added)} ({splits or 'none'}), "
        f"relabelled {len(result.relabelled)}, "
        f"duplicates {len(result.unchanged) + len(result.updated)}",
        highlight=False,
    )
    if result.conflicts:
        err_console.print(
            f"[yellow]warning:[/yellow] {len(result.conflicts)} duplicate(s) carried another label "
            f"and were not changed (ids {', '.join(result.conflicts[:5])}…); "
            "use `mailrouter dataset relabel ID LABEL` to relabel one on purpose",
            highlight=False,
        )


@group.command("export")
def export(
    out_dir: Annotated[Path, typer.Argument(help="Folder for train/valid/test.jsonl.")],
) -> None:
    """Write an mlx-lm data folder (completions format, bare prompts)."""
    current = settings()
    result = Dataset.from_settings(current).export(
        out_dir, current.departments, PromptOptions.from_settings(current)
    )
    written = ", ".join(f"{s} {n}" for s, n in result.counts.items())
    console.print(f"wrote {out_dir}: {written}", highlight=False)
    for label, n in result.skipped.items():
        err_console.print(
            f"[yellow]warning:[/yellow] left out {n} example(s) labelled {label!r}: "
            "not a configured department",
            highlight=False,
        )


@group.command("add")
def add(
    email: Annotated[str, typer.Argument(help="An .eml file, or the email text itself.")],
    label: Annotated[str, typer.Option("--label", "-l", help="Its department.")],
    subject: Annotated[str, typer.Option(help="Subject, when EMAIL is text.")] = "",
) -> None:
    """Add (or relabel) one email by hand."""
    current = settings()
    path = Path(email)
    if path.is_file():
        examples = read_examples(path, current.departments, fmt="eml", label=label, source="manual")
    else:
        name = check_label(label, current.departments, "--label")
        examples = [Example.new(email, name, subject=subject, source="manual")]
    result = Dataset.from_settings(current).add(examples)
    for example in examples:
        stored = Dataset.from_settings(current).get(example.id)
        state = (
            "added"
            if example.id in result.added
            else "relabelled"
            if example.id in result.relabelled
            else "already there"
        )
        split = stored.split if stored else "?"
        console.print(f"{state}: {example.id} {example.label} ({split})", highlight=False)
        if stored is not None and example.id in result.conflicts:
            err_console.print(
                f"[yellow]warning:[/yellow] {stored.id} is labelled {stored.label} and was not "
                f"changed: `mailrouter dataset relabel {stored.id} {example.label}`"
                + (" --force (a test or starter example)" if stored.protected else ""),
                highlight=False,
            )


@group.command("relabel")
def relabel(
    example_id: Annotated[str, typer.Argument(help="The example's id (see the dataset file).")],
    label: Annotated[str, typer.Argument(help="Its department.")],
    force: Annotated[
        bool,
        typer.Option("--force", help="Allowed on a test or starter example (moves the yardstick)."),
    ] = False,
) -> None:
    """Relabel one example on purpose; test and starter examples need --force."""
    current = settings()
    name = check_label(label, current.departments, "LABEL")
    stored = Dataset.from_settings(current).relabel(example_id, name, force=force)
    console.print(f"{stored.id}: {stored.label} ({stored.split})", highlight=False)
    if stored.split == "test":
        err_console.print(
            "the pinned test set no longer matches: once it is as you want it, "
            "`mailrouter dataset pin-test --force` makes it the gate's yardstick again",
            highlight=False,
        )


@group.command("pin-test")
def pin_test(
    force: Annotated[
        bool,
        typer.Option("--force", help="Re-pin even if pinned examples changed or are gone."),
    ] = False,
) -> None:
    """Pin the test split (the promotion gate's yardstick) as it is now.

    Adding test examples to the pin needs only this command; accepting that pinned ones changed
    or disappeared needs --force.
    """
    current = settings()
    path = pin_path(current)
    pin, diff = repin(path, Dataset.from_settings(current).load(), force=force)
    console.print(
        f"pinned {len(pin.entries)} test example(s) in {path} (digest {pin.digest[:12]}): "
        f"{len(diff.new)} added, {len(diff.changed)} changed, {len(diff.missing)} removed",
        highlight=False,
    )
