"""The tiny model is a real Mistral v0.3 stand-in: Mistral's own token ids, and mlx-lm trains it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from tests import tiny_model as generator
from tests.conftest import require
from tests.fixtures.models import starter_test_prompts


def _mistral_ids(prompt: str, answer: str) -> list[int]:
    """Mistral's reference encoding of one training row (finetuning mode: ends with the answer)."""
    tokenizer = MistralTokenizer.from_file(
        str(generator.mistral_tokenizer_path()), mode=ValidationMode.finetuning
    )
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
    assert tok_config["chat_template"] == generator.CHAT_TEMPLATE
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


def test_mlx_lm_lora_trains(tiny_model: Path, tmp_path: Path) -> None:
    """A few LoRA iterations through mlx-lm's own command (the training tests go further)."""
    data = tmp_path / "data"
    data.mkdir()
    rows = [
        {"prompt": f"Email {i} : bonjour", "completion": label}
        for i, label in enumerate(["RH", "Support", "Finance", "SPAM"])
    ]
    for split in ("train", "valid"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    adapters = tmp_path / "adapters"
    cmd = [
        sys.executable,
        "-m",
        "mlx_lm",
        "lora",
        "--model",
        str(tiny_model),
        "--train",
        "--data",
        str(data),
        "--iters",
        "3",
        "--batch-size",
        "2",
        "--num-layers",
        "2",
        "--mask-prompt",
        "--val-batches",
        "1",
        "--steps-per-eval",
        "3",
        "--adapter-path",
        str(adapters),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert (adapters / "adapters.safetensors").stat().st_size > 0
