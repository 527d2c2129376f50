"""One server's deployments share the ``prewarm`` scaler's start-up resources, with real
(tiny, random) Llamas on the spmd executor:

- the pre-warmed pool is model-agnostic: a process warmed while only model ``a`` was served
  becomes the first instance of model ``b`` when ``b`` is deployed later;
- two deployments of the same model file share one zygote, so one DRAM copy of its weights:
  the second deployment's instance is forked from the first one's zygote and owns no copy;
- the zygote lives while some deployment of its model does, and goes with the last one.

Every instance is checked against HF's greedy tokens of the model it must run.
"""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest

pytest.importorskip("flowserve_spmd_executor")
pytest.importorskip("flowserve_hf_tokenizer")
pytest.importorskip("flowserve_colocated")
pytest.importorskip("flowserve_paged_kv")
torch = pytest.importorskip("torch")
psutil = pytest.importorskip("psutil")

from flowserve_core.deployment import Deployment  # noqa: E402  (after the importorskip above)
from flowserve_core.plugins import PluginManager  # noqa: E402  (after the importorskip above)
from flowserve_core.types import DeploymentSpec, Request, SamplingParams, Task  # noqa: E402  (after the importorskip above)
from flowserve_prewarm_scaler.pool import shared_resources, zygote_key  # noqa: E402  (after the importorskip above)
from flowserve_testing import hf_greedy, write_tiny_llama  # noqa: E402  (after the importorskip above)

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(420)]

#: Seconds any one wait may take on a busy 2-core machine.
BOUND = 240
PROMPT = [5, 17, 42, 9, 77, 3]


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Models ``a`` (big enough for page sharing to show: ~90 MB of float32 weights) and ``b``
    (another seed), with images and caches in the test's own directories."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("shared")
    saved = {k: os.environ.get(k) for k in ("FLOWSERVE_SHM_DIR", "FLOWSERVE_CACHE_DIR")}
    os.environ["FLOWSERVE_SHM_DIR"] = str(root / "shm")
    os.environ["FLOWSERVE_CACHE_DIR"] = str(root / "cache")
    paths = {"a": write_tiny_llama(root / "a", hidden_size=768, num_hidden_layers=4, seed=3, initializer_range=0.1),
             "b": write_tiny_llama(root / "b", seed=4)}
    loaded = {name: AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
              for name, path in paths.items()}
    expected = {name: hf_greedy(model, PROMPT, 6) for name, model in loaded.items()}
    assert expected["a"] != expected["b"]
    weights = sum(p.numel() * 4 for p in loaded["a"].parameters())
    yield {"paths": paths, "expected": expected, "weights_a": weights}
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def spec(name: str, path: Path, **options) -> DeploymentSpec:
    return DeploymentSpec(
        name=name, model=str(path), tokenizer="hf", executor="spmd", kv_cache="paged",
        batch_scheduler="continuous", job_scheduler="colocated", scaler="prewarm", dtype="float32",
        device="cpu", kv_cache_memory="4MiB", max_model_len=256, min_instances=1, max_instances=1,
        options={"autoscale": False, "pool_size": 1, **options})


async def start(tg, deployment_spec: DeploymentSpec) -> tuple[Deployment, anyio.Event]:
    """Run a deployment in ``tg``; the event is set once its run (and its scaler's) ended."""
    deployment = Deployment(deployment_spec, PluginManager())
    ended = anyio.Event()

    async def run(*, task_status=anyio.TASK_STATUS_IGNORED) -> None:
        try:
            await deployment.run(task_status=task_status)
        finally:
            ended.set()

    await tg.start(run)
    return deployment, ended


async def ready_instance(deployment: Deployment):
    with anyio.fail_after(BOUND):
        while not deployment.pool.ready():
            await deployment.pool.wait_changed()
    (instance,) = deployment.pool.ready()
    return instance


async def generate_on(instance, new_tokens: int = 6) -> list[int]:
    task = Task(request=Request(prompt_token_ids=PROMPT, params=SamplingParams(
        max_tokens=new_tokens, temperature=0.0, ignore_eos=True)))
    tokens: list[int] = []
    with anyio.fail_after(BOUND):
        async with instance.submit(task) as stream:
            async for event in stream:
                assert event.error is None, event.error
                tokens += event.token_ids
    return tokens


async def until(check, what: str) -> None:
    """Wait until ``check()`` holds; fail naming ``what`` after ``BOUND`` s."""
    with anyio.move_on_after(BOUND):
        while not check():
            await anyio.sleep(0.1)
    assert check(), f"waited {BOUND} s for {what}"


def uss(pid: int) -> int:
    """Memory only this process holds (private pages), from ``/proc/PID/smaps_rollup``."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        fields[name] = int(rest.split()[0]) * 1024
    return fields["Private_Clean"] + fields["Private_Dirty"]


async def test_deployments_share_the_warm_pool_and_one_zygote_per_model_file(models):
    paths, expected = models["paths"], models["expected"]
    async with anyio.create_task_group() as tg:
        a1, a1_ended = await start(tg, spec("a1", paths["a"], start_path="fork"))
        resources = a1.scaler.resources
        assert resources is shared_resources()
        first_a = await ready_instance(a1)
        assert first_a.info.start_path == "forked"
        zygote = resources.zygotes.by_key[zygote_key(a1.spec)]
        assert psutil.Process(first_a.info.pid).ppid() == zygote.pid

        # The pool warmed a process while only model a was served: it is nobody's yet.
        await until(lambda: resources.pool.idle and resources.pool.idle[0].warm(), "a warm pooled process")
        pooled = {p.process.pid for p in resources.pool.idle}

        # Model b, deployed later, takes that process as its first instance.
        b, b_ended = await start(tg, spec("b", paths["b"], start_path="prewarm"))
        assert b.scaler.resources is resources
        first_b = await ready_instance(b)
        assert first_b.info.start_path == "prewarmed" and first_b.info.pid in pooled
        assert await generate_on(first_b) == expected["b"]

        # A second deployment of model a's file (other scaling options) forks from a's zygote:
        # its instance maps the weights the zygote holds, with no copy of its own.
        a2, a2_ended = await start(tg, spec("a2", paths["a"], start_path="fork", pool_size=0, scale_interval=2))
        second_a = await ready_instance(a2)
        assert second_a.info.start_path == "forked"
        assert list(resources.zygotes.by_key) == [zygote_key(a1.spec)] == [zygote_key(a2.spec)]
        assert psutil.Process(second_a.info.pid).ppid() == zygote.pid
        for instance in (first_a, second_a):
            assert await generate_on(instance) == expected["a"]
        # It touched every weight (they sit in its RSS), yet owns none of them.
        private = uss(second_a.info.pid)
        assert psutil.Process(second_a.info.pid).memory_info().rss > models["weights_a"]
        assert private < models["weights_a"] / 2, (private >> 20, models["weights_a"] >> 20)

        # Removing a1 keeps the zygote (a2 serves its model); removing a2 stops it.
        await a1.stop()
        await a1_ended.wait()
        assert zygote.process.poll() is None and resources.zygotes.by_key
        assert await generate_on(second_a) == expected["a"]
        await a2.stop()
        await a2_ended.wait()
        await until(lambda: zygote.process.poll() is not None, "the zygote to exit")
        assert not resources.zygotes.by_key
        assert await generate_on(first_b) == expected["b"]  # b never noticed

        await b.stop()
        await b_ended.wait()
        assert shared_resources() is not resources  # the last deployment closed the pool
        for pid in pooled - {first_b.info.pid}:
            await until(lambda pid=pid: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
                        "pooled processes to stop")
        tg.cancel_scope.cancel()
