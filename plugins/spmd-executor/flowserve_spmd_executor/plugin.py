"""Hook implementation: executor ``spmd``. Imports nothing heavy; the factory does."""

from __future__ import annotations

from typing import Any

from flowserve_core import hookimpl
from flowserve_core.types import DeploymentSpec


def build_executor(spec: DeploymentSpec) -> Any:
    """Factory of executor ``spmd``: load ``spec.model`` (blocks; the kernel calls it in a thread)."""
    from flowserve_spmd_executor.executor import SpmdExecutor

    return SpmdExecutor(spec)


@hookimpl
def flowserve_register_executors(register: Any) -> None:
    """Register ``spmd``: a torch runner for Llama, Qwen2, Mistral and SmolLM2 checkpoints."""
    register("spmd", build_executor)
