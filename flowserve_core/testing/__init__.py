"""FlowServe's plugin test kit: what plugin authors use in their tests.

For tests only (and ``flowserve plugin new``, which writes plugin projects from its
``templates``: ``scaffold.py``). The server never imports it, except ``inprocess.py`` when a
deployment with scaler ``inproc`` (instances inside the server process) starts an instance.
Importing it imports no torch.

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

from flowserve_core.testing._suite import ConformanceError
from flowserve_core.testing.check_executor import check_executor
from flowserve_core.testing.check_kv_cache import check_kv_cache_manager
from flowserve_core.testing.check_scheduler import check_batch_scheduler
from flowserve_core.testing.check_tokenizer import check_tokenizer
from flowserve_core.testing.engines import TinyEngine, find_tiny_engine, hf_greedy, write_tiny_llama
from flowserve_core.testing.harness import DeploymentRunner, InstanceStartError, plugin_manager, run_deployment
from flowserve_core.testing.live import LiveServer, free_port, serve

__all__ = [
    "ConformanceError", "DeploymentRunner", "InstanceStartError", "LiveServer", "TinyEngine",
    "check_batch_scheduler", "check_executor", "check_kv_cache_manager", "check_tokenizer",
    "find_tiny_engine", "free_port", "hf_greedy", "plugin_manager", "run_deployment", "serve", "write_tiny_llama",
]
