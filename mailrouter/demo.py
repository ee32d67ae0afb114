"""``mailrouter demo``: the whole loop on this machine, with no network and no configuration.

A local IMAP server (Dovecot when installed, the pure-Python pymap otherwise) and an SMTP sink
stand in for the company's mail; a temp data dir holds the starter dataset minus about twenty of
its held-out (test split) emails, which are dropped into the inbox as real mail. Then: the router
runs one round and each decision is shown; a member of staff corrects one route by reply; the
router re-forwards it and records the example; the baseline is retrained on the grown dataset
(and, with ``--with-mlx``, a tiny Mistral-architecture model is LoRA-trained with mlx-lm). The
classifier is Ollama when one answers on this machine with a model, else the baseline.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .classify.ollama import OllamaClassifier, full_name
from .config import Settings, load_settings
from .dataset import Dataset, Example
from .errors import MailRouterError, TrainingError
from .files import STARTER_EXAMPLES
from .localservers import (
    Delivered,
    DovecotServer,
    ImapAccount,
    PymapServer,
    SmtpSink,
    find_dovecot,
    local_config,
    write_toml,
)
from .prompt import PromptOptions
from .state import State
from .training.config import build_run
from .training.lora import run_lora
from .wiring import build_pipeline

# The demo routes a temp data folder of its own, with its own servers: it takes no data-folder
# lock (see mailrouter.datalock) and runs beside a live service.
# MLX on a CPU spends about 2.5 s per iteration of one ~400-token prompt on this tiny model (its
# 32,768-token output layer dominates): a handful of iterations shows the path in a minute.
MLX_ITERS = 10
MLX_TRAINING = {
    "num_layers": -1,
    "batch_size": 1,
    "learning_rate": 1e-3,
    "grad_checkpoint": False,
    "max_seq_length": 1024,
}
STAFF = "responsable@example.com"  # example.com is a staff domain in the default config


@dataclass
class Summary:
    """What the demo did, for its last lines and for tests."""

    imap: str = ""
    backend: str = ""
    emails: int = 0
    routes: Counter[str] = field(default_factory=Counter)
    as_labelled: int = 0
    misrouted: int = 0
    triaged: int = 0
    correction: str = ""
    new_example: Example | None = None
    retrained: str = ""
    seconds: float = 0.0


# --- pure helpers ---------------------------------------------------------------------------


def pick_held_out(examples: Sequence[Example], n: int, split: str) -> list[Example]:
    """About ``n`` examples of ``split``, taken from each label in turn so all of them show."""
    by_label: dict[str, list[Example]] = {}
    for ex in sorted(examples, key=lambda e: e.id):
        if ex.split == split:
            by_label.setdefault(ex.label, []).append(ex)
    picked: list[Example] = []
    while len(picked) < n and any(by_label.values()):
        for label in sorted(by_label):
            if by_label[label] and len(picked) < n:
                picked.append(by_label[label].pop(0))
    return picked


def as_email(example: Example, number: int) -> bytes:
    """A held-out example as the mail a customer would send (same subject, same text)."""
    msg = EmailMessage()
    msg["From"] = f"client{number}@{example.sender_domain or 'client-demo.fr'}"
    msg["To"] = "router@mailrouter.test"
    msg["Subject"] = example.subject
    msg["Date"] = formatdate(localtime=True)
    msg["Message-ID"] = f"<demo-{number}-{example.id}@client-demo.fr>"
    msg.set_content(example.text)
    return msg.as_bytes()


def _subject_of(text: str, words: int = 6) -> str:
    head = text.split()
    return " ".join(head[:words]) + (" …" if len(head) > words else "")


def choose_correction(
    decisions: Sequence[Any], expected: dict[str, str]
) -> tuple[Any, str, str] | None:
    """The decision staff would correct, the command they send, and why it was chosen.

    A department route that disagrees with the label first, then mail sent to triage (low
    confidence) with the label it should have had; failing both, the least confident route is
    confirmed with ``ok``.
    """
    known = [d for d in decisions if d.message_id in expected]
    wrong = [d for d in known if d.route == "department" and d.department != expected[d.message_id]]
    if wrong:
        d = min(wrong, key=lambda d: d.confidence or 0)
        return d, expected[d.message_id], f"misrouted to {d.department}"
    triaged = [d for d in known if d.route == "triage"]
    if triaged:
        d = min(triaged, key=lambda d: d.confidence or 0)
        return d, expected[d.message_id], "sent to triage"
    routed = [d for d in known if d.route == "department"]
    if routed:
        d = min(routed, key=lambda d: d.confidence or 0)
        return d, "ok", "the least confident route, confirmed"
    return None


def correction_email(forward_message_id: str, token: str, command: str, subject: str) -> bytes:
    """What a member of staff sends by clicking a link of the forward (a reply, in effect)."""
    msg = EmailMessage()
    msg["From"] = STAFF
    msg["To"] = "router@mailrouter.test"
    msg["Subject"] = f"[MR-{token}] {command}"
    msg["Date"] = formatdate(localtime=True)
    msg["Message-ID"] = f"<correction-{token}@example.com>"
    msg["In-Reply-To"] = forward_message_id
    msg.set_content(f"{command}\n\n> {subject}\n")
    return msg.as_bytes()


def confirmation_answer(request: Delivered) -> bytes:
    """What the member of staff sends back: “oui”, replying to the confirmation request."""
    msg = EmailMessage()
    msg["From"] = STAFF
    msg["To"] = "router@mailrouter.test"
    msg["Subject"] = f"Re: {request.header('Subject')}"
    msg["Date"] = formatdate(localtime=True)
    msg["Message-ID"] = make_msgid(domain="example.com")
    msg["In-Reply-To"] = request.header("Message-ID") or ""
    msg.set_content("oui\n")
    return msg.as_bytes()


# --- the run --------------------------------------------------------------------------------


class Demo:
    def __init__(
        self,
        console: Console,
        *,
        emails: int = 20,
        with_mlx: bool = False,
        backend: str | None = None,
        starter: Traversable = STARTER_EXAMPLES,
    ) -> None:
        self.console = console
        self.emails = emails
        self.with_mlx = with_mlx
        self.forced_backend = backend
        self.starter = starter
        self.summary = Summary()

    def say(self, text: str = "", **kwargs: Any) -> None:
        self.console.print(text, highlight=False, **kwargs)

    def step(self, title: str) -> None:
        self.console.rule(f"[bold]{title}")

    def run(self) -> Summary:
        started = time.monotonic()
        if not self.starter.is_file():
            raise MailRouterError(
                f"{self.starter}: the starter dataset is missing; reinstall mailrouter"
            )
        work = Path(tempfile.mkdtemp(prefix="mailrouter-demo-"))
        try:
            with self._servers() as (account, sink):
                settings, held_out = self._prepare(work, account, sink)
                self._route(settings, account, sink, held_out)
                self._correct(settings, account, sink)
                self._retrain(settings)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        self.summary.seconds = time.monotonic() - started
        self._print_summary()
        return self.summary

    @contextlib.contextmanager
    def _servers(self) -> Iterator[tuple[ImapAccount, SmtpSink]]:
        self.step("1. Local mail servers")
        with contextlib.ExitStack() as stack:
            if find_dovecot() is not None:
                dovecot = stack.enter_context(DovecotServer())
                account = dovecot.add_user("contact")
                self.summary.imap = "Dovecot"
            else:
                pymap = stack.enter_context(PymapServer("contact", "demo"))
                account = pymap.account
                self.summary.imap = "pymap (Dovecot is not installed)"
            sink = stack.enter_context(SmtpSink())
            self.say(f"IMAP: {self.summary.imap} on {account.host}:{account.port}")
            self.say(f"SMTP: a local sink on {sink.host}:{sink.port} (nothing leaves this machine)")
            yield account, sink

    def _prepare(
        self, work: Path, account: ImapAccount, sink: SmtpSink
    ) -> tuple[Settings, list[Example]]:
        data = work / "data"
        data.mkdir()
        host = os.environ.get("OLLAMA_HOST", "http://127.0.0.1:11434")
        backend, why, fine_tuned = self._choose_backend(work, account, sink, host)
        # The emails are taken out of the demo's dataset, so the classifier trained here has never
        # seen them. A fine-tuned Ollama model was trained on the starter's train split: it gets
        # test-split emails. (Train-split emails otherwise: then a correction lands in train, as
        # most do, and the retrained model visibly learns it.)
        split = "test" if fine_tuned else "train"
        with resources.as_file(self.starter) as path:
            starter = Dataset(path).load()
        held_out = pick_held_out(starter, self.emails, split)
        chosen = {e.id for e in held_out}
        Dataset(data / "examples.jsonl").add(e for e in starter if e.id not in chosen)
        values = local_config(
            account,
            sink,
            data,
            classifier={"backend": backend, "ollama_host": host},
            corrections={"token_key": secrets.token_hex(16)},
            log={"level": "WARNING"},
        )
        settings = _settings(values, work / "mailrouter.toml")
        self.summary.backend = backend
        self.say(
            f"data: {len(starter) - len(held_out)} starter examples in a temp dir; "
            f"{len(held_out)} emails of its {split} split kept aside, unseen by the classifier"
        )
        self.say(f"classifier: [bold]{backend}[/bold] — {why}")
        return settings, held_out

    def _choose_backend(
        self, work: Path, account: ImapAccount, sink: SmtpSink, host: str
    ) -> tuple[str, str, bool]:
        """Ollama when it answers here and has the fine-tuned or the zero-shot model; whether
        that model is the fine-tuned one."""
        if self.forced_backend == "baseline":
            return "baseline", "chosen with --backend", False
        quick = {"ollama_host": host, "timeout_seconds": 3}
        probe = _settings(local_config(account, sink, work, classifier=quick), work / "probe.toml")
        classifier = OllamaClassifier(probe)
        try:
            info = classifier.start()
            model = classifier.resolve_model(force=True)
        except MailRouterError as exc:
            if self.forced_backend:
                raise
            return "baseline", f"no usable Ollama here ({_first_line(exc)})", False
        fine_tuned = model == full_name(probe.classifier.model)
        kind = "fine-tuned" if fine_tuned else "zero-shot"
        return (
            "ollama",
            f"Ollama {info.version} at {classifier.host} with {model} ({kind})",
            fine_tuned,
        )

    def _route(
        self, settings: Settings, account: ImapAccount, sink: SmtpSink, held_out: list[Example]
    ) -> None:
        self.step(f"2. {len(held_out)} emails arrive; the router runs one round")
        mails = [as_email(e, i) for i, e in enumerate(held_out, 1)]
        account.append(mails)
        self.expected = {
            f"<demo-{i}-{e.id}@client-demo.fr>": e.label for i, e in enumerate(held_out, 1)
        }
        self.texts = {
            f"<demo-{i}-{e.id}@client-demo.fr>": e.text for i, e in enumerate(held_out, 1)
        }
        pipeline = build_pipeline(settings)
        try:
            report = pipeline.run_once()
        finally:
            pipeline.close()
        self.decisions = report.decisions
        self._table(report.decisions)
        s = self.summary
        s.emails = len(report.decisions)
        s.routes = Counter(
            d.department if d.route == "department" and d.department else d.route
            for d in report.decisions
        )
        s.as_labelled = sum(
            1 for d in report.decisions if _landed(d) == self.expected.get(d.message_id)
        )
        s.triaged = sum(1 for d in report.decisions if d.route == "triage")
        s.misrouted = s.emails - s.as_labelled - s.triaged
        self.say(
            f"{report.forwarded} forwarded, {report.filed} filed in {report.seconds:.1f} s "
            f"({len(sink.delivered())} messages in the SMTP sink). {_routing(s)}, "
            f"{s.triaged} to triage (confidence below their department's calibrated threshold) "
            "for a person to dispatch"
        )

    def _table(self, decisions: Sequence[Any]) -> None:
        table = Table(show_lines=False, expand=False)
        room = max(24, self.console.width - 62)
        for name, kwargs in (
            ("email", {"no_wrap": True, "max_width": room}),
            ("expected", {"no_wrap": True}),
            ("predicted", {"no_wrap": True}),
            ("to", {"no_wrap": True}),
            ("conf.", {"justify": "right"}),
            ("", {"justify": "center"}),
        ):
            table.add_column(name, **kwargs)
        for d in decisions:
            want = self.expected.get(d.message_id, "?")
            body = " ".join(self.texts.get(d.message_id, "").split())
            text = f"{d.subject} — {body}" if d.subject and not body.startswith(d.subject) else body
            landed = _landed(d)
            table.add_row(
                Text(text[: room - 1] + "…" if len(text) > room else text),
                want,
                d.department if d.route == "department" else d.route,
                (d.address or "").split("@")[0] or "-",
                f"{d.confidence:.2f}" if d.confidence is not None else "",
                "[green]✓[/green]" if landed == want else "[red]✗[/red]",
            )
        self.console.print(table)

    def _correct(self, settings: Settings, account: ImapAccount, sink: SmtpSink) -> None:
        self.step("3. A member of staff corrects one route by reply")
        chosen = choose_correction(self.decisions, self.expected)
        if chosen is None:
            self.say("nothing was routed, so there is nothing to correct")
            self.summary.correction = "nothing to correct"
            return
        decision, command, why = chosen
        with State(settings.state_path) as state:
            record = state.first_with_message_id(decision.message_id)
            assert record is not None
            forward = state.forwards_of(record.id)[0]
        text = self.texts[decision.message_id]
        self.say(f"chosen: “{_subject_of(text, 10)}” — {why}")
        self.say(
            f"{STAFF} clicks the “{command}” link of the forward: a mail to the router "
            f"with subject [MR-{forward.token}] {command}"
        )
        self.say(
            "no mail server vouches for it here (no Authentication-Results), so the router "
            "asks the address it claims to confirm"
        )
        request = self._deliver(
            settings, account, sink,
            correction_email(forward.message_id, forward.token, command, text[:60]),
        )  # fmt: skip
        if request is not None:
            self.say(f"{STAFF} answers “oui” to the request (only that mailbox received it)")
            self._deliver(settings, account, sink, confirmation_answer(request))
        self._report_example(settings, decision)

    def _deliver(
        self, settings: Settings, account: ImapAccount, sink: SmtpSink, mail: bytes
    ) -> Delivered | None:
        """Drop ``mail`` in the inbox, run one round, show what was sent; the confirmation
        request among it, if any."""
        before = len(sink.delivered())
        account.append([mail])
        pipeline = build_pipeline(settings)
        try:
            pipeline.run_once()
        finally:
            pipeline.close()
        request = None
        for msg in sink.delivered()[before:]:
            subject = (msg.header("Subject") or "").replace("\n", " ")
            kind = "re-forward" if msg.rcpt_tos != (STAFF,) else "answer"
            if msg.header("X-MailRouter-Notice") == "confirmation-request":
                kind, request = "confirmation request", msg
            self.say(f"  SMTP → {', '.join(msg.rcpt_tos)} ({kind}): {subject[:90]}")
        return request

    def _report_example(self, settings: Settings, decision: Any) -> None:
        examples = Dataset.from_settings(settings).load()
        new = [e for e in examples if e.source in ("correction", "confirmation")]
        if not new:
            self.say("[red]the correction was not recorded[/red]")
            self.summary.correction = "not recorded"
            return
        ex = new[-1]
        self.summary.new_example = ex
        self.say(
            f"new example in examples.jsonl: label {ex.label}, split {ex.split}, "
            f"source {ex.source}"
            + (f", corrected from {ex.corrected_from}" if ex.corrected_from else "")
            + f", by {ex.by}"
        )
        self.summary.correction = f"{_landed(decision)} → {ex.label} ({ex.source})"

    def _retrain(self, settings: Settings) -> None:
        from .classify.baseline import BaselineClassifier  # numpy: heavy for `import demo`

        self.step("4. Retraining on the grown dataset")
        started = time.monotonic()
        model = BaselineClassifier.from_settings(settings)
        seconds = time.monotonic() - started
        stats = Dataset.from_settings(settings).stats()
        line = (
            f"baseline retrained on {stats.split_total('train') + stats.split_total('valid')} "
            f"examples in {seconds:.1f} s ({model.name})"
        )
        ex = self.summary.new_example
        if ex is not None:
            p = model.classify(ex.to_input())
            line += f"; the corrected email now reads as {p.label} ({p.confidence:.2f})"
        self.say(line)
        self.summary.retrained = f"baseline in {seconds:.1f} s"
        if self.with_mlx:
            self.summary.retrained += "; " + self._retrain_mlx(settings)

    def _retrain_mlx(self, settings: Settings) -> str:
        """LoRA-train the tiny Mistral-architecture model (:mod:`.training.tinymodel`) on the
        grown dataset with mlx-lm.

        Its weights are random, so what this shows is the training path (export, the mlx-lm
        child process, its losses), not accuracy. Its tokenizer comes from mistral-common, a dev
        extra: without it the step is skipped with the command that adds it.
        """
        from .training import tinymodel  # numpy, sentencepiece: only with --with-mlx

        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no "PyTorch was not found"
        work = settings.data_dir.parent / "mlx"
        started = time.monotonic()
        try:
            model = tinymodel.build(work / "tiny-model")
        except TrainingError as exc:
            self.say(f"tiny MLX model skipped: {exc}")
            return "MLX skipped (mistral-common missing)"
        exported = Dataset.from_settings(settings).export(
            work / "data", settings.departments, PromptOptions.from_settings(settings)
        )
        # Small and quick: both layers, big steps, one validation batch at the start and the end.
        quick = settings.training.model_copy(update=MLX_TRAINING)
        run = build_run(
            quick,
            model=model,
            data_dir=work / "data",
            adapter_dir=work / "adapters",
            n_train=exported.counts["train"],
            n_valid=exported.counts["valid"],
            iters=MLX_ITERS,
        )
        run = replace(run, steps_per_eval=run.iters, val_batches=1, steps_per_report=5)
        result = run_lora(
            run.write(work / "run.yaml"),
            adapter_dir=work / "adapters",
            total_iters=run.iters,
            log_path=work / "train.log",
            timeout=600,
            nice=settings.training.nice,
        )
        seconds = time.monotonic() - started
        self.say(
            f"tiny MLX model (random weights, real Mistral v0.3 tokenizer): {result.iterations} "
            f"LoRA iterations on {exported.counts['train']} examples in {result.seconds:.1f} s "
            f"({seconds:.1f} s with the model build); train loss {_loss(result.train_loss)}, "
            f"validation loss {_loss(result.val_loss)}"
        )
        return f"tiny MLX model in {seconds:.1f} s"

    def _print_summary(self) -> None:
        s = self.summary
        self.step("Summary")
        routes = ", ".join(f"{k} {v}" for k, v in sorted(s.routes.items()))
        self.say(f"IMAP server: {s.imap}; classifier: {s.backend}")
        self.say(f"{s.emails} emails routed: {routes}")
        self.say(f"{_routing(s)}; {s.triaged} to triage")
        self.say(f"correction: {s.correction}")
        self.say(f"retrained: {s.retrained}")
        self.say(f"demo finished in {s.seconds:.0f} s")


def _settings(values: dict[str, Any], path: Path) -> Settings:
    """Settings for the demo's own servers: given values win over any ``MAILROUTER_*`` variable."""
    return load_settings(write_toml(values, path), **values)


def _landed(decision: Any) -> str:
    """Where a decision sent the mail, in label terms (a department name, or the route)."""
    return decision.department if decision.route in ("department", "spam") else decision.route


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def _loss(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "?"


def _routing(s: Summary) -> str:
    auto = s.as_labelled + s.misrouted
    accuracy = f"{s.as_labelled / auto:.0%}" if auto else "n/a"
    return (
        f"{auto} of {s.emails} routed automatically: {s.as_labelled} right, {s.misrouted} wrong "
        f"(accuracy {accuracy})"
    )
