"""Classification in-process with mlx-lm: a base model plus an optional LoRA adapter.

This backend evaluates a candidate before it is published: it reads exactly what training wrote
(the base model and the adapter folder of ``mlx_lm lora``) and sees exactly what training saw (the
chat-templated :func:`mailrouter.prompt.build_prompt`, tokenized by the model's own tokenizer).
MLX is imported when a classifier is built, never when this module is imported, so the service
and most tests never load it.

Decoding is greedy for at most ``classifier.num_predict`` tokens, stopping at ``</s>`` or at one
of the prompt's stop strings; the text goes through :func:`map_label` like every other backend.
Confidence is exact, since the logits are at hand: the softmax over the department names' first
answer tokens at the first answer position. Where names share a first token, each of those
names scores the probability of its whole token sequence up to the end token (teacher-forced on
the prompt's cache), so the shared token's mass is split by what the model would say next.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import Department, Settings
from ..errors import ClassifierError
from ..prediction import ClassifyInput, Prediction, map_label
from ..prompt import PromptOptions
from ..tokens import DEFAULT_MEASURE, PromptMeasure


class MlxClassifier:
    """One loaded model; ``name`` says which base and adapter answered."""

    def __init__(
        self,
        model: str | Path,
        departments: Sequence[Department],
        *,
        adapter_path: str | Path | None = None,
        options: PromptOptions = PromptOptions(),  # noqa: B008 - frozen dataclass
        max_tokens: int = 8,
        name: str | None = None,
    ) -> None:
        try:
            import mlx_lm  # heavy (MLX, seconds to load): only when this backend is built
        except ImportError as exc:
            raise ClassifierError(
                "the mlx backend needs mlx-lm (`pip install mlx-lm`, and `mlx[cpu]` on Linux)"
            ) from exc
        try:
            loaded = mlx_lm.load(  # (model, tokenizer): the config only with return_config
                str(model), adapter_path=str(adapter_path) if adapter_path else None
            )
            self.model, self.tokenizer = loaded[0], loaded[1]
        except Exception as exc:  # mlx-lm raises OSError, ValueError, HF errors...
            raise ClassifierError(
                f"cannot load model {model}"
                + (f" with adapter {adapter_path}" if adapter_path else "")
                + f": {exc}"
            ) from exc
        self.departments = list(departments)
        self.options = options
        self.max_tokens = max_tokens
        self.name = name or (
            f"mlx:{Path(str(model)).name}" + (f"+{Path(adapter_path).name}" if adapter_path else "")
        )
        self._answers = {d.name: self._answer_ids(d.name) for d in self.departments}

    @classmethod
    def from_settings(
        cls, settings: Settings, adapter_path: str | Path | None = None
    ) -> MlxClassifier:
        """``training.base_model`` with ``adapter_path``: the candidate, or the model in service."""
        folder = Path(settings.training.base_model).expanduser()
        measure = PromptMeasure.for_model_dir(folder) if folder.is_dir() else DEFAULT_MEASURE
        return cls(
            settings.training.base_model,
            settings.departments,
            adapter_path=adapter_path,
            options=PromptOptions.from_settings(settings, measure),
            max_tokens=settings.classifier.num_predict,
        )

    # --- tokens -----------------------------------------------------------------------------

    def prompt_ids(self, prompt: str) -> list[int]:
        """The user turn through the model's chat template: what training saw before the answer."""
        messages = [{"role": "user", "content": prompt}]
        return _ids(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))

    def _answer_ids(self, answer: str) -> list[int]:
        """The ids of ``answer`` as the assistant turn after a prompt, without the end token.

        The prompt part ends with a control token (``[/INST]``), so the answer's ids do not depend
        on the prompt: one probe prompt gives them for all.
        """
        messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": answer}]
        full = _ids(self.tokenizer.apply_chat_template(messages))
        head = self.prompt_ids("x")
        if full[: len(head)] != head:
            raise ClassifierError("the chat template does not render the prompt as a prefix")
        ids = full[len(head) :]
        while ids and ids[-1] in self.tokenizer.eos_token_ids:
            ids.pop()
        if not ids:
            raise ClassifierError(f"the label {answer!r} renders to no token")
        return ids

    # --- classification ---------------------------------------------------------------------

    def render(self, item: ClassifyInput) -> str:
        return item.prompt(self.departments, self.options)

    def classify(self, item: ClassifyInput) -> Prediction:
        try:
            _tokens, answer, label_probs = self.answer(self.prompt_ids(self.render(item)))
        except ClassifierError:
            raise
        except Exception as exc:  # an MLX runtime failure, e.g. out of memory
            raise ClassifierError(f"MLX failed to classify: {exc}") from exc
        label = map_label(answer, self.departments)
        if label is None:
            return Prediction(label=None, confidence=0.0, model=self.name, raw=answer.strip())
        return Prediction(
            label=label,
            confidence=label_probs[label],
            model=self.name,
            raw=answer.strip(),
            probabilities=label_probs,
        )

    def answer(self, prompt_ids: list[int]) -> tuple[list[int], str, dict[str, float]]:
        """Greedy answer tokens, their text, and each department's probability."""
        import mlx.core as mx  # heavy: loaded by __init__ already, never at module level
        from mlx_lm.models.cache import make_prompt_cache

        cache = make_prompt_cache(self.model)
        logits = self._last_logits(mx.array(prompt_ids)[None], cache)
        first = logits - mx.logsumexp(logits)
        mx.eval(first)
        probs = self._label_probs(first, cache)

        tokens: list[int] = []
        step = first
        for _ in range(self.max_tokens):
            token = int(mx.argmax(step))
            if token in self.tokenizer.eos_token_ids:
                break
            tokens.append(token)
            text = self.tokenizer.decode(tokens)
            if any(stop in text for stop in self.options.measure.template.stop):
                break
            step = self._last_logits(mx.array([[token]]), cache)
        text = self.tokenizer.decode(tokens)
        for stop in self.options.measure.template.stop:
            text = text.split(stop, 1)[0]
        return tokens, text, probs

    def _last_logits(self, inputs: Any, cache: list[Any]) -> Any:
        """Logits at the last position only.

        The output head of a 32,768-token vocabulary is most of the work for a small model; a
        llama-family model in mlx-lm exposes its body (``model``) and head (``lm_head``), so the
        head runs on one position instead of the whole prompt (ten times faster on the test model).
        Other layouts (tied embeddings) take the full call.
        """
        body = getattr(self.model, "model", None)
        head = getattr(self.model, "lm_head", None)
        if body is None or head is None:
            return self.model(inputs, cache=cache)[0, -1]
        return head(body(inputs, cache=cache)[:, -1])[0]

    def _label_probs(self, first: Any, cache: list[Any]) -> dict[str, float]:
        """Softmax over the labels' answer scores (see the module docstring)."""
        import mlx.core as mx  # heavy: loaded by __init__ already, never at module level
        from mlx_lm.models.cache import trim_prompt_cache

        by_first: dict[int, list[str]] = {}
        for name, ids in self._answers.items():
            by_first.setdefault(ids[0], []).append(name)
        scores: dict[str, float] = {}
        for token, names in by_first.items():
            head = float(first[token].item())
            if len(names) == 1:
                scores[names[0]] = head
                continue
            for name in names:
                # With the end token, a label that is a prefix of another ("RH", "RHX") is told
                # apart: each complete answer is scored once.
                ids = [*self._answers[name], self.tokenizer.eos_token_id]
                out = self.model(mx.array(ids[:-1])[None], cache=cache)[0]
                logp = out - mx.logsumexp(out, axis=-1, keepdims=True)
                mx.eval(logp)
                trim_prompt_cache(cache, len(ids) - 1)
                scores[name] = head + sum(float(logp[i, t].item()) for i, t in enumerate(ids[1:]))
        top = max(scores.values())
        weights = {name: math.exp(s - top) for name, s in scores.items()}
        norm = sum(weights.values())
        return {name: w / norm for name, w in weights.items()}


def _ids(encoded: Any) -> list[int]:
    """``apply_chat_template`` returns a list or, in transformers 5, a mapping with input_ids."""
    if isinstance(encoded, dict) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return [int(i) for i in encoded]
