"""Command: ``classify`` — the department of emails given on the command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..classify import make_classifier
from ..classify.base import Classifier
from ..classify.ollama import OllamaClassifier
from ..config import Settings
from ..errors import ClassifierError, MailRouterError
from ..mail.parse import parse_email
from ..prediction import ClassifyInput
from .app import BackendOption, check_backend, err_console, settings


def classify(
    files: Annotated[list[str], typer.Argument(help="Email files (.eml); - reads one from stdin.")],
    backend: BackendOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Print the department of each email: file, department, confidence, backend."""
    current = settings()
    classifier = (
        make_classifier(current, check_backend(backend)) if backend else _usable_classifier(current)
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
    if not isinstance(classifier, OllamaClassifier):
        return classifier
    try:
        classifier.start()
        classifier.resolve_model()
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
