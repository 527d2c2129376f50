"""The model architectures this executor can run, by HF ``model_type``: a registry filled
through the kernel hook ``flowserve_register_model_architectures``.

The executor's own architectures are registered by its plugin module (``plugin.py``) through
that same hook; a third-party distribution adds one the same way, without editing the
executor::

    @hookimpl
    def flowserve_register_model_architectures(register):
        register("my_arch", build_my_model, hf_architectures=["MyArchForCausalLM"])

``build_my_model(config, group, max_positions, dtype, device)`` returns the module (see
``models.base.CausalLM`` for what the runner calls on it). The registry is asked of the plugin
manager that built the executor (its factory is handed it, ``plugins``); worker ranks of a
tensor-parallel executor, in processes of their own, ask their process's manager, which loads
the installed plugins (entry points): an architecture must come from an installed
distribution to run at ``tensor_parallel > 1``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from flowserve_core.errors import ConfigError, PluginError
from flowserve_core.interfaces import PluginLookup

if TYPE_CHECKING:
    import torch

    from flowserve_spmd_executor.distributed import TensorParallelGroup
    from flowserve_spmd_executor.model_config import ModelConfig
    from flowserve_spmd_executor.models.base import CausalLM

#: ``factory(config, group, max_positions, dtype, device)`` → the model's module tree
ModelFactory = Callable[["ModelConfig", "TensorParallelGroup", int, "torch.dtype", "torch.device"], "CausalLM"]


def _builtin(module: str, cls: str) -> ModelFactory:
    """A factory that imports ``module`` only when a model is built (the hook module stays light)."""

    def build(config: ModelConfig, group: TensorParallelGroup, max_positions: int, dtype: torch.dtype,
              device: torch.device) -> CausalLM:
        import importlib

        model_cls = getattr(importlib.import_module(f"flowserve_spmd_executor.models.{module}"), cls)
        model: CausalLM = model_cls(config, group, max_positions, dtype, device)
        return model

    build.__qualname__ = f"{module}.{cls}"
    return build


#: model_type → (factory, HF architecture class names that imply it)
BUILTIN_ARCHITECTURES: dict[str, tuple[ModelFactory, tuple[str, ...]]] = {
    "llama": (_builtin("llama", "LlamaForCausalLM"), ("LlamaForCausalLM",)),
    "mistral": (_builtin("llama", "LlamaForCausalLM"), ("MistralForCausalLM",)),
    "qwen2": (_builtin("llama", "LlamaForCausalLM"), ("Qwen2ForCausalLM",)),
    "granite": (_builtin("granite", "GraniteForCausalLM"), ("GraniteForCausalLM",)),
    "qwen3": (_builtin("qwen3", "Qwen3ForCausalLM"), ("Qwen3ForCausalLM",)),
    "gemma2": (_builtin("gemma2", "Gemma2ForCausalLM"), ("Gemma2ForCausalLM",)),
    "gemma3_text": (_builtin("gemma3", "Gemma3ForCausalLM"), ("Gemma3ForCausalLM",)),
    "phi3": (_builtin("phi3", "Phi3ForCausalLM"), ("Phi3ForCausalLM",)),
    "olmo2": (_builtin("olmo2", "Olmo2ForCausalLM"), ("Olmo2ForCausalLM",)),
    "mixtral": (_builtin("mixtral", "MixtralForCausalLM"), ("MixtralForCausalLM",)),
    "qwen3_moe": (_builtin("qwen3_moe", "Qwen3MoeForCausalLM"), ("Qwen3MoeForCausalLM",)),
}


def register_builtin_architectures(register: Callable[..., None]) -> None:
    """Register the executor's own architectures (what its ``plugin.py`` hook does)."""
    for model_type, (factory, hf_names) in BUILTIN_ARCHITECTURES.items():
        register(model_type, factory, hf_architectures=list(hf_names))


class Architecture:
    """One registered architecture: its factory, HF class names, and who registered it."""

    def __init__(self, model_type: str, factory: ModelFactory, hf_architectures: tuple[str, ...], plugin: str):
        self.model_type, self.factory = model_type, factory
        self.hf_architectures, self.plugin = hf_architectures, plugin



def architectures(plugins: PluginLookup | None = None) -> dict[str, Architecture]:
    """Every architecture ``plugins`` knows: the built-ins, then what its plugins register (a
    name registered twice with different factories is an error naming both plugins). Without
    ``plugins``, the built-ins only: whoever serves plugin architectures passes the manager it
    was built by (an executor's factory, a worker process's entry point). Asked afresh each
    time (a dozen calls, once per model load or check), so a plugin registered later counts."""
    found: dict[str, Architecture] = {}

    def registrar(plugin: str) -> Callable[..., None]:
        def register(model_type: str, factory: ModelFactory, hf_architectures: list[str] | tuple[str, ...] = ()
                     ) -> None:
            if model_type in found:
                if found[model_type].factory is factory:
                    return  # the executor's own plugin registers the built-ins again
                raise PluginError(f"model architecture {model_type!r} is registered twice: by "
                                  f"{found[model_type].plugin} and by {plugin}; block one with --plugin no:NAME")
            found[model_type] = Architecture(model_type, factory, tuple(hf_architectures), plugin)
        return register

    register_builtin_architectures(registrar("spmd_executor"))
    for impl in plugins.hook.flowserve_register_model_architectures.get_hookimpls() if plugins else []:
        offered = {"register": registrar(impl.plugin_name), "plugins": plugins}
        impl.function(**{name: offered[name] for name in impl.argnames})
    return found


def architecture_of(raw: dict[str, Any], source: str, plugins: PluginLookup | None = None) -> str:
    """The registered ``model_type`` of a config dictionary (its ``model_type``, else the first
    of its ``architectures`` some registered architecture names); ``ConfigError`` otherwise."""
    known = architectures(plugins)
    model_type = raw.get("model_type")
    if isinstance(model_type, str) and model_type in known:
        return model_type
    for name in raw.get("architectures") or []:
        for arch in known.values():
            if name in arch.hf_architectures:
                return arch.model_type
    raise ConfigError(f"{source}: model_type {model_type!r} (architectures {raw.get('architectures')}) is not "
                      f"supported by the spmd executor; supported: {', '.join(sorted(known))} (a plugin can add "
                      "one through the hook flowserve_register_model_architectures)")


def model_factory(model_type: str, plugins: PluginLookup | None = None) -> ModelFactory:
    """The factory of ``model_type`` (``ValueError`` if none is registered)."""
    found = architectures(plugins).get(model_type)
    if found is None:
        raise ValueError(f"model_type {model_type!r} is not supported")
    return found.factory
