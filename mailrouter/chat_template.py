"""The base model's own chat template: one rendering for training and for serving.

mlx-lm turns a ``completions`` row ``{prompt, completion}`` into tokens with the tokenizer's chat
template (``apply_chat_template`` of ``[user: prompt, assistant: completion]``, and of the user turn
with ``add_generation_prompt`` for ``--mask-prompt``: ``mlx_lm/tuner/datasets.py``,
``CompletionsDataset.process``). The router must send the model the same text, so it renders the
same Jinja template, with the environment transformers builds for it
(``transformers/utils/chat_template_utils.py``, ``_cached_compile_jinja_template``: a sandboxed
environment, ``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, ``raise_exception``,
``strftime_now``, a ``tojson`` that does not escape HTML).

Where the BOS goes: a template that starts with ``bos_token`` renders its text (``<s>``), which
transformers and mlx-lm tokenize as the BOS id without adding another (``apply_chat_template``
tokenizes with ``add_special_tokens=False``). llama.cpp and Ollama add the BOS themselves when the
GGUF says ``tokenizer.ggml.add_bos_token`` (llama.cpp ``common_tokenize(..., add_special=true)``;
Ollama's raw ``/api/generate`` goes through the same tokenizer), so the string sent to them drops
the leading BOS text when :attr:`ChatTemplate.add_bos` is set: the ids are then the same, which the
tests check with llama.cpp and with mistral-common's own tokenizer.

A model folder's template is found as transformers finds it: ``chat_template.jinja`` (what
``save_pretrained`` writes since transformers 4.49), else ``chat_template`` in
``tokenizer_config.json``. A folder without one gets the built-in template of its family, guessed
from its special tokens; the built-ins are the real template texts of the models named below.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import MailRouterError

#: mistralai/Mistral-7B-Instruct-v0.3, ``tokenizer_config.json`` ``chat_template`` (Hugging Face
#: hub, the revision with tool calls and an optional system message): ``<s>[INST] user[/INST]
#: answer</s>``.
MISTRAL_V3 = (
    '{%- if messages[0]["role"] == "system" %}\n'
    '    {%- set system_message = messages[0]["content"] %}\n'
    "    {%- set loop_messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n"
    "{%- if not tools is defined %}\n"
    "    {%- set tools = none %}\n"
    "{%- endif %}\n"
    '{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}\n'
    "\n"
    "{#- This block checks for alternating user/assistant messages, skipping tool calling"
    " messages #}\n"
    "{%- set ns = namespace() %}\n"
    "{%- set ns.index = 0 %}\n"
    "{%- for message in loop_messages %}\n"
    '    {%- if not (message.role == "tool" or message.role == "tool_results" or'
    " (message.tool_calls is defined and message.tool_calls is not none)) %}\n"
    '        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}\n'
    '            {{- raise_exception("After the optional system message, conversation roles'
    ' must alternate user/assistant/user/assistant/...") }}\n'
    "        {%- endif %}\n"
    "        {%- set ns.index = ns.index + 1 %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "\n"
    "{{- bos_token }}\n"
    "{%- for message in loop_messages %}\n"
    '    {%- if message["role"] == "user" %}\n'
    "        {%- if tools is not none and (message == user_messages[-1]) %}\n"
    '            {{- "[AVAILABLE_TOOLS] [" }}\n'
    "            {%- for tool in tools %}\n"
    "                {%- set tool = tool.function %}\n"
    '                {{- \'{"type": "function", "function": {\' }}\n'
    '                {%- for key, val in tool.items() if key != "return" %}\n'
    "                    {%- if val is string %}\n"
    "                        {{- '\"' + key + '\": \"' + val + '\"' }}\n"
    "                    {%- else %}\n"
    "                        {{- '\"' + key + '\": ' + val|tojson }}\n"
    "                    {%- endif %}\n"
    "                    {%- if not loop.last %}\n"
    '                        {{- ", " }}\n'
    "                    {%- endif %}\n"
    "                {%- endfor %}\n"
    '                {{- "}}" }}\n'
    "                {%- if not loop.last %}\n"
    '                    {{- ", " }}\n'
    "                {%- else %}\n"
    '                    {{- "]" }}\n'
    "                {%- endif %}\n"
    "            {%- endfor %}\n"
    '            {{- "[/AVAILABLE_TOOLS]" }}\n'
    "            {%- endif %}\n"
    "        {%- if loop.last and system_message is defined %}\n"
    '            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}\n'
    "        {%- else %}\n"
    '            {{- "[INST] " + message["content"] + "[/INST]" }}\n'
    "        {%- endif %}\n"
    "    {%- elif message.tool_calls is defined and message.tool_calls is not none %}\n"
    '        {{- "[TOOL_CALLS] [" }}\n'
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- set out = tool_call.function|tojson %}\n"
    "            {{- out[:-1] }}\n"
    "            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}\n"
    '                {{- raise_exception("Tool call IDs should be alphanumeric strings with'
    ' length 9!") }}\n'
    "            {%- endif %}\n"
    "            {{- ', \"id\": \"' + tool_call.id + '\"}' }}\n"
    "            {%- if not loop.last %}\n"
    '                {{- ", " }}\n'
    "            {%- else %}\n"
    '                {{- "]" + eos_token }}\n'
    "            {%- endif %}\n"
    "        {%- endfor %}\n"
    '    {%- elif message["role"] == "assistant" %}\n'
    '        {{- " " + message["content"]|trim + eos_token}}\n'
    '    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}\n'
    "        {%- if message.content is defined and message.content.content is defined %}\n"
    "            {%- set content = message.content.content %}\n"
    "        {%- else %}\n"
    "            {%- set content = message.content %}\n"
    "        {%- endif %}\n"
    '        {{- \'[TOOL_RESULTS] {"content": \' + content|string + ", " }}\n'
    "        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}\n"
    '            {{- raise_exception("Tool call IDs should be alphanumeric strings with'
    ' length 9!") }}\n'
    "        {%- endif %}\n"
    "        {{- '\"call_id\": \"' + message.tool_call_id + '\"}[/TOOL_RESULTS]' }}\n"
    "    {%- else %}\n"
    '        {{- raise_exception("Only user and assistant roles are supported, with the'
    ' exception of an initial optional system message!") }}\n'
    "    {%- endif %}\n"
    "{%- endfor %}\n"
)

#: ChatML, as transformers shipped it for models without a template (``default_chat_template``
#: of ``PreTrainedTokenizerBase``, transformers 4.x) and as Qwen and SmolLM2 use it (SmolLM2's
#: own template also adds a default system turn: a model folder's template wins over this one).
CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

#: meta-llama/Meta-Llama-3-8B-Instruct, ``tokenizer_config.json`` ``chat_template``.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

#: google/gemma-2-2b-it (and gemma-1.1-it), ``tokenizer_config.json`` ``chat_template``.
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

#: Text that ends a turn in one of the families: generation stops there (with ``\n``: the
#: answer is one label on one line).
_TURN_MARKERS = ("[INST]", "<|im_end|>", "<|im_start|>", "<|eot_id|>", "<end_of_turn>")

#: Where a prompt goes in :meth:`ChatTemplate.ollama_template`.
_SLOT = "\x00PROMPT\x00"


class ChatTemplateError(MailRouterError):
    """A chat template that does not render a user turn (or a folder without a usable one)."""


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template with the special-token texts it is rendered with.

    ``add_bos``: the runtime (llama.cpp, Ollama, mlx-lm's tokenizer) adds the BOS token itself,
    so :meth:`serving` leaves the leading ``bos_token`` text out.
    """

    source: str
    bos_token: str = ""
    eos_token: str = ""
    add_bos: bool = False
    name: str = "custom"
    extra: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)

    # --- built-ins ---------------------------------------------------------------------

    @classmethod
    def mistral_v3(cls) -> ChatTemplate:
        return cls(MISTRAL_V3, "<s>", "</s>", add_bos=True, name="mistral")

    @classmethod
    def chatml(cls) -> ChatTemplate:
        return cls(CHATML, "", "<|im_end|>", add_bos=False, name="chatml")

    @classmethod
    def llama3(cls) -> ChatTemplate:
        return cls(LLAMA3, "<|begin_of_text|>", "<|eot_id|>", add_bos=True, name="llama3")

    @classmethod
    def gemma(cls) -> ChatTemplate:
        return cls(GEMMA, "<bos>", "<eos>", add_bos=True, name="gemma")

    @classmethod
    def builtin(cls, name: str) -> ChatTemplate:
        """``mistral``, ``chatml``, ``llama3`` or ``gemma``."""
        found = {"mistral": cls.mistral_v3, "chatml": cls.chatml, "llama3": cls.llama3}
        found["gemma"] = cls.gemma
        if name not in found:
            raise ChatTemplateError(
                f"no built-in chat template {name!r} (known: {', '.join(sorted(found))})"
            )
        return found[name]()

    @classmethod
    def from_model_dir(cls, folder: str | Path) -> ChatTemplate:
        """The template a model folder's tokenizer applies (see the module docstring)."""
        return from_model_dir(Path(folder))

    # --- rendering -----------------------------------------------------------------------

    def render(self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool) -> str:
        """What ``tokenizer.apply_chat_template(messages, tokenize=False, ...)`` returns."""
        try:
            return _compiled(self.source).render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **self.extra,
            )
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template {self.name!r}: {exc}") from exc

    def user_turn(self, prompt: str) -> str:
        """The user turn with the generation prompt, BOS text included: what mlx-lm masks."""
        return self.render([{"role": "user", "content": prompt}], add_generation_prompt=True)

    def training_text(self, prompt: str, answer: str) -> str:
        """The user turn and the answer, as mlx-lm renders a ``completions`` row."""
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        return self.render(messages, add_generation_prompt=False)

    def serving(self, prompt: str) -> str:
        """The raw string sent to Ollama (``raw: true``) or an OpenAI-style ``/v1/completions``:
        :meth:`user_turn` without the leading BOS text when the runtime adds the BOS itself."""
        text = self.user_turn(prompt)
        if self.add_bos and self.bos_token and text.startswith(self.bos_token):
            return text[len(self.bos_token) :]
        return text

    @property
    def stop(self) -> list[str]:
        """Stop sequences for generation: the end of turn, the start of a new one, a new line."""
        found = [self.eos_token] if self.eos_token else []
        found += [m for m in _TURN_MARKERS if m in self.source and m not in found]
        return [*found, "\n"]

    def ollama_template(self) -> str:
        """The same user turn in Ollama's Go template language (``{{ .Prompt }}``), for a
        published model that a person runs by hand (``ollama run``); the router sends raw text."""
        return self.serving(_SLOT).replace("{{", '{{ "{{" }}').replace(_SLOT, "{{ .Prompt }}")

    def with_tokens(self, bos_token: str, eos_token: str) -> ChatTemplate:
        return replace(self, bos_token=bos_token, eos_token=eos_token)


