"""A version's prompt files: kept by digest, found again by the Ollama backend, counted with its
own tokenizer (never below the ids the model evaluates)."""

from __future__ import annotations

import json
from pathlib import Path

import ollama

from mailrouter.chat_template import CHATML, MISTRAL_V3, ChatTemplate
from mailrouter.classify.ollama import OllamaClassifier
from mailrouter.config import Settings
from mailrouter.prediction import ClassifyInput
from mailrouter.tokens import (
    DEFAULT_MEASURE,
    PromptMeasure,
    keep,
    kept_dir,
    measure_for_kept,
    tokenizers_counter,
)
from tests.fixtures.models import starter_test_prompts

DIGEST = "sha256:" + "ab" * 32


def test_kept_files_give_the_models_template_and_tokenizer(
    tiny_model: Path, tmp_path: Path
) -> None:
    folder = keep(tiny_model, kept_dir(tmp_path, DIGEST))
    assert sorted(p.name for p in folder.iterdir()) == [
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    keep(tiny_model, folder)  # replaced whole
    measure = measure_for_kept(tmp_path, DIGEST)
    assert measure.name == "tokenizer" and measure.template.source == MISTRAL_V3
    assert measure_for_kept(tmp_path, "sha256:" + "cd" * 32) is DEFAULT_MEASURE
    assert measure_for_kept(tmp_path, "") is DEFAULT_MEASURE


def test_sentencepiece_count_is_never_below_the_real_ids(tiny_model: Path) -> None:
    """SentencePiece reads ``[INST]`` as text: it counts more, never less, than the model sees."""
    sentencepiece = PromptMeasure.for_model_dir(tiny_model)
    ids = tokenizers_counter(tiny_model / "tokenizer.json")  # control tokens as one id each
    template = ChatTemplate.mistral_v3()
    for prompt in starter_test_prompts():
        exact = ids(template.user_turn(prompt))
        assert exact <= sentencepiece(prompt) <= exact + 8


def test_the_ollama_backend_renders_with_the_template_of_the_model_answering(
    tmp_path: Path,
) -> None:
    """A version whose base speaks ChatML gets ChatML, its stop sequences and its own count."""
    base = tmp_path / "base"
    base.mkdir()
    config = {"chat_template": CHATML, "eos_token": "<|im_end|>"}
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    settings = Settings(data_dir=tmp_path / "data")
    keep(base, kept_dir(settings.models_dir, DIGEST))

    class Listing:
        def list(self) -> ollama.ListResponse:
            model = ollama.ListResponse.Model(model="mailrouter:latest", digest=DIGEST)
            return ollama.ListResponse(models=[model])

    classifier = OllamaClassifier(settings, client=Listing())  # type: ignore[arg-type]
    assert classifier.render(ClassifyInput("Bonjour")).startswith("[INST] ")
    classifier.resolve_model()
    rendered = classifier.render(ClassifyInput("Bonjour", "Objet"))
    assert rendered.startswith("<|im_start|>user\nTu tries") and rendered.endswith(
        "Bonjour<|im_end|>\n<|im_start|>assistant\n"
    )
    assert classifier.template.stop == ["<|im_end|>", "<|im_start|>", "\n"]
