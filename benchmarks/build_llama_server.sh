#!/usr/bin/env bash
# Build llama.cpp's own C++ server, `llama-server`, from the llama.cpp source tree that
# llama-cpp-python vendors, so that benchmarks/vs_llama_server.py compares FlowServe's
# llamacpp executor with the server built from the very same ggml kernels.
#
#   benchmarks/build_llama_server.sh                      # pip-downloads the sdist, builds, prints the path
#   benchmarks/build_llama_server.sh /tmp/llama_cpp_python-0.3.36.tar.gz   # reuse a downloaded sdist
#
# The last line printed on stdout is the binary's path (progress goes to stderr), so
#   LLAMA_SERVER=$(benchmarks/build_llama_server.sh)
# works. A second run prints the path of the binary already built and returns at once.
#
# Environment:
#   LLAMA_CPP_PYTHON_VERSION  the sdist version (default: the llama-cpp-python pin of
#                             plugins/llamacpp-executor/pyproject.toml, else 0.3.36)
#   FLOWSERVE_CACHE_DIR       cache root (default ~/.cache/flowserve); the build goes to
#                             $FLOWSERVE_CACHE_DIR/llama-server-<version>/, outside the repository
#   JOBS                      parallel compile jobs (default 2)
#   PYTHON                    the Python whose pip downloads the sdist (default: .venv/bin/python,
#                             else python3)
#   REBUILD=1                 build again even if the binary exists
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
pin_file=$here/plugins/llamacpp-executor/pyproject.toml
pinned=""
if [[ -f $pin_file ]]; then
    pinned=$(grep -oE 'llama-cpp-python *== *[0-9][0-9A-Za-z.]*' "$pin_file" | head -1 | sed -E 's/.*== *//') || true
fi
version=${LLAMA_CPP_PYTHON_VERSION:-${pinned:-0.3.36}}
cache=${FLOWSERVE_CACHE_DIR:-$HOME/.cache/flowserve}/llama-server-$version
binary=$cache/build/bin/llama-server
jobs=${JOBS:-2}
python=${PYTHON:-}
if [[ -z $python ]]; then
    if [[ -x $here/.venv/bin/python ]]; then python=$here/.venv/bin/python; else python=python3; fi
fi

say() { echo "build_llama_server: $*" >&2; }

if [[ -x $binary && -z ${REBUILD:-} ]]; then
    say "already built (REBUILD=1 builds again)"
    echo "$binary"
    exit 0
fi

for tool in cmake c++ tar; do
    command -v "$tool" >/dev/null || { say "needs '$tool' on PATH (e.g. apt-get install cmake g++)"; exit 1; }
done

mkdir -p "$cache"
sdist=${1:-}
if [[ -z $sdist ]]; then
    sdist=$(ls "$cache"/llama_cpp_python-"$version".tar.gz 2>/dev/null || true)
fi
if [[ -z $sdist ]]; then
    say "downloading the llama-cpp-python $version sdist into $cache"
    "$python" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
        --dest "$cache" "llama-cpp-python==$version" >&2
    sdist=$cache/llama_cpp_python-$version.tar.gz
fi
[[ -f $sdist ]] || { say "no sdist at $sdist"; exit 1; }

say "extracting $sdist"
rm -rf "$cache/src"
mkdir -p "$cache/src"
tar -xzf "$sdist" -C "$cache/src" --strip-components=1
source_dir=$cache/src/vendor/llama.cpp
[[ -f $source_dir/CMakeLists.txt ]] || { say "$sdist has no vendor/llama.cpp"; exit 1; }

# Why these flags, for this llama.cpp (the one llama-cpp-python $version vendors):
# - LLAMA_CURL is deprecated and ignored here; downloads go through LLAMA_OPENSSL, which
#   only `-hf`/URL model loading needs: off, so no libssl-dev is needed.
# - The web UI's assets come from npm or a Hugging Face bucket at build time: both off,
#   so the build needs no network (the server then embeds an empty UI; the API is whole).
# - GGML_NATIVE: kernels for this CPU (AVX2/AVX-512 as it has), as llama-cpp-python's
#   own build does by default; a static binary, so it runs from the cache without RPATH care.
say "configuring in $cache/build"
cmake -S "$source_dir" -B "$cache/build" \
    -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF >&2
say "compiling llama-server with $jobs jobs (several minutes on 2 cores)"
cmake --build "$cache/build" --target llama-server -j "$jobs" >&2
[[ -x $binary ]] || { say "the build finished but $binary is missing"; exit 1; }
"$binary" --version >&2 || true
echo "$binary"
