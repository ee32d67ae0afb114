"""Benchmark: a backlog drained at the rate the LLM server allows.

A full mailbox (after a weekend, a holiday, a first install) is worked through as fast as the
model answers. With a server that takes L seconds per answer and computes P answers at once,
nothing can route more than P / L emails a second: that is ``ideal``, and ``ratio`` is how close
one ``Pipeline.run_once()`` (what ``mailrouter serve`` runs) comes to it, from the IMAP
connection to the last original filed.

Servers, all on loopback: Dovecot with ``-n`` emails in a fresh mailbox, the SMTP sink in its
own process, and the Ollama-compatible test server (``tests/ollama_server.py``) started with
``--latency-ms L --parallel P``: each generation holds one of P slots for L ms, later requests
wait in line for a slot, as Ollama queues requests beyond its ``OLLAMA_NUM_PARALLEL`` slots.
The router runs with its defaults (``classifier.concurrency`` 4, batches of 50).

The answers are a recorded real one (``--canned-response``): the fine-tuned tiny test model's
answer to the first starter test email, captured from the test server's HTTP response to the
classifier's own request, is replayed for every request, through the same HTTP API. It does not
flatter the figure: each request is the router's real one (its prompt, validated by the server),
each answer is the JSON a model sends (the label, the end token, 20 alternatives per token), so
the router parses it, computes a confidence for every department and forwards the email to a
department, as for any answer. What it leaves out is the model's own compute, which a real
Ollama does on its GPU, not on the cores the router uses.

``--model`` has the tiny model (llama.cpp) compute every answer instead, on the same two cores as
the router, Dovecot and the sink: a few ms an email, one at a time in its one llama.cpp context,
inside the L ms of its slot; on a loaded machine some take hundreds of ms, and the figure then
measures this machine more than the router.

Prints, for each P: ``backlog: n=…, latency_ms=…, parallel=…, msgs_per_s=…, ideal=…, ratio=…``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import ollama

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline import SinkProcess, dataset_into, messages  # noqa: E402

from mailrouter.classify.ollama import OllamaClassifier  # noqa: E402
from mailrouter.config import load_settings  # noqa: E402
from mailrouter.dataset import Dataset  # noqa: E402
from mailrouter.localservers import DovecotServer, find_dovecot, local_config, write_toml  # noqa: E402
from mailrouter.wiring import build_pipeline  # noqa: E402
from tests.fixtures.ollama import OllamaEndpoint, publish_gguf, spawn  # noqa: E402

MODEL = "mailrouter-bench:latest"


def tiny_model() -> Path:
    """The tests' fine-tuned tiny model as GGUF (built and cached on first use)."""
    from mailrouter.training.tinymodel import build
    from tests.fixtures.models import cached_build, tiny_model_key
    from tests.fixtures.ollama import build_trained_gguf

    return build_trained_gguf(cached_build("tiny-mistral", tiny_model_key(), build))


def serve(store: Path, gguf: Path, args: list[str]) -> OllamaEndpoint:
    """The test server on ``store`` with ``args``, the tiny model published as MODEL."""
    server = spawn(store, 0, args)
    publish_gguf(server.url, gguf, MODEL)
    return server


def record_answer(store: Path, gguf: Path, data_dir: Path, out: Path) -> str:
    """Record in ``out`` the test server's HTTP answer to the classifier's request for the first
    starter test email; its raw answer."""
    server = serve(store, gguf, [])
    try:
        answers: list[bytes] = []

        def keep(response: httpx.Response) -> None:
            if response.request.url.path == "/api/generate":
                answers.append(response.read())

        conf = {"backend": "ollama", "ollama_host": server.url, "model": MODEL}
        settings = load_settings(None, classifier=conf)
        client = ollama.Client(host=server.url, event_hooks={"response": [keep]})
        example = Dataset(data_dir / "examples.jsonl").split("test")[0]
        prediction = OllamaClassifier(settings, client=client).classify(example.to_input())
    finally:
        server.stop()
    json.loads(answers[-1])  # one JSON object: the non-streamed answer
    out.write_bytes(answers[-1])
    return prediction.raw


def drain(
    dovecot: DovecotServer, sink: SinkProcess, server: OllamaEndpoint, work: Path, n: int
) -> tuple[float, int]:
    """Seconds one round takes to route a fresh mailbox of ``n`` emails, and the forwards."""
    data_dir = Path(tempfile.mkdtemp(prefix="data", dir=work))
    os.environ["MAILROUTER_DATA_DIR"] = str(data_dir)
    dataset_into(data_dir)
    account = dovecot.add_user()
    account.append(messages(data_dir, n))
    conf = local_config(
        account,
        (sink.host, sink.port),
        data_dir,
        classifier={"backend": "ollama", "ollama_host": server.url, "model": MODEL},
    )
    settings = load_settings(write_toml(conf, data_dir / "mailrouter.toml"))
    pipeline = build_pipeline(settings)
    try:
        started = time.perf_counter()
        report = pipeline.run_once()
        seconds = time.perf_counter() - started
    finally:
        pipeline.close()
    if report.filed != n or report.waiting:
        sys.exit(f"the round filed {report.filed} of {n} emails ({report.waiting} waiting)")
    return seconds, report.forwarded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument(
        "--parallel", default="4,1", help="the server's slots; a comma-separated list runs each"
    )
    parser.add_argument(
        "--model", action="store_true", help="the tiny model computes every answer (no replay)"
    )
    args = parser.parse_args()
    if find_dovecot() is None:
        sys.exit("dovecot is not installed (apt-get install dovecot-imapd)")
    os.environ.setdefault("MAILROUTER_CORRECTIONS__TOKEN_KEY", os.urandom(16).hex())
    os.environ["MAILROUTER_NO_KEYRING"] = "1"
    logging.getLogger("mailrouter").setLevel(logging.ERROR)  # --model: its answers are noise
    work = Path(tempfile.mkdtemp(prefix="mailrouter-backlog-"))
    try:
        dataset_into(work)
        gguf = tiny_model()
        answers: list[str] = []
        if not args.model:
            canned = work / "answer.json"
            answer = record_answer(work / "store", gguf, work, canned)
            print(f"replaying {answer!r}, the tiny model's answer to the first starter test email")
            answers = ["--canned-response", str(canned)]
        sink = SinkProcess()
        slots = [int(p) for p in args.parallel.split(",")]
        forwarded = 0
        with DovecotServer() as dovecot:
            for parallel in slots:
                load = ["--parallel", str(parallel), "--latency-ms", str(args.latency_ms)]
                server = serve(work / "store", gguf, answers + load)
                try:
                    seconds, sent = drain(dovecot, sink, server, work, args.n)
                finally:
                    server.stop()
                forwarded += sent
                rate, ideal = args.n / seconds, parallel / (args.latency_ms / 1000)
                print(
                    f"backlog: n={args.n}, latency_ms={args.latency_ms:g}, parallel={parallel}, "
                    f"msgs_per_s={rate:.2f}, ideal={ideal:.2f}, ratio={rate / ideal:.2f}",
                    flush=True,
                )
        if (received := sink.close()) != forwarded:
            sys.exit(f"the SMTP server received {received} of {forwarded} forwards")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
