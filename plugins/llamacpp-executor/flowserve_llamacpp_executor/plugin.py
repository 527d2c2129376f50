"""Hook implementation: executor ``llamacpp``. Imports nothing heavy; the factory does."""

from __future__ import annotations

from typing import Any

from flowserve_core import hookimpl
from flowserve_core.types import DeploymentSpec


def build_executor(spec: DeploymentSpec) -> Any:
    """Factory of executor ``llamacpp``: load ``spec.model``'s GGUF and make a context (blocks;
    the kernel calls it in a thread)."""
    from flowserve_llamacpp_executor.executor import LlamaCppExecutor

    return LlamaCppExecutor(spec)


def _prewarm(device: str = "auto") -> None:
    """Import llama.cpp and its Python bindings (a pre-warmed process, no model yet)."""
    import llama_cpp  # noqa: F401  (the import is the work: loading libllama and its ctypes bindings)

    import flowserve_llamacpp_executor.executor  # noqa: F401  (and torch, for the sampler)


def _preload(spec: DeploymentSpec) -> str:
    """Load ``spec``'s GGUF (mmapped) in this process for its next executor: a zygote does this
    and its forked children share the pages; each makes its own context after the fork."""
    from flowserve_llamacpp_executor.model import preload_model

    return str(preload_model(spec).path)


# The fast-start API scalers look for on an executor factory (see flowserve-prewarm-scaler).
build_executor.prewarm = _prewarm  # type: ignore[attr-defined]  # the prewarm scaler's published convention
build_executor.preload = _preload  # type: ignore[attr-defined]  # the prewarm scaler's published convention


@hookimpl
def flowserve_check_deployment(spec: DeploymentSpec) -> None:
    """For a deployment of executor ``llamacpp``: what an instance start would refuse (tensor
    parallelism, a missing or damaged GGUF, a KV cache too small), from the header only."""
    if spec.executor == "llamacpp":
        from flowserve_llamacpp_executor.checks import check_deployment

        check_deployment(spec)


@hookimpl
def flowserve_register_executors(register: Any) -> None:
    """Register ``llamacpp``: GGUF models on llama.cpp's quantized CPU kernels."""
    register("llamacpp", build_executor)
