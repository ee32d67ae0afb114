"""One training run, end to end: data → LoRA → evaluation → gate → publish → record.

Steps, each recorded in the state database (``training_runs``) as it completes:

1. Take the training lock (a file lock in ``models/``): two trainings never run at once, whether
   started by the nightly job or by ``mailrouter train --now``; a lock held by a killed process is
   released by the operating system.
2. Snapshot the dataset into ``models/runs/<id>/examples.jsonl`` (writers may add examples
   meanwhile; the run trains and evaluates on one consistent file) and hold its test split to the
   pin (:mod:`..testpin`): a pinned example gone or changed stops the run, test examples not yet
   pinned are reported and left out of the gate. Hash the snapshot: the same hash as the last
   completed run means nothing new to learn, the run is recorded as ``skipped``.
3. Check Ollama answers (a candidate can only be published there), export the splits for mlx-lm
   (train and valid for training, test only for evaluation), fetch the base model, write
   ``run.yaml`` and run ``mlx_lm lora`` in a child process (:mod:`.lora`).
4. Evaluate on the pinned test set: the candidate in-process with MLX, the model in service
   through Ollama (or its recorded metrics, when Ollama no longer has it and they were measured
   on the same pin), and the baseline.
5. Gate (:mod:`.gate`); publish when it says so (:mod:`.publish`). The rule that decided is
   recorded (``metrics.gate``). Anything that fails leaves the model in service untouched and is
   recorded with its error.

``python -m mailrouter.training.runner`` runs one run from a JSON request on stdin: this is the
child process :mod:`.job` starts, so the service never imports MLX.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from ..classify.mlx import MlxClassifier
from ..config import Settings
from ..dataset import SPLITS, Dataset, Example
from ..errors import MailRouterError, TrainingError
from ..files import private_umask, tighten
from ..logs import event, setup_logging
from ..prompt import PromptOptions
from ..state import State, open_state
from ..tokens import PromptMeasure
from . import registry
from .basemodel import base_record, resolve_base_model
from .config import build_run
from .evaluation import Report, evaluate
from .gate import Decision, GateRules, Scores, decide
from .lora import LoraResult, Progress, run_lora
from .publish import (
    client,
    evaluate_on_ollama,
    latest_name,
    model_names,
    publish,
    server_version,
    unload_models,
)
from .recorder import Recorder, agreement, differences
from .testpin import TestPin, check_pin, pin_path

log = logging.getLogger(__name__)

LOCK_NAME = "training.lock"
EXIT_FAILED = 1
EXIT_BUSY = 75  # EX_TEMPFAIL: another training holds the lock


@dataclass
class Outcome:
    """What a run decided. ``decision``: published, rejected, skipped, failed or busy."""

    run_id: int | None
    decision: str
    reason: str
    version: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    run_dir: Path | None = None
    rule: str | None = None  # the gate rule that decided, when the gate ran


@dataclass
class Hooks:
    """What a caller watches: stage names, LoRA progress, evaluation progress (done, total)."""

    stage: Callable[[str], None] = lambda _name: None
    progress: Callable[[Progress], None] | None = None
    evaluation: Callable[[int, int], None] | None = None


def lock_path(settings: Settings) -> Path:
    return settings.models_dir / LOCK_NAME


def prompt_options(settings: Settings, base_dir: Path) -> PromptOptions:
    """The one prompt as the base model sees it: cut to ``max_prompt_tokens`` of its own chat
    template and tokenizer, which the published version keeps (so serving cuts it the same)."""
    return PromptOptions.from_settings(settings, PromptMeasure.for_model_dir(base_dir))


def evaluate_mlx(
    settings: Settings,
    base_dir: Path,
    adapter_dir: Path | None,
    test: list[Example],
    *,
    name: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Report, list[str]]:
    """The test split through the MLX classifier (base, or base + adapter) with the base's own
    prompt cut (:func:`prompt_options`): the report and the raw answers, in the split's order."""
    model = Recorder(
        MlxClassifier(
            base_dir,
            settings.departments,
            adapter_path=adapter_dir,
            options=prompt_options(settings, base_dir),
            max_tokens=settings.classifier.num_predict,
            name=name,
        )
    )
    threshold = settings.classifier.confidence_threshold
    report = evaluate(model, test, settings.departments, threshold, progress=progress)
    return report, model.answers


