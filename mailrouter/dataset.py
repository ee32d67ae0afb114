"""The canonical dataset: ``data/examples.jsonl``, one labelled email a line.

Four promises hold whatever writes to it (the CLI, the service recording corrections, an import):

- **A split is assigned once and never changes.** The test split stays unseen by training, so an
  evaluation today is comparable with one next month. New examples are placed per label so each
  label's splits stay near the target proportions (80/10/10) and every split holds every label as
  soon as that label has three examples; a split given at import is kept. Corrections and
  confirmations are placed in train or valid only: the test split is the promotion gate's
  yardstick, and whoever can send a correction must not be able to grow or steer it.
- **Duplicates are merged** by :func:`example_id` (normalised subject + text). A newer manual
  label of the same email wins its label; an import never overrides one.
- **No correction relabels a protected example** (test split or starter data), and a correction
  that contradicts any existing example is *held* in ``examples.held.jsonl`` until someone reviews
  it (``mailrouter corrections review``). The starter data is public and examples are found by
  their text, so without this anyone who can forge a correction could relabel the gate's own test
  set. A later correction of the same mail supersedes the earlier one; the two are linked by
  ``mail_key``, a hash of the original mail as our server received it, never by the
  sender-chosen ``Message-ID`` (kept in the file for information only).
- **Writes are atomic and serialised**: temp file (mode 0600) + fsync + rename, under one lock file
  next to the dataset, so a reader never sees half a file and two writers never lose each other's
  work.
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
from typing import Any

from filelock import FileLock, Timeout

from .config import Department, Settings
from .errors import DatasetError
from .files import make_dirs
from .prediction import ClassifyInput
from .prompt import PromptOptions

SPLITS = ("train", "valid", "test")
DEFAULT_RATIOS = (0.8, 0.1, 0.1)
SOURCES = ("seed", "import", "correction", "confirmation", "manual")
#: Sources that state what a person decided: a newer one of these wins a duplicate's label.
AUTHORITATIVE = frozenset({"correction", "confirmation", "manual"})
#: What staff say by mail: never placed in, and never changing, the test split or starter data.
CORRECTION_SOURCES = frozenset({"correction", "confirmation"})
#: The splits a correction may be placed in.
LEARNED_SPLITS = ("train", "valid")
_SPLIT_ALIASES = {"validation": "valid", "val": "valid", "dev": "valid", "eval": "test"}
LOCK_TIMEOUT = 30.0
_OPTIONAL = ("sender_domain", "message_id", "mail_key", "corrected_from", "by")


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
    """One labelled email. ``split`` is ``None`` only before :meth:`Dataset.add` assigns it.

    ``message_id`` is information only (the sender chooses it); ``mail_key`` links a correction
    to the mail it corrected, so a later correction of the same mail replaces it.
    """

    id: str
    text: str
    label: str
    split: str | None
    source: str
    created: str
    subject: str = ""
    sender_domain: str = ""
    message_id: str | None = None
    mail_key: str | None = None
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
        mail_key: str | None = None,
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
            mail_key=mail_key or None,
            corrected_from=corrected_from or None,
            by=by or None,
        )

    @property
    def protected(self) -> bool:
        """A test or starter example: only a maintainer changes it, on purpose (``--force``)."""
        return self.split == "test" or self.source == "seed"

    @property
    def kind(self) -> str:
        """How a person would call it in a message: ``test``, ``starter`` or its split."""
        if self.split == "test":
            return "test"
        return "starter" if self.source == "seed" else str(self.split)

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
            mail_key=data.get("mail_key") or None,
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


def choose_split(
    counts: dict[str, int],
    ratios: Sequence[float] = DEFAULT_RATIOS,
    allowed: Sequence[str] = SPLITS,
) -> str:
    """The split for one more example of a label whose examples are spread as ``counts``.

    First every split gets one example (train, then valid, then test), so a label with three
    examples is in every split; after that the split furthest below its target share wins (ties go
    to the earlier split). The result depends only on ``counts``: re-running an import assigns
    the same splits, and nothing already placed is ever moved. ``allowed`` restricts the choice
    (corrections: train and valid) with the same rule, the ratios rescaled to the splits kept.
    """
    shares = [(s, r) for s, r in zip(SPLITS, ratios, strict=True) if s in allowed]
    for split, _ in shares:
        if counts.get(split, 0) == 0:
            return split
    # The full set's ratios already sum to 1; rescaling them too would only add float noise.
    weight = 1.0 if len(shares) == len(SPLITS) else sum(r for _, r in shares)
    total = sum(counts.get(s, 0) for s, _ in shares) + 1
    deficits = [r / weight * total - counts.get(s, 0) for s, r in shares]
    return shares[max(range(len(shares)), key=lambda i: (deficits[i], -i))][0]


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
class CorrectionResult:
    """What :meth:`Dataset.upsert_correction` did; when ``held``, ``example`` waits for review
    under its own id (the one ``mailrouter corrections review accept ID`` takes)."""

    example: Example
    held: bool
    reason: str


@dataclass(frozen=True)
class Held:
    """A held correction and the example it contradicts, as that example is now."""

    example: Example
    target: Example | None

    @property
    def target_id(self) -> str:
        return example_id(self.example.text, self.example.subject)


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
        examples = read_examples(self.path)
        for number, example in enumerate(examples, 1):
            if example.split is None:
                raise DatasetError(f"{self.path}: example {number} ({example.id}) has no split")
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
        mail_key: str,
        corrected_from: str | None = None,
        by: str | None = None,
        source: str = "correction",
        created: str | None = None,
    ) -> CorrectionResult:
        """Record what staff said about a mail; see :func:`apply_correction` for the rules.

        ``mail_key`` is the hash of the original mail's raw bytes as received (our server's own
        headers make it unique per delivery): a later correction with the same key replaces this
        one. Never pass a sender-chosen value such as its ``Message-ID``.
        """
        if source not in CORRECTION_SOURCES:
            raise DatasetError(
                f"a correction's source is one of {sorted(CORRECTION_SOURCES)}, not {source!r}"
            )
        if not mail_key:
            raise DatasetError("a correction needs the mail_key of the mail it corrects")
        example = Example.new(
            text,
            label,
            subject=subject,
            sender_domain=sender_domain,
            source=source,
            created=created,
            mail_key=mail_key,
            corrected_from=corrected_from,
            by=by,
        )
        with self._locked():
            current, held = self.load(), self._load_held()
            before, held_before = list(current), list(held)
            result = apply_correction(current, held, example, self.ratios)
            if current != before:
                self._write(current)
            if held != held_before:
                self._write_held(held)
        return result

    # review of held corrections

    @property
    def held_path(self) -> Path:
        """``examples.held.jsonl`` beside the dataset (same lock, same atomic writes)."""
        return self.path.with_name(f"{self.path.stem}.held{self.path.suffix or '.jsonl'}")

    def held(self) -> list[Held]:
        """The corrections waiting for review, oldest first, each with what it contradicts."""
        current = {e.id: e for e in self.load()}
        entries = sorted(self._load_held(), key=lambda h: h.created)
        return [Held(h, current.get(example_id(h.text, h.subject))) for h in entries]

    def accept_held(self, held_id_: str) -> Example:
        """Apply a held correction: relabel the example it contradicts (or add it, if gone).

        Refused for a test or starter example: those are the gate's yardstick and the public
        starter data, and change only by a maintainer's ``dataset relabel ID LABEL --force``.
        """
        with self._locked():
            current, held = self.load(), self._load_held()
            entry = _held_entry(held, held_id_)
            target_id = example_id(entry.text, entry.subject)
            target = next((e for e in current if e.id == target_id), None)
            if target is not None and target.protected:
                raise DatasetError(
                    f"example {target.id} is a {target.kind} example (labelled {target.label}): "
                    "test and starter examples can only be changed on purpose by a maintainer, "
                    f"with `mailrouter dataset relabel {target.id} {entry.label} --force`; "
                    f"reject this correction with `mailrouter corrections review reject {entry.id}`"
                )
            current[:] = [e for e in current if e.mail_key != entry.mail_key or e is target]
            if target is None:
                counts = Counter(e.split or "" for e in current if e.label == entry.label)
                split = choose_split(counts, self.ratios, LEARNED_SPLITS)
                stored = replace(entry, id=target_id, split=split)
                current.append(stored)
            else:
                stored = _relabelled(target, entry)
                current[current.index(target)] = stored
            held.remove(entry)
            self._write(current)
            self._write_held(held)
        return stored

    def reject_held(self, held_id_: str) -> Example:
        """Drop a held correction; the dataset stays as it is."""
        with self._locked():
            held = self._load_held()
            entry = _held_entry(held, held_id_)
            held.remove(entry)
            self._write_held(held)
        return entry

    def relabel(self, example_id_: str, label: str, *, force: bool = False) -> Example:
        """A maintainer's relabel of one example; a test or starter one needs ``force``."""
        with self._locked():
            current = self.load()
            found = next((e for e in current if e.id == example_id_), None)
            if found is None:
                raise DatasetError(f"no example {example_id_} in {self.path}")
            if found.protected and not force:
                raise DatasetError(
                    f"example {found.id} is a {found.kind} example: relabelling it changes the "
                    f"promotion gate's yardstick; add --force if that is what you mean"
                )
            if found.label == label:
                return found
            stored = replace(
                found,
                label=label,
                source="seed" if found.source == "seed" else "manual",
                created=now_iso(),
                corrected_from=found.label,
                by=None,
            )
            current[current.index(found)] = stored
            self._write(current)
        return stored

    def remove(self, example_id_: str) -> bool:
        """Delete one example; ``False`` when there is none with that id."""
        with self._locked():
            current = self.load()
            kept = [e for e in current if e.id != example_id_]
            if len(kept) == len(current):
                return False
            self._write(kept)
        return True

    def remove_correction(self, example_id_: str) -> bool:
        """Undo what a correction recorded: its held entry, or the example it created.

        Only an example whose source is a correction or confirmation and that is not protected
        is removed: a correction that merely agreed with a starter, test or imported example
        points at that example, and reverting the correction must not delete it.
        """
        with self._locked():
            held = self._load_held()
            if any(h.id == example_id_ for h in held):
                self._write_held([h for h in held if h.id != example_id_])
                return True
            current = self.load()
            kept = [
                e
                for e in current
                if e.id != example_id_ or e.protected or e.source not in CORRECTION_SOURCES
            ]
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
        make_dirs(self.path.parent)
        try:
            with FileLock(self.lock_path, timeout=LOCK_TIMEOUT, mode=0o600):
                yield
        except Timeout as exc:
            raise DatasetError(
                f"{self.path} is locked by another mailrouter process ({self.lock_path}); "
                "try again when it has finished"
            ) from exc

    def _write(self, examples: Sequence[Example]) -> None:
        atomic_write_text(self.path, "".join(e.to_json() + "\n" for e in examples))

    def _load_held(self) -> list[Example]:
        return read_examples(self.held_path)

    def _write_held(self, held: Sequence[Example]) -> None:
        atomic_write_text(self.held_path, "".join(e.to_json() + "\n" for e in held))


