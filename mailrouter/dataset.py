"""The canonical dataset: ``data/examples.jsonl``, one labelled email a line.

Three promises hold whatever writes to it (the CLI, the service recording corrections, an import):

- **A split is assigned once and never changes.** The test split stays unseen by training, so an
  evaluation today is comparable with one next month. New examples are placed per label so each
  label's splits stay near the target proportions (80/10/10) and every split holds every label as
  soon as that label has three examples; a split given at import is kept.
- **Duplicates are merged** by :func:`example_id` (normalised subject + text). A newer correction,
  confirmation or manual label of the same email wins its label; an import never overrides one.
- **Writes are atomic and serialised**: temp file + fsync + rename, under a lock file next to the
  dataset, so a reader never sees half a file and two writers never lose each other's work.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock, Timeout

from .classify.base import ClassifyInput
from .errors import DatasetError
from .prompt import PromptOptions

if TYPE_CHECKING:
    from .config import Department, Settings

SPLITS = ("train", "valid", "test")
DEFAULT_RATIOS = (0.8, 0.1, 0.1)
SOURCES = ("seed", "import", "correction", "confirmation", "manual")
#: Sources that state what a person decided: a newer one of these wins a duplicate's label.
AUTHORITATIVE = frozenset({"correction", "confirmation", "manual"})
_SPLIT_ALIASES = {"validation": "valid", "val": "valid", "dev": "valid", "eval": "test"}
LOCK_TIMEOUT = 30.0
_OPTIONAL = ("sender_domain", "message_id", "corrected_from", "by")


def example_id(text: str, subject: str = "") -> str:
    """The id of an email: the same text, whatever its case or spacing, is the same example."""
    normalised = " ".join((subject + "\n" + text).casefold().split())
    return hashlib.sha256(normalised.encode()).hexdigest()[:16]


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def normalise_split(split: str | None) -> str | None:
    """``train``/``valid``/``test`` (``validation`` accepted); ``None`` or empty: to be assigned."""
    if split is None or not split.strip():
        return None
    key = split.strip().lower()
    key = _SPLIT_ALIASES.get(key, key)
    if key not in SPLITS:
        raise DatasetError(f"unknown split {split!r}: expected train, valid or test")
    return key


@dataclass(frozen=True)
class Example:
    """One labelled email. ``split`` is ``None`` only before :meth:`Dataset.add` assigns it."""

    id: str
    text: str
    label: str
    split: str | None
    source: str
    created: str
    subject: str = ""
    sender_domain: str = ""
    message_id: str | None = None
    corrected_from: str | None = None
    by: str | None = None

    @classmethod
    def new(
        cls,
        text: str,
        label: str,
        *,
        subject: str = "",
        sender_domain: str = "",
        split: str | None = None,
        source: str = "manual",
        created: str | None = None,
        message_id: str | None = None,
        corrected_from: str | None = None,
        by: str | None = None,
    ) -> Example:
        """An example with its id computed and ``created`` defaulting to now."""
        if not text.strip() and not subject.strip():
            raise DatasetError("an example needs a text or a subject")
        if source not in SOURCES:
            raise DatasetError(f"unknown source {source!r}: expected one of {', '.join(SOURCES)}")
        return cls(
            id=example_id(text, subject),
            text=text,
            label=label,
            split=normalise_split(split),
            source=source,
            created=created or now_iso(),
            subject=subject,
            sender_domain=sender_domain.strip().lower(),
            message_id=message_id or None,
            corrected_from=corrected_from or None,
            by=by or None,
        )

    def to_json(self) -> str:
        """One JSONL line in a fixed key order; unset optional fields are left out.

        ``subject`` is always written (the starter file has it on every line), so rewriting an
        unchanged file reproduces it byte for byte and its diffs show only real changes.
        """
        data = asdict(self)
        order = ["id", "text", "subject", "label", "split", "source", "created", *_OPTIONAL]
        kept = {k: data[k] for k in order if k not in _OPTIONAL or data[k] not in (None, "")}
        return json.dumps(kept, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Example:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise DatasetError(f"unknown field(s) {', '.join(sorted(unknown))}")
        missing = {"text", "label"} - set(data)
        if missing:
            raise DatasetError(f"missing field(s) {', '.join(sorted(missing))}")
        text = str(data["text"])
        subject = str(data.get("subject") or "")
        return cls(
            id=str(data.get("id") or example_id(text, subject)),
            text=text,
            label=str(data["label"]),
            split=normalise_split(data.get("split")),
            source=str(data.get("source") or "import"),
            created=str(data.get("created") or now_iso()),
            subject=subject,
            sender_domain=str(data.get("sender_domain") or ""),
            message_id=data.get("message_id") or None,
            corrected_from=data.get("corrected_from") or None,
            by=data.get("by") or None,
        )

    @classmethod
    def from_json(cls, line: str) -> Example:
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise DatasetError("expected a JSON object")
        return cls.from_dict(data)

    def to_input(self) -> ClassifyInput:
        """What a classifier reads for this example: the same fields as a live email."""
        return ClassifyInput(text=self.text, subject=self.subject, sender_domain=self.sender_domain)


def example_prompt(
    example: Example,
    departments: Sequence[Department],
    options: PromptOptions = PromptOptions(),  # noqa: B008 - frozen dataclass
) -> str:
    """The training prompt of an example: :func:`mailrouter.prompt.build_prompt`, nothing else."""
    return example.to_input().prompt(departments, options)


# --- split assignment (pure) ------------------------------------------------------------------


def choose_split(counts: dict[str, int], ratios: Sequence[float] = DEFAULT_RATIOS) -> str:
    """The split for one more example of a label whose examples are spread as ``counts``.

    First every split gets one example (train, then valid, then test), so a label with three
    examples is in every split; after that the split furthest below its target share wins (ties go
    to the earlier split). The result depends only on ``counts``: re-running an import assigns
    the same splits, and nothing already placed is ever moved.
    """
    for split in SPLITS:
        if counts.get(split, 0) == 0:
            return split
    total = sum(counts.get(s, 0) for s in SPLITS) + 1
    deficits = [ratio * total - counts.get(s, 0) for s, ratio in zip(SPLITS, ratios, strict=True)]
    return SPLITS[max(range(len(SPLITS)), key=lambda i: (deficits[i], -i))]


# --- results -------------------------------------------------------------------------------


@dataclass
class AddResult:
    """What :meth:`Dataset.add` did, by example id."""

    added: list[str] = field(default_factory=list)
    relabelled: list[str] = field(default_factory=list)  # an authoritative newer label won
    updated: list[str] = field(default_factory=list)  # same label, newer record (who, when)
    unchanged: list[str] = field(default_factory=list)  # a duplicate with nothing new
    conflicts: list[str] = field(default_factory=list)  # a duplicate whose other label lost
    splits: Counter[str] = field(default_factory=Counter)  # splits given to the added ones

    @property
    def ids(self) -> list[str]:
        """Every example the call touched or matched, once each."""
        seen = self.added + self.relabelled + self.updated + self.unchanged + self.conflicts
        return list(dict.fromkeys(seen))

    @property
    def changed(self) -> bool:
        return bool(self.added or self.relabelled or self.updated)


@dataclass(frozen=True)
class Stats:
    """Label × split counts."""

    counts: dict[str, dict[str, int]]  # label -> split -> n

    @property
    def labels(self) -> list[str]:
        return sorted(self.counts)

    @property
    def total(self) -> int:
        return sum(self.split_total(s) for s in SPLITS)

    def split_total(self, split: str) -> int:
        return sum(by_split.get(split, 0) for by_split in self.counts.values())

    def label_total(self, label: str) -> int:
        return sum(self.counts.get(label, {}).values())

    def warnings(self, departments: Sequence[Department], batch_size: int) -> list[str]:
        """What would make training fail or mislead: small splits, missing or unknown labels."""
        out = []
        for split in SPLITS:
            n = self.split_total(split)
            if n < batch_size:
                out.append(
                    f"split {split!r} has {n} example(s), fewer than training.batch_size="
                    f"{batch_size}: mlx-lm needs at least one batch per split"
                )
        names = [d.name for d in departments]
        for name in names:
            if self.counts.get(name, {}).get("train", 0) == 0:
                out.append(
                    f"department {name!r} has no example in train: the model cannot learn it"
                )
        for label in self.labels:
            if label not in names:
                out.append(
                    f"label {label!r} ({self.label_total(label)} examples) is not a configured "
                    "department: its examples are left out of training and evaluation"
                )
        return out


@dataclass(frozen=True)
class ExportResult:
    counts: dict[str, int]  # split -> lines written
    skipped: dict[str, int]  # unconfigured label -> examples left out


# --- the store -----------------------------------------------------------------------------


class Dataset:
    """The examples file and its lock. Cheap to build; every method reads the file afresh."""

    def __init__(self, path: Path | str, *, ratios: Sequence[float] = DEFAULT_RATIOS) -> None:
        if len(ratios) != len(SPLITS) or abs(sum(ratios) - 1.0) > 1e-9 or min(ratios) <= 0:
            raise DatasetError(
                f"split ratios {tuple(ratios)} must be three positive shares summing to 1"
            )
        self.path = Path(path)
        self.ratios = tuple(ratios)
        self.lock_path = self.path.with_name(self.path.name + ".lock")

    @classmethod
    def from_settings(cls, settings: Settings) -> Dataset:
        return cls(settings.examples_path)

    # reading

    def load(self) -> list[Example]:
        """All examples, in file order; ``[]`` when the file does not exist yet."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        except (OSError, UnicodeDecodeError) as exc:
            raise DatasetError(f"{self.path}: cannot read: {exc}") from exc
        examples = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                example = Example.from_json(line)
            except DatasetError as exc:
                raise DatasetError(f"{self.path}:{number}: {exc}") from exc
            if example.split is None:
                raise DatasetError(f"{self.path}:{number}: example {example.id} has no split")
            examples.append(example)
        return examples

    def split(self, name: str | Iterable[str]) -> list[Example]:
        wanted = {name} if isinstance(name, str) else set(name)
        return [e for e in self.load() if e.split in wanted]

    def get(self, example_id_: str) -> Example | None:
        return next((e for e in self.load() if e.id == example_id_), None)

    def stats(self) -> Stats:
        counts: dict[str, dict[str, int]] = {}
        for example in self.load():
            by_split = counts.setdefault(example.label, {})
            by_split[example.split or ""] = by_split.get(example.split or "", 0) + 1
        return Stats(counts)

    def content_hash(self) -> str:
        """A hash of what training sees (ids, texts, labels, splits), not of dates or authors.

        Two datasets with the same hash train the same model, so a nightly run can skip when
        nothing changed and a training record names exactly the data it used.
        """
        digest = hashlib.sha256()
        for example in sorted(self.load(), key=lambda e: e.id):
            row = [
                example.id,
                example.label,
                example.split,
                example.subject,
                example.sender_domain,
                example.text,
            ]
            digest.update(json.dumps(row, ensure_ascii=False).encode())
            digest.update(b"\n")
        return digest.hexdigest()

    # writing

    def add(self, examples: Iterable[Example]) -> AddResult:
        """Merge ``examples`` in; new ones get a split. Atomic, under the lock."""
        incoming = list(examples)
        with self._locked():
            current = self.load()
            result = merge(current, incoming, self.ratios)
            if result.changed:
                self._write(current)
        return result

    def upsert_correction(
        self,
        *,
        text: str,
        label: str,
        subject: str = "",
        sender_domain: str = "",
        message_id: str | None = None,
        corrected_from: str | None = None,
        by: str | None = None,
        source: str = "correction",
        created: str | None = None,
    ) -> Example:
        """Record what staff said about an email; a later word on the same message replaces it.

        The example is found by ``message_id`` when one is given (the same message may have been
        re-parsed into slightly different text), else by its text. It keeps its id and split.
        """
        if source not in AUTHORITATIVE:
            raise DatasetError(
                f"a correction's source is one of {sorted(AUTHORITATIVE)}, not {source!r}"
            )
        example = Example.new(
            text,
            label,
            subject=subject,
            sender_domain=sender_domain,
            source=source,
            created=created,
            message_id=message_id,
            corrected_from=corrected_from,
            by=by,
        )
        with self._locked():
            current = self.load()
            result = merge(current, [example], self.ratios)
            if result.changed:
                self._write(current)
        (stored_id,) = result.ids
        return next(e for e in current if e.id == stored_id)

    def remove(self, example_id_: str) -> bool:
        """Delete one example; ``False`` when there is none with that id."""
        with self._locked():
            current = self.load()
            kept = [e for e in current if e.id != example_id_]
            if len(kept) == len(current):
                return False
            self._write(kept)
        return True

    def export(
        self,
        out_dir: Path | str,
        departments: Sequence[Department],
        options: PromptOptions = PromptOptions(),  # noqa: B008 - frozen dataclass
    ) -> ExportResult:
        """Write ``train/valid/test.jsonl`` for mlx-lm; see :func:`export_examples`."""
        return export_examples(self.load(), out_dir, departments, options)

    # internals

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with FileLock(self.lock_path, timeout=LOCK_TIMEOUT):
                yield
        except Timeout as exc:
            raise DatasetError(
                f"{self.path} is locked by another mailrouter process ({self.lock_path}); "
                "try again when it has finished"
            ) from exc

    def _write(self, examples: Sequence[Example]) -> None:
        atomic_write_text(self.path, "".join(e.to_json() + "\n" for e in examples))


