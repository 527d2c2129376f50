"""Fork-clone and DRAM pre-loading with a real (tiny, random) Llama on the spmd executor:
forked and pre-loaded instances give HF's greedy tokens, run torch's parallel ops after the
fork without hanging, and 64 forked instances share one copy of the weights."""

from __future__ import annotations

import os
import random
from pathlib import Path

import anyio
import pytest

pytest.importorskip("flowserve_spmd_executor")
pytest.importorskip("flowserve_hf_tokenizer")
pytest.importorskip("flowserve_colocated")
pytest.importorskip("flowserve_paged_kv")
torch = pytest.importorskip("torch")

from flowserve_core.deployment import Deployment  # noqa: E402  (after the importorskip above)
from flowserve_core.plugins import PluginManager  # noqa: E402  (after the importorskip above)
from flowserve_core.types import DeploymentSpec, Request, SamplingParams  # noqa: E402  (after the importorskip above)
from flowserve_testing import generate_on, hf_greedy, write_tiny_llama  # noqa: E402  (after the importorskip above)

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(300)]


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A Llama big enough for page sharing to show (hidden 768, 4 layers: ~90 MB in float32),
    with images and caches in the test's own directories."""
    root = tmp_path_factory.mktemp("fork-clone")
    saved = {k: os.environ.get(k) for k in ("FLOWSERVE_SHM_DIR", "FLOWSERVE_CACHE_DIR")}
    os.environ["FLOWSERVE_SHM_DIR"] = str(root / "shm")
    os.environ["FLOWSERVE_CACHE_DIR"] = str(root / "cache")
    path = write_tiny_llama(root / "model", hidden_size=768, num_hidden_layers=4, seed=5,
                            initializer_range=0.1)
    from transformers import AutoModelForCausalLM

    yield path, AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def spec(path: Path, **overrides) -> DeploymentSpec:
    options = {"pool_size": 0, "autoscale": False, **overrides.pop("options", {})}
    fields = dict(name="tiny", model=str(path), tokenizer="hf", executor="spmd", kv_cache="paged",
                  batch_scheduler="continuous", job_scheduler="colocated", scaler="prewarm",
                  dtype="float32", device="cpu", kv_cache_memory="8MiB", max_model_len=512,
                  min_instances=2, max_instances=64, options=options)
    fields.update(overrides)
    return DeploymentSpec(**fields)






async def run_with_ready(deployment: Deployment, count: int, timeout: float = 240):
    with anyio.fail_after(timeout):
        while len(deployment.pool.ready()) < count:
            await deployment.pool.wait_changed()
    return deployment.pool.ready()


@pytest.mark.parametrize("start_path, reported", [("fork", "forked"), ("preload", "preloaded")])
async def test_fast_started_instances_generate_what_hf_generates(tiny, start_path, reported):
    path, model = tiny
    options = {"start_path": start_path, "pool_size": 2 if start_path == "preload" else 0}
    deployment = Deployment(spec(path, options=options), PluginManager())
    rng = random.Random(1)
    # 100 tokens: the prefill runs torch's intra-op parallel loops (over 32768 elements) and
    # oneDNN on the machine's thread count, right after the fork: it must not hang.
    prompts = [[rng.randrange(3, model.config.vocab_size) for _ in range(n)] for n in (100, 7)]
    async with anyio.create_task_group() as tg:
        await tg.start(deployment.run)
        instances = await run_with_ready(deployment, 2)
        assert {i.info.start_path for i in instances} == {reported}
        for instance, prompt in zip(instances, prompts):
            assert await generate_on(instance, prompt, 8) == hf_greedy(model, prompt, 8)
        # The router's way too: a request through the deployment.
        async with deployment.open(Request(prompt_token_ids=prompts[0], params=SamplingParams(
                max_tokens=8, temperature=0.0, ignore_eos=True))) as stream:
            tokens = [t async for event in stream for t in event.token_ids]
        assert tokens == hf_greedy(model, prompts[0], 8)
        await deployment.stop()
        tg.cancel_scope.cancel()