def run_dir(settings: Settings, run_id: int) -> Path:
    return settings.models_dir / "runs" / f"{run_id:04d}"


def scores(report: Report) -> Scores:
    return Scores(report.accuracy, report.macro_f1, report.n, report.recall, report.false_spam)


def recorded_scores(found: dict[str, Any]) -> Scores | None:
    """Scores from a recorded summary; ``None`` when it lacks accuracy or macro-F1."""
    if "accuracy" not in found or "macro_f1" not in found:
        return None
    recall = found.get("recall")
    return Scores(
        found["accuracy"],
        found["macro_f1"],
        int(found.get("n", 0)),
        recall if isinstance(recall, dict) else {},
        found.get("false_spam"),
    )


def run_training(
    settings: Settings,
    *,
    force: bool = False,
    iters: int | None = None,
    run_id: int | None = None,
    hooks: Hooks | None = None,
) -> Outcome:
    """One run under the training lock; ``busy`` at once when another run holds it."""
    settings.models_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path(settings)), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        event(log, "training.busy", lock=lock_path(settings))
        return Outcome(run_id, "busy", "another training is running")
    try:
        with open_state(settings) as state:
            registry.close_stale_runs(state, keep=run_id)
            if run_id is None:
                run_id = registry.start_run(state)
            return _Run(settings, state, run_id, hooks or Hooks()).execute(force=force, iters=iters)
    finally:
        lock.release()


