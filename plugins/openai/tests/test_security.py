"""Security: keys compared in constant time and never logged, admin endpoints behind the admin
key, CORS off unless configured, 127.0.0.1 by default, plugins only from installed
distributions, no code or pickle from the network, and KV imports checked against their
schema. (test_keys_and_admin.py and test_operations.py cover CORS when configured and the
key-less admin fallback.)"""

from __future__ import annotations

import ast
import hmac
import importlib.metadata
import re
import sys
from pathlib import Path

import anyio
import httpx
import pytest
from openai_live import MODEL, LiveServer, serve_command, write_config

from flowserve_core.plugins import PluginManager
from flowserve_openai.auth import BearerKeyMiddleware

API_KEY = "sk-secret-api-3f9a1c"
ADMIN_KEY = "adm-secret-admin-77d2e0"
STRANGER_KEY = "sk-someone-elses-key-5b6e"  # a wrong key may be a real key elsewhere: never log it either
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def keyed_server(start_server, tmp_path_factory):
    """API key and admin key set, no CORS configured, logging at debug."""
    config = write_config(tmp_path_factory.mktemp("secure"), f'admin_key = "{ADMIN_KEY}"\nlog_level = "debug"\n')
    return start_server(serve_command("--config", config), env={"FLOWSERVE_API_KEY": API_KEY})


def call(server, method: str, path: str, key: str | None = None, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, server.url + path, headers={**headers, **kw.pop("headers", {})}, timeout=30, **kw)


def test_admin_endpoints_take_only_the_admin_key(keyed_server):
    for method, path, body in (("GET", "/admin/status", None), ("POST", "/admin/scale", {"instances": 1})):
        for key in (None, API_KEY, STRANGER_KEY):
            refused = call(keyed_server, method, path, key, json=body)
            assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
        assert call(keyed_server, method, path, ADMIN_KEY, json=body).status_code == 200
    # and the admin key is not an API key
    assert call(keyed_server, "GET", "/v1/models", ADMIN_KEY).status_code == 401
    assert call(keyed_server, "GET", "/v1/models", API_KEY).status_code == 200


def test_keys_never_reach_the_log(keyed_server):
    completion = {"model": MODEL, "prompt": "t1", "max_tokens": 2}
    assert call(keyed_server, "POST", "/v1/completions", API_KEY, json=completion).status_code == 200
    assert call(keyed_server, "POST", "/v1/completions", STRANGER_KEY, json=completion).status_code == 401
    assert call(keyed_server, "POST", "/v1/completions", API_KEY, json={**completion, "n": 10**9}).status_code == 400
    assert call(keyed_server, "GET", "/admin/status", ADMIN_KEY).status_code == 200
    assert call(keyed_server, "GET", "/admin/status", API_KEY).status_code == 401
    log = keyed_server.log()
    assert '"level": "debug"' in log or "debug" in log.lower()  # the most talkative level ran
    for secret in (API_KEY, ADMIN_KEY, STRANGER_KEY):
        assert secret not in log


