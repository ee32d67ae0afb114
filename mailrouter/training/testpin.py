"""The pinned test set: the promotion gate's yardstick, frozen by hash.

A candidate model is judged on the test split. If anything could quietly change that split (a
relabelled example, a removed hard case, a planted easy one) it could steer which model goes into
service, so the test set's membership and labels are recorded in ``models/test-pin.json`` (mode
0600): for each example id, a hash of what the model reads and the answer it must give (text,
subject, sender domain, label), and one digest of the whole. Customer text is never written there,
only hashes and labels.

Before each training run the test split is checked against the pin: a pinned example that is gone
or changed stops the run with an error naming it; test examples added since (an import) are
reported and left out of the gate's evaluation until a maintainer adds them on purpose with
``mailrouter dataset pin-test``. The first run writes the pin.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Settings
from ..dataset import Example, atomic_write_text, now_iso
from ..errors import DatasetError

PIN_NAME = "test-pin.json"
PIN_VERSION = 1
REPIN = "mailrouter dataset pin-test --force"
#: How many examples an error names before it counts the rest.
NAMED = 5


def pin_path(settings: Settings) -> Path:
    return settings.models_dir / PIN_NAME


def example_hash(example: Example) -> str:
    """What a test example asks and answers: text, subject, sender domain and label."""
    row = [example.text, example.subject, example.sender_domain, example.label]
    return hashlib.sha256(json.dumps(row, ensure_ascii=False).encode()).hexdigest()


@dataclass(frozen=True)
class PinEntry:
    hash: str
    label: str  # kept in clear so an error can say "label changed from A to B"


@dataclass(frozen=True)
class TestPin:
    """Pinned test examples by id, and when they were pinned."""

    __test__ = False  # not a pytest class, despite its name

    entries: Mapping[str, PinEntry]
    created: str = field(default_factory=now_iso)

    @property
    def digest(self) -> str:
        """One hash of the whole pinned set: a run records which yardstick judged it."""
        lines = "".join(f"{i} {self.entries[i].hash}\n" for i in sorted(self.entries))
        return hashlib.sha256(lines.encode()).hexdigest()

    def to_json(self) -> str:
        entries = {i: {"hash": e.hash, "label": e.label} for i, e in sorted(self.entries.items())}
        data = {"version": PIN_VERSION, "created": self.created, "digest": self.digest}
        return json.dumps({**data, "examples": entries}, ensure_ascii=False, indent=1) + "\n"


@dataclass(frozen=True)
class PinDiff:
    """How the test split differs from the pin."""

    missing: list[str]  # pinned ids no longer in the test split
    changed: list[tuple[str, str, str]]  # (id, pinned label, label now)
    new: list[str]  # test ids not pinned

    @property
    def tampered(self) -> bool:
        return bool(self.missing or self.changed)


def build_pin(examples: Iterable[Example]) -> TestPin:
    """The pin of the test examples among ``examples``."""
    return TestPin(
        {e.id: PinEntry(example_hash(e), e.label) for e in examples if e.split == "test"}
    )


def compare(pin: TestPin, examples: Iterable[Example]) -> PinDiff:
    """The test split of ``examples`` against ``pin`` (pure)."""
    test = {e.id: e for e in examples if e.split == "test"}
    missing = [i for i in pin.entries if i not in test]
    changed = [
        (i, entry.label, test[i].label)
        for i, entry in pin.entries.items()
        if i in test and example_hash(test[i]) != entry.hash
    ]
    new = [i for i in test if i not in pin.entries]
    return PinDiff(missing, changed, new)


def describe(diff: PinDiff) -> str:
    """The examples a tampered diff names, for an error message."""
    parts = [f"{i} is no longer in the test split" for i in diff.missing]
    for i, was, now in diff.changed:
        what = f"its label changed from {was} to {now}" if was != now else "its text changed"
        parts.append(f"{i}: {what}")
    more = f" (and {len(parts) - NAMED} more)" if len(parts) > NAMED else ""
    return "; ".join(parts[:NAMED]) + more


def read_pin(path: Path) -> TestPin | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = {
            str(i): PinEntry(str(e["hash"]), str(e["label"])) for i, e in data["examples"].items()
        }
        pin = TestPin(entries, str(data.get("created", "")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DatasetError(
            f"{path}: unreadable test pin ({exc}); restore it, or re-pin with `{REPIN}`"
        ) from exc
    if data.get("digest") != pin.digest:
        raise DatasetError(
            f"{path}: the test pin's digest does not match its entries (edited by hand?); "
            f"restore it, or re-pin with `{REPIN}`"
        )
    return pin


def write_pin(path: Path, pin: TestPin) -> None:
    """Atomic, mode 0600 (the temp file is created so, and the rename keeps it)."""
    atomic_write_text(path, pin.to_json())
    os.chmod(path, 0o600)


@dataclass(frozen=True)
class PinStatus:
    """What a run checked: the pin it holds to, whether it just wrote it, and unpinned ids."""

    pin: TestPin
    created: bool
    new: list[str]


def check_pin(path: Path, examples: list[Example]) -> PinStatus:
    """Hold ``examples``' test split to the pin at ``path``; write the pin when there is none.

    Raises :class:`DatasetError` naming the examples when a pinned one is gone or changed.
    """
    pin = read_pin(path)
    if pin is None:
        pin = build_pin(examples)
        write_pin(path, pin)
        return PinStatus(pin, True, [])
    diff = compare(pin, examples)
    if diff.tampered:
        raise DatasetError(
            f"the pinned test set (the promotion gate's yardstick, {path}, pinned "
            f"{pin.created}) changed: {describe(diff)}. Restore the dataset from a backup, "
            f"or, if the change was made on purpose, re-pin it with `{REPIN}`"
        )
    return PinStatus(pin, False, diff.new)


def repin(path: Path, examples: list[Example], *, force: bool = False) -> tuple[TestPin, PinDiff]:
    """Pin the test split as it is now. Adding new test examples is enough reason; dropping or
    changing pinned ones needs ``force`` (it moves the yardstick every earlier run was judged on).
    """
    try:
        old = read_pin(path)
    except DatasetError:
        if not force:
            raise
        old = None  # an unreadable pin is exactly what --force replaces
    diff = compare(old or TestPin({}), examples)
    if diff.tampered and not force:
        raise DatasetError(
            f"the test split no longer matches the pin: {describe(diff)}; "
            f"`{REPIN}` re-pins it as it is now"
        )
    pin = build_pin(examples)
    write_pin(path, pin)
    return pin, diff
