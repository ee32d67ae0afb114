"""Counting a prompt's tokens with the model's own tokenizer, to keep every prompt bounded.

A model version keeps its tokenizer (``tokenizer.model`` for SentencePiece models such as Mistral,
``tokenizer.json`` for the others) next to its chat template, so the count is the served model's
own. The count is of the rendered prompt (:meth:`ChatTemplate.serving`, plus the BOS the runtime
adds): SentencePiece reads the template's control texts (``[INST]``) as plain text, which only
counts them longer than they are, so the bound holds. Where no tokenizer is known (the embedded
baseline, a zero-shot model pulled by hand) :func:`estimate` stands in for one.
"""

from __future__ import annotations

import math
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import tokenizers

from .chat_template import ChatTemplate

#: Counts the tokens of a text (no BOS, no EOS).
Counter = Callable[[str], int]

#: Bytes a token covers at least, for :func:`estimate`: the Mistral v0.3 tokenizer averages 3.3
#: characters a token on the instruction and departments and 2 to 5 on the starter emails.
ESTIMATE_BYTES_PER_TOKEN = 3


def estimate(text: str) -> int:
    """A tokenizer-free count: one token per :data:`ESTIMATE_BYTES_PER_TOKEN` UTF-8 bytes."""
    return math.ceil(len(text.encode("utf-8", "surrogatepass")) / ESTIMATE_BYTES_PER_TOKEN)


def sentencepiece_counter(path: Path) -> Counter:
    sp = spm.SentencePieceProcessor(model_file=str(path))
    return lambda text: len(sp.encode(text))


def tokenizers_counter(path: Path) -> Counter:
    """``tokenizer.json``: its special tokens (``<|im_start|>``…) are read as one token each."""
    tok = tokenizers.Tokenizer.from_file(str(path))
    return lambda text: len(tok.encode(text, add_special_tokens=False).ids)


def counter_for(folder: Path) -> Counter | None:
    """The tokenizer of a model folder, or ``None`` when it has none."""
    if (folder / "tokenizer.model").is_file():
        return sentencepiece_counter(folder / "tokenizer.model")
    if (folder / "tokenizer.json").is_file():
        return tokenizers_counter(folder / "tokenizer.json")
    return None


@dataclass(frozen=True)
class PromptMeasure:
    """The tokens a prompt takes once rendered by ``template``, BOS included."""

    template: ChatTemplate
    count: Counter = estimate
    name: str = "estimate"

    def __call__(self, prompt: str) -> int:
        bos = 1 if self.template.add_bos and self.template.bos_token else 0
        return self.count(self.template.serving(prompt)) + bos

    @classmethod
    def for_model_dir(cls, folder: Path) -> PromptMeasure:
        """The template and tokenizer of a model folder (the estimate when it has no tokenizer)."""
        count = counter_for(folder)
        template = ChatTemplate.from_model_dir(folder)
        return cls(template, count or estimate, "tokenizer" if count else "estimate")


#: No model folder known: the Mistral v0.3 template and the estimate.
DEFAULT_MEASURE = PromptMeasure(ChatTemplate.mistral_v3())


# --- kept with each published version -------------------------------------------------------

#: The files of a model folder that say how its prompts are rendered and counted.
PROMPT_FILES = (
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "tokenizer.model",
    "tokenizer.json",
)


def digest_key(digest: str) -> str:
    """``ollama-<hex>`` for an Ollama model digest: what is kept for a model (its calibration,
    its prompt files) is keyed by content, so a copy (``latest`` of ``v3``) finds it and a
    replaced model does not; only hex digits reach the file name."""
    key = re.sub(r"[^0-9a-f]", "", digest.lower().removeprefix("sha256:"))[:64]
    return f"ollama-{key or 'none'}"


def kept_dir(models_dir: Path, digest: str) -> Path:
    """Where the prompt files of the Ollama model with ``digest`` are kept, keyed as its
    calibration (:func:`digest_key`)."""
    return models_dir / "prompt" / digest_key(digest)


def keep(model_dir: Path, dest: Path) -> Path:
    """Copy ``model_dir``'s :data:`PROMPT_FILES` to ``dest`` (replaced whole, never half)."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in PROMPT_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, tmp / name)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def measure_for_kept(models_dir: Path, digest: str) -> PromptMeasure:
    """The measure of a served model: its kept files, else :data:`DEFAULT_MEASURE`."""
    folder = kept_dir(models_dir, digest) if digest else None
    if folder is None or not folder.is_dir():
        return DEFAULT_MEASURE
    return PromptMeasure.for_model_dir(folder)
