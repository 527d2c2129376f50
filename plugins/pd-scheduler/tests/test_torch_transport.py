"""KV transport ``torch-dist`` (torch.distributed send/recv, gloo on CPU): bytes move between
real processes exactly, also two fetches at once from two threads; released, fetched and dead-publisher handoffs fail clearly and fast;
and a PD deployment using it stays greedy-exact against HF."""

from __future__ import annotations

import multiprocessing
import threading
import time

import anyio
import pytest

torch = pytest.importorskip("torch")

from flowserve_core.types import DeploymentSpec, KVHandoff  # noqa: E402  (after the importorskip above)
from flowserve_pd_scheduler.torch_transport import (  # noqa: E402  (after the importorskip above)
    KVHandoffMissing,
    TorchDistributedTransport,
    default_backend,
    parse_locator,
)


def handoff(locator: str, nbytes: int) -> KVHandoff:
    return KVHandoff(transport="torch-dist", locator=locator, num_tokens=1, block_size=16, nbytes=nbytes)


def publisher(connection, payloads: list[bytes]) -> None:
    """A separate process: publish each payload, send the locators, serve until told to stop."""
    transport = TorchDistributedTransport(DeploymentSpec(name="t", model="m", kv_transport="torch-dist"))
    connection.send([transport.publish(p, f"seq-{i}") for i, p in enumerate(payloads)])
    connection.recv()
    transport.close()


@pytest.fixture
def remote():
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    payloads = [bytes(range(256)) * 1500, b"\x07" * 4096, b"never fetched", bytes(range(255, -1, -1)) * 900]
    process = context.Process(target=publisher, args=(theirs, payloads), daemon=True)
    process.start()
    assert ours.poll(120), "the publisher process did not start"
    yield process, ours, payloads, ours.recv()
    if process.is_alive():
        ours.send("stop")
        process.join(30)
    if process.is_alive():
        process.kill()


def test_bytes_move_between_processes_once_and_release_works_from_anywhere(remote):
    process, _, payloads, locators = remote
    receiver = TorchDistributedTransport(DeploymentSpec(name="t", model="m", options={"kv_transport_timeout": 20}))
    # Batch schedulers fetch in worker threads, several at once from one publisher.
    got: dict[int, bytes] = {}

    def fetch(i: int) -> None:
        got[i] = bytes(receiver.fetch(handoff(locators[i], len(payloads[i]))))

    threads = [threading.Thread(target=fetch, args=(i,)) for i in (0, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert got == {0: payloads[0], 3: payloads[3]}
    with pytest.raises(KVHandoffMissing, match="no longer held"):  # one fetch per handoff
        receiver.fetch(handoff(locators[0], len(payloads[0])))
    # A third process (here: another transport object) releases what it never fetched.
    TorchDistributedTransport().release(locators[1])
    with pytest.raises(KVHandoffMissing, match="no longer held"):
        receiver.fetch(handoff(locators[1], len(payloads[1])))
    # The publisher dies with a handoff unfetched: the fetch fails within its timeout, no hang.
    process.kill()
    process.join(30)
    started = time.monotonic()
    with pytest.raises(KVHandoffMissing, match="unreachable"):
        TorchDistributedTransport(DeploymentSpec(name="t", model="m", options={"kv_transport_timeout": 2})).fetch(
            handoff(locators[2], len(payloads[2])))
    assert time.monotonic() - started < 60


def test_locators_backends_and_expiry():
    assert parse_locator("torch-dist://10.0.0.7:29500/" + "a" * 32) == ("10.0.0.7", 29500, "a" * 32)
    with pytest.raises(ValueError, match="not a torch-dist KV locator"):
        parse_locator("/dev/shm/../../etc/passwd")
    assert [default_backend(d) for d in ("cpu", "cuda:1", "npu:0")] == ["gloo", "nccl", "hccl"]
    with pytest.raises(Exception, match="kv_transport_backend must be one of"):
        TorchDistributedTransport(DeploymentSpec(name="t", model="m", options={"kv_transport_backend": "mpi"}))
    transport = TorchDistributedTransport(DeploymentSpec(name="t", model="m", options={"kv_transport_ttl": 0.2}))
    locator = transport.publish(b"abc", "seq")
    time.sleep(0.4)
    with pytest.raises(KVHandoffMissing, match="no longer held"):
        TorchDistributedTransport().fetch(handoff(locator, 3))
    transport.close()


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 1, reason="needs a CUDA device")
def test_nccl_backend_moves_bytes_on_a_cuda_device():
    spec = DeploymentSpec(name="t", model="m", device="cuda", kv_transport="torch-dist")
    sender, receiver = TorchDistributedTransport(spec), TorchDistributedTransport(spec)
    data = bytes(range(256)) * 64
    locator = sender.publish(data, "seq")
    assert bytes(receiver.fetch(handoff(locator, len(data)))) == data
    sender.close()


@pytest.mark.anyio
async def test_pd_deployment_over_torch_dist_is_greedy_exact(tmp_path):
    pytest.importorskip("flowserve_spmd_executor")
    from transformers import AutoModelForCausalLM

    from flowserve_testing import run_deployment, write_tiny_llama

    path = write_tiny_llama(tmp_path / "tiny", num_hidden_layers=2, seed=11)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    spec = DeploymentSpec(name="tiny", model=str(path), tokenizer="hf", executor="spmd", kv_cache="paged",
                          batch_scheduler="continuous", job_scheduler="pd-disaggregated", scaler="inproc",
                          dtype="float32", device="cpu", kv_cache_memory="8MiB", max_num_batched_tokens=64,
                          prefill_instances=1, decode_instances=1, kv_transport="torch-dist")
    prompts = [[(7 * i + 3 * j) % 200 + 3 for j in range(n)] for i, n in enumerate((5, 40, 70))]
    outputs: list = [None] * len(prompts)
    async with run_deployment(spec) as runner:
        async def one(i: int) -> None:
            outputs[i] = await runner.generate(prompts[i], max_tokens=8, temperature=0.0, ignore_eos=True)

        async with anyio.create_task_group() as group:
            for i in range(len(prompts)):
                group.start_soon(one, i)
        moved = sum(s.stats().kv_transfer_bytes for s in runner.batch_schedulers())
    for prompt, output in zip(prompts, outputs):
        with torch.no_grad():
            expected = model.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert output.output_token_ids == expected, output.error
    assert moved > 0
