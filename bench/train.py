"""Training wrapper overhead: ``run_lora`` (child process, output parsing, log file, progress
callback) against a bare ``python -m mlx_lm lora -c run.yaml`` with the same config and data.

Both train the tiny Mistral-architecture model (built here, in a temp dir) on the starter data
exported with the real prompt. Runs alternate (bare, wrapper, bare, wrapper…) so a change in the
machine's load hits both; the best time of each is compared. Both children run with the BLAS the
training job gives MLX (OpenBLAS preloaded on Linux where installed, see
``mailrouter/training/blas.py``), or with the wheel's bundled reference BLAS with
``--blas bundled``. Prints the BLAS first and, last:

    train: iters=N, bare_s=…, wrapper_s=…, ratio=…, blas=openblas|reference|…

Usage: ``python bench/train.py [--iters N] [--repeat R] [--blas auto|bundled]``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mailrouter.config import load_settings  # noqa: E402
from mailrouter.dataset import Dataset  # noqa: E402
from mailrouter.prompt import PromptOptions  # noqa: E402
from mailrouter.training import blas  # noqa: E402
from mailrouter.training.config import build_run  # noqa: E402
from mailrouter.training.lora import child_env, command, run_lora  # noqa: E402
from mailrouter.training.tinymodel import build as build_tiny_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--blas", choices=["auto", "bundled"], default="auto")
    args = parser.parse_args()
    if args.blas == "bundled":  # the children get no preload, even under `make bench`
        os.environ[blas.OPT_OUT[0]] = blas.OPT_OUT[1]
        ours = {str(p) for p in blas.OPENBLAS_CANDIDATES}
        kept = [p for p in os.environ.get("LD_PRELOAD", "").split(":") if p and p not in ours]
        os.environ["LD_PRELOAD"] = ":".join(kept)
    used = blas.for_this_machine()
    print(f"BLAS for MLX: {used.describe()}", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        root = Path(tmp)
        model = build_tiny_model(root / "tiny")
        settings = load_settings(
            data_dir=root / "data",
            training={"batch_size": 2, "val_batches": 1, "nice": 0, "num_layers": -1},
        )
        exported = Dataset(REPO / "data" / "examples.jsonl").export(
            root / "export", settings.departments, PromptOptions.from_settings(settings)
        )
        bare_times, wrapper_times = [], []
        for i in range(args.repeat):
            for kind in ("bare", "wrapper"):
                adapters = root / f"{kind}-{i}"
                run = build_run(
                    settings.training,
                    model=model,
                    data_dir=root / "export",
                    adapter_dir=adapters,
                    n_train=exported.counts["train"],
                    n_valid=exported.counts["valid"],
                    iters=args.iters,
                )
                config = run.write(root / f"{kind}-{i}.yaml")
                started = time.perf_counter()
                if kind == "bare":
                    subprocess.run(
                        command(config),
                        check=True,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                        env=child_env(),
                    )
                    bare_times.append(time.perf_counter() - started)
                else:
                    reports = []
                    run_lora(
                        config,
                        adapter_dir=adapters,
                        total_iters=run.iters,
                        log_path=root / f"{kind}-{i}.log",
                        timeout=3600,
                        nice=0,
                        on_progress=reports.append,
                    )
                    wrapper_times.append(time.perf_counter() - started)
                    assert reports, "the wrapper saw no progress line"
        bare, wrapper = min(bare_times), min(wrapper_times)
        print(
            f"train: iters={args.iters}, bare_s={bare:.1f}, wrapper_s={wrapper:.1f}, "
            f"ratio={wrapper / bare:.3f}, blas={used.key}"
        )


if __name__ == "__main__":
    main()
