"""Which BLAS MLX runs on: OpenBLAS preloaded on Linux where installed, the user's preload kept."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from mailrouter.doctor import check_blas
from mailrouter.training import blas
from mailrouter.training.blas import choose

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
ARM = "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3"


def test_linux_with_openblas_preloads_it() -> None:
    choice = choose("Linux", [OPENBLAS], {})
    assert (choice.key, choice.path, choice.ld_preload) == ("openblas", OPENBLAS, OPENBLAS)
    assert choice.describe() == f"OpenBLAS at {OPENBLAS}"
    assert choice.apply({"PATH": "/bin"}) == {"PATH": "/bin", "LD_PRELOAD": OPENBLAS}


def test_the_first_installed_candidate_wins() -> None:
    assert choose("Linux", [ARM, OPENBLAS], {}).path == ARM


def test_the_users_preload_is_kept_first() -> None:
    choice = choose("Linux", [OPENBLAS], {"LD_PRELOAD": "/opt/libjemalloc.so.2 /opt/libx.so"})
    assert choice.ld_preload == f"/opt/libjemalloc.so.2:/opt/libx.so:{OPENBLAS}"


def test_openblas_already_preloaded_is_not_added_twice() -> None:
    environ = {"LD_PRELOAD": f"/opt/libjemalloc.so.2:{OPENBLAS}"}
    choice = choose("Linux", [OPENBLAS], environ)
    assert (choice.key, choice.path, choice.ld_preload) == ("openblas", OPENBLAS, None)
    assert choice.apply(environ) == environ


def test_a_blas_the_user_preloads_is_left_alone() -> None:
    environ = {"LD_PRELOAD": "/opt/intel/libmkl_rt.so:/opt/flexiblas/libblas.so.3"}
    choice = choose("Linux", [OPENBLAS], environ)
    assert (choice.key, choice.path, choice.ld_preload) == (
        "preloaded",
        "/opt/flexiblas/libblas.so.3",
        None,
    )


def test_without_openblas_the_bundled_reference_blas_runs_and_says_how_to_fix() -> None:
    choice = choose("Linux", [], {"LD_PRELOAD": "/opt/libjemalloc.so.2"})
    assert (choice.key, choice.ld_preload) == ("reference", None)
    assert "libopenblas0-pthread" in choice.describe()
    assert choice.apply({"LD_PRELOAD": "/opt/libjemalloc.so.2"}) == {
        "LD_PRELOAD": "/opt/libjemalloc.so.2"
    }


def test_the_opt_out_keeps_the_bundled_blas() -> None:
    choice = choose("Linux", [OPENBLAS], {"MAILROUTER_BLAS": "bundled"})
    assert (choice.key, choice.ld_preload) == ("reference", None)
    assert "MAILROUTER_BLAS=bundled" in choice.describe()


@pytest.mark.parametrize("system", ["Darwin", "Windows", "FreeBSD"])
def test_nothing_is_preloaded_off_linux(system: str) -> None:
    choice = choose(system, [OPENBLAS], {"LD_PRELOAD": "/opt/libx.so"})
    assert choice.ld_preload is None and choice.path is None
    assert choice.key == ("accelerate" if system == "Darwin" else "other")


def test_the_makefile_helper_prints_the_value_to_preload() -> None:
    """``python -m mailrouter.training.blas`` prints what ``make test`` exports, or nothing."""
    out = subprocess.run(
        [sys.executable, "-m", "mailrouter.training.blas"],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin"},
    ).stdout.strip()
    assert out == (blas.for_this_machine({}).ld_preload or "")
    if platform.system() == "Linux" and any(p.is_file() for p in blas.OPENBLAS_CANDIDATES):
        assert out.endswith("openblas-pthread/libblas.so.3")


def test_doctor_says_which_blas_mlx_will_use() -> None:
    chosen = check_blas({"MAILROUTER_BLAS": "bundled"})
    assert chosen.ok and not chosen.required
    assert (
        chosen.line() == "✓ BLAS: MLX will use the bundled reference BLAS (MAILROUTER_BLAS=bundled)"
    )
    here = check_blas({})
    assert here.detail == f"MLX will use {blas.for_this_machine({}).describe()}"
    if blas.for_this_machine({}).key == "reference":  # Linux without OpenBLAS: the fix is named
        assert not here.ok and "apt-get install libopenblas0-pthread" in here.line()
