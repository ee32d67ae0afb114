"""What one classification costs: prompt tokens per email and latency through the Ollama API.

Token counts use Mistral-7B-Instruct-v0.3's own tokenizer (``mistral-common``) on the
chat-templated prompt of every test-split email of the starter data, cut as a Mistral v0.3
version cuts it (``classifier.max_prompt_tokens`` of its own template and tokenizer), and of the
same emails 200 times as long (``tokens_max`` covers both: it must stay at or under the bound).
The fixed prefix (instruction and departments) is the longest token prefix all prompts share;
``prefix_identical=yes`` when it covers the whole fixed text, so Ollama reuses its cached
evaluation from one email to the next. Latency is measured through
:class:`~mailrouter.classify.ollama.OllamaClassifier` against the llama.cpp test server running
the tiny test model (so it measures the service path, not a 7B model), and against a real Ollama
when one answers at ``$OLLAMA_HOST`` (default ``127.0.0.1:11434``) with the configured model or
the zero-shot one. Prints, last: ``classify: tokens_mean=…, tokens_p95=…, tokens_max=…,
prefix_tokens=…, prefix_identical=…, ms_per_email=…``.
Targets: at most 400 prompt tokens per email, the fixed prefix identical across emails.

    python bench/classify.py [--config FILE]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mailrouter.chat_template import ChatTemplate  # noqa: E402
from mailrouter.classify.ollama import OllamaClassifier, normalize_host  # noqa: E402
from mailrouter.config import Settings, load_settings  # noqa: E402
from mailrouter.dataset import Dataset, example_prompt  # noqa: E402
from mailrouter.errors import ClassifierError  # noqa: E402
from mailrouter.prediction import ClassifyInput  # noqa: E402
from mailrouter.prompt import PromptOptions, prefix  # noqa: E402
from mailrouter.tokens import PromptMeasure, sentencepiece_counter  # noqa: E402
from mailrouter.training.tinymodel import mistral_tokenizer_path  # noqa: E402

STARTER = REPO / "data" / "examples.jsonl"


def chat_ids(prompts: list[str]) -> list[list[int]]:
    """``<s>[INST]▁prompt[/INST]`` ids, as Mistral's own library encodes a user turn."""
    from mistral_common.protocol.instruct.messages import UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    tokenizer = MistralTokenizer.v3()
    return [
        tokenizer.encode_chat_completion(
            ChatCompletionRequest(messages=[UserMessage(content=p)])
        ).tokens
        for p in prompts
    ]


def common_prefix(sequences: list[list[int]]) -> int:
    first = sequences[0]
    n = len(first)
    for seq in sequences[1:]:
        n = next((i for i, (a, b) in enumerate(zip(first[:n], seq, strict=False)) if a != b), n)
        n = min(n, len(seq))
    return n


def p95(values: list[int]) -> float:
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))])


def mistral_options(settings: Settings) -> PromptOptions:
    """The prompt as served by a Mistral v0.3 version: its template, its tokenizer."""
    counter = sentencepiece_counter(mistral_tokenizer_path())
    measure = PromptMeasure(ChatTemplate.mistral_v3(), counter, "tokenizer")
    return PromptOptions.from_settings(settings, measure)


def long_versions(examples: list) -> list:
    """Each email with its body 200 times over (about 40-100 KB): what the token bound cuts."""
    return [replace(e, text=" ".join([e.text] * 200)) for e in examples]


def token_figures(settings: Settings, examples: list) -> dict[str, object]:
    options = mistral_options(settings)
    prompts = [example_prompt(e, settings.departments, options) for e in examples]
    ids = chat_ids(prompts)
    counts = [len(i) for i in ids]
    long_prompts = [
        example_prompt(e, settings.departments, options) for e in long_versions(examples)
    ]
    long_max = max(len(i) for i in chat_ids(long_prompts))
    shared = common_prefix(ids)
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    decoded = MistralTokenizer.v3().instruct_tokenizer.tokenizer.decode(ids[0][:shared])
    fixed = prefix(settings.departments, strip_accents=options.strip_accents).rstrip()
    mean = statistics.fmean(counts)
    return {
        "n": len(counts),
        "tokens_mean": round(mean),
        "tokens_p95": round(p95(counts)),
        "tokens_max": max(counts),
        "tokens_max_long": long_max,
        "prefix_tokens": shared,
        "prefix_share": f"{shared / mean:.0%}",
        "prefix_identical": "yes" if decoded.strip().startswith(fixed.strip()) else "no",
    }


