#!/usr/bin/env bash
# Set up everything (scripts/install.sh, with the llama.cpp executor), lint (ruff), check types
# (mypy: the kernel strict, plugins at the default level), run the whole test suite, build the
# docs strictly. ruff and mypy are configured in pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh --llamacpp
.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
.venv/bin/mkdocs build --strict --quiet --site-dir /tmp/flowserve-site
