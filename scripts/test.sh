#!/usr/bin/env bash
# Set up everything (scripts/install.sh, with the llama.cpp executor), lint (ruff), check types
# (mypy: the kernel strict, plugins at the default level), build every distribution's wheel and
# sdist, run the whole test suite, build the docs strictly. ruff and mypy are configured in pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh --llamacpp
.venv/bin/ruff check .
.venv/bin/mypy
# a wheel and an sdist of every distribution; tests/test_selected_install.py installs from it
.venv/bin/python scripts/build_dists.py build/wheelhouse
FLOWSERVE_WHEELHOUSE="$PWD/build/wheelhouse" .venv/bin/python -m pytest "$@"
.venv/bin/mkdocs build --strict --quiet --site-dir /tmp/flowserve-site
