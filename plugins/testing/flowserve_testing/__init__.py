"""FlowServe's plugin test kit: what plugin authors use in their tests.

The distribution ``flowserve-testing``, importable as ``flowserve_core.testing`` too. For
tests only, plus its plugin (``plugin.py``): the scaler ``inproc``, whose instances run
inside the server process (``inprocess.py``), and the command ``flowserve plugin new``, which
writes plugin projects from ``templates`` (``scaffold.py``). Importing the kit imports no
torch, and most names below load on first use: every process that loads the plugin imports
this package too.

- ``plugin_manager(*names)``: a fresh ``PluginManager`` with only the named plugins.
- ``run_deployment(spec)``: an in-process deployment to ``generate(prompt_ids, **params)`` on.
- ``write_tiny_llama(directory)``: a tiny random Llama checkpoint with its tokenizer;
  ``hf_greedy(model, prompt, n)``: the oracle, transformers' greedy tokens.
- ``TinyEngine`` / ``find_tiny_engine``: the smallest installed engine to run a plugin on.
- ``LiveServer`` / ``serve``: ``flowserve serve`` in a subprocess on a free 127.0.0.1 port.
- Conformance suites, one call each: ``check_batch_scheduler``, ``check_kv_cache_manager``,
  ``check_tokenizer``, ``await check_executor``; a broken rule raises ``ConformanceError``.
- ``flowserve_core.testing.fixtures``: pytest fixtures ``tiny_model``, ``tiny_engine``,
  ``live_server``; import them in your ``conftest.py``.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the lazy names are, for type checkers and the API docs
    from flowserve_testing._suite import ConformanceError
    from flowserve_testing.check_executor import check_executor
    from flowserve_testing.check_kv_cache import check_kv_cache_manager
    from flowserve_testing.check_scheduler import check_batch_scheduler
    from flowserve_testing.check_tokenizer import check_tokenizer
    from flowserve_testing.engines import TinyEngine, find_tiny_engine, hf_greedy, write_tiny_llama
    from flowserve_testing.harness import (
        DeploymentRunner,
        InstanceStartError,
        generate_on,
        plugin_manager,
        run_deployment,
    )
    from flowserve_testing.live import LiveServer, free_port, serve

#: name → the submodule that defines it, imported on first use
_LAZY = {
    "ConformanceError": "_suite", "check_executor": "check_executor", "check_kv_cache_manager": "check_kv_cache",
    "check_batch_scheduler": "check_scheduler", "check_tokenizer": "check_tokenizer", "TinyEngine": "engines",
    "find_tiny_engine": "engines", "hf_greedy": "engines", "write_tiny_llama": "engines",
    "DeploymentRunner": "harness", "InstanceStartError": "harness", "generate_on": "harness", "plugin_manager": "harness",
    "run_deployment": "harness", "LiveServer": "live", "free_port": "live", "serve": "live",
}
__all__ = [
    "ConformanceError", "DeploymentRunner", "InstanceStartError", "LiveServer", "TinyEngine", "check_batch_scheduler",
    "check_executor", "check_kv_cache_manager", "check_tokenizer", "find_tiny_engine", "free_port", "generate_on",
    "hf_greedy", "plugin_manager", "run_deployment", "serve", "write_tiny_llama",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


class _Kit(types.ModuleType):
    # Importing a submodule sets it as an attribute of its package: the submodules
    # ``check_executor`` and ``check_tokenizer`` would hide the functions of the same names.
    def __setattr__(self, name: str, value: Any) -> None:
        if not (name in _LAZY and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Kit
