#!/usr/bin/env bash
# Set up everything (scripts/install.sh), run the whole test suite, build the docs strictly.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
.venv/bin/python -m pytest "$@"
.venv/bin/mkdocs build --strict --quiet --site-dir /tmp/flowserve-site
