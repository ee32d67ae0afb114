"""The dataset store: ids, lasting splits, merges, corrections, locked writes, import and export."""

from __future__ import annotations

import json
import mailbox
import os
import subprocess
import sys
from collections import Counter
from email.message import EmailMessage
from pathlib import Path

import jinja2.sandbox
import pytest
from filelock import FileLock
from hypothesis import given, settings
from hypothesis import strategies as st

from mailrouter import dataset as dataset_module
from mailrouter.chat_template import MISTRAL_V3, ChatTemplate
from mailrouter.config import default_departments
from mailrouter.dataset import (
    LEARNED_SPLITS,
    SPLITS,
    CorrectionResult,
    Dataset,
    Example,
    choose_split,
    example_id,
    example_prompt,
    export_examples,
)
from mailrouter.errors import DatasetError
from mailrouter.importers import detect_format, extract_tutorial_email, read_examples
from mailrouter.prompt import PromptOptions, build_prompt

DEPS = default_departments()
LABELS = [d.name for d in DEPS]
REPO = Path(__file__).resolve().parent.parent


def ex(text: str, label: str = "RH", **kwargs) -> Example:
    return Example.new(text, label, **kwargs)


# --- ids and serialisation -----------------------------------------------------------------


def test_example_id_ignores_case_and_spacing_but_not_subject() -> None:
    assert example_id("Bonjour  le\nmonde") == example_id("bonjour le monde")
    assert example_id("Bonjour", "Objet") != example_id("Bonjour")
    expected = __import__("hashlib").sha256(b"objet bonjour").hexdigest()[:16]
    assert example_id("Bonjour", "Objet") == expected


def test_json_round_trip_omits_none() -> None:
    example = ex("Ma facture", "Finance", subject="Facture", split="test", source="import")
    line = example.to_json()
    data = json.loads(line)
    assert "message_id" not in data and "by" not in data and "corrected_from" not in data
    assert Example.from_json(line) == example
    full = ex("x", message_id="<a@b>", corrected_from="RH", by="boss@example.com", split="train")
    assert Example.from_json(full.to_json()) == full


def test_unknown_field_and_bad_split_are_refused() -> None:
    with pytest.raises(DatasetError, match="unknown field"):
        Example.from_json('{"text": "a", "label": "RH", "colour": "red"}')
    with pytest.raises(DatasetError, match="unknown split"):
        Example.from_json('{"text": "a", "label": "RH", "split": "holdout"}')
    assert Example.from_json('{"text": "a", "label": "RH", "split": "validation"}').split == "valid"


# --- split assignment ------------------------------------------------------------------------


def test_first_three_examples_of_a_label_cover_every_split() -> None:
    assert choose_split({}) == "train"
    assert choose_split({"train": 1}) == "valid"
    assert choose_split({"train": 1, "valid": 1}) == "test"
    assert choose_split({"train": 5}) == "valid"  # given splits elsewhere: fill the gap first


def test_splits_approach_80_10_10() -> None:
    store = Dataset(Path("examples.jsonl"))
    store.add(ex(f"email numero {i}", "Support") for i in range(100))
    counts = store.stats().counts["Support"]
    assert counts == {"train": 80, "valid": 10, "test": 10}


def test_given_split_is_kept() -> None:
    store = Dataset(Path("examples.jsonl"))
    store.add([ex(f"mail {i}", split="test") for i in range(4)])
    assert {e.split for e in store.load()} == {"test"}