def latency_ms(settings: Settings, examples: list) -> float:
    """Mean wall time of one ``classify`` call, after one warm-up call."""
    classifier = OllamaClassifier.from_settings(settings)
    items = [ClassifyInput(e.text, e.subject, e.sender_domain) for e in examples]
    classifier.classify(items[0])
    started = time.perf_counter()
    for item in items:
        classifier.classify(item)
    return (time.perf_counter() - started) / len(items) * 1000


def with_ollama(settings: Settings, host: str, model: str | None = None) -> Settings:
    update = {"ollama_host": host} | ({"model": model} if model else {})
    return settings.model_copy(update={"classifier": settings.classifier.model_copy(update=update)})


def test_server_latency(settings: Settings, examples: list) -> float:
    """Start the llama.cpp test server with the fine-tuned tiny model and time the classifier.

    The model is the tests' one (built and cached on first use): it answers with a department
    name, so each request generates what a real answer costs (a label and ``</s>``).
    """
    from mailrouter.training.tinymodel import build
    from tests.fixtures.models import cached_build, tiny_model_key
    from tests.fixtures.ollama import build_trained_gguf, publish_gguf, spawn

    gguf = build_trained_gguf(cached_build("tiny-mistral", tiny_model_key(), build))
    with tempfile.TemporaryDirectory(prefix="mailrouter-bench-") as tmp:
        server = spawn(Path(tmp) / "store", 0, [])
        try:
            publish_gguf(server.url, gguf, "mailrouter-bench:latest")
            return latency_ms(with_ollama(settings, server.url, "mailrouter-bench"), examples)
        finally:
            server.stop()


def real_ollama_latency(settings: Settings, examples: list) -> float | None:
    host = normalize_host(os.environ.get("OLLAMA_HOST") or settings.classifier.ollama_host)
    try:
        return latency_ms(with_ollama(settings, host), examples)
    except ClassifierError as exc:
        print(f"real Ollama at {host}: not measured ({str(exc).splitlines()[0]})")
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=None)
    args = parser.parse_args()
    settings = load_settings(args.config)
    logging.getLogger("mailrouter").setLevel(logging.ERROR)  # the tiny model's answers are noise
    examples = Dataset(STARTER).split("test")
    figures = token_figures(settings, examples)
    print(
        f"prompt tokens on {figures['n']} test emails: mean {figures['tokens_mean']}, "
        f"p95 {figures['tokens_p95']}, max {figures['tokens_max']}; fixed prefix "
        f"{figures['prefix_tokens']} tokens ({figures['prefix_share']} of the mean), "
        f"identical: {figures['prefix_identical']}; the same emails 200 times as long: max "
        f"{figures['tokens_max_long']} (bound: classifier.max_prompt_tokens = "
        f"{settings.classifier.max_prompt_tokens})"
    )
    tokens_max = max(figures["tokens_max"], figures["tokens_max_long"])  # type: ignore[type-var]
    ms = test_server_latency(settings, examples)
    print(f"test server (llama.cpp, tiny model): {ms:.1f} ms per email")
    real = real_ollama_latency(settings, examples)
    extra = ""
    if real is not None:
        print(f"real Ollama ({settings.classifier.model}): {real:.1f} ms per email")
        extra = f", ollama_ms_per_email={real:.0f}"
    print(
        f"classify: tokens_mean={figures['tokens_mean']}, tokens_p95={figures['tokens_p95']}, "
        f"tokens_max={tokens_max}, "
        f"prefix_tokens={figures['prefix_tokens']}, "
        f"prefix_identical={figures['prefix_identical']}, ms_per_email={ms:.0f}{extra}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
