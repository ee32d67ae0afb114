"""What the training tests share: settings for the tiny model and a small slice of the starter data.

On two CPU cores mlx-lm needs about a second per iteration for the tiny model on the starter
prompts, so the tests train on a slice of the starter data (a few emails per department and split,
unevenly, as real mail is), with short department lines and bodies cut at 100 characters: about
100 prompt tokens instead of 260. Everything else is the real loop: the real prompt, tokenizer,
mlx-lm, GGUF export and llama.cpp behind the Ollama API.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

from mailrouter.config import Settings, default_departments, load_settings
from mailrouter.dataset import Dataset, Example
from tests.conftest import STARTER

#: Emails per department in the train split (valid and test get half, at least one).
QUOTAS = {"RH": 6, "Support": 4, "Commercial": 2, "Finance": 2, "SPAM": 2}

ALL_LINEAR = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]


def starter_slice(quotas: dict[str, int] = QUOTAS) -> list[Example]:
    seen: Counter[tuple[str, str | None]] = Counter()
    kept = []
    for example in Dataset(STARTER).load():
        quota = quotas[example.label]
        if example.split != "train":
            quota = max(1, quota // 2)
        if seen[(example.label, example.split)] < quota:
            seen[(example.label, example.split)] += 1
            kept.append(example)
    return kept


def write_examples(path: Path, examples: list[Example]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(e.to_json() + "\n" for e in examples), encoding="utf-8")
    return path


def deranged(examples: list[Example], labels: list[str]) -> list[Example]:
    """Train and valid labels moved one department along (RH→Support…); test labels kept."""
    shift = dict(zip(labels, labels[1:] + labels[:1], strict=True))
    return [e if e.split == "test" else replace(e, label=shift[e.label]) for e in examples]


def tiny_settings(
    data_dir: Path, base_model: Path, ollama_url: str, namespace: str, **training: Any
) -> Settings:
    departments = [d.model_copy(update={"description": ""}) for d in default_departments()]
    return load_settings(
        data_dir=data_dir,
        departments=departments,
        classifier={
            "ollama_host": ollama_url,
            "model": f"{namespace}:latest",
            "zero_shot_model": f"{namespace}-zero-shot",
            "max_chars": 100,
        },
        training={
            "base_model": str(base_model),
            "quantize": "",
            "num_layers": -1,
            "lora_keys": ALL_LINEAR,
            "learning_rate": 1e-2,
            "batch_size": 2,
            "epochs": 1,
            "max_iters": 6,
            "val_batches": 1,
            "nice": 0,
            "grad_checkpoint": False,
            "min_baseline_gain": -1.0,
            "keep_versions": 2,
            "timeout_seconds": 600,
            **training,
        },
    )


def write_config(path: Path, settings: Settings) -> Path:
    """The settings as a TOML file, for the CLI in a child process."""
    data = settings.model_dump(mode="json", exclude={"training": {"hf_token"}}, exclude_none=True)
    for section in ("mailbox", "smtp", "corrections"):
        data.pop(section, None)
    lines = [f"data_dir = {json.dumps(data.pop('data_dir'))}"]
    departments = data.pop("departments")
    data.pop("rules", None)  # none in these tests; a list, written as [[rules]] if ever needed
    for name, section in data.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in section.items()]
    for dep in departments:
        lines.append("[[departments]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in dep.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