batches = st.lists(
    st.lists(
        st.tuples(
            st.integers(0, 30),  # text number: repeats are duplicates
            st.sampled_from(LABELS[:3]),
            st.sampled_from([None, None, None, "train", "valid", "test"]),
            st.sampled_from(["import", "import", "correction", "manual"]),
        ),
        max_size=12,
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=40, deadline=None)
@given(batches=batches)
def test_adding_examples_never_moves_an_existing_one(tmp_path_factory, batches) -> None:
    store = Dataset(tmp_path_factory.mktemp("ds") / "examples.jsonl")
    seen: dict[str, str] = {}
    for number, batch in enumerate(batches):
        store.add(
            ex(
                f"email {n}",
                label,
                split=split,
                source=source,
                created=f"2026-01-01T00:00:{number:02d}+00:00",
            )
            for n, label, split, source in batch
        )
        current = {e.id: e.split for e in store.load()}
        for example_id_, split in seen.items():
            assert current[example_id_] == split
        seen = current


@settings(max_examples=40, deadline=None)
@given(labels=st.lists(st.sampled_from(LABELS), min_size=1, max_size=80), size=st.integers(1, 7))
def test_stratified_without_given_splits(labels, size) -> None:
    counts: dict[str, Counter] = {}
    examples = [ex(f"email {i}", label) for i, label in enumerate(labels)]
    current: list[Example] = []
    for start in range(0, len(examples), size):  # any batching gives the same splits
        dataset_module.merge(current, examples[start : start + size], (0.8, 0.1, 0.1))
    for e in current:
        counts.setdefault(e.label, Counter())[e.split] += 1
    for label, by_split in counts.items():
        n = sum(by_split.values())
        if n >= 3:
            assert all(by_split[s] >= 1 for s in SPLITS), (label, by_split)
        for split, ratio in zip(SPLITS, (0.8, 0.1, 0.1), strict=True):
            assert abs(by_split[split] - ratio * n) < 1.5, (label, by_split)
    reference: list[Example] = []
    dataset_module.merge(reference, examples, (0.8, 0.1, 0.1))
    assert [e.split for e in reference] == [e.split for e in current]


# --- merging and corrections -----------------------------------------------------------------


def test_duplicate_import_merges_and_never_overrides_a_label(tmp_path: Path) -> None:
    store = Dataset(tmp_path / "examples.jsonl")
    first = store.add([ex("Bonjour, ma candidature ?", "RH", source="import")])
    again = store.add([ex("bonjour,  MA candidature ?", "Support", source="import")])
    assert again.conflicts == first.added and not again.added
    assert [e.label for e in store.load()] == ["RH"]


def test_newer_label_wins_and_keeps_split_except_on_protected_examples(tmp_path: Path) -> None:
    store = Dataset(tmp_path / "examples.jsonl")
    old = "2026-01-01T00:00:00+00:00"
    store.add([ex("Facture impayée", "Support", split="valid", source="import", created=old)])
    store.add([ex("Relance", "Support", split="test", source="import", created=old)])
    store.add([ex("Bonjour", "RH", split="train", source="seed", created=old)])
    result = store.add(
        [ex("Facture impayée", "Finance", source="manual", split="train", by="a@example.com")]
    )
    assert result.relabelled
    stored = store.get(example_id("Facture impayée"))
    assert (stored.label, stored.split, stored.by) == ("Finance", "valid", "a@example.com")
    stale = ex("Facture impayée", "RH", source="correction", created="2000-01-01T00:00:00+00:00")
    assert store.add([stale]).conflicts and store.get(stale.id).label == "Finance"
    # A test or starter example is never relabelled by a merge, whatever the source says.
    for text in ("Relance", "Bonjour"):
        result = store.add([ex(text, "Finance", source="correction"), ex(text, "Finance")])
        assert result.conflicts == [example_id(text)] * 2 and not result.relabelled
    assert [e.label for e in store.load()] == ["Finance", "Support", "RH"]


def test_merge_never_matches_by_message_id(tmp_path: Path) -> None:
    """The sender chooses the Message-ID: two texts under one Message-ID are two examples."""
    store = Dataset(tmp_path / "examples.jsonl")
    store.add([ex("Mon colis est arrivé cassé", "Support", message_id="<m1@x>", split="test")])
    result = store.add(
        [ex("Autre chose", "Finance", message_id="<m1@x>", source="correction", by="a@x.fr")]
    )
    assert result.added == [example_id("Autre chose")]
    assert [(e.label, e.split) for e in store.load()] == [("Support", "test"), ("Finance", "train")]


def test_remove(tmp_path: Path) -> None:
    store = Dataset(tmp_path / "examples.jsonl")
    store.add([ex("a"), ex("b")])
    assert store.remove(example_id("a")) is True
    assert store.remove(example_id("a")) is False
    assert [e.text for e in store.load()] == ["b"]


def test_content_hash_follows_training_data_only(tmp_path: Path) -> None:
    store = Dataset(tmp_path / "examples.jsonl")
    assert store.content_hash() == Dataset(tmp_path / "missing.jsonl").content_hash()
    store.add([ex("Devis svp", "Commercial", split="train")])
    before = store.content_hash()
    store.upsert_correction(text="Devis svp", label="Commercial", by="x@example.com", mail_key="k")
    assert store.get(example_id("Devis svp")).by == "x@example.com"
    assert store.content_hash() == before  # who confirmed and when do not retrain
    held = store.upsert_correction(text="Devis svp", label="Finance", mail_key="k2")
    assert held.held and store.content_hash() == before  # a held correction trains nothing
    store.accept_held(held.example.id)
    assert store.content_hash() != before


def test_stats_and_warnings(tmp_path: Path) -> None:
    store = Dataset(tmp_path / "examples.jsonl")
    store.add([ex(f"rh {i}", "RH") for i in range(3)] + [ex("legacy", "Legal")])
    stats = store.stats()
    assert stats.counts["RH"] == {"train": 1, "valid": 1, "test": 1}
    warnings = "\n".join(stats.warnings(DEPS, batch_size=2))
    assert "split 'valid' has 1 example(s)" in warnings
    assert "'Support' has no example in train" in warnings
    assert "'Legal'" in warnings


def test_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "examples.jsonl"
    path.write_text(ex("a", split="train").to_json() + "\n{oops\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"examples.jsonl:2: not JSON"):
        Dataset(path).load()


# --- corrections: nothing a sender says can poison the dataset ------------------------------


def correct(store: Dataset, text: str, label: str, key: str, **kwargs) -> CorrectionResult:
    """A correction as the service records it: ``key`` stands for the hash of the raw mail."""
    return store.upsert_correction(text=text, label=label, mail_key=key, **kwargs)


def test_a_correction_of_a_test_or_starter_text_is_held_and_changes_nothing(
    starter_data: Path,
) -> None:
    """The starter data is public: an attacker forges corrections of its test texts."""
    store = Dataset(starter_data)
    before = starter_data.read_bytes()
    test = store.split("test")
    starters = [e for e in store.split("train") if e.source == "seed"][:5]
    for n, target in enumerate([*test, *starters]):
        other = next(label for label in LABELS if label != target.label)
        result = correct(store, target.text, other, f"forged-{n}", subject=target.subject)
        assert result.held and result.example.label == other
        assert target.id in result.reason and target.label in result.reason
    assert starter_data.read_bytes() == before  # test labels and membership unchanged
    assert len(store.held()) == len(test) + len(starters)
    # A reviewer cannot accept one either: only a maintainer changes them, on purpose.
    held = store.held()[0]
    with pytest.raises(DatasetError, match=r"mailrouter dataset relabel \w+ \w+ --force"):
        store.accept_held(held.example.id)
    assert starter_data.read_bytes() == before
    store.reject_held(held.example.id)
    assert len(store.held()) == len(test) + len(starters) - 1


def test_a_correction_that_agrees_with_a_protected_example_changes_nothing(
    starter_data: Path,
) -> None:
    store = Dataset(starter_data)
    before = starter_data.read_bytes()
    target = store.split("test")[0]
    result = correct(store, target.text, target.label, "k", by="x@example.com")
    assert not result.held and result.example == target and "unchanged" in result.reason
    assert starter_data.read_bytes() == before and store.held() == []
    # Reverting that correction must not delete the starter example it pointed at.
    assert store.remove_correction(target.id) is False
    assert starter_data.read_bytes() == before


corrections = st.lists(
    st.tuples(
        st.integers(0, 40),  # text number: some repeat the seeded texts, some each other
        st.sampled_from(LABELS[:3]),
        st.integers(0, 15),  # mail number: repeats are later words on the same mail
        st.sampled_from(["correction", "confirmation"]),
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=40, deadline=None)
@given(batch=corrections)
def test_corrections_never_enter_or_change_the_test_split(tmp_path_factory, batch) -> None:
    store = Dataset(tmp_path_factory.mktemp("ds") / "examples.jsonl")
    store.add(ex(f"email {n}", LABELS[n % 3], source="import") for n in range(0, 40, 2))
    store.add(ex(f"email {n}", LABELS[n % 3], source="seed") for n in range(1, 12, 2))
    protected = {e.id: e for e in store.load() if e.protected}
    for number, (n, label, mail, source) in enumerate(batch):
        created = f"2026-01-01T00:{number // 60:02d}:{number % 60:02d}+00:00"
        correct(store, f"email {n}", label, f"mail-{mail}", source=source, created=created)
    after = store.load()
    assert {e.id: e for e in after if e.protected} == protected
    learned = [e for e in after if e.source in ("correction", "confirmation")]
    assert all(e.split in ("train", "valid") for e in learned)
    assert len({e.mail_key for e in learned if e.mail_key}) == len(
        [e for e in learned if e.mail_key]
    )  # one example per mail
    assert len({h.example.mail_key for h in store.held()}) == len(store.held())  # one held per mail


def test_corrections_are_stratified_over_train_and_valid() -> None:
    store = Dataset(Path("examples.jsonl"))
    for i in range(90):
        correct(store, f"mail {i}", "Support", f"k{i}")
    assert store.stats().counts["Support"] == {"train": 80, "valid": 10}
    assert choose_split({}, allowed=LEARNED_SPLITS) == "train"
    assert choose_split({"train": 1}, allowed=LEARNED_SPLITS) == "valid"


def test_a_later_correction_of_the_same_mail_supersedes_by_mail_key(tmp_path: Path) -> None:
    store = Dataset(tmp_path / "examples.jsonl")
    first = correct(
        store,
        "Mon colis est arrivé cassé",
        "Finance",
        "mail-1",
        corrected_from="RH",
        by="a@example.com",
        created="2026-01-01T00:00:00+00:00",
    )
    assert not first.held and first.example.split == "train"
    second = correct(
        store,
        "Mon colis est arrivé cassé (re-parsed)",
        "Support",
        "mail-1",
        by="b@example.com",
        created="2026-01-02T00:00:00+00:00",
    )
    (stored,) = store.load()
    assert stored == second.example and stored.split == first.example.split
    assert (stored.label, stored.by, stored.mail_key) == ("Support", "b@example.com", "mail-1")
    # Older news about the same mail changes nothing.
    stale = correct(store, "Mon colis", "RH", "mail-1", created="2025-12-31T00:00:00+00:00")
    assert not stale.held and "newer correction" in stale.reason and store.load() == [stored]
    # Another mail with the same text is another word on an existing example: held.
    other = correct(store, stored.text, "RH", "mail-2")
    assert other.held and store.load() == [stored]


def test_a_later_correction_replaces_a_held_one_of_the_same_mail(tmp_path: Path) -> None:
    store = Dataset(tmp_path / "examples.jsonl")
    store.add([ex("Relance facture", "Finance", split="train", source="import")])
    first = correct(store, "Relance facture", "Support", "mail-1", by="a@example.com")
    second = correct(store, "Relance facture", "RH", "mail-1", by="b@example.com")
    assert first.held and second.held and first.example.id == second.example.id
    (held,) = store.held()
    assert (held.example.label, held.example.by, held.target.label) == (
        "RH",
        "b@example.com",
        "Finance",
    )
    # The same mail then agrees with the example: nothing is held any more.
    agreed = correct(store, "Relance facture", "Finance", "mail-1", by="c@example.com")
    assert not agreed.held and store.held() == []
    assert store.get(example_id("Relance facture")).by == "c@example.com"


def test_held_accept_and_reject(tmp_path: Path) -> None:
    store = Dataset(tmp_path / "examples.jsonl")
    store.add(
        [
            ex("Devis", "Commercial", split="train", source="import"),
            ex("Panne", "Support", split="valid", source="import"),
        ]
    )
    before = store.path.read_bytes()
    devis = correct(store, "Devis", "Finance", "m1", corrected_from="Commercial", by="a@x.fr")
    panne = correct(store, "Panne", "RH", "m2", by="b@x.fr")
    assert devis.held and panne.held and store.path.read_bytes() == before
    assert oct(store.held_path.stat().st_mode & 0o777) == "0o600"
    assert [h.example.id for h in store.held()] == [devis.example.id, panne.example.id]
    accepted = store.accept_held(devis.example.id)
    assert (accepted.id, accepted.label, accepted.split) == (
        example_id("Devis"),
        "Finance",
        "train",
    )
    assert (accepted.source, accepted.by, accepted.corrected_from) == (
        "correction",
        "a@x.fr",
        "Commercial",
    )
    rejected = store.reject_held(panne.example.id)
    assert rejected.label == "RH" and store.get(example_id("Panne")).label == "Support"
    assert store.held() == []
    with pytest.raises(DatasetError, match="no held correction"):
        store.accept_held(devis.example.id)
    assert oct(store.path.stat().st_mode & 0o777) == "0o600"


def test_accepting_a_held_correction_whose_example_is_gone_adds_it_outside_test(
    tmp_path: Path,
) -> None:
    store = Dataset(tmp_path / "examples.jsonl")
    store.add([ex(f"rh {i}", "RH", source="import") for i in range(3)] + [ex("Devis", "RH")])
    held = correct(store, "Devis", "Commercial", "m1")
    assert store.remove(example_id("Devis"))
    assert store.held()[0].target is None
    assert store.accept_held(held.example.id).split == "train"


def test_remove_correction_removes_only_what_a_correction_created(tmp_path: Path) -> None:
    store = Dataset(tmp_path / "examples.jsonl")
    store.add([ex("Import", "RH", split="train", source="import")])
    made = correct(store, "Nouveau", "RH", "m1")
    held = correct(store, "Import", "Support", "m2")
    agreed = correct(store, "Import", "RH", "m3")
    assert store.remove_correction(agreed.example.id) is False  # the imported example stays
    assert store.remove_correction(held.example.id) is True and store.held() == []
    assert store.remove_correction(made.example.id) is True
    assert [e.text for e in store.load()] == ["Import"]


def test_relabel_protected_examples_only_with_force(starter_data: Path) -> None:
    store = Dataset(starter_data)
    target = store.split("test")[0]
    other = next(label for label in LABELS if label != target.label)
    with pytest.raises(DatasetError, match="--force"):
        store.relabel(target.id, other)
    stored = store.relabel(target.id, other, force=True)
    assert (stored.label, stored.split, stored.source, stored.corrected_from) == (
        other,
        "test",
        "seed",
        target.label,
    )
    with pytest.raises(DatasetError, match="no example"):
        store.relabel("0000000000000000", other)


def test_a_correction_needs_a_mail_key_and_a_correction_source(tmp_path: Path) -> None:
    store = Dataset(tmp_path / "examples.jsonl")
    with pytest.raises(DatasetError, match="mail_key"):
        store.upsert_correction(text="x", label="RH", mail_key="")
    for source in ("import", "manual", "seed"):
        with pytest.raises(DatasetError, match="source"):
            store.upsert_correction(text="x", label="RH", mail_key="k", source=source)


def test_old_files_with_message_id_stay_readable(tmp_path: Path) -> None:
    line = (
        '{"id": "x1", "text": "a", "label": "RH", "split": "test", "source": "correction", '
        '"created": "2026-01-01T00:00:00Z", "message_id": "<m@x>"}'
    )
    (tmp_path / "examples.jsonl").write_text(line + "\n", encoding="utf-8")
    (example,) = Dataset(tmp_path / "examples.jsonl").load()
    assert (example.message_id, example.mail_key, example.protected) == ("<m@x>", None, True)
    assert json.loads(example.to_json()) == {**json.loads(line), "subject": ""}


# --- atomic writes and the lock ------------------------------------------------------------


def test_failed_write_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Dataset(tmp_path / "examples.jsonl")
    store.add([ex("kept")])
    before = store.path.read_bytes()

    def crash(*_args):
        raise OSError("disk full")

    monkeypatch.setattr(dataset_module.os, "replace", crash)
    with pytest.raises(OSError):
        store.add([ex("lost")])
    assert store.path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_lock_held_elsewhere_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Dataset(tmp_path / "examples.jsonl")
    monkeypatch.setattr(dataset_module, "LOCK_TIMEOUT", 0.1)
    with FileLock(store.lock_path), pytest.raises(DatasetError, match="locked"):
        store.add([ex("a")])
    assert store.load() == []


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "examples.jsonl"
    script = (
        "import sys\n"
        "from mailrouter.dataset import Dataset, Example\n"
        "store = Dataset(sys.argv[1])\n"
        "for i in range(25):\n"
        "    store.add([Example.new(f'{sys.argv[2]} mail {i}', 'RH', source='import')])\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(path), who], cwd=REPO)
        for who in ("alice", "bob")
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert len(Dataset(path).load()) == 50


# --- import ----------------------------------------------------------------------------------


def test_tutorial_format(tmp_path: Path) -> None:
    prompt = '[INST] Veuillez classifier l\'email suivant : "Il dit "bonjour" puis part"[/INST]'
    line = json.dumps({"prompt": prompt, "completion": "rh"})
    folder = tmp_path / "tuto"
    folder.mkdir()
    (folder / "train.jsonl").write_text(line + "\n", encoding="utf-8")
    (folder / "test.jsonl").write_text(
        json.dumps(
            {"prompt": '[INST] Veuillez classifier : "Facture EDF"[/INST]', "completion": "Finance"}
        )
        + "\n",
        encoding="utf-8",
    )
    assert detect_format(folder) == "tutorial"
    examples = read_examples(folder, DEPS)
    assert [(e.text, e.label, e.split) for e in examples] == [
        ('Il dit "bonjour" puis part', "RH", "train"),
        ("Facture EDF", "Finance", "test"),
    ]
    assert extract_tutorial_email("[INST] sans guillemets[/INST]") == "sans guillemets"


def test_seed_file_keeps_its_splits(tmp_path: Path) -> None:
    source = tmp_path / "seed.jsonl"
    rows = [
        {"text": f"Candidature {i}", "label": "RH", "split": split}
        for i, split in enumerate(["valid", "valid", "test", "train", "valid"])
    ]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    store = Dataset(tmp_path / "examples.jsonl")
    store.add(read_examples(source, DEPS))
    assert [e.split for e in store.load()] == [r["split"] for r in rows]


def test_jsonl_and_csv(tmp_path: Path) -> None:
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text(
        '{"text": "Un devis ?", "label": "ventes"}\n'
        '{"text": "Votre facture", "label": "Finance", "split": "test", "subject": "Facture"}\n',
        encoding="utf-8",
    )
    got = read_examples(jsonl, DEPS)
    assert [(e.label, e.split, e.subject) for e in got] == [
        ("Commercial", None, ""),
        ("Finance", "test", "Facture"),
    ]
    csv_file = tmp_path / "mine.csv"
    csv_file.write_text(
        "text,label,subject,split\n"
        '"Bonjour, un bug",Support,Panne,valid\n'
        "Gagnez un iPhone,spam,,\n",
        encoding="utf-8",
    )
    got = read_examples(csv_file, DEPS)
    assert [(e.text, e.label, e.subject, e.split) for e in got] == [
        ("Bonjour, un bug", "Support", "Panne", "valid"),
        ("Gagnez un iPhone", "SPAM", "", None),
    ]


def test_bad_imports_name_the_problem(tmp_path: Path) -> None:
    bad_label = tmp_path / "x.jsonl"
    bad_label.write_text('{"text": "a", "label": "Legal"}\n', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"x.jsonl:1: label 'Legal' is not a configured"):
        read_examples(bad_label, DEPS)
    no_header = tmp_path / "x.csv"
    no_header.write_text("a,RH\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="first line must name the columns"):
        read_examples(no_header, DEPS)
    with pytest.raises(DatasetError, match="--label"):
        read_examples(tmp_path, DEPS, fmt="eml")
    with pytest.raises(DatasetError, match="no such file"):
        read_examples(tmp_path / "nope.csv", DEPS)


def _mail(subject: str, body: str, sender: str, message_id: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = "contact@example.com"
    msg["Subject"] = subject
    msg["Message-ID"] = message_id
    msg.set_content(body)
    return msg


def test_eml_folder_and_mbox(tmp_path: Path) -> None:
    folder = tmp_path / "eml"
    folder.mkdir()
    mails = [
        _mail("Candidature", "Bonjour, voici mon CV.", "Léa <lea@candidate.fr>", "<1@x>"),
        _mail("Stage", "Prenez-vous des stagiaires ?", "paul@ecole.fr", "<2@x>"),
    ]
    for i, msg in enumerate(mails):
        (folder / f"{i}.eml").write_bytes(msg.as_bytes())
    got = read_examples(folder, DEPS, label="hr")
    assert [(e.subject, e.label, e.sender_domain, e.message_id) for e in got] == [
        ("Candidature", "RH", "candidate.fr", "<1@x>"),
        ("Stage", "RH", "ecole.fr", "<2@x>"),
    ]
    assert "voici mon CV" in got[0].text
    box_path = tmp_path / "inbox.mbox"
    box = mailbox.mbox(box_path)
    for msg in mails:
        box.add(msg)
    box.close()
    from_box = read_examples(box_path, DEPS, label="RH")
    assert [e.id for e in from_box] == [e.id for e in got]


# --- export and the one prompt ---------------------------------------------------------------


def test_export_writes_bare_prompts(tmp_path: Path) -> None:
    examples = [
        ex("Ma candidature", "RH", split="train", subject="CV"),
        ex("Facture", "Finance", split="valid", sender_domain="edf.fr"),
        ex("Bug", "Support", split="test"),
        ex("Old", "Legal", split="train"),
    ]
    result = export_examples(examples, tmp_path / "mlx", DEPS)
    assert result.counts == {"train": 1, "valid": 1, "test": 1}
    assert result.skipped == {"Legal": 1}
    row = json.loads((tmp_path / "mlx" / "valid.jsonl").read_text(encoding="utf-8"))
    assert row == {
        "prompt": build_prompt("Facture", DEPS, sender_domain="edf.fr"),
        "completion": "Finance",
    }
    assert row["prompt"] == example_prompt(examples[1], DEPS, PromptOptions())


def test_exported_line_rendered_like_mlx_lm_contains_the_prompt_once(tmp_path: Path) -> None:
    """mlx-lm turns a completions row into [user, assistant] through the chat template."""
    store = Dataset(tmp_path / "examples.jsonl")
    store.add([ex("Bonjour, voici ma candidature.", "RH", subject="CV")])
    store.export(tmp_path / "mlx", DEPS)
    line = next(
        line
        for split in SPLITS
        for line in (tmp_path / "mlx" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    )
    row = json.loads(line)
    assert "[INST]" not in row["prompt"] and "</s>" not in row["prompt"]
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    rendered = env.from_string(MISTRAL_V3).render(
        messages=[
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["completion"]},
        ],
        bos_token="<s>",
        eos_token="</s>",
    )
    assert rendered.count(row["prompt"]) == 1
    assert rendered == "<s>" + ChatTemplate.mistral_v3().serving(row["prompt"]) + " RH</s>"
    assert rendered.count("[INST]") == 1 and rendered.count("[/INST]") == 1


def test_export_empty_dataset(tmp_path: Path) -> None:
    result = Dataset(tmp_path / "none.jsonl").export(tmp_path / "out", DEPS)
    assert result.counts == {"train": 0, "valid": 0, "test": 0}
    assert sorted(os.listdir(tmp_path / "out")) == ["test.jsonl", "train.jsonl", "valid.jsonl"]


def test_rewriting_the_starter_file_reproduces_it(starter_data: Path) -> None:
    before = starter_data.read_bytes()
    store = Dataset(starter_data)
    store.add([ex("Un email de passage", "RH")])
    assert store.remove(example_id("Un email de passage"))
    assert starter_data.read_bytes() == before


def test_every_starter_example_exports_its_prompt_once(starter_data: Path, tmp_path: Path) -> None:
    store = Dataset(starter_data)
    result = store.export(tmp_path / "mlx", DEPS)
    assert sum(result.counts.values()) == len(store.load()) and not result.skipped
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(MISTRAL_V3)
    for split in SPLITS:
        for line in (tmp_path / "mlx" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            messages = [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row["completion"]},
            ]
            rendered = template.render(messages=messages, bos_token="<s>", eos_token="</s>")
            assert rendered.count(row["prompt"]) == 1
            assert rendered.count("[INST]") == 1 + row["prompt"].count("[INST]")
            assert rendered == f"<s>[INST] {row['prompt']}[/INST] {row['completion']}</s>"
