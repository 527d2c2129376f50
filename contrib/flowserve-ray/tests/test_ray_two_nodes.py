"""A 2-node Ray cluster on this machine (``ray start --head`` and ``ray start --address``,
started here and stopped at the end): the tiny model served by one actor on each node, both
with weights from the object store and HF's greedy tokens; KV bytes cross the nodes; a
tensor-parallel gang spread over both nodes (rank 1 an actor on the other node) gives HF's
greedy tokens."""

from __future__ import annotations

import anyio
import pytest

ray = pytest.importorskip("ray")
torch = pytest.importorskip("torch")
pytest.importorskip("flowserve_spmd_executor")

from kv_peers import peer_on  # noqa: E402  (after the importorskip above)
from ray_nodes import ray_cluster  # noqa: E402  (after the importorskip above)

from flowserve_core.testing import generate_on, run_deployment, write_tiny_llama  # noqa: E402  (after the importorskip above)
from flowserve_core.types import DeploymentSpec, InstanceState  # noqa: E402  (after the importorskip above)

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def two_nodes():
    with ray_cluster(nodes=2, cpus_per_node=1) as address:
        yield address




async def test_one_actor_per_node_both_serve_hf_greedy_tokens(two_nodes, tmp_path):
    from transformers import AutoModelForCausalLM

    path = write_tiny_llama(tmp_path / "tiny", num_hidden_layers=2, seed=11)
    spec = DeploymentSpec(name="tiny", model=str(path), tokenizer="hf", executor="spmd", kv_cache="paged",
                          batch_scheduler="continuous", job_scheduler="colocated", dtype="float32",
                          device="cpu", kv_cache_memory="4MiB", scaler="ray", min_instances=2,
                          max_instances=2, options={"num_cpus": 1, "autoscale": False})
    prompt = [4, 8, 15, 16, 23, 42]
    async with run_deployment(spec, timeout=180) as runner:
        with anyio.fail_after(180):
            while len([i for i in runner.deployment.pool.instances.values()
                       if i.info.state is InstanceState.READY]) < 2:
                await runner.deployment.pool.wait_changed()
        instances = list(runner.deployment.pool.instances.values())
        outputs = [await generate_on(instance, prompt, 8) for instance in instances]
    assert len({i.node_id for i in instances}) == 2  # one actor on each node (1 CPU each)
    assert all(i.info.start_path == "object-store" for i in instances), [i.info for i in instances]
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert outputs == [expected, expected]


def test_kv_bytes_cross_nodes_through_ray_objects(two_nodes):
    first, second = [n["NodeID"] for n in ray.nodes() if n["Alive"]][:2]
    prefill, decode = peer_on(first), peer_on(second)
    (prefill_node, _), (decode_node, _) = ray.get([prefill.where.remote(), decode.where.remote()])
    assert prefill_node != decode_node
    size = 2 * 2**20
    locator, digest = ray.get(prefill.publish.remote(size, seed=7))
    assert ray.get(decode.fetch.remote(locator, size)) == digest
    ray.get(decode.release.remote(locator))


async def test_pd_disaggregated_across_nodes_hands_kv_through_ray_objects(two_nodes, tmp_path):
    pytest.importorskip("flowserve_pd_scheduler")
    from transformers import AutoModelForCausalLM

    from flowserve_core.testing import hf_greedy
    from flowserve_core.types import TaskRole

    path = write_tiny_llama(tmp_path / "tiny", num_hidden_layers=2, seed=13)
    spec = DeploymentSpec(name="pd", model=str(path), tokenizer="hf", executor="spmd", kv_cache="paged",
                          batch_scheduler="continuous", job_scheduler="pd-disaggregated", kv_transport="ray",
                          dtype="float32", device="cpu", kv_cache_memory="4MiB", scaler="ray",
                          prefill_instances=1, decode_instances=1, options={"num_cpus": 1, "autoscale": False})
    prompts = [list(range(5, 45)), [9, 8, 7, 6, 5, 4, 3]]
    async with run_deployment(spec, timeout=180) as runner:
        pool = runner.deployment.pool
        with anyio.fail_after(180):
            while not (pool.ready(TaskRole.PREFILL) and pool.ready(TaskRole.DECODE)):
                await pool.wait_changed()
        outputs = [await runner.generate(p, max_tokens=8, temperature=0.0, ignore_eos=True) for p in prompts]
        (prefill,), (decode,) = pool.ready(TaskRole.PREFILL), pool.ready(TaskRole.DECODE)
        imported = decode.stats.scheduler.kv_transfer_bytes
    assert prefill.node_id != decode.node_id  # the KV crossed hosts
    assert imported > 0  # the decode instance imported the prefill's blocks (it did not recompute)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    for prompt, output in zip(prompts, outputs):
        assert output.finish_reason == "length", output.error
        assert output.output_token_ids == hf_greedy(model, prompt, 8)


async def test_a_tensor_parallel_gang_spread_over_both_nodes_gives_hf_tokens(two_nodes, tmp_path):
    from transformers import AutoModelForCausalLM

    from flowserve_core.testing import hf_greedy

    path = write_tiny_llama(tmp_path / "tiny", num_hidden_layers=2, seed=17)
    spec = DeploymentSpec(name="tp", model=str(path), tokenizer="hf", executor="spmd", kv_cache="paged",
                          batch_scheduler="continuous", job_scheduler="colocated", dtype="float32",
                          device="cpu", kv_cache_memory="4MiB", tensor_parallel=2, scaler="ray",
                          options={"num_cpus": 1, "autoscale": False, "placement_strategy": "SPREAD"})
    prompts = [[2, 7, 1, 8, 2, 8, 1, 8], list(range(10, 50))]
    async with run_deployment(spec, timeout=180) as runner:
        outputs = [await runner.generate(p, max_tokens=8, temperature=0.0, ignore_eos=True) for p in prompts]
        (instance,) = [i for i in runner.deployment.pool.instances.values() if i.info.state is InstanceState.READY]
        rank1 = ray.get_actor(f"flowserve-tp-{instance.info.id}-rank1", namespace="flowserve")
        rank1_node, _ = await rank1.where.remote()
        table = ray.util.placement_group_table(instance.placement_group)
        listen_host = await instance.actor.rank_listen_host.remote()
    assert table["strategy"] == "SPREAD"
    # Rank 0 listened on its node's address for a rank on another node, not on loopback.
    node_address = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}[instance.node_id]
    assert listen_host == node_address != "127.0.0.1", (listen_host, node_address)
    assert rank1_node != instance.node_id  # the two ranks ran on different nodes
    assert set(table["bundles_to_node_id"].values()) == {instance.node_id, rank1_node}
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    for prompt, output in zip(prompts, outputs):
        assert output.finish_reason == "length", output.error
        assert output.output_token_ids == hf_greedy(model, prompt, 8)
