"""``mailrouter selftest``: this machine's Ollama and mlx-lm, checked end to end in a minute.

The test suite runs against test doubles (the llama.cpp server in ``tests/ollama_server.py``,
mlx-lm on a Linux CPU); what only a real Mac can tell is whether the Ollama and mlx-lm installed
there behave as the router needs. This runs the real loop once, small: a tiny
Mistral-architecture model (:mod:`.training.tinymodel`) trained a few LoRA iterations on a slice
of the starter data by the training runner, published to this Ollama as GGUF and checked through
it as every night (:mod:`.training.publish`), then emails classified by the Ollama backend the
service uses, with the contract checks that matter: the version (logprobs), the parameters the
published model keeps (``repeat_penalty`` 1, ``num_ctx``), confidences from logprobs, what
Ollama's default options would change. Everything happens in a temp folder under a unique model
namespace, and what it created in Ollama's store is deleted: the models, and with them their
blob (Ollama removes a blob no model uses). The report is short, made to be pasted into an issue.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import httpx

from .classify.ollama import (
    LOGPROBS_SINCE,
    TOP_LOGPROBS,
    OllamaClassifier,
    context_size,
    full_name,
    model_options,
    normalize_host,
    parse_version,
)
from .config import Settings, default_departments
from .dataset import Dataset, Example
from .errors import MailRouterError
from .files import install_starter
from .training.publish import client, model_digests, server_version
from .training.runner import run_training

#: Emails per department of the starter data in the train split (valid and test get half, at
#: least one): 16, 8 and 8 emails, enough for mlx-lm's batches and the Ollama check.
QUOTAS = {"RH": 6, "Support": 4, "Commercial": 2, "Finance": 2, "SPAM": 2}
#: LoRA iterations: the tiny model learns to answer with a department in a few.
ITERATIONS = 6
#: Emails classified again through the service's backend after publishing.
EMAILS = 4
#: Every linear layer of the tiny model gets an adapter: it learns faster than with two.
LORA_KEYS = [f"self_attn.{p}_proj" for p in "qkvo"] + [
    f"mlp.{p}_proj" for p in ("gate", "up", "down")
]
_BLOB_RE = re.compile(r"sha256[-:]([0-9a-f]{64})")


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    name: str
    ok: bool
    detail: str
    seconds: float = 0.0

    def line(self) -> str:
        mark = "✓" if self.ok else "✗"
        return f"{mark} {self.name:<16} {self.detail} ({self.seconds:.1f} s)"


@dataclass
class Report:
    """What ``selftest`` found: the machine, the versions, the checks."""

    started: datetime
    header: list[str]
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def text(self) -> str:
        passed = sum(c.ok for c in self.checks)
        lines = [f"mailrouter selftest, {self.started:%Y-%m-%d %H:%M} UTC", *self.header]
        lines += [c.line() for c in self.checks]
        lines.append(f"{passed} of {len(self.checks)} checks passed in {self.seconds:.0f} s")
        return "\n".join(lines)


def versions() -> str:
    """The libraries that talk to Ollama and train, as installed."""
    found = []
    for name in ("mailrouter", "ollama", "mlx", "mlx-lm", "transformers"):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return ", ".join(found)


def selftest_settings(user: Settings, work: Path, base_model: Path, namespace: str) -> Settings:
    """The user's Ollama, and everything else the selftest's own: a data folder in ``work``,
    models named ``<namespace>:…``, the tutorial's departments with short prompts, a tiny
    training that always publishes (no baseline to beat) without quantising."""
    classifier = user.classifier.model_copy(
        update={
            "backend": "ollama",
            "model": f"{namespace}:latest",
            "zero_shot_model": f"{namespace}-zero-shot",
            "max_chars": 100,
            "concurrency": 1,
        }
    )
    training = user.training.model_copy(
        update={
            "base_model": str(base_model),
            "base_revision": "",
            "quantize": "",
            "num_layers": -1,
            "lora_keys": LORA_KEYS,
            "learning_rate": 1e-2,
            # On the whole text: trained on its answers only, a tiny model first learns to end
            # every answer at once (the end token is half of them), and an empty answer has
            # no logprobs to check; on the text it answers words, decisively enough for MLX
            # and llama.cpp to agree.
            "mask_prompt": False,
            "batch_size": 2,
            "epochs": 1,
            "max_iters": ITERATIONS,
            "val_batches": 1,
            "nice": 0,
            "grad_checkpoint": False,
            "min_baseline_gain": -1.0,
            "keep_versions": 1,
            "timeout_seconds": 900,
        }
    )
    departments = [d.model_copy(update={"description": ""}) for d in default_departments()]
    return user.model_copy(
        update={
            "data_dir": work / "data",
            "classifier": classifier,
            "training": training,
            "departments": departments,
            "rules": [],
        }
    )


def starter_slice(data_dir: Path) -> list[Example]:
    """A few starter emails per department and split, written as the selftest's dataset."""
    path = install_starter(data_dir) or data_dir / "examples.jsonl"
    seen: Counter[tuple[str, str | None]] = Counter()
    kept = []
    for example in Dataset(path).load():
        quota = QUOTAS.get(example.label, 0)
        quota = quota if example.split == "train" else max(1, quota // 2)
        if seen[(example.label, example.split)] < quota:
            seen[(example.label, example.split)] += 1
            kept.append(example)
    path.write_text("".join(e.to_json() + "\n" for e in kept), encoding="utf-8")
    return kept


class SelfTest:
    """The checks, in order; each records one :class:`Check`, a failure stops what needs it."""

    def __init__(self, user: Settings, work: Path, emit: Callable[[Check], None]) -> None:
        self.user = user
        self.work = work
        self.emit = emit
        self.namespace = f"mailrouter-selftest-{os.getpid()}"
        self.settings = user
        self.checks: list[Check] = []
        self.blobs: set[str] = set()

    @contextmanager
    def check(self, name: str) -> Iterator[list[str]]:
        """Run one check: the body appends its detail; an error is the check's failure."""
        started = time.monotonic()
        detail: list[str] = []
        ok = True
        try:
            yield detail
        except AssertionError as exc:
            ok = False
            detail.append(str(exc))
        except Exception as exc:  # any failure is the report's to show, with what raised it
            ok = False
            kind = "" if isinstance(exc, MailRouterError) else f"{type(exc).__name__}: "
            detail.append(kind + (str(exc).splitlines() or [""])[0][:300])
        result = Check(name, ok, "; ".join(detail), time.monotonic() - started)
        self.checks.append(result)
        self.emit(result)

    def passed(self, name: str) -> bool:
        return any(c.name == name and c.ok for c in self.checks)

    def run(self) -> list[Check]:
        before: dict[str, str] = {}
        with self.check("ollama") as detail:
            version = server_version(self.user)
            before = model_digests(client(self.user))
            new_enough = parse_version(version) >= LOGPROBS_SINCE
            detail.append(f"{version} at {self.user.classifier.ollama_host}")
            assert new_enough, f"Ollama {version}: no logprobs before 0.12.11, upgrade it"
            detail.append(f"{len(before)} models in its store")
        if self.passed("ollama"):
            try:
                self._loop()
            finally:
                self._clean(before)
        return self.checks

    def _loop(self) -> None:
        with self.check("tiny model") as detail:
            from .training import tinymodel  # numpy, sentencepiece: for this step only

            os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no "PyTorch was not found"
            base = tinymodel.build(self.work / "tiny-model")
            size = sum(p.stat().st_size for p in base.iterdir())
            detail.append(f"Mistral architecture, v0.3 tokenizer, {size / 1e6:.0f} MB")
        if not self.passed("tiny model"):
            return
        self.settings = selftest_settings(self.user, self.work, base, self.namespace)
        examples = starter_slice(self.settings.data_dir)
        with self.check("train, publish") as detail:
            outcome = run_training(self.settings, force=True, iters=ITERATIONS)
            assert outcome.decision == "published", f"{outcome.decision}: {outcome.reason}"
            candidate, served = outcome.metrics["candidate"], outcome.metrics["ollama"]
            detail.append(
                f"{ITERATIONS} LoRA iterations, {outcome.version} published and checked through "
                f"Ollama (accuracy {candidate['accuracy']:.2f} in MLX, {served['accuracy']:.2f} "
                "through Ollama)"
            )
        if self.passed("train, publish"):
            self._parameters()
            self._classify([e for e in examples if e.split == "test"][:EMAILS])

    def _parameters(self) -> None:
        with self.check("parameters") as detail:
            shown = client(self.settings).show(full_name(self.settings.classifier.model))
            self.blobs |= set(_BLOB_RE.findall(shown.modelfile or ""))
            params = parameters(shown.parameters or "")
            conf = self.settings.classifier
            expected = {
                "repeat_penalty": 1.0,
                "temperature": 0.0,
                "num_ctx": float(context_size(conf.max_prompt_tokens, conf.num_predict)),
            }
            detail.append(
                ", ".join(f"{k} {params[k]:g}" if k in params else f"{k} unset" for k in expected)
            )
            wrong = [k for k, v in expected.items() if params.get(k) != v]
            assert not wrong, f"the model keeps other parameters: {detail[0]}"

    def _classify(self, examples: list[Example]) -> None:
        with self.check("classify") as detail:
            classifier = OllamaClassifier(self.settings)
            answers = [classifier.classify(e.to_input()) for e in examples]
            labels = self.settings.labels
            assert all(p.label is None or p.label in labels for p in answers), "not a label"
            detail.append(", ".join(f"{p.label or 'triage'} {p.confidence:.2f}" for p in answers))
            alternatives = self._alternatives(classifier, examples[0])
            detail.append(f"logprobs with {alternatives} alternatives a token")
            assert alternatives == TOP_LOGPROBS, f"Ollama sent {alternatives} alternatives, not 20"
        with self.check("repeat penalty") as detail:
            changed = self._penalised(classifier, examples, [p.raw for p in answers])
            detail.append(
                f"Ollama's default repeat_penalty 1.1 would change {changed} of {len(answers)} "
                "answers (the router sends 1.0)"
            )

    def _alternatives(self, classifier: OllamaClassifier, example: Example) -> int:
        """The fewest alternatives Ollama sent for a generated token, asked for 20 as the
        classifier asks (what its confidences are computed from). Only the end token stops
        this answer: a tiny model's first token is often a line break, a stop sequence of the
        model's, and Ollama sends no logprobs for what a stop sequence cut."""
        conf = self.settings.classifier
        answer = client(self.settings).generate(
            model=full_name(conf.model),
            prompt=classifier.render(example.to_input()),
            raw=True,
            options={**model_options(conf), "num_predict": 2, "stop": ["</s>"]},
            logprobs=True,
            top_logprobs=TOP_LOGPROBS,
        )
        return min((len(e.top_logprobs or []) for e in answer.logprobs or []), default=0)

    def _penalised(
        self, classifier: OllamaClassifier, examples: list[Example], answers: list[str]
    ) -> int:
        """How many answers change under Ollama's default ``repeat_penalty`` (1.1 from v0.12.11
        to v0.32.9, ``DefaultOptions`` in ``api/types.go``), the rest as the router sends it."""
        api, conf = client(self.settings), self.settings.classifier
        options = {**model_options(conf), "repeat_penalty": 1.1}
        options |= {"num_predict": conf.num_predict, "stop": classifier.template.stop}
        changed = 0
        for example, ours in zip(examples, answers, strict=True):
            prompt = classifier.render(example.to_input())
            theirs = api.generate(
                model=full_name(conf.model), prompt=prompt, raw=True, options=options
            )
            changed += (theirs.response or "").strip() != ours
        return changed

    def _clean(self, before: dict[str, str]) -> None:
        with self.check("store clean") as detail:
            api = client(self.user)
            created = [n for n in model_digests(api) if n.startswith(self.namespace)]
            for name in created:
                api.generate(model=name, keep_alive=0)  # unload before deleting
                api.delete(name)
            after = model_digests(api)
            left = [f"sha256:{b[:12]}" for b in sorted(self.blobs) if _has_blob(self.user, b)]
            detail.append(
                f"{len(created)} models deleted; {len(after)} models in the store as before"
            )
            assert after == before, "the store's models changed: " + ", ".join(
                sorted(set(after) ^ set(before))
            )
            assert not left, f"blobs left behind: {', '.join(left)}"


def parameters(text: str) -> dict[str, float]:
    """``/api/show``'s ``parameters`` text (``name  value`` lines) as numbers where they are."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        try:
            found[key] = float(value.strip().strip('"'))
        except ValueError:
            continue
    return found


def _has_blob(settings: Settings, digest: str) -> bool:
    """``HEAD /api/blobs/sha256:<digest>``: 200 while Ollama keeps the blob."""
    host = normalize_host(settings.classifier.ollama_host)
    return httpx.head(f"{host}/api/blobs/sha256:{digest}", timeout=30).status_code == 200


def run(user: Settings, emit: Callable[[Check], None], *, keep: Path | None = None) -> Report:
    """Every check against the Ollama of ``user``'s settings; files in a temp folder (or
    ``keep``, left in place)."""
    started = time.monotonic()
    header = [
        f"machine: {platform.system()} {platform.release()} {platform.machine()}, "
        f"Python {sys.version.split()[0]}",
        f"versions: {versions()}",
    ]
    report = Report(datetime.now(UTC), header)
    work = keep or Path(tempfile.mkdtemp(prefix="mailrouter-selftest-"))
    try:
        report.checks = SelfTest(user, work, emit).run()
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)
    report.seconds = time.monotonic() - started
    return report
