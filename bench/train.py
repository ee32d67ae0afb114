"""Training wrapper overhead: ``run_lora`` (child process, output parsing, log file, progress
callback) against a bare ``python -m mlx_lm lora -c run.yaml`` with the same config and data.

Both train the tiny Mistral-architecture model (built here, in a temp dir) on the starter data
exported with the real prompt. Runs alternate (bare, wrapper, bare, wrapper…) so a change in the
machine's load hits both; the best time of each is compared. Both children run with the BLAS the
training job gives MLX (OpenBLAS preloaded on Linux where installed, see
``mailrouter/training/blas.py``), or with the wheel's bundled reference BLAS with
``--blas bundled``. Prints the BLAS first and, last:

    train: iters=N, bare_s=…, wrapper_s=…, ratio=…, blas=openblas|reference|…

Then the memory of publishing (``--publish-only`` for this part alone): a bench-size model of the
tiny model's architecture (hidden 1024, 4 layers, 112 M parameters, so that the model, not the
interpreter, is what is measured), converted to 4 bits by ``mlx_lm convert`` as the default base
is, with a LoRA adapter on q and v of every layer, exported as the float16 GGUF a publish uploads
(``export_gguf``) in a child process. The child's peak RSS (``ru_maxrss`` from ``wait4``) over the
file's size, and the same for a child that only imports what the export imports (the baseline),
and for ``mlx_lm fuse --dequantize``, the step the export replaced:

    publish: params=…, gguf_mb=…, peak_mb=…, baseline_mb=…, fuse_peak_mb=…,
    publish_peak_over_file=…, increment_over_file=…, fuse_peak_over_file=…

Usage: ``python bench/train.py [--iters N] [--repeat R] [--blas auto|bundled] [--publish-only]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mailrouter.config import load_settings  # noqa: E402
from mailrouter.dataset import Dataset  # noqa: E402
from mailrouter.prompt import PromptOptions  # noqa: E402
from mailrouter.training import blas  # noqa: E402
from mailrouter.training.config import build_run  # noqa: E402
from mailrouter.training.lora import child_env, command, run_lora  # noqa: E402
from mailrouter.training.tinymodel import CONFIG  # noqa: E402
from mailrouter.training.tinymodel import build as build_tiny_model  # noqa: E402
from mailrouter.training.tinymodel import weights as tiny_weights  # noqa: E402

#: The bench-size model: the tiny model's architecture and tokenizer, 112 M parameters.
BENCH_SIZE = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 4}
BENCH_SIZE |= {"num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 64}
EXPORT_IMPORTS = "import numpy, gguf, mailrouter.training.gguf, mailrouter.training.weights"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--blas", choices=["auto", "bundled"], default="auto")
    parser.add_argument("--publish-only", action="store_true", help="only the publish memory")
    args = parser.parse_args()
    if args.publish_only:
        with tempfile.TemporaryDirectory(prefix="bench-publish-") as tmp:
            publish_memory(Path(tmp), build_tiny_model(Path(tmp) / "tiny"))
        return
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
            f"ratio={wrapper / bare:.3f}, blas={used.key}",
            flush=True,
        )
        publish_memory(root, model)


#: Runs each command it reads (a JSON list a line) and answers its exit code and ``ru_maxrss``.
#: A child's ``ru_maxrss`` starts at the resident size of the process it was forked from (Linux
#: keeps the old memory's high-water mark across ``exec``), so the children are started by this
#: small process, not by the bench, which holds the bench model's weights while it builds them.
LAUNCHER = """
import json, os, subprocess, sys
for line in sys.stdin:
    proc = subprocess.Popen(json.loads(line), stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    print(json.dumps([os.waitstatus_to_exitcode(status), usage.ru_maxrss]), flush=True)
"""


def peak_rss_mb(launcher: subprocess.Popen[str], cmd: list[str]) -> float:
    """Run ``cmd`` to its end; its peak resident memory in MiB (``ru_maxrss``: KiB on Linux)."""
    assert launcher.stdin is not None and launcher.stdout is not None
    launcher.stdin.write(json.dumps(cmd) + "\n")
    launcher.stdin.flush()
    code, maxrss = json.loads(launcher.stdout.readline())
    assert code == 0, f"{cmd[:4]} failed"
    return maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)


def bench_base(root: Path, tiny: Path) -> tuple[Path, Path]:
    """The bench-size model converted to 4 bits as mlx-community's are, and a LoRA adapter."""
    from safetensors.numpy import save_file

    config = {**CONFIG, **BENCH_SIZE}
    float_dir = root / "bench-float"
    float_dir.mkdir()
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        (float_dir / name).write_bytes((tiny / name).read_bytes())
    (float_dir / "config.json").write_text(json.dumps(config))
    save_file(tiny_weights(config), str(float_dir / "model.safetensors"))
    base = root / "bench-4bit"
    subprocess.run(
        [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(float_dir),
         "--mlx-path", str(base), "-q", "--q-bits", "4", "--q-group-size", "64"],
        check=True, capture_output=True, env=child_env(),
    )  # fmt: skip
    adapter = root / "bench-adapter"
    adapter.mkdir()
    rng = np.random.default_rng(0)
    hidden, kv = config["hidden_size"], config["num_key_value_heads"] * config["head_dim"]
    lora = {}
    for i in range(config["num_hidden_layers"]):
        for proj, out in (("q_proj", hidden), ("v_proj", kv)):
            key = f"model.layers.{i}.self_attn.{proj}"
            lora[f"{key}.lora_a"] = rng.normal(0, 0.01, (hidden, 8)).astype(np.float32)
            lora[f"{key}.lora_b"] = rng.normal(0, 0.01, (8, out)).astype(np.float32)
    save_file(lora, str(adapter / "adapters.safetensors"))
    keys = ["self_attn.q_proj", "self_attn.v_proj"]
    settings = {
        "fine_tune_type": "lora",
        "num_layers": config["num_hidden_layers"],
        "lora_parameters": {"rank": 8, "scale": 20.0, "dropout": 0.0, "keys": keys},
    }
    (adapter / "adapter_config.json").write_text(json.dumps(settings))
    return base, adapter


def publish_memory(root: Path, tiny: Path) -> None:
    """Peak memory of the GGUF export of a 4-bit base + adapter, against the file it writes."""
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    base, adapter = bench_base(root, tiny)
    out = root / "bench.gguf"
    export = (
        "from mailrouter.training.gguf import export_gguf; "
        f"export_gguf({str(base)!r}, {str(adapter)!r}, {str(out)!r}, dtype='f16')"
    )
    baseline = peak_rss_mb(launcher, [sys.executable, "-c", EXPORT_IMPORTS])
    peak = peak_rss_mb(launcher, [sys.executable, "-c", export])
    fuse = peak_rss_mb(
        launcher,
        [sys.executable, "-m", "mlx_lm", "fuse", "--model", str(base), "--adapter-path",
         str(adapter), "--save-path", str(root / "fused"), "--dequantize"],
    )  # fmt: skip
    launcher.communicate()
    size = out.stat().st_size / 2**20
    params = sum(int(np.prod(t.shape)) for t in gguf.GGUFReader(out).tensors)
    print(
        f"publish: params={params / 1e6:.0f}M, gguf_mb={size:.0f}, peak_mb={peak:.0f}, "
        f"baseline_mb={baseline:.0f}, fuse_peak_mb={fuse:.0f}, "
        f"publish_peak_over_file={peak / size:.2f}, "
        f"increment_over_file={(peak - baseline) / size:.2f}, "
        f"fuse_peak_over_file={fuse / size:.2f}"
    )


if __name__ == "__main__":
    main()