def merge(
    current: list[Example], incoming: Iterable[Example], ratios: Sequence[float]
) -> AddResult:
    """Merge ``incoming`` into ``current`` in place (pure apart from mutating the list).

    New examples keep a given split or get :func:`choose_split`; duplicates keep their split
    whatever the incoming one says.
    """
    result = AddResult()
    counts: dict[str, Counter[str]] = {}
    for example in current:
        counts.setdefault(example.label, Counter())[example.split or ""] += 1
    index = {e.id: i for i, e in enumerate(current)}
    by_message = {e.message_id: i for i, e in enumerate(current) if e.message_id}

    for example in incoming:
        found = None
        if example.message_id and example.source in AUTHORITATIVE:
            found = by_message.get(example.message_id)
        if found is None:
            found = index.get(example.id)
        if found is None:
            split = example.split or choose_split(counts.get(example.label, Counter()), ratios)
            example = replace(example, split=split)
            index[example.id] = len(current)
            if example.message_id:
                by_message[example.message_id] = len(current)
            current.append(example)
            counts.setdefault(example.label, Counter())[split] += 1
            result.added.append(example.id)
            result.splits[split] += 1
            continue

        old = current[found]
        if example.source in AUTHORITATIVE and not _older(example, old):
            new = replace(
                old,
                label=example.label,
                source=example.source,
                created=example.created,
                message_id=example.message_id or old.message_id,
                corrected_from=example.corrected_from
                or (old.label if example.label != old.label else None),
                by=example.by,
            )
            if new != old:
                counts[old.label][old.split or ""] -= 1
                counts.setdefault(new.label, Counter())[new.split or ""] += 1
                current[found] = new
                if new.message_id:
                    by_message[new.message_id] = found
                (result.relabelled if new.label != old.label else result.updated).append(old.id)
            else:
                result.unchanged.append(old.id)
        elif example.label != old.label:
            result.conflicts.append(old.id)
        else:
            result.unchanged.append(old.id)
    return result


