"""Read labelled emails from the formats people already have, as :class:`Example` values.

Formats: the tutorial's JSONL (``{"prompt": "[INST] … \\"<email>\\"[/INST]", "completion": "RH"}``:
the quoted email is kept, the wrapper dropped), our own JSONL (``text``, ``label``, optional
``split``/``subject``/``sender_domain``, or whole dataset lines), CSV with a header (``text,label``
and optional ``subject``, ``split``, ``sender_domain``), and raw mail (a folder of ``.eml`` files,
one ``.eml`` or an mbox) with one label for all. Labels are matched onto the configured departments
(case, accents, aliases): an unknown label stops the import before anything is written.
"""

from __future__ import annotations

import csv
import json
import mailbox
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, TypeGuard, get_args

from .config import Department
from .dataset import SPLITS, Example, normalise_split
from .errors import DatasetError
from .mail.parse import parse_email
from .prediction import map_label

Format = Literal["tutorial", "jsonl", "csv", "eml", "mbox"]
FORMATS: tuple[Format, ...] = get_args(Format)


def is_format(value: str) -> TypeGuard[Format]:
    """Whether ``value`` names a format :func:`read_examples` reads (``--format``)."""
    return value in FORMATS


_WRAPPER = re.compile(r"^\s*(?:<s>)?\s*\[INST\]\s*(?P<body>.*?)\s*\[/INST\]\s*$", re.DOTALL)


def detect_format(path: Path) -> Format:
    """Guess the format from the path: folder → eml (or tutorial with train/valid/test.jsonl)."""
    if path.is_dir():
        if any((path / f"{s}.jsonl").is_file() for s in SPLITS):
            return "tutorial" if _looks_tutorial(next(_split_files(path))[1]) else "jsonl"
        return "eml"
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix == ".eml":
        return "eml"
    if suffix in (".mbox", ".mbx") or path.name == "mbox":
        return "mbox"
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "tutorial" if _looks_tutorial(path) else "jsonl"
    raise DatasetError(f"{path}: cannot tell its format; pass --format {'|'.join(FORMATS)}")


def read_examples(
    path: Path,
    departments: Sequence[Department],
    *,
    fmt: Format | None = None,
    label: str | None = None,
    source: str = "import",
) -> list[Example]:
    """All examples in ``path``; raises :class:`DatasetError` naming the file and line at fault."""
    if not path.exists():
        raise DatasetError(f"{path}: no such file or folder")
    fmt = fmt or detect_format(path)
    if fmt in ("eml", "mbox"):
        if not label:
            raise DatasetError(f"{path}: raw mail carries no label; pass --label DEPARTMENT")
        return list(_read_mail(path, fmt, check_label(label, departments, str(path)), source))
    if label:
        raise DatasetError(f"--label applies to eml and mbox imports; {fmt} rows carry their own")
    files = list(_split_files(path)) if path.is_dir() else [(None, path)]
    out: list[Example] = []
    for split, file in files:
        reader = {"tutorial": _read_tutorial, "jsonl": _read_jsonl, "csv": _read_csv}[fmt]
        for where, example in reader(file, split, source):
            checked = check_label(example.label, departments, where)
            out.append(replace(example, label=checked))
    return out


def extract_tutorial_email(prompt: str) -> str:
    """The email inside a tutorial prompt: ``[INST] Veuillez classifier … : "<email>"[/INST]``."""
    match = _WRAPPER.match(prompt)
    body = match.group("body") if match else prompt
    first, last = body.find('"'), body.rfind('"')
    if 0 <= first < last:
        return body[first + 1 : last].strip()
    return body.strip()


# --- readers -------------------------------------------------------------------------------


def _read_tutorial(path: Path, split: str | None, source: str) -> Iterator[tuple[str, Example]]:
    split = split or _split_from_name(path)
    for where, row in _json_rows(path):
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("completion"), str):
            raise DatasetError(f"{where}: expected {{'prompt': …, 'completion': …}}")
        text = extract_tutorial_email(row["prompt"])
        with _located(where):
            example = Example.new(text, row["completion"].strip(), split=split, source=source)
        yield where, example


