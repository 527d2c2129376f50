"""Hook implementation: executor ``spmd``. Imports nothing heavy; the factory does."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flowserve_core import hookimpl
from flowserve_core.interfaces import PluginLookup
from flowserve_core.types import DeploymentSpec

if TYPE_CHECKING:
    from flowserve_core.deployment import Deployment


class SpmdExecutorFactory:
    """Factory of executor ``spmd``, with the fast-start steps scalers may run before it
    (``FastStartExecutorFactory`` and ``DeviceSharingExecutorFactory`` of
    ``flowserve_core.interfaces``; see ``flowserve_spmd_executor.preload``). Each method imports
    what it needs when called, so that this hook module stays light. ``plugins``: the manager
    that registered it: the model architectures its executors build, and the structured-output
    backends their samplers use."""

    def __init__(self, plugins: PluginLookup):
        self.plugins = plugins

    def __call__(self, spec: DeploymentSpec) -> Any:
        """Load ``spec.model`` (blocks; the kernel calls it in a thread)."""
        from flowserve_spmd_executor.executor import SpmdExecutor

        return SpmdExecutor(spec, self.plugins)

    def prewarm(self, device: str = "auto") -> None:
        """Import torch and the runner and open ``device`` (a pre-warmed process, no model yet)."""
        from flowserve_spmd_executor.preload import prewarm

        prewarm(device)

    def preload(self, spec: DeploymentSpec) -> str:
        """Map ``spec``'s weights from their DRAM image into this process for its next executor;
        raises ``PreloadUnsupported`` where it cannot."""
        from flowserve_spmd_executor.preload import preload

        return preload(spec, self.plugins)

    def share(self, spec: DeploymentSpec) -> bytes:
        """Hold ``spec``'s model on its device here; IPC handles for ``attach`` (CUDA, NPU)."""
        from flowserve_spmd_executor.preload import share

        return share(spec, self.plugins)

    def attach(self, spec: DeploymentSpec, handles: bytes) -> None:
        """Take a holder's device weights (``share``) for this process's next executor."""
        from flowserve_spmd_executor.preload import attach

        attach(spec, handles, self.plugins)



@hookimpl
def flowserve_check_deployment(spec: DeploymentSpec, plugins: PluginLookup) -> None:
    """For a deployment of executor ``spmd``: the checks of an instance start, from the model's
    config.json or GGUF header only (``flowserve_spmd_executor.checks``), with the model
    architectures ``plugins`` registers."""
    if spec.executor == "spmd":
        from flowserve_spmd_executor.checks import check_deployment

        check_deployment(spec, plugins)


@hookimpl
def flowserve_startup(deployment: Deployment) -> None:
    """Open this server's private session for DRAM images before the deployment's scaler starts
    processes (they inherit it), and remove the images of servers that died; the session and
    its images go when the server exits cleanly (``flowserve_spmd_executor.image_store``)."""
    if deployment.spec.executor == "spmd":
        from flowserve_spmd_executor.image_store import open_session

        open_session()


@hookimpl
def flowserve_register_executors(register: Any, plugins: PluginLookup) -> None:
    """Register ``spmd``: a torch runner for HF decoder-only checkpoints (Llama, Mistral, Qwen2/3,
    Gemma 2/3, Phi-3, OLMo 2, Granite, Mixtral, Qwen3-MoE, and what plugins add)."""
    register("spmd", SpmdExecutorFactory(plugins))


@hookimpl
def flowserve_register_model_architectures(register: Any) -> None:
    """The executor's own architectures, through the same hook a plugin would use (their
    factories import the model code only when a model is built)."""
    from flowserve_spmd_executor.architectures import register_builtin_architectures

    register_builtin_architectures(register)