# --- compiling ------------------------------------------------------------------------------


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """transformers' ``tojson``: no HTML escaping, keys in order."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def _compiled(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"the chat template does not parse: {exc}") from exc


# --- model folders ----------------------------------------------------------------------------

#: A special token only one family has, and that family's built-in template.
_FAMILY_TOKENS = (
    ("<|im_start|>", "chatml"),
    ("<|start_header_id|>", "llama3"),
    ("<start_of_turn>", "gemma"),
    ("[INST]", "mistral"),
)


def _token_text(value: Any) -> str:
    """A special token as ``tokenizer_config.json`` writes it: a string or ``{"content": …}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def _config_template(config: Mapping[str, Any]) -> str:
    """``chat_template``: a string, or a list of named templates of which ``default`` is used."""
    value = config.get("chat_template")
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) else ""


def detect_family(folder: Path) -> str:
    """The built-in template that fits a folder without one: from its special tokens, else
    ``mistral`` (the base model this project was made for)."""
    text = ""
    for name in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        path = folder / name
        if path.is_file():
            text += path.read_text(encoding="utf-8", errors="replace")
    return next((family for token, family in _FAMILY_TOKENS if token in text), "mistral")


def from_model_dir(folder: Path) -> ChatTemplate:
    """The chat template of a model folder (base model, fused model or a kept version)."""
    config_path = folder / "tokenizer_config.json"
    try:
        config = (
            json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        )
    except ValueError as exc:
        raise ChatTemplateError(f"{config_path} is not valid JSON: {exc}") from exc
    jinja_path = folder / "chat_template.jinja"
    source = jinja_path.read_text(encoding="utf-8") if jinja_path.is_file() else ""
    source = source or _config_template(config)
    fallback = ChatTemplate.builtin(detect_family(folder))
    bos = _token_text(config.get("bos_token")) or fallback.bos_token
    eos = _token_text(config.get("eos_token")) or fallback.eos_token
    if not source:
        add_bos = bool(config.get("add_bos_token", fallback.add_bos))
        return replace(fallback, bos_token=bos, eos_token=eos, add_bos=add_bos)
    add_bos = bool(config.get("add_bos_token", "bos_token" in source))
    return ChatTemplate(source, bos, eos, add_bos=add_bos, name=f"{folder.name}")
