"""The one prompt: what the model is trained on and what it sees in service.

Training export, the Ollama backend, the MLX backend and the baseline all build their input with
:func:`build_prompt`, so a change here changes all of them at once and they can never drift apart.
The fixed text (instruction, departments) comes first and the email last: Ollama reuses the cached
prefix between emails, and the prefix is byte-identical for every email.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

from unidecode import unidecode

from .config import Department, Settings

INSTRUCTION = (
    "Tu tries le courrier de la boite contact d'une entreprise. "
    "Reponds uniquement par le nom du service qui doit traiter l'email, sans autre mot."
)

#: Mistral v0.3 chat template (Jinja, as in tokenizer_config.json):
#: ``<s>[INST] user[/INST] answer</s>``.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + '[/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
)

#: The same rendering in Ollama's Go template language, for ``ollama run`` by hand.
OLLAMA_TEMPLATE = "[INST] {{ .Prompt }}[/INST]"

#: Stop sequences for generation: the answer is one label and ends with ``</s>``.
STOP = ["</s>", "[INST]", "\n"]


#: Text an email could use to pose as the chat template's control tokens (``[INST]``, ``</s>``,
#: ``[TOOL_CALLS]``…): tokenizers parse these as special tokens, so they are defused in the email.
_CONTROL_LIKE = re.compile(r"\[(/?[A-Z][A-Z_0-9]*)\]|<(/?)(s|unk)>")


_NON_ASCII = re.compile(r"[^\x00-\x7f]+")


def _ascii(text: str) -> str:
    """``unidecode(text)``, computed on the non-ASCII stretches only: the same string (it maps
    each character on its own), without walking every ASCII character in Python."""
    if text.isascii():
        return text
    return _NON_ASCII.sub(lambda m: unidecode(m.group()), text)


def _defuse(text: str) -> str:
    return _CONTROL_LIKE.sub(
        lambda m: f"({m.group(1)})" if m.group(1) else f"< {m.group(2)}{m.group(3)}>", text
    )


@dataclass(frozen=True)
class PromptOptions:
    """The knobs of the prompt that come from ``[classifier]``."""

    max_chars: int = 2000
    strip_accents: bool = True

    @classmethod
    def from_settings(cls, settings: Settings) -> PromptOptions:
        return cls(
            max_chars=settings.classifier.max_chars,
            strip_accents=settings.classifier.strip_accents,
        )


def prefix(departments: Sequence[Department], *, strip_accents: bool = True) -> str:
    """The part of every prompt that does not depend on the email."""
    return _prefix(tuple((d.name, d.description) for d in departments), strip_accents)


@functools.lru_cache(maxsize=16)
def _prefix(departments: tuple[tuple[str, str], ...], strip_accents: bool) -> str:
    """Built once per department list: transliterating it was a fifth of classifying a batch."""
    lines = [INSTRUCTION, "", "Services :"]
    for name, description in departments:
        desc = f" : {description}" if description else ""
        lines.append(f"- {name}{desc}")
    lines += ["", "Email :", ""]
    text = "\n".join(lines)
    return unidecode(text) if strip_accents else text


def build_prompt(
    email_text: str,
    departments: Sequence[Department],
    *,
    subject: str = "",
    sender_domain: str = "",
    options: PromptOptions = PromptOptions(),
) -> str:
    """The full prompt for one email: :func:`prefix` + subject, sender domain and truncated body."""
    body = " ".join(email_text.split()) if email_text.strip() else "(vide)"
    if len(body) > options.max_chars:
        body = body[: options.max_chars].rsplit(" ", 1)[0] + " [...]"
    head = []
    if subject.strip():
        head.append(f"Objet : {' '.join(subject.split())}")
    if sender_domain.strip():
        head.append(f"Domaine de l'expediteur : {sender_domain.strip().lower()}")
    email_part = "\n".join([*head, body])
    if options.strip_accents:
        email_part = _ascii(email_part)
    return prefix(departments, strip_accents=options.strip_accents) + _defuse(email_part)


def render_chat(prompt: str) -> str:
    """The prompt as the chat template renders a user turn, without the BOS text.

    This is the string sent to Ollama with ``raw: true``; mlx-lm produces the same tokens from
    ``{"prompt": prompt, "completion": label}`` through :data:`CHAT_TEMPLATE`.
    """
    return f"[INST] {prompt}[/INST]"