class _Run:
    def __init__(self, settings: Settings, state: State, run_id: int, hooks: Hooks) -> None:
        self.settings = settings
        self.state = state
        self.id = run_id
        self.hooks = hooks
        self.dir = run_dir(settings, run_id)
        self.durations: dict[str, float] = {}
        self.metrics: dict[str, Any] = {}
        self.answers: list[str] = []  # the candidate's raw answers on the test split, in order
        self.pin: TestPin | None = None

    def _timed(self, name: str, started: float) -> None:
        self.durations[name] = round(time.monotonic() - started, 2)
        registry.update_run(self.state, self.id, metrics={"durations": self.durations})

    def execute(self, *, force: bool, iters: int | None) -> Outcome:
        event(log, "training.run.start", run=self.id, dir=self.dir)
        try:
            return self._execute(force=force, iters=iters)
        except MailRouterError as exc:
            return self._failed(exc)
        except Exception as exc:  # a bug or a library error: recorded, then re-raised
            self._failed(exc)
            raise

    def _failed(self, exc: BaseException) -> Outcome:
        message = str(exc) or type(exc).__name__
        registry.finish_run(self.state, self.id, "failed", "error", error=message[:4000])
        event(log, "training.run.failed", logging.ERROR, run=self.id, error=message[:500])
        return Outcome(self.id, "failed", message, metrics=self.metrics, run_dir=self.dir)

    def _execute(self, *, force: bool, iters: int | None) -> Outcome:
        dataset, data_hash, examples, test = self._snapshot()
        if not force and data_hash == registry.last_trained_hash(self.state):
            return self._skipped("no example added or changed since the last training")
        self.hooks.stage("checking Ollama")
        self.metrics["ollama_version"] = server_version(self.settings)
        if not test:
            raise TrainingError("the pinned test set is empty (`mailrouter dataset pin-test`)")
        base_dir, adapter_dir = self._train(dataset, iters)
        candidate, baseline, current = self._evaluate(base_dir, adapter_dir, examples, test)
        decision = self._gate(candidate, baseline, current)
        if not decision.publish:
            registry.finish_run(self.state, self.id, "rejected", decision.reason)
            return self._judged("rejected", decision.reason, decision)
        valid = [e for e in examples if e.split == "valid"]
        return self._publish(base_dir, adapter_dir, test, valid, candidate, decision)

    def _snapshot(self) -> tuple[Dataset, str, list[Example], list[Example]]:
        """Copy the dataset into the run folder (writers may add examples meanwhile: the run
        trains and evaluates on one consistent file), hash it and hold its test split to the
        pin; returns the copy, its hash, the usable examples and the pinned test examples."""
        settings = self.settings
        self.dir.mkdir(parents=True, exist_ok=True)
        snapshot = self.dir / "examples.jsonl"
        source = settings.examples_path
        if not source.is_file():
            raise TrainingError(f"{source}: no dataset yet (`mailrouter dataset import FILE`)")
        shutil.copyfile(source, snapshot)
        tighten(snapshot)
        dataset = Dataset(snapshot)
        data_hash = dataset.content_hash()
        loaded = dataset.load()
        examples = [e for e in loaded if e.label in settings.labels]
        test = self._pinned_test(loaded, examples)
        counts = {s: sum(e.split == s for e in examples) for s in SPLITS}
        registry.update_run(self.state, self.id, dataset_hash=data_hash, counts=counts)
        return dataset, data_hash, examples, test

    def _skipped(self, reason: str) -> Outcome:
        registry.finish_run(self.state, self.id, "skipped", reason)
        shutil.rmtree(self.dir, ignore_errors=True)
        event(log, "training.skipped", run=self.id, reason=reason)
        return Outcome(self.id, "skipped", reason)

    def _train(self, dataset: Dataset, iters: int | None) -> tuple[Path, Path]:
        """Export the splits, fetch the base model, write ``run.yaml`` and run LoRA; returns
        the base model's folder and the adapter's."""
        settings = self.settings
        self.hooks.stage("fetching the base model")
        started = time.monotonic()
        served = registry.in_service(self.state)
        base_dir = resolve_base_model(
            settings, served.metrics.get("base_model") if served else None
        )
        self._timed("base_model", started)
        self.metrics["base_model"] = base_record(settings, base_dir)
        self.hooks.stage("exporting the dataset")
        data_dir = self.dir / "data"
        exported = dataset.export(
            data_dir, settings.departments, prompt_options(settings, base_dir)
        )

        adapter_dir = self.dir / "adapters"
        lora_run = build_run(
            settings.training,
            model=base_dir,
            data_dir=data_dir,
            adapter_dir=adapter_dir,
            n_train=exported.counts["train"],
            n_valid=exported.counts["valid"],
            iters=iters,
        )
        config_path = lora_run.write(self.dir / "run.yaml")
        params = {k: v for k, v in asdict(lora_run).items() if k != "model"}
        registry.update_run(
            self.state,
            self.id,
            base_model=settings.training.base_model,
            params=params,
            metrics={"base_model": self.metrics["base_model"]},
        )
        self.hooks.stage("unloading Ollama's models")
        self.metrics["ollama_unloaded"] = unload_models(settings)

        self.hooks.stage(f"training ({lora_run.iters} iterations)")
        trained = run_lora(
            config_path,
            adapter_dir=adapter_dir,
            total_iters=lora_run.iters,
            log_path=self.dir / "train.log",
            timeout=settings.training.timeout_seconds,
            nice=settings.training.nice,
            on_progress=self.hooks.progress,
        )
        self._trained(trained)
        return base_dir, adapter_dir

    def _trained(self, trained: LoraResult) -> None:
        self.durations["train"] = round(trained.seconds, 2)
        self.metrics["lora"] = {
            "train_loss": trained.train_loss,
            "val_loss": trained.val_loss,
            "peak_rss_mb": round(trained.peak_rss_mb, 1),
        }
        registry.update_run(
            self.state, self.id, metrics={"durations": self.durations, "lora": self.metrics["lora"]}
        )

    def _publish(
        self,
        base_dir: Path,
        adapter_dir: Path,
        test: list[Example],
        valid: list[Example],
        candidate: Report,
        decision: Decision,
    ) -> Outcome:
        """Publish the candidate the gate accepted, check it through Ollama, calibrate its
        thresholds on the valid split (:func:`.publish.calibrate_version`), record it."""
        self.hooks.stage("publishing to Ollama")
        started = time.monotonic()
        published = publish(
            self.settings,
            self.state,
            run_id=self.id,
            base_dir=base_dir,
            adapter_dir=adapter_dir,
            run_dir=self.dir,
            test_examples=test,
            mlx_accuracy=candidate.accuracy,
            metrics={
                "mlx": self.metrics["candidate"],
                "baseline": self.metrics["baseline"],
                "test_pin": self.metrics["test_pin"]["digest"],
                "base_model": self.metrics["base_model"],
            },
            progress=self.hooks.evaluation,
            valid_examples=valid,
            status=self.hooks.stage,
        )
        self._timed("publish", started)
        self.metrics["ollama"] = published.ollama.summary()
        self.metrics["version"] = published.version
        if published.calibration is not None:
            self.metrics["calibration"] = published.calibration.to_dict()
        self.metrics["ollama_agreement"] = agreement(self.answers, published.answers)
        self.metrics["ollama_differences"] = differences(self.answers, published.answers)
        reason = f"{decision.reason}; in service as {published.name}"
        registry.finish_run(
            self.state,
            self.id,
            "published",
            reason,
            metrics={
                k: self.metrics[k]
                for k in (
                    "ollama",
                    "version",
                    "ollama_agreement",
                    "ollama_differences",
                    "calibration",
                )
                if k in self.metrics
            },
        )
        event(log, "training.published", run=self.id, model=published.name)
        return self._judged("published", reason, decision, published.version)

    def _judged(
        self, outcome: str, reason: str, decision: Decision, version: str | None = None
    ) -> Outcome:
        """The outcome of a run the gate judged: with its metrics, files and deciding rule."""
        return Outcome(self.id, outcome, reason, version, self.metrics, self.dir, decision.rule)

    def _pinned_test(self, loaded: list[Example], examples: list[Example]) -> list[Example]:
        """The test examples the gate judges on: the pinned ones. A pinned example gone or
        changed raises (the run fails naming it); unpinned test examples are reported."""
        status = check_pin(pin_path(self.settings), loaded)
        self.pin = status.pin
        self.metrics["test_pin"] = {
            "digest": status.pin.digest,
            "n": len(status.pin.entries),
            "created": status.pin.created,
            "unpinned": status.new,
        }
        registry.update_run(self.state, self.id, metrics={"test_pin": self.metrics["test_pin"]})
        if status.created:
            event(log, "training.test_pinned", run=self.id, n=len(status.pin.entries))
        if status.new:
            event(log, "training.test_unpinned", logging.WARNING, run=self.id,
                  n=len(status.new), ids=",".join(status.new[:10]))  # fmt: skip
            self.hooks.stage(
                f"{len(status.new)} test example(s) added since the test set was pinned are left "
                "out of the gate; `mailrouter dataset pin-test` adds them on purpose"
            )
        return [e for e in examples if e.split == "test" and e.id in status.pin.entries]

    def _gate(self, candidate: Report, baseline: Report, current: Scores | None) -> Decision:
        training = self.settings.training
        rules = GateRules(
            min_accuracy_gain=training.min_accuracy_gain,
            min_baseline_gain=training.min_baseline_gain,
            max_recall_drop=training.max_recall_drop,
        )
        decision = decide(scores(candidate), current, scores(baseline), rules)
        self.metrics["gate"] = {"rule": decision.rule, "publish": decision.publish}
        registry.update_run(self.state, self.id, metrics={"gate": self.metrics["gate"]})
        event(log, "training.gate", run=self.id, publish=decision.publish, rule=decision.rule,
              reason=decision.reason)  # fmt: skip
        return decision

    def _evaluate(
        self, base_dir: Path, adapter_dir: Path, examples: list[Example], test: list[Example]
    ) -> tuple[Report, Report, Scores | None]:
        from ..classify.baseline import BaselineClassifier  # numpy: heavy for `mailrouter`

        settings, state = self.settings, self.state
        self.hooks.stage(f"evaluating the candidate on {len(test)} test emails (MLX)")
        started = time.monotonic()
        candidate, self.answers = evaluate_mlx(
            settings, base_dir, adapter_dir, test,
            name=f"candidate-{self.id:04d}", progress=self.hooks.evaluation,
        )  # fmt: skip
        self._timed("evaluate_candidate", started)
        self.metrics["candidate"] = candidate.summary()

        self.hooks.stage("evaluating the baseline")
        started = time.monotonic()
        train = [e for e in examples if e.split in ("train", "valid")]
        baseline_model = BaselineClassifier.fit(
            train, settings.departments, PromptOptions.from_settings(settings)
        )
        baseline = evaluate(
            baseline_model,
            test,
            settings.departments,
            settings.classifier.threshold_for(baseline_model.name),
        )
        self._timed("evaluate_baseline", started)
        self.metrics["baseline"] = baseline.summary()

        current = self._current(test)
        registry.update_run(
            state,
            self.id,
            metrics=self.metrics,
        )
        return candidate, baseline, current

    def _current(self, test: list[Example]) -> Scores | None:
        """The model in service on the pinned test set: through Ollama, else as recorded when
        recorded on the same pin (figures from another test set judge nothing)."""
        name = latest_name(self.settings)
        if name in model_names(client(self.settings)):
            self.hooks.stage(f"evaluating the model in service ({name}) through Ollama")
            started = time.monotonic()
            report, _ = evaluate_on_ollama(self.settings, name, test, self.hooks.evaluation)
            self._timed("evaluate_current", started)
            self.metrics["current"] = {**report.summary(), "source": "ollama"}
            return scores(report)
        recorded = registry.in_service(self.state)
        found = recorded_scores(recorded.best_metrics) if recorded is not None else None
        if recorded is None or found is None:
            self.metrics["current"] = None
            return None
        pinned = recorded.metrics.get("test_pin")
        if pinned is not None and self.pin is not None and pinned != self.pin.digest:
            event(log, "training.current_not_comparable", logging.WARNING, run=self.id,
                  version=recorded.version)  # fmt: skip
            self.metrics["current"] = {"source": f"recorded ({recorded.version}) on another pin"}
            return None
        self.metrics["current"] = {
            **recorded.best_metrics,
            "source": f"recorded ({recorded.version})",
        }
        return found


# --- child-process entry point ---------------------------------------------------------------


def request_settings(request: dict[str, Any]) -> Settings:
    """The child's settings: the request's, with the Hugging Face token that travels beside
    them (the parent gives this process no secret in its environment, see
    :func:`.job.child_environment`)."""
    data = dict(request["settings"])
    if request.get("hf_token"):
        data["training"] = {**data.get("training", {}), "hf_token": request["hf_token"]}
    return Settings(**data)


def main() -> int:
    """Run one training from ``{"settings": …, "hf_token": …, "run_id": …, "force": …,
    "iters": …}`` on stdin."""
    private_umask()
    request = json.loads(sys.stdin.read())
    settings = request_settings(request)
    setup_logging(fmt=settings.log.format, level=settings.log.level)
    outcome = run_training(
        settings,
        force=bool(request.get("force")),
        iters=request.get("iters"),
        run_id=request.get("run_id"),
    )
    print(json.dumps({"decision": outcome.decision, "reason": outcome.reason}), flush=True)
    if outcome.decision == "busy":
        return EXIT_BUSY
    return EXIT_FAILED if outcome.decision == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())
