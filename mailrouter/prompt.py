"""The one prompt: what the model is trained on and what it sees in service.

Training export, the Ollama backend, the MLX backend and the baseline all build their input with
:func:`build_prompt`, so a change here changes all of them at once and they can never drift apart.
The fixed text (instruction, departments) comes first and the email last: Ollama reuses the cached
prefix between emails, and the prefix is byte-identical for every email.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from unidecode import unidecode

from .config import Department, Settings
from .errors import ConfigError
from .tokens import DEFAULT_MEASURE, PromptMeasure

INSTRUCTION = (
    "Tu tries le courrier de la boite contact d'une entreprise. "
    "Reponds uniquement par le nom du service qui doit traiter l'email, sans autre mot."
)

#: What stands for the middle of a body cut to fit (start and end kept).
CUT = " [...] "

#: Characters read from each end of a body before any other work: a 20 MB email is never
#: normalised, transliterated or tokenized whole.
_RAW_CHARS_PER_KEPT = 4

#: A subject is cut to this many characters (start and end kept), and further only when the
#: body cannot be cut enough.
_SUBJECT_CHARS = 200


#: Text an email could use to pose as the chat template's control tokens (``[INST]``, ``</s>``,
#: ``[TOOL_CALLS]``, ChatML's and Llama 3's ``<|im_start|>``, ``<|eot_id|>``, Gemma's
#: ``<start_of_turn>``…): tokenizers parse these as special tokens, so the email's are defused.
_CONTROL_LIKE = re.compile(
    r"\[(/?[A-Z][A-Z_0-9]*)\]|<(/?)(s|unk|bos|eos|start_of_turn|end_of_turn)>|<\|(\w+)\|>"
)


_NON_ASCII = re.compile(r"[^\x00-\x7f]+")


def _ascii(text: str) -> str:
    """``unidecode(text)``, computed on the non-ASCII stretches only: the same string (it maps
    each character on its own), without walking every ASCII character in Python."""
    if text.isascii():
        return text
    return _NON_ASCII.sub(lambda m: unidecode(m.group()), text)


def _defuse(text: str) -> str:
    return _CONTROL_LIKE.sub(_defused, text)


def _defused(m: re.Match[str]) -> str:
    if m.group(1):
        return f"({m.group(1)})"
    if m.group(4):
        return f"<{m.group(4)}>"
    return f"< {m.group(2)}{m.group(3)}>"


@dataclass(frozen=True)
class PromptOptions:
    """The knobs of the prompt that come from ``[classifier]``, and how a prompt is measured.

    ``measure`` counts the tokens of a prompt rendered for the model (its chat template and
    tokenizer: :class:`~mailrouter.tokens.PromptMeasure`); no prompt exceeds ``max_prompt_tokens``
    of it. ``max_chars`` cuts the body first, by characters, so that a huge email costs nothing.
    """

    max_prompt_tokens: int = 400
    max_chars: int = 2000
    strip_accents: bool = True
    measure: PromptMeasure = DEFAULT_MEASURE

    @classmethod
    def from_settings(
        cls, settings: Settings, measure: PromptMeasure = DEFAULT_MEASURE
    ) -> PromptOptions:
        return cls(
            max_prompt_tokens=settings.classifier.max_prompt_tokens,
            max_chars=settings.classifier.max_chars,
            strip_accents=settings.classifier.strip_accents,
            measure=measure,
        )

    def measured_with(self, measure: PromptMeasure) -> PromptOptions:
        return replace(self, measure=measure)


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
    """The full prompt for one email: :func:`prefix`, then subject, sender domain and body, the
    body (then the subject) cut in the middle until the rendered prompt fits
    ``options.max_prompt_tokens``."""
    fixed = prefix(departments, strip_accents=options.strip_accents)
    limit = options.max_chars
    subject_text = _clean(_ends(subject, _SUBJECT_CHARS), _SUBJECT_CHARS, options)
    domain = _clean(sender_domain.strip().lower()[:255], 255, options)
    body = _clean(_ends(email_text, limit), limit, options) or "(vide)"

    def compose(subject_part: str, body_part: str) -> str:
        head = [f"Objet : {subject_part}"] if subject_part else []
        head += [f"Domaine de l'expediteur : {domain}"] if domain else []
        return fixed + "\n".join([*head, body_part])

    fits = _fitter(options)
    full = compose(subject_text, body)
    if fits(full):
        return full
    kept = _longest(body, lambda b: fits(compose(subject_text, b)))
    if kept is not None:
        return compose(subject_text, kept)
    kept = _longest(subject_text, lambda s: fits(compose(s, CUT.strip())))
    if kept is not None:
        return compose(kept, CUT.strip())
    raise ConfigError(
        f"the instruction and the departments alone take {options.measure(fixed)} tokens: "
        f"raise classifier.max_prompt_tokens ({options.max_prompt_tokens}) or shorten the "
        "department descriptions"
    )


def _fitter(options: PromptOptions) -> Callable[[str], bool]:
    return lambda prompt: options.measure(prompt) <= options.max_prompt_tokens


def _ends(text: str, limit: int) -> str:
    """``text`` itself, or its first and last stretches when it is far longer than ``limit``
    characters (whitespace runs may shrink, so more than ``limit`` is read from each end)."""
    room = limit * _RAW_CHARS_PER_KEPT
    return text if len(text) <= 2 * room else text[:room] + CUT + text[-room:]


def _clean(text: str, limit: int, options: PromptOptions) -> str:
    """One line, at most ``limit`` characters (start and end kept), ASCII when configured,
    control-token look-alikes defused."""
    text = " ".join(text.split())
    if len(text) > limit:
        text = _excerpt(text, limit)
    if options.strip_accents:
        text = _ascii(text)
    return _defuse(text).strip()


def _excerpt(text: str, size: int) -> str:
    """About ``size`` characters of ``text``: two thirds from its start, one third from its end,
    cut at spaces when a space is near, joined by :data:`CUT`."""
    if size <= 0:
        return CUT.strip()
    start, end = text[: size - size // 3], text[len(text) - size // 3 :]
    space = start.rfind(" ")
    if space > len(start) // 2:
        start = start[:space]
    space = end.find(" ")
    if 0 <= space < len(end) // 2:
        end = end[space + 1 :]
    return (start + CUT + end).strip()


def _longest(text: str, fits: Callable[[str], bool]) -> str | None:
    """The longest :func:`_excerpt` of ``text`` that ``fits`` (binary search on its size; only a
    size that was checked is returned), or ``None`` when not even the bare cut mark fits."""
    best = None
    low, high = 0, len(text) - 1
    while low <= high:
        size = (low + high) // 2
        candidate = _excerpt(text, size)
        if fits(candidate):
            best, low = candidate, size + 1
        else:
            high = size - 1
    return best