def memory(pid: int) -> dict[str, int]:
    """``/proc/PID/smaps_rollup`` in bytes: Rss, Pss, Shared_*, Private_*."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        fields[name] = int(rest.split()[0]) * 1024
    fields["Uss"] = fields["Private_Clean"] + fields["Private_Dirty"]
    return fields


async def test_64_forked_instances_share_one_copy_of_the_weights(tiny):
    """Every child serves a request (touching every weight) and still owns no copy of the
    weights: they are shared with the zygote and each other."""
    path, model = tiny
    deployment = Deployment(spec(path, min_instances=64, options={"start_path": "fork"}), PluginManager())
    rng = random.Random(2)
    prompt = [rng.randrange(3, model.config.vocab_size) for _ in range(2)]
    weights = sum(p.numel() * 4 for p in model.parameters())
    async with anyio.create_task_group() as tg:
        await tg.start(deployment.run)
        instances = await run_with_ready(deployment, 64)
        assert {i.info.start_path for i in instances} == {"forked"}
        assert len({i.info.pid for i in instances}) == 64
        expected = hf_greedy(model, prompt, 2)
        with anyio.fail_after(240):
            results = []
            # Two at a time: 64 instances × 2 OpenMP threads at once on 2 cores only thrash.
            limiter = anyio.CapacityLimiter(2)

            async def one(instance) -> None:
                async with limiter:
                    results.append(await generate_on(instance, prompt, 2))

            async with anyio.create_task_group() as group:
                for instance in instances:
                    group.start_soon(one, instance)
        assert results == [expected] * 64
        usage = [memory(i.info.pid) for i in instances]
        await deployment.stop()
        tg.cancel_scope.cancel()
    # Every child touched all weights (its RSS holds them) but owns no copy of them.
    assert min(u["Rss"] for u in usage) > weights
    assert max(u["Uss"] for u in usage) < weights / 2, [u["Uss"] >> 20 for u in usage]
    # 64 private copies would put over 64 × the weights in the children's PSS; shared, each
    # child's PSS is its own bookkeeping plus 1/65 of the weights.
    assert sum(u["Pss"] for u in usage) < 64 * weights / 2


async def test_a_killed_zygote_is_replaced_and_instances_fork_from_the_new_one(tiny):
    """SIGKILL of the zygote, then of the instance it forked: the replacement forks from a new
    zygote. Before, every fork from the dead zygote failed at once and the scaler tried again
    at once: thousands of failed starts, and a deployment dead for good (issue 20, item 3)."""
    import signal

    import psutil

    path, model = tiny
    deployment = Deployment(spec(path, min_instances=1, max_instances=1, options={"start_path": "fork"}),
                            PluginManager())
    prompt = [5, 9, 13, 21]
    seen: dict[str, object] = {}

    async def watch_instances() -> None:
        while True:
            for instance_id, instance in list(deployment.pool.instances.items()):
                seen.setdefault(instance_id, instance.info)
            await anyio.sleep(0.01)

    async with anyio.create_task_group() as tg:
        await tg.start(deployment.run)
        tg.start_soon(watch_instances)
        (first,) = await run_with_ready(deployment, 1)
        old_zygote = psutil.Process(first.info.pid).ppid()
        os.kill(old_zygote, signal.SIGKILL)
        os.kill(first.info.pid, signal.SIGKILL)
        with anyio.fail_after(240):
            while not (fresh := [i for i in deployment.pool.ready() if i.info.pid != first.info.pid]):
                await deployment.pool.wait_changed()
        (second,) = fresh
        assert second.info.start_path == "forked"
        assert psutil.Process(second.info.pid).ppid() not in (old_zygote, os.getpid())
        assert await generate_on(second, prompt, 6) == hf_greedy(model, prompt, 6)
        failed_starts = [info for info in seen.values() if info.error and not info.start_seconds]
        assert len(failed_starts) <= 1, [info.error for info in failed_starts[:3]]
        await deployment.stop()
        tg.cancel_scope.cancel()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
async def test_on_cuda_instances_attach_the_zygotes_weights_through_ipc_handles(tiny):
    path, model = tiny
    deployment = Deployment(spec(path, device="cuda", options={"start_path": "fork", "pool_size": 2}),
                            PluginManager())
    prompt = [5, 9, 13, 21]
    async with anyio.create_task_group() as tg:
        await tg.start(deployment.run)
        instances = await run_with_ready(deployment, 2)
        assert {i.info.start_path for i in instances} == {"ipc"}
        for instance in instances:
            assert await generate_on(instance, prompt, 6) == hf_greedy(model, prompt, 6)
        await deployment.stop()
        tg.cancel_scope.cancel()