def read_examples(path: Path) -> list[Example]:
    """The examples of a JSONL file, in order; ``[]`` when it does not exist. An unreadable line
    is an error naming the file and the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read: {exc}") from exc
    examples = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            examples.append(Example.from_json(line))
        except DatasetError as exc:
            raise DatasetError(f"{path}:{number}: {exc}") from exc
    return examples


def merge(
    current: list[Example], incoming: Iterable[Example], ratios: Sequence[float]
) -> AddResult:
    """Merge ``incoming`` into ``current`` in place (pure apart from mutating the list).

    New examples keep a given split or get :func:`choose_split` (train or valid for a correction
    or confirmation); duplicates keep their split whatever the incoming one says. A newer
    authoritative label wins a duplicate's, except on a protected (test or starter) example: that
    is a conflict, to be settled with ``mailrouter dataset relabel ID LABEL --force``.
    """
    result = AddResult()
    counts: dict[str, Counter[str]] = {}
    for example in current:
        counts.setdefault(example.label, Counter())[example.split or ""] += 1
    index = {e.id: i for i, e in enumerate(current)}

    for example in incoming:
        found = index.get(example.id)
        if found is None:
            allowed = LEARNED_SPLITS if example.source in CORRECTION_SOURCES else SPLITS
            label_counts = counts.setdefault(example.label, Counter())
            split = example.split or choose_split(label_counts, ratios, allowed)
            index[example.id] = len(current)
            current.append(replace(example, split=split))
            label_counts[split] += 1
            result.added.append(example.id)
            result.splits[split] += 1
            continue

        old = current[found]
        wins = example.source in AUTHORITATIVE and not _older(example, old) and not old.protected
        new = _relabelled(old, example) if wins else old
        if new == old:
            (result.conflicts if example.label != old.label else result.unchanged).append(old.id)
            continue
        counts[old.label][old.split or ""] -= 1
        counts.setdefault(new.label, Counter())[new.split or ""] += 1
        current[found] = new
        (result.relabelled if new.label != old.label else result.updated).append(old.id)
    return result


def _relabelled(old: Example, word: Example) -> Example:
    """``old`` with the label, source, date and author of a person's newer ``word`` on it."""
    return replace(
        old,
        label=word.label,
        source=word.source,
        created=word.created,
        corrected_from=word.corrected_from or (old.label if word.label != old.label else None),
        by=word.by,
    )


