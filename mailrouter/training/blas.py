"""Which BLAS MLX's CPU backend runs: Debian's OpenBLAS on Linux when it is installed.

The ``mlx[cpu]`` wheel for Linux bundles the reference netlib BLAS (``mlx_cpu.libs/libblas-*``):
a 1024×1024 float32 product runs at about 6 GFLOP/s on a 2-core VM, against about 210 GFLOP/s with
OpenBLAS (package ``libopenblas0-pthread``) preloaded with ``LD_PRELOAD``, whose ``sgemm_`` then
wins over the bundled one; ``bench/train.py``'s bare LoRA run fell from 45 s to 19 s. The preload
goes only to the processes that run MLX (the training child and its ``mlx_lm`` child), after any
library the user preloads already. macOS is left alone: MLX uses Accelerate and Metal there.

:func:`choose` is the decision, pure; :func:`for_this_machine` feeds it this machine's facts.
Run as ``python -m mailrouter.training.blas`` it prints the ``LD_PRELOAD`` value to use (nothing
when there is nothing to preload), and on stderr which BLAS that is: the Makefile runs the tests
and benchmarks with it.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

#: Where Debian and Ubuntu's ``libopenblas0-pthread`` puts its ``libblas.so.3``
#: (``dpkg -L libopenblas0-pthread``), by architecture.
OPENBLAS_CANDIDATES = (
    Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"),
    Path("/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3"),
)
INSTALL_HINT = "libopenblas0-pthread is not installed: matrix products about 30× slower"
#: ``MAILROUTER_BLAS=bundled`` keeps the wheel's reference BLAS (to compare, to rule OpenBLAS out).
OPT_OUT = ("MAILROUTER_BLAS", "bundled")


@dataclass(frozen=True)
class Blas:
    """The BLAS MLX will use, and the ``LD_PRELOAD`` that makes it so (``None``: leave it);
    ``key`` is one word for figures: ``openblas``, ``reference``, ``preloaded``, ``accelerate``
    or ``other``."""

    key: str
    name: str
    path: str | None = None
    ld_preload: str | None = None

    def describe(self) -> str:
        return f"{self.name} at {self.path}" if self.path else self.name

    def apply(self, environ: Mapping[str, str]) -> dict[str, str]:
        """``environ`` with this choice's ``LD_PRELOAD``, for a child process."""
        env = dict(environ)
        if self.ld_preload is not None:
            env["LD_PRELOAD"] = self.ld_preload
        return env


def choose(system: str, installed: Sequence[str | Path], environ: Mapping[str, str]) -> Blas:
    """The BLAS for MLX on ``system`` (``platform.system()``), given the OpenBLAS libraries
    ``installed`` (the candidates that exist, best first) and the environment: on Linux the
    first one is appended to the user's ``LD_PRELOAD`` (theirs stay first). A BLAS the user
    preloads already is left as it is; ``MAILROUTER_BLAS=bundled`` adds none."""
    if system == "Darwin":
        return Blas("accelerate", "Accelerate and Metal (macOS)")
    if system != "Linux":
        return Blas("other", f"MLX's own BLAS ({system})")
    preloaded = [p for p in re.split(r"[:\s]+", environ.get("LD_PRELOAD", "")) if p]
    candidates = [str(p) for p in installed]
    for path in preloaded:
        if path in candidates:
            return Blas("openblas", "OpenBLAS", path)
        if "blas" in Path(path).name.lower():
            return Blas("preloaded", "the BLAS preloaded by LD_PRELOAD", path)
    if environ.get(OPT_OUT[0]) == OPT_OUT[1]:
        return Blas("reference", f"the bundled reference BLAS ({OPT_OUT[0]}={OPT_OUT[1]})")
    if not candidates:
        return Blas("reference", f"the bundled reference BLAS ({INSTALL_HINT})")
    return Blas("openblas", "OpenBLAS", candidates[0], ":".join([*preloaded, candidates[0]]))


def for_this_machine(environ: Mapping[str, str] | None = None) -> Blas:
    """:func:`choose` with this machine's system, installed libraries and environment."""
    installed = [p for p in OPENBLAS_CANDIDATES if p.is_file()]
    return choose(platform.system(), installed, os.environ if environ is None else environ)


if __name__ == "__main__":
    choice = for_this_machine()
    print(f"BLAS for MLX: {choice.describe()}", file=sys.stderr)
    print(choice.ld_preload or "")
