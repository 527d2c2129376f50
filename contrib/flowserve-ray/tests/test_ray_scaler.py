"""Scaler ``ray`` on a local Ray instance: the tiny model served through Ray actors gives the
local scaler's (and HF's) greedy tokens with weights mapped from the object store; 0 → 4
actors and back; a killed actor's requests are retried or failed and the actor replaced."""

from __future__ import annotations

import os
import signal

import anyio
import pytest

from flowserve_core.types import InstanceState

ray = pytest.importorskip("ray")
torch = pytest.importorskip("torch")
pytest.importorskip("flowserve_spmd_executor")
from flowserve_core.testing import run_deployment, write_tiny_llama  # noqa: E402  (after the importorskip above)
from flowserve_test_fixtures import toy_spec  # noqa: E402  (after the importorskip above)

pytestmark = pytest.mark.anyio
TIMEOUT = 120


async def wait_until(check, timeout: float = TIMEOUT, what: str = "") -> None:
    with anyio.fail_after(timeout):
        while not check():
            await anyio.sleep(0.05)


def ready_actors(runner) -> list:
    return [i for i in runner.deployment.pool.instances.values() if i.info.state is InstanceState.READY]


async def test_tiny_llama_through_ray_actors_matches_the_local_scaler_and_hf(local_ray, tmp_path):
    from transformers import AutoModelForCausalLM

    from flowserve_core.types import DeploymentSpec

    path = write_tiny_llama(tmp_path / "tiny", num_hidden_layers=2, seed=5)
    fields = dict(name="tiny", model=str(path), tokenizer="hf", executor="spmd", kv_cache="paged",
                  batch_scheduler="continuous", job_scheduler="colocated", dtype="float32", device="cpu",
                  kv_cache_memory="4MiB", max_num_batched_tokens=64)
    prompts = [[5, 9, 14, 3], list(range(3, 40)), [7] * 20 + [11, 12]]

    async def serve(spec: DeploymentSpec) -> tuple[list[list[int]], object]:
        async with run_deployment(spec, timeout=TIMEOUT) as runner:
            outputs = []
            async with anyio.create_task_group() as tg:
                async def one(i: int) -> None:
                    outputs.append((i, await runner.generate(prompts[i], max_tokens=10, temperature=0.0,
                                                             ignore_eos=True)))
                for i in range(len(prompts)):
                    tg.start_soon(one, i)
            instance = ready_actors(runner)[0]
            mapping = await instance.actor.weights_mappings.remote() if hasattr(instance, "actor") else []
            info = instance.info
        for _, output in outputs:
            assert output.finish_reason == "length", output.error
        return [o.output_token_ids for _, o in sorted(outputs, key=lambda x: x[0])], (info, mapping)

    through_ray, (info, mapping) = await serve(DeploymentSpec(
        **fields, scaler="ray", options={"num_cpus": 1, "autoscale": False}))
    local, _ = await serve(DeploymentSpec(**fields, scaler="inproc"))
    assert through_ray == local
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        for prompt, tokens in zip(prompts, through_ray):
            expected = model.generate(torch.tensor([prompt]), max_new_tokens=10, min_new_tokens=10,
                                      do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(prompt):]
            assert tokens == expected.tolist()
    # The actor built its model over the object store's shared pages, not a private copy.
    assert info.start_path == "object-store", info
    assert mapping and all("plasma" in path for path in mapping), mapping
    assert info.pid != os.getpid()