def _read_jsonl(path: Path, split: str | None, source: str) -> Iterator[tuple[str, Example]]:
    split = split or _split_from_name(path)
    for where, row in _json_rows(path):
        if "prompt" in row:
            raise DatasetError(f"{where}: this is the tutorial's format; pass --format tutorial")
        with _located(where):
            example = Example.from_dict({"source": source, **row})
        if example.split is None and split:
            example = replace(example, split=split)
        yield where, example


def _read_csv(path: Path, split: str | None, source: str) -> Iterator[tuple[str, Example]]:
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            columns = {c.strip().lower(): c for c in reader.fieldnames or []}
            if not {"text", "label"} <= set(columns):
                raise DatasetError(
                    f"{path}: the first line must name the columns, with at least text and label "
                    f"(found {', '.join(reader.fieldnames or []) or 'nothing'})"
                )
            for number, row in enumerate(reader, 2):
                where = f"{path}:{number}"

                def col(name: str, row: dict[str, str | None] = row) -> str:
                    key = columns.get(name)
                    return (row.get(key) or "") if key else ""

                with _located(where):
                    example = Example.new(
                        col("text"),
                        col("label").strip(),
                        subject=col("subject"),
                        sender_domain=col("sender_domain"),
                        split=col("split") or split,
                        source=source,
                    )
                yield where, example
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path}: cannot read: {exc}") from exc


def _read_mail(path: Path, fmt: str, label: str, source: str) -> Iterator[Example]:
    for where, raw in _raw_messages(path, fmt):
        email = parse_email(raw)
        text = email.body.strip() or email.full_text.strip()
        if not text and not email.subject.strip():
            raise DatasetError(f"{where}: no text could be read from this message")
        yield Example.new(
            text,
            label,
            subject=email.subject,
            sender_domain=email.sender_domain,
            message_id=email.message_id or None,
            source=source,
        )


def _raw_messages(path: Path, fmt: str) -> Iterator[tuple[str, bytes]]:
    try:
        if fmt == "eml":
            files = sorted(path.glob("*.eml")) if path.is_dir() else [path]
            if not files:
                raise DatasetError(f"{path}: no .eml file in this folder")
            for file in files:
                yield str(file), file.read_bytes()
        else:
            box = mailbox.mbox(path, create=False)
            try:
                for key in box.iterkeys():
                    yield f"{path}#{key}", box.get_bytes(key)
            finally:
                box.close()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read: {exc}") from exc


# --- helpers -------------------------------------------------------------------------------


def _json_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read: {exc}") from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{where}: not JSON: {exc}") from exc
        if not isinstance(row, dict):
            raise DatasetError(f"{where}: expected a JSON object")
        yield where, row


@contextmanager
def _located(where: str) -> Iterator[None]:
    """A row's ``DatasetError`` says where the row is, so the import names the line to fix."""
    try:
        yield
    except DatasetError as exc:
        raise DatasetError(f"{where}: {exc}") from exc


def check_label(label: str, departments: Sequence[Department], where: str) -> str:
    name = map_label(label, departments)
    if name is None:
        known = ", ".join(d.name for d in departments)
        raise DatasetError(f"{where}: label {label!r} is not a configured department ({known})")
    return name


def _split_files(folder: Path) -> Iterator[tuple[str, Path]]:
    for split in SPLITS:
        file = folder / f"{split}.jsonl"
        if file.is_file():
            yield split, file


def _split_from_name(path: Path) -> str | None:
    """``train.jsonl``/``valid.jsonl``/``test.jsonl`` name their split, as mlx-lm folders do."""
    try:
        return normalise_split(path.stem)
    except DatasetError:
        return None


def _looks_tutorial(path: Path) -> bool:
    for _, row in _json_rows(path):
        return "prompt" in row and "completion" in row
    return False