def _older(a: Example, b: Example) -> bool:
    try:
        return datetime.fromisoformat(a.created) < datetime.fromisoformat(b.created)
    except ValueError:
        return a.created < b.created


# --- export --------------------------------------------------------------------------------


def training_row(
    example: Example,
    departments: Sequence[Department],
    options: PromptOptions = PromptOptions(),  # noqa: B008 - frozen dataclass
) -> dict[str, str]:
    """One mlx-lm ``completions`` row: the bare prompt (mlx-lm applies the chat template)."""
    return {"prompt": example_prompt(example, departments, options), "completion": example.label}


def export_examples(
    examples: Iterable[Example],
    out_dir: Path | str,
    departments: Sequence[Department],
    options: PromptOptions = PromptOptions(),  # noqa: B008 - frozen dataclass
) -> ExportResult:
    """Write an mlx-lm data folder. Examples of unconfigured labels are left out and counted."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = {d.name for d in departments}
    lines: dict[str, list[str]] = {s: [] for s in SPLITS}
    skipped: Counter[str] = Counter()
    for example in examples:
        if example.label not in names:
            skipped[example.label] += 1
            continue
        row = training_row(example, departments, options)
        lines[example.split or "train"].append(json.dumps(row, ensure_ascii=False) + "\n")
    for split, rows in lines.items():
        atomic_write_text(out / f"{split}.jsonl", "".join(rows))
    return ExportResult({s: len(rows) for s, rows in lines.items()}, dict(skipped))


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so readers see the old file or the new one, never a mix."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Temp file in the same folder, fsync, rename over ``path``, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); harmless where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
