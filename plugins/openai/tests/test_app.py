"""The app as a library: built in a function (several per process), light to import."""

from __future__ import annotations

import subprocess
import sys

import msgspec
import pytest

from flowserve_core.config import load_config
from flowserve_core.server import Server
from flowserve_openai.errors import invalid_body
from flowserve_openai.protocol import ChatCompletionRequest


def toy_server_object(pm, **overrides) -> Server:
    config = load_config(None, {"model": "toy", "tokenizer": "whitespace", "executor": "counter",
                                "kv_cache": "unbounded", "batch_scheduler": "fifo",
                                "job_scheduler": "least-tasks", "scaler": "inproc", **overrides})
    return Server(config, pm)


def test_each_app_has_its_own_metrics_registry(pm):
    from flowserve_openai.app import build_app

    server = toy_server_object(pm)
    first, second = build_app(server), build_app(server)
    assert first.state.flowserve.metrics.registry is not second.state.flowserve.metrics.registry
    assert b"flowserve:num_requests_running" in first.state.flowserve.metrics.exposition()


def test_the_plugin_registers_the_frontend_without_importing_the_http_stack():
    code = ("import sys; from flowserve_core.plugins import PluginManager; pm = PluginManager(); "
            "frontend = pm.get('frontend', 'openai'); assert frontend.distribution == 'flowserve-openai'; "
            "heavy = [m for m in ('uvicorn', 'starlette', 'httpx', 'prometheus_client') if m in sys.modules]; "
            "assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_the_factory_builds_a_frontend_with_serve(pm):
    server = toy_server_object(pm, port=0)
    frontend = pm.build("frontend", "openai", server.config)
    assert callable(frontend.serve)


@pytest.mark.parametrize("body, param", [
    (b'{"messages": [{"role": "user", "content": 5}]}', "messages[0].content"),
    (b'{"messages": [{"role": "user", "content": "x"}], "stop": [1]}', "stop[0]"),
    (b'{"messages": [{"role": "user", "content": "x"}], "n": -1}', "n"),
    (b'{"messages": [{"role": "user"}]}', "messages[0].content"),
    (b'{"messages": [{"role": "wizard", "content": "x"}]}', "messages[0].role"),
    (b'{"messages": [{"role": "tool", "content": "x"}]}', "messages[0].tool_call_id"),
    (b'{"messages": [{"role": "user", "content": [{"text": "x"}]}]}', "messages[0].content[0].type"),
    (b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}',
     "messages[0].content[0].type"),
    (b'{}', "messages"),
    (b'"text"', None),
])
def test_decoding_errors_name_the_parameter(body, param):
    with pytest.raises(msgspec.DecodeError) as caught:
        msgspec.json.decode(body, type=ChatCompletionRequest)
    error = invalid_body(caught.value)
    assert (error.status, error.param) == (400, param), error.message


def test_a_deployment_added_at_run_time_takes_the_servers_deployment_flags_under_its_own():
    from flowserve_openai.deployments import with_server_defaults
    from flowserve_openai.errors import APIError

    defaults = load_config(None, {"model": "/m/a", "device": "cpu", "dtype": "float32",
                                  "kv_cache_memory": "16MiB", "options": {"step_delay": 0.1, "x": 1}}
                           ).deployment_defaults
    spec = with_server_defaults({"name": "b", "model": "/m/b", "kv_cache_memory": "32MiB",
                                 "options": {"x": 2}}, defaults)
    assert (spec.name, spec.model, spec.device, spec.dtype, spec.kv_cache_memory) == \
        ("b", "/m/b", "cpu", "float32", "32MiB")
    assert spec.options == {"step_delay": 0.1, "x": 2}
    with pytest.raises(APIError) as info:
        with_server_defaults({"name": "b", "model": "/m/b", "dtype": "float8"}, defaults)
    assert info.value.status == 400 and "dtype" in info.value.message
