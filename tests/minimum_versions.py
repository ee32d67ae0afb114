"""Pip constraints pinning the runtimes mailrouter talks to at their declared minimum versions.

``make test-min`` installs the package with these constraints into ``.venv-min`` and runs the
Ollama and training tests there, so a minimum in ``pyproject.toml`` is a version that was tested,
not a guess. The pins are read from ``pyproject.toml`` itself (``name>=X`` becomes ``name==X``):
the two can never disagree.

    python tests/minimum_versions.py > constraints.txt
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

#: The libraries whose behaviour the minimums are about: the Ollama client (``logprobs``), mlx-lm
#: (``lora --mask-prompt``, its adapter files) and the MLX it needs. ``mlx-cpu`` is what
#: ``mlx[cpu]`` installs on Linux.
PINNED = ("ollama", "mlx-lm", "mlx")
SAME_VERSION_AS = {"mlx-cpu": "mlx"}

_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*>=\s*([0-9][0-9A-Za-z.]*)")


def minimums(pyproject: Path) -> dict[str, str]:
    """``{name: version}`` for every ``name>=version`` dependency of ``pyproject``."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    found: dict[str, str] = {}
    for requirement in project["dependencies"]:
        match = _REQUIREMENT.match(requirement)
        if match:
            found[match.group(1).lower().replace("_", "-")] = match.group(2)
    return found


def constraints(pyproject: Path) -> list[str]:
    """``name==version`` lines for :data:`PINNED` (and ``mlx-cpu`` beside ``mlx``)."""
    found = minimums(pyproject)
    missing = [name for name in PINNED if name not in found]
    if missing:
        raise SystemExit(f"{pyproject}: no `>=` minimum for {', '.join(missing)}")
    lines = [f"{name}=={found[name]}" for name in PINNED]
    lines += [f"{name}=={found[same]}" for name, same in SAME_VERSION_AS.items()]
    return lines


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    print("\n".join(constraints(root / "pyproject.toml")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