async def test_scale_from_zero_to_four_actors_and_back(local_ray):
    spec = toy_spec(scaler="ray", min_instances=0, max_instances=4,
                    options={"num_cpus": 0.25, "autoscale": False})
    async with run_deployment(spec, timeout=TIMEOUT) as runner:
        assert not runner.deployment.pool.instances  # zero: no actor yet
        runner.deployment.scaler.set_target(4)
        await wait_until(lambda: len(ready_actors(runner)) == 4)
        actors = ready_actors(runner)
        assert len({a.info.pid for a in actors}) == 4  # four Ray worker processes
        assert all(a.info.pid != os.getpid() for a in actors)
        outputs = [await runner.generate([1, 2, 3], max_tokens=4) for _ in range(8)]
        assert all(o.output_token_ids == [4, 5, 6, 7] for o in outputs)
        handles = [a.actor for a in actors]
        runner.deployment.scaler.set_target(0)
        await wait_until(lambda: not runner.deployment.pool.instances)
    for handle in handles:  # every actor is gone from the cluster (ray.kill is asynchronous)
        with pytest.raises(ray.exceptions.RayActorError), anyio.fail_after(TIMEOUT):
            while True:
                await handle.ping.remote()
                await anyio.sleep(0.1)


async def test_a_killed_actor_fails_its_requests_and_is_replaced(local_ray):
    spec = toy_spec(scaler="ray", min_instances=1, max_instances=1,
                    options={"num_cpus": 0.25, "autoscale": False, "step_delay": 0.05,
                             "retry_on_instance_death": 1})
    async with run_deployment(spec, timeout=TIMEOUT) as runner:
        (first,) = ready_actors(runner)
        results: dict[str, object] = {}

        async def long_request() -> None:
            results["long"] = await runner.generate([1], max_tokens=200)

        async with anyio.create_task_group() as tg:
            tg.start_soon(long_request)
            await wait_until(lambda: first.stats.generation_tokens > 3)
            os.kill(first.info.pid, signal.SIGKILL)  # the actor's process, as a node loss would
        output = results["long"]
        # It had streamed tokens, so a retry would repeat them: it fails with the actor's error.
        assert output.finish_reason == "error" and "actor died" in output.error, output
        await wait_until(lambda: ready_actors(runner) and ready_actors(runner)[0] is not first)
        (second,) = ready_actors(runner)
        assert second.info.pid != first.info.pid
        assert first.info.state is InstanceState.GONE and "actor died" in first.info.error
        again = await runner.generate([10], max_tokens=3)
        assert again.output_token_ids == [11, 12, 13]


def actor_bundles(actor_id: str) -> dict[str, float]:
    """The placement-group resources an actor holds, from the GCS actor table (the state API
    needs the dashboard, which the tests' Ray runs without): ``CPU_group_1_<pg id>`` is
    bundle 1 of that group."""
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    raw = state._connect_and_get_accessor().get_actor_info(ray.ActorID.from_hex(actor_id))
    return dict(gcs_pb2.ActorTableData.FromString(raw).required_resources)