def test_cors_is_off_unless_configured(keyed_server):
    preflight = call(keyed_server, "OPTIONS", "/v1/chat/completions", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert not any(name.lower().startswith("access-control-") for name in preflight.headers)
    simple = call(keyed_server, "GET", "/v1/models", API_KEY, headers={"Origin": "https://evil.example"})
    assert simple.status_code == 200 and "access-control-allow-origin" not in simple.headers


class Recorder:
    """A stand-in for the route behind the middleware: records that it was reached."""

    def __init__(self):
        self.reached = 0

    async def __call__(self, scope, receive, send):
        self.reached += 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def test_keys_are_compared_in_constant_time(monkeypatch):
    compared: list[tuple[bytes, bytes]] = []
    real_compare = hmac.compare_digest

    def recording_compare(a, b):
        compared.append((a, b))
        return real_compare(a, b)

    monkeypatch.setattr("flowserve_openai.auth.hmac.compare_digest", recording_compare)
    inner = Recorder()
    app = BearerKeyMiddleware(inner, api_key=API_KEY, admin_key=ADMIN_KEY)
    statuses = []

    async def send(message):
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def request(path: str, key: str) -> None:
        scope = {"type": "http", "method": "GET", "path": path,
                 "headers": [(b"authorization", f"Bearer {key}".encode())]}
        await app(scope, receive, send)

    async def main():
        for path, key in (("/v1/models", API_KEY), ("/v1/models", API_KEY[:-1] + "x"), ("/v1/models", "s"),
                          ("/admin/status", ADMIN_KEY), ("/admin/status", API_KEY)):
            await request(path, key)

    anyio.run(main)
    assert statuses == [200, 401, 401, 200, 401] and inner.reached == 2
    # every decision went through hmac.compare_digest, whatever the length or prefix of the guess
    assert len(compared) == 5
    source = Path(sys.modules["flowserve_openai.auth"].__file__).read_text()
    assert not re.search(r"(api_key|admin_key|given)\s*(==|!=)", source), "a key compared with == leaks timing"


def test_the_server_binds_127_0_0_1_by_default(tmp_path):
    from flowserve_core.config import ServerConfig, load_config

    assert ServerConfig().host == "127.0.0.1" and load_config().host == "127.0.0.1"
    command = [part for part in serve_command() if part not in ("--host", "127.0.0.1")]
    assert "--host" not in command
    server = LiveServer(command, tmp_path / "server.log")
    try:
        server.wait_listening()
        assert server.url.startswith("http://127.0.0.1:"), server.url
        server.wait_ready()  # stop a started server (SIGTERM during start-up is another matter)
    finally:
        assert server.stop() == 0


def test_requests_cannot_name_code_or_plugins(keyed_server):
    """Component names come from the configuration, never from a request: a body naming
    modules or plugins is refused or ignored, and nothing is imported for it."""
    before = set(sys.modules)
    for model in ("os", "flowserve_core.cli", "../../etc/passwd", "__import__('os')"):
        answer = call(keyed_server, "POST", "/v1/completions", API_KEY, json={"model": model, "prompt": "t1"})
        assert answer.status_code == 404 and answer.json()["error"]["code"] == "model_not_found"
    answer = call(keyed_server, "POST", "/v1/completions", API_KEY, json={
        "model": MODEL, "prompt": "t1", "max_tokens": 1, "executor": "evil", "plugin": "os:system",
        "tokenizer": "pickle", "options": {"record_params": "/tmp/x"}})
    assert answer.status_code == 200  # unknown fields are ignored, as OpenAI-compatible servers do
    assert set(sys.modules) == before  # (this process; the server loads nothing at request time either)


def test_plugins_come_only_from_installed_distributions():
    pm = PluginManager()
    installed = {ep.name: ep.dist.name for ep in importlib.metadata.entry_points(group="flowserve") if ep.dist}
    for record in pm.records:
        if record.distribution == "flowserve-core":
            continue  # the built-ins, in the kernel itself
        assert installed.get(record.name) == record.distribution, record
        assert importlib.metadata.distribution(record.distribution).version == record.version


UNSAFE_CALLS = {("pickle", "loads"), ("pickle", "load"), ("cloudpickle", "loads"), ("dill", "loads"),
                ("marshal", "loads"), ("shelve", "open")}
UNSAFE_NAMES = {"eval", "exec", "broadcast_object_list", "all_gather_object", "recv_object", "scatter_object_list"}


def _source_files() -> list[Path]:
    roots = [REPO / "flowserve_core", *REPO.glob("plugins/*/flowserve_*"), *REPO.glob("contrib/*/flowserve_*")]
    return [path for root in roots for path in root.rglob("*.py") if "tests" not in path.parts]


def test_no_code_or_pickle_is_loaded_from_data():
    """No module of the kernel or a plugin unpickles, evals or execs anything, sends Python
    objects through torch collectives (pickle underneath), or loads a torch file without
    ``weights_only``: what crosses a process or the network is msgspec Structs and raw tensors."""
    offences = []
    files = _source_files()
    assert len(files) > 50
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef) and any(ast.unparse(base).endswith("Unpickler") for base in node.bases):
                # only a restricted unpickler (its own find_class) may exist: spmd preload's, for
                # CUDA/NPU IPC handles between processes of one host, admits torch's rebuild functions only
                if not any(isinstance(f, ast.FunctionDef) and f.name == "find_class" for f in node.body):
                    offences.append(f"{path.relative_to(REPO)}:{node.lineno} unpickles without find_class")
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            if (owner, name) in UNSAFE_CALLS or (name in UNSAFE_NAMES and owner != "model"):
                offences.append(f"{where} calls {owner + '.' if owner else ''}{name}")
            if (owner, name) == ("torch", "load") and not any(
                    k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in node.keywords):
                offences.append(f"{where} calls torch.load without weights_only=True")
    assert not offences, offences


def test_kv_imports_are_checked_against_the_layout(tmp_path):
    """KV blocks travel as raw bytes of a declared shape and dtype; a payload of another size
    or for blocks outside the cache is refused, never reinterpreted."""
    from flowserve_core.types import DeploymentSpec
    from flowserve_spmd_executor.executor import SpmdExecutor
    from flowserve_testing import write_tiny_llama

    model = write_tiny_llama(tmp_path / "tiny")
    executor = SpmdExecutor(DeploymentSpec(model=str(model), dtype="float32", device="cpu",
                                           kv_cache_memory="1MiB", block_size=16))
    try:
        good = bytes(executor.export_kv([0, 1]))
        executor.import_kv([2, 3], good)  # the declared layout round-trips
        assert bytes(executor.export_kv([2, 3])) == good
        for bad in (good[:-1], good + b"\0", b"", good[: len(good) // 2]):
            with pytest.raises(ValueError, match="import_kv got"):
                executor.import_kv([2, 3], bad)
        num_blocks = executor.kv_cache_spec().num_blocks
        with pytest.raises((ValueError, IndexError, RuntimeError)):
            executor.import_kv([num_blocks + 5, 0], good)
        assert bytes(executor.export_kv([2, 3])) == good  # a refused import changed nothing
    finally:
        executor.close()
