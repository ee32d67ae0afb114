"""The mlx-lm LoRA configuration of one run, generated from ``[training]`` and the dataset size.

``lora_parameters`` (rank, scale, dropout, keys) can only be given to ``mlx_lm lora`` in a YAML
file, so every option goes there and the command line stays ``mlx_lm lora -c run.yaml``: the file
in the run folder is then the complete, replayable record of what was trained.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from ..config import TrainingSettings


def iterations(n_train: int, *, epochs: float, batch_size: int, max_iters: int) -> int:
    """``epochs`` passes over ``n_train`` examples, in batches, capped by ``max_iters``."""
    return max(1, min(max_iters, math.ceil(epochs * n_train / max(1, batch_size))))


@dataclass(frozen=True)
class LoraRun:
    """Everything ``mlx_lm lora`` is told; field names are mlx-lm's YAML keys."""

    model: str
    data: str
    adapter_path: str
    iters: int
    batch_size: int
    learning_rate: float
    num_layers: int
    lora_parameters: dict[str, Any]
    mask_prompt: bool
    grad_checkpoint: bool
    seed: int
    steps_per_report: int
    steps_per_eval: int
    save_every: int
    val_batches: int
    max_seq_length: int
    train: bool = True
    test: bool = False
    fine_tune_type: str = "lora"

    def to_yaml(self) -> str:
        return yaml.safe_dump(asdict(self), sort_keys=False)

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml(), encoding="utf-8")
        return path


def build_run(
    training: TrainingSettings,
    *,
    model: Path | str,
    data_dir: Path,
    adapter_dir: Path,
    n_train: int,
    n_valid: int,
    iters: int | None = None,
) -> LoraRun:
    """The run for ``n_train``/``n_valid`` examples; ``iters`` overrides the epochs rule.

    mlx-lm refuses a split smaller than one batch, so the batch size shrinks to the smallest split
    (a young dataset has few validation examples) instead of failing after the model has loaded.
    """
    smallest = min(n_train, n_valid)
    if smallest < 1:
        raise ValueError(
            f"training needs examples in the train and valid splits (got {n_train} and {n_valid})"
        )
    batch = min(training.batch_size, smallest)
    total = iters or iterations(
        n_train, epochs=training.epochs, batch_size=batch, max_iters=training.max_iters
    )
    report = max(1, min(10, total))
    return LoraRun(
        model=str(model),
        data=str(data_dir),
        adapter_path=str(adapter_dir),
        iters=total,
        batch_size=batch,
        learning_rate=training.learning_rate,
        num_layers=training.num_layers,
        lora_parameters={
            "rank": training.lora_rank,
            "scale": training.lora_scale,
            "dropout": training.lora_dropout,
            "keys": list(training.lora_keys),
        },
        mask_prompt=training.mask_prompt,
        grad_checkpoint=training.grad_checkpoint,
        seed=training.seed,
        steps_per_report=report,
        # Validation at the start, every ~quarter and at the end (mlx-lm always does the first
        # and the last): a loss curve without much cost, and no more than that on short runs.
        steps_per_eval=max(10, math.ceil(total / 4)),
        # One adapter file at the end; intermediate checkpoints only cost disk.
        save_every=total + 1,
        max_seq_length=training.max_seq_length,
        val_batches=training.val_batches,
    )
