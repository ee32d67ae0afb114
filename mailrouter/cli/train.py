"""Command: ``train [--now|--scheduled] [--force] [--iters N]``."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.progress import BarColumn, TaskID, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress

from ..dataset import Dataset
from ..scheduling import next_training
from ..state import open_state
from ..training import registry
from ..training.job import run_job
from ..training.lora import Progress
from ..training.runner import Hooks, run_training
from .app import console, settings


def train(
    now: Annotated[bool, typer.Option("--now", help="Train now, in the foreground.")] = False,
    scheduled: Annotated[
        bool,
        typer.Option(
            "--scheduled",
            help="Run as the nightly job: in a supervised child process, no progress bar.",
        ),
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Train even if no example changed since last time.")
    ] = False,
    iters: Annotated[
        int | None,
        typer.Option("--iters", min=1, help="LoRA iterations (default: from epochs and size)."),
    ] = None,
) -> None:
    """Fine-tune on the dataset, evaluate, and publish to Ollama if the gate allows it.

    Without --now: what the next nightly training would do, and when.
    """
    current = settings()
    if scheduled:
        result = run_job(current, force=force, iters=iters)
        console.print(f"training: {result.decision} — {result.reason}", highlight=False)
        if not result.ok:
            raise typer.Exit(1)
        return
    if not now:
        _plan()
        return
    _train_now(force=force, iters=iters)


def _plan() -> None:
    current = settings()
    with open_state(current) as state:
        last = registry.last_trained_hash(state)
        runs = registry.runs(state, limit=1)
    dataset = Dataset.from_settings(current)
    changed = dataset.content_hash() != last
    upcoming = next_training(current)
    console.print(
        f"next scheduled training: {upcoming:%Y-%m-%d %H:%M} ({current.training.schedule})"
        if upcoming
        else "no scheduled training",
        highlight=False,
    )
    if runs:
        r = runs[0]
        console.print(f"last run #{r.id} ({r.started}): {r.decision} — {r.reason}", highlight=False)
    console.print(
        "the dataset changed since the last training: it will train"
        if changed
        else "no example changed since the last training: it will skip (--force to train anyway)",
        highlight=False,
    )
    console.print("run `mailrouter train --now` to train now", highlight=False)


def _train_now(*, force: bool, iters: int | None) -> None:
    current = settings()
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    )
    with RichProgress(*columns, console=console, transient=False) as bar:
        tasks: dict[str, TaskID] = {}

        def stage(name: str) -> None:
            console.print(f"[bold]·[/bold] {name}", highlight=False)

        def progress(p: Progress) -> None:
            if "train" not in tasks:
                tasks["train"] = bar.add_task("train", total=p.total, info="")
            losses = [
                f"{name} {value:.3f}"
                for name, value in (("loss", p.train_loss), ("val", p.val_loss))
                if value is not None
            ]
            bar.update(tasks["train"], completed=p.iteration, info=" ".join(losses))

        def evaluation(done: int, total: int) -> None:
            if done == 1:  # a new evaluation starts
                tasks["eval"] = bar.add_task("evaluate", total=total, info="")
            bar.update(tasks["eval"], completed=done)

        outcome = run_training(
            current,
            force=force,
            iters=iters,
            hooks=Hooks(stage=stage, progress=progress, evaluation=evaluation),
        )
    style = {"published": "green", "rejected": "yellow", "skipped": "blue"}.get(
        outcome.decision, "red"
    )
    console.print(
        f"[{style}]{outcome.decision}[/{style}] (run #{outcome.run_id}): {outcome.reason}",
        highlight=False,
    )
    if outcome.rule:
        console.print(f"  gate rule  {outcome.rule}", highlight=False)
    metrics = outcome.metrics
    for key in ("candidate", "current", "baseline", "ollama"):
        m = metrics.get(key)
        if m and "accuracy" in m:
            spam = m.get("false_spam")
            console.print(
                f"  {key:<10} accuracy {m['accuracy']:.3f}  macro-F1 {m['macro_f1']:.3f}"
                + (f"  real mail to spam {spam}" if spam is not None else ""),
                highlight=False,
            )
    if outcome.run_dir is not None:
        console.print(f"  files: {outcome.run_dir}", highlight=False)
    if outcome.decision in ("failed", "busy"):
        raise typer.Exit(1)
