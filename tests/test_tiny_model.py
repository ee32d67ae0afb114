"""The tiny model is a real Mistral v0.3 stand-in: Mistral's own token ids, and mlx-lm trains it."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mailrouter.chat_template import MISTRAL_V3
from mailrouter.errors import TrainingError
from mailrouter.training import tinymodel as generator
from tests.conftest import require
from tests.fixtures.models import starter_test_prompts


@functools.cache
def _mistral_tokenizer() -> MistralTokenizer:
    """Mistral's own tokenizer in fine-tuning mode (a row ends with the assistant's answer)."""
    return MistralTokenizer.from_file(
        str(generator.mistral_tokenizer_path()), mode=ValidationMode.finetuning
    )


def _mistral_ids(prompt: str, answer: str) -> list[int]:
    """Mistral's reference encoding of one training row."""
    tokenizer = _mistral_tokenizer()
    request = ChatCompletionRequest(
        messages=[UserMessage(content=prompt), AssistantMessage(content=answer)]
    )
    return tokenizer.encode_chat_completion(request).tokens


def _ids(encoded: object) -> list[int]:
    return list(encoded["input_ids"] if isinstance(encoded, dict) else encoded)  # type: ignore[index]


def test_files_and_config(tiny_model: Path) -> None:
    config = json.loads((tiny_model / "config.json").read_text())
    assert config["model_type"] == "mistral"
    assert config["vocab_size"] == 32768
    tok_config = json.loads((tiny_model / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == MISTRAL_V3
    assert (tok_config["bos_token"], tok_config["eos_token"]) == ("<s>", "</s>")
    assert (tiny_model / "tokenizer.model").read_bytes() == (
        generator.mistral_tokenizer_path().read_bytes()
    )


def test_build_is_deterministic(tmp_path: Path, tiny_model: Path) -> None:
    generator.build(tmp_path)
    for name in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]:
        assert (tmp_path / name).read_bytes() == (tiny_model / name).read_bytes(), name


def test_chat_template_tokens_equal_mistral_common(tiny_model: Path) -> None:
    """Every starter test email: mlx-lm's training tokens are Mistral's own encoding."""
    from mlx_lm.utils import load_tokenizer

    prompts = starter_test_prompts()
    require(bool(prompts), "the starter data has no test split")
    tokenizer = load_tokenizer(tiny_model)
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": "RH"}]
        full = _ids(tokenizer.apply_chat_template(messages))
        assert full == _mistral_ids(prompt, "RH")
        assert full[:2] == [1, 3] and full[-2:] == [tokenizer.encode("RH")[-1], 2]
        # --mask-prompt needs the rendered user turn to be a token prefix of the full row.
        head = _ids(tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True))
        assert full[: len(head)] == head and head[-1] == 4


def test_mlx_lm_lora_trains(tiny_adapter: Path) -> None:
    """mlx-lm's own ``lora`` command trains it (the fixture runs it; training tests go further)."""
    config = json.loads((tiny_adapter / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == 2
    assert (tiny_adapter / "adapters.safetensors").stat().st_size > 0


def test_without_mistral_common_the_error_names_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An installed mailrouter may lack the dev extra: the demo shows this and goes on."""
    monkeypatch.setitem(sys.modules, "mistral_common", None)  # as if it were not installed
    with pytest.raises(TrainingError, match="pipx inject mailrouter mistral-common"):
        generator.build(tmp_path / "tiny")