def held_id(mail_key: str) -> str:
    """The review id of a held correction: one per mail, so a later word on it replaces it."""
    return hashlib.sha256(b"held\0" + mail_key.encode()).hexdigest()[:16]


def apply_correction(
    current: list[Example], held: list[Example], correction: Example, ratios: Sequence[float]
) -> CorrectionResult:
    """Apply one correction to the examples and the held list, in place (pure otherwise).

    - An older word on the same mail (``mail_key``) than one already recorded changes nothing.
    - A later word on the same mail replaces the earlier one, held or applied (its id follows
      the text, its split is kept).
    - Text that another example already has with another label (whatever its source) is held
      for review, never written over: the starter data is public and a forged correction of a
      test text would otherwise move the gate's own yardstick.
    - Text that another example has with the same label: who and when are updated, unless that
      example is protected (test or starter), which nothing but a maintainer changes.
    - Otherwise a new example, in train or valid (never test).
    """
    key = correction.mail_key
    prior = next((e for e in current if key and e.mail_key == key and not e.protected), None)
    waiting = next((h for h in held if key and h.mail_key == key), None)
    for earlier in (prior, waiting):
        if earlier is not None and _older(correction, earlier):
            why = "a newer correction of this mail is already recorded: this one changes nothing"
            return CorrectionResult(earlier, earlier is waiting, why)
    held[:] = [h for h in held if h is not waiting]
    existing = next((e for e in current if e.id == correction.id), None)
    if existing is not None and existing is not prior:
        if existing.label != correction.label:
            entry = replace(correction, id=held_id(key or correction.id), split=None)
            held.append(entry)
            why = f"held for review: {existing.kind} example {existing.id} is {existing.label}"
            return CorrectionResult(entry, True, why)
        current[:] = [e for e in current if e is not prior]
        return _agree(current, existing, correction)
    if prior is not None:
        stored = replace(correction, split=prior.split)
        current[current.index(prior)] = stored
        why = f"replaces this mail's earlier correction ({prior.label} -> {stored.label})"
        return CorrectionResult(stored, False, f"{why} in {stored.split}")
    counts = Counter(e.split or "" for e in current if e.label == correction.label)
    stored = replace(correction, split=choose_split(counts, ratios, LEARNED_SPLITS))
    current.append(stored)
    return CorrectionResult(stored, False, f"added to {stored.split}")


def _agree(current: list[Example], existing: Example, correction: Example) -> CorrectionResult:
    """A correction that says what ``existing`` already says: at most who and when change."""
    if existing.protected or _older(correction, existing):
        why = f"agrees with {existing.kind} example {existing.id}: unchanged"
        return CorrectionResult(existing, False, why)
    stored = replace(existing, created=correction.created, by=correction.by)
    current[current.index(existing)] = stored
    return CorrectionResult(stored, False, f"agrees with example {existing.id}: who, when updated")


def _held_entry(held: Sequence[Example], held_id_: str) -> Example:
    found = next((h for h in held if h.id == held_id_), None)
    if found is None:
        raise DatasetError(
            f"no held correction {held_id_!r}: `mailrouter corrections review` lists them"
        )
    return found


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
    make_dirs(out)
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
    """Temp file in the same folder, fsync, rename over ``path``, fsync the folder. The file
    is ``0o600`` (``mkstemp``'s mode): datasets, exports and models hold customer text."""
    make_dirs(path.parent)
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