async def test_a_tensor_parallel_gang_runs_its_ranks_as_actors_on_its_bundles(local_ray, tmp_path):
    from transformers import AutoModelForCausalLM

    from flowserve_core.types import DeploymentSpec

    path = write_tiny_llama(tmp_path / "tiny", num_hidden_layers=2, seed=9, max_position_embeddings=2048)
    spec = DeploymentSpec(name="tp", model=str(path), tokenizer="hf", executor="spmd", kv_cache="paged",
                          batch_scheduler="continuous", job_scheduler="colocated", dtype="float32", device="cpu",
                          kv_cache_memory="4MiB", tensor_parallel=2, scaler="ray",
                          options={"num_cpus": 0.5, "autoscale": False})
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    async with run_deployment(spec, timeout=TIMEOUT) as runner:
        output = await runner.generate(prompt, max_tokens=8, temperature=0.0, ignore_eos=True)
        assert output.output_token_ids == expected, output.error
        (first,) = ready_actors(runner)
        group = first.placement_group
        table = ray.util.placement_group_table(group)
        assert table["strategy"] == "STRICT_PACK"
        assert [b.get("CPU") for b in table["bundles"].values()] == [0.5, 0.5]  # one bundle per rank
        assert first.info.start_path == "loaded"  # ranks load their own shards
        # Rank 1 is an actor of its own (not a process of rank 0's), in bundle 1 of the group.
        rank1 = ray.get_actor(f"flowserve-tp-{first.info.id}-rank1", namespace="flowserve")
        node, pid = await rank1.where.remote()
        assert pid != first.info.pid and node == first.node_id
        held = actor_bundles(rank1._actor_id.hex())
        assert held.get(f"CPU_group_1_{group.id.hex()}") == 0.5, held
        assert not any(name.startswith("CPU_group_0_") for name in held), held
        assert actor_bundles(first.actor._actor_id.hex()).get(f"CPU_group_0_{group.id.hex()}") == 0.5
        assert await first.actor.rank_listen_host.remote() == "127.0.0.1"  # one node: loopback only

        # A killed rank actor: the instance fails its request naming the rank, and is replaced.
        results: dict[str, object] = {}

        async def long_request() -> None:
            results["long"] = await runner.generate(prompt, max_tokens=1800, temperature=0.0, ignore_eos=True)

        async with anyio.create_task_group() as tg:
            tg.start_soon(long_request)
            await wait_until(lambda: first.stats.generation_tokens > 12)
            ray.kill(rank1, no_restart=True)
        failed = results["long"]
        assert failed.finish_reason == "error" and "rank 1" in failed.error, failed
        await wait_until(lambda: ready_actors(runner) and ready_actors(runner)[0] is not first)
        assert first.info.state is InstanceState.GONE and "rank 1" in first.info.error, first.info
        await wait_until(lambda: ray.util.placement_group_table(group)["state"] == "REMOVED")
        (second,) = ready_actors(runner)
        again = await runner.generate(prompt, max_tokens=8, temperature=0.0, ignore_eos=True)
        assert again.output_token_ids == expected, again.error
        assert ray.get_actor(f"flowserve-tp-{second.info.id}-rank1", namespace="flowserve")
    await wait_until(lambda: ray.util.placement_group_table(second.placement_group)["state"] == "REMOVED")


async def test_load_scales_actors_up_and_down_through_the_shared_policy(local_ray):
    from flowserve_instance_runtime import Autoscaler

    spec = toy_spec(scaler="ray", min_instances=1, max_instances=2,
                    options={"num_cpus": 0.25, "step_delay": 0.05, "target_concurrency": 1,
                             "scale_up_cooldown": 0, "scale_down_delay": 0.5, "scale_interval": 0.1})
    async with run_deployment(spec, timeout=TIMEOUT) as runner:
        assert type(runner.deployment.scaler.autoscaler) is Autoscaler  # the prewarm scaler's policy
        assert len(ready_actors(runner)) == 1
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, len(ready_actors(runner)))
                await anyio.sleep(0.05)

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            outputs = []

            async def one() -> None:
                outputs.append(await runner.generate([1], max_tokens=60))

            async with anyio.create_task_group() as load:
                for _ in range(4):
                    load.start_soon(one)
            assert [o.finish_reason for o in outputs] == ["length"] * 4
            await wait_until(lambda: runner.deployment.scaler.target == 1)  # idle: back down
            tg.cancel_scope.cancel()
        assert peak == 2
        await wait_until(lambda: len(runner.deployment.pool.instances) == 1)


async def test_instances_take_pre_warmed_actors_and_the_pool_refills(local_ray):
    spec = toy_spec(scaler="ray", min_instances=0, max_instances=2,
                    options={"num_cpus": 0.25, "autoscale": False, "pool_size": 2})
    async with run_deployment(spec, timeout=TIMEOUT) as runner:
        pool = runner.deployment.scaler.pool
        await wait_until(lambda: len(pool.idle) == 2)
        warmed = {actor._actor_id for actor in pool.idle}
        runner.deployment.scaler.set_target(2)
        await wait_until(lambda: len(ready_actors(runner)) == 2)
        actors = ready_actors(runner)
        assert {a.actor._actor_id for a in actors} == warmed  # the pooled actors became the instances
        assert {a.info.start_path for a in actors} == {"prewarmed"}
        assert (await runner.generate([5], max_tokens=2)).output_token_ids == [6, 7]
        await wait_until(lambda: len(pool.idle) == 2)  # refilled with new actors
        assert not {actor._actor_id for actor in pool.idle} & warmed
