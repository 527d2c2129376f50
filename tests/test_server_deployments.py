"""A server's deployments at run time: add, alias switches, removal that drains, and
``--model NAME=PATH`` in the configuration (toy components, in-process instances)."""

from __future__ import annotations

import threading
import types

import anyio
import pytest

from flowserve_core import hookimpl
from flowserve_core.config import ServerConfig, load_config
from flowserve_core.errors import ConfigError, UnknownModelError
from flowserve_core.server import Server
from flowserve_core.types import InstanceState, Request, SamplingParams
from flowserve_test_fixtures import toy_spec

pytestmark = pytest.mark.anyio


class _IdleFrontend:
    """A frontend that serves nothing: the test drives the server until it sets ``done``."""

    def __init__(self, config):
        self.done = anyio.Event()

    async def serve(self, server):
        await self.done.wait()


@pytest.fixture
def frontends(pm):
    built: list[_IdleFrontend] = []

    def factory(config):
        built.append(_IdleFrontend(config))
        return built[-1]

    pm.register(types.SimpleNamespace(flowserve_register_frontends=hookimpl(
        lambda register: register("idle", factory))), name="idle-frontend")
    return built


async def _generate(deployment, prompt: list[int], max_tokens: int = 4) -> list[int]:
    request = Request(prompt_token_ids=prompt, params=SamplingParams(max_tokens=max_tokens, temperature=0.0),
                      eos_token_ids=[0])
    tokens: list[int] = []
    async with deployment.open(request) as handle:
        async for event in handle:
            assert event.error is None, event.error
            tokens += event.token_ids
    return tokens


async def test_add_alias_switch_and_remove_at_run_time(pm, frontends):
    config = ServerConfig(frontend="idle", drain_timeout=10.0, deployments=[toy_spec(name="a")])
    server = Server(config, pm)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(server.run)
            assert list(server.deployments) == ["a"]
            b = await server.add_deployment(toy_spec(name="b", options={"step_delay": 0.02}))
            assert server.resolve("b") is b and server.resolve(None) is server.deployments["a"]
            with pytest.raises(ConfigError, match="'b' already exists"):
                await server.add_deployment(toy_spec(name="b"))

            server.aliases = {"chat": "a"}  # what the admin API does (its checks: the openai tests)
            assert server.resolve("chat") is server.deployments["a"]
            server.aliases = {"chat": "b"}  # the switch: one assignment
            assert server.resolve("chat") is b

            # A request admitted before the removal finishes; afterwards the name is unknown.
            result: list[list[int]] = []

            async def in_flight():
                result.append(await _generate(b, [5], max_tokens=20))

            tg.start_soon(in_flight)
            while not b.requests:
                await anyio.sleep(0.01)
            await server.remove_deployment("b")
            assert result == [list(range(6, 26))]
            assert not b.pool.instances and "chat" not in server.aliases
            with pytest.raises(UnknownModelError, match="does not exist; this server serves: a"):
                server.resolve("b")
            with pytest.raises(UnknownModelError, match="no deployment is named 'b'"):
                await server.remove_deployment("b")
            assert await _generate(server.deployments["a"], [7]) == [8, 9, 10, 11]
            frontends[0].done.set()


async def test_removal_fails_requests_still_waiting_after_the_drain(pm, frontends):
    config = ServerConfig(frontend="idle", deployments=[toy_spec(name="a", min_instances=0, max_instances=1)])
    server = Server(config, pm)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(server.run)
            deployment = server.deployments["a"]
            deployment.scaler.on_demand = lambda role: None  # no instance will ever come
            deployment.pool.on_demand = deployment.scaler.on_demand
            events = []

            async def waiting():
                request = Request(prompt_token_ids=[1], params=SamplingParams(max_tokens=2), eos_token_ids=[0])
                async with deployment.open(request) as handle:
                    events.extend([e async for e in handle])

            tg.start_soon(waiting)
            while not deployment.requests:
                await anyio.sleep(0.01)
            await server.remove_deployment("a", drain_timeout=0.2)
            while deployment.requests:
                await anyio.sleep(0.01)
            assert events[-1].finish_reason == "error" and "removed" in events[-1].error
            assert all(i.info.state is InstanceState.GONE for i in deployment.pool.instances.values())
            frontends[0].done.set()


def test_named_models_from_flags_join_the_file(tmp_path):
    path = tmp_path / "flowserve.toml"
    path.write_text('[[deployments]]\nname = "a"\nmodel = "/m/a"\nmin_instances = 2\nmax_instances = 2\n')
    config = load_config(path, {"models": {"a": "/n/a", "b": "/n/b"}, "dtype": "float32"})
    assert [(d.name, d.model, d.min_instances) for d in config.deployments] == [("a", "/n/a", 2), ("b", "/n/b", 1)]
    assert all(d.dtype == "float32" for d in config.deployments)
    config = load_config(None, {"models": {"x": "/m/x", "y": "/m/y"}})
    assert [(d.name, d.model) for d in config.deployments] == [("x", "/m/x"), ("y", "/m/y")]


def test_model_flags_split_into_one_model_or_named_models():
    from typer import BadParameter

    from flowserve_core.cli import _split_models

    assert _split_models(["/m/x=1"], None) == ("/m/x=1", {})  # a path that holds '='
    assert _split_models(["/m/x"], "smol") == ("/m/x", {})
    assert _split_models(["a=/m/a", "b=/m/b"], None) == (None, {"a": "/m/a", "b": "/m/b"})
    for values, name, words in ((["a=/m/a", "/m/b"], None, "do not mix"), (["a=/m/a"], "x", "do not mix"),
                                (["/m/a", "/m/b"], None, "once"), (["a=/m/a", "a=/m/b"], None, "twice")):
        with pytest.raises(BadParameter, match=words):
            _split_models(values, name)


async def test_a_deployment_removed_while_it_starts_is_a_clear_error_not_a_crash(pm, frontends):
    loading, release, added = anyio.Event(), threading.Event(), anyio.Event()

    def slow_tokenizer(spec):  # blocks in its worker thread until the removal has begun
        anyio.from_thread.run_sync(loading.set)
        release.wait(30)
        return pm.get("tokenizer", "whitespace").factory(spec)

    pm.register(types.SimpleNamespace(flowserve_register_tokenizers=hookimpl(
        lambda register: register("slow", slow_tokenizer))), name="slow-tokenizer")
    server = Server(ServerConfig(frontend="idle", deployments=[toy_spec(name="a")]), pm)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(server.run)
            outcome: list[BaseException] = []

            async def add():
                try:
                    await server.add_deployment(toy_spec(name="b", tokenizer="slow"))
                except ConfigError as exc:
                    outcome.append(exc)
                finally:
                    added.set()

            tg.start_soon(add)
            await loading.wait()
            async with anyio.create_task_group() as removal:
                removal.start_soon(server.remove_deployment, "b")
                while "b" in server.deployments:  # the removal has begun
                    await anyio.sleep(0.01)
                release.set()
            await added.wait()
            assert [str(e) for e in outcome] == ["deployment 'b' was removed while it was starting"]
            assert list(server.deployments) == ["a"]
            assert await _generate(server.deployments["a"], [7]) == [8, 9, 10, 11]
            frontends[0].done.set()
