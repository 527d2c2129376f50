"""Hook implementation: executor ``llamacpp``. Imports nothing heavy; the factory does."""

from __future__ import annotations

from typing import Any

from flowserve_core import hookimpl
from flowserve_core.factories import ExecutorFactory, Register
from flowserve_core.interfaces import PluginLookup
from flowserve_core.types import DeploymentSpec


class LlamaCppExecutorFactory:
    """Factory of executor ``llamacpp``, with the fast-start steps scalers may run before it
    (``FastStartExecutorFactory`` of ``flowserve_core.interfaces``). Each method imports what
    it needs when called, so that this hook module stays light. ``plugins``: the manager that
    registered it (its executors' samplers build structured-output backends with it)."""

    def __init__(self, plugins: PluginLookup):
        self.plugins = plugins

    def __call__(self, spec: DeploymentSpec) -> Any:
        """Load ``spec.model``'s GGUF and make a context (blocks; the kernel calls it in a thread)."""
        from flowserve_llamacpp_executor.executor import LlamaCppExecutor

        return LlamaCppExecutor(spec, self.plugins)

    def prewarm(self, device: str = "auto") -> None:
        """Import llama.cpp and its Python bindings (a pre-warmed process, no model yet)."""
        import llama_cpp  # noqa: F401  (the import is the work: loading libllama and its ctypes bindings)

        import flowserve_llamacpp_executor.executor  # noqa: F401  (and torch, for the sampler)

    def preload(self, spec: DeploymentSpec) -> str:
        """Load ``spec``'s GGUF (mmapped) in this process for its next executor: a zygote does
        this and its forked children share the pages; each makes its own context after the fork."""
        from flowserve_llamacpp_executor.model import preload_model

        return str(preload_model(spec).path)



@hookimpl
def flowserve_check_deployment(spec: DeploymentSpec) -> None:
    """For a deployment of executor ``llamacpp``: what an instance start would refuse (tensor
    parallelism, a missing or damaged GGUF, a KV cache too small), from the header only."""
    if spec.executor == "llamacpp":
        from flowserve_llamacpp_executor.checks import check_deployment

        check_deployment(spec)


@hookimpl
def flowserve_register_executors(register: Register[ExecutorFactory], plugins: PluginLookup) -> None:
    """Register ``llamacpp``: GGUF models on llama.cpp's quantized CPU kernels."""
    register("llamacpp", LlamaCppExecutorFactory(plugins))
