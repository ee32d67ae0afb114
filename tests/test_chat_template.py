"""Chat templates: our rendering is transformers' (what mlx-lm trains on), token for token
Mistral's own encoding for v0.3, and the serving string becomes the same ids once the runtime
adds the BOS."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st
from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from transformers.utils.chat_template_utils import render_jinja_template

from mailrouter.chat_template import MISTRAL_V3, ChatTemplate, ChatTemplateError, detect_family
from mailrouter.training import tinymodel
from tests.fixtures.models import starter_test_prompts

BUILTINS = ["mistral", "chatml", "llama3", "gemma"]


@functools.cache
def _mistral(mode: ValidationMode) -> MistralTokenizer:
    return MistralTokenizer.from_file(str(tinymodel.mistral_tokenizer_path()), mode=mode)


def _reference(prompt: str, answer: str | None) -> list[int]:
    """mistral-common's ids: a training row (with the answer) or a serving request (without)."""
    if answer is None:
        request = ChatCompletionRequest(messages=[UserMessage(content=prompt)])
        return _mistral(ValidationMode.test).encode_chat_completion(request).tokens
    messages = [UserMessage(content=prompt), AssistantMessage(content=answer)]
    request = ChatCompletionRequest(messages=messages)
    return _mistral(ValidationMode.finetuning).encode_chat_completion(request).tokens


@functools.cache
def _fast(tiny_model: Path) -> tokenizers.Tokenizer:
    """The tiny model's tokenizer.json: Mistral's pieces, its control tokens read as special."""
    return tokenizers.Tokenizer.from_file(str(tiny_model / "tokenizer.json"))


def _ids(tiny_model: Path, text: str) -> list[int]:
    return _fast(tiny_model).encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("name", BUILTINS)
def test_rendering_is_transformers_rendering(name: str) -> None:
    """The same text as transformers' apply_chat_template (what mlx-lm tokenizes)."""
    template = ChatTemplate.builtin(name)
    user = [{"role": "user", "content": "Objet : test\n  corps  "}]
    both = [*user, {"role": "assistant", "content": "RH"}]
    tokens = {"bos_token": template.bos_token, "eos_token": template.eos_token}
    for messages, generation in ((user, True), (both, False)):
        expected = render_jinja_template(
            [messages], chat_template=template.source, add_generation_prompt=generation, **tokens
        )[0][0]
        assert template.render(messages, add_generation_prompt=generation) == expected


def test_mistral_v3_is_the_tiny_models_template(tiny_model: Path) -> None:
    config = json.loads((tiny_model / "tokenizer_config.json").read_text())
    assert config["chat_template"] == MISTRAL_V3
    assert ChatTemplate.from_model_dir(tiny_model) == ChatTemplate(
        MISTRAL_V3, "<s>", "</s>", add_bos=True, name=tiny_model.name
    )


def test_mistral_v3_ids_are_mistral_commons_on_the_starter_prompts(tiny_model: Path) -> None:
    """Training text (what mlx-lm tokenizes) and serving text + the runtime's BOS: Mistral's ids."""
    template = ChatTemplate.mistral_v3()
    for prompt in starter_test_prompts():
        assert _ids(tiny_model, template.training_text(prompt, "RH")) == _reference(prompt, "RH")
        served = [1, *_ids(tiny_model, template.serving(prompt))]
        assert served == _reference(prompt, None)
        assert _ids(tiny_model, template.user_turn(prompt)) == served


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1))
def test_mistral_v3_ids_for_any_text(tiny_model: Path, text: str) -> None:
    prompt = " ".join(text.split()) or "x"
    template = ChatTemplate.mistral_v3()
    assert [1, *_ids(tiny_model, template.serving(prompt))] == _reference(prompt, None)


def test_serving_leaves_the_bos_to_the_runtime() -> None:
    assert ChatTemplate.mistral_v3().serving("P") == "[INST] P[/INST]"
    assert ChatTemplate.mistral_v3().user_turn("P") == "<s>[INST] P[/INST]"
    assert ChatTemplate.chatml().serving("P") == (
        "<|im_start|>user\nP<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ChatTemplate.llama3().serving("P").startswith("<|start_header_id|>user")
    assert ChatTemplate.gemma().serving("P") == (
        "<start_of_turn>user\nP<end_of_turn>\n<start_of_turn>model\n"
    )


@pytest.mark.parametrize("name", BUILTINS)
def test_ollama_template_is_the_serving_text(name: str) -> None:
    template = ChatTemplate.builtin(name)
    go = template.ollama_template()
    assert go.count("{{ .Prompt }}") == 1
    assert go.replace("{{ .Prompt }}", "P") == template.serving("P")


def test_stop_sequences() -> None:
    assert ChatTemplate.mistral_v3().stop == ["</s>", "[INST]", "\n"]
    assert ChatTemplate.chatml().stop == ["<|im_end|>", "<|im_start|>", "\n"]
    assert ChatTemplate.llama3().stop == ["<|eot_id|>", "\n"]


def test_from_model_dir(tmp_path: Path) -> None:
    """chat_template.jinja wins over tokenizer_config.json; a folder without one gets its family."""
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": {"content": "<s>"}, "eos_token": "</s>", "add_bos_token": True})
    )
    assert ChatTemplate.from_model_dir(tmp_path).source == MISTRAL_V3
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "chat_template": [{"name": "default", "template": "{{ messages[0].content }}"}],
                "added_tokens_decoder": {"0": {"content": "<|im_start|>"}},
                "eos_token": "<|im_end|>",
            }
        )
    )
    found = ChatTemplate.from_model_dir(tmp_path)
    assert (found.serving("P"), found.add_bos, found.eos_token) == ("P", False, "<|im_end|>")
    assert detect_family(tmp_path) == "chatml"
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}<{{ messages[0].content }}>")
    assert ChatTemplate.from_model_dir(tmp_path).user_turn("P") == "<P>"


def test_errors_name_the_template() -> None:
    with pytest.raises(ChatTemplateError, match="alternate"):
        ChatTemplate.mistral_v3().render(
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
            add_generation_prompt=True,
        )
    with pytest.raises(ChatTemplateError, match="no built-in"):
        ChatTemplate.builtin("nope")
    with pytest.raises(ChatTemplateError, match="does not parse"):
        ChatTemplate("{% if %}").user_turn("P")


def test_chatml_serving_ids_are_the_prefix_mlx_lm_masks() -> None:
    """SmolLM2-135M-Instruct's own ChatML template and tokenizer (its GGUF, read by llama.cpp):
    the serving ids are the user turn's ids of the training row, and the rest is the answer."""
    from llama_cpp import Llama

    from tests.conftest import require
    from tests.fixtures.smollm2 import INSTALL, gguf_chat_template, smollm2_gguf

    path = smollm2_gguf()
    require(path is not None, INSTALL)
    assert path is not None
    template = gguf_chat_template(path)
    assert "<|im_start|>" in template.source and not template.add_bos
    llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    for prompt in starter_test_prompts()[:10]:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": "RH"}]
        full = template.training_text(prompt, "RH")
        assert (
            full
            == render_jinja_template(
                [messages], chat_template=template.source, eos_token=template.eos_token
            )[0][0]
        )
        trained = llm.tokenize(full.encode(), add_bos=False, special=True)
        served = llm.tokenize(template.serving(prompt).encode(), add_bos=False, special=True)
        assert trained[: len(served)] == served
        answer = llm.tokenize(b"RH<|im_end|>\n", add_bos=False, special=True)
        assert trained[len(served) :] == answer and answer[1] == llm.token_eos()
