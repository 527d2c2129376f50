"""``flowserve serve --job-scheduler pd-disaggregated`` for real: prefill and decode instances
are separate processes (scaler ``static``), the official openai client talks to it, the KV
moves through /dev/shm; a decode instance killed mid-stream is rerouted, never hung."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("flowserve_spmd_executor")
openai = pytest.importorskip("openai")

from flowserve_testing import hf_greedy, serve, write_tiny_llama  # noqa: E402  (after the importorskip above)

ENGINE = ["--tokenizer", "hf", "--executor", "spmd", "--kv-cache", "paged", "--batch-scheduler", "continuous",
          "--scaler", "static", "--dtype", "float32", "--device", "cpu", "--kv-cache-memory", "16MiB"]
PD = ["--job-scheduler", "pd-disaggregated", "--prefill-instances", "1", "--decode-instances", "2",
      "-o", "retry_on_instance_death=4"]
BOUND = 120


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), num_hidden_layers=2, seed=9)
    from transformers import AutoModelForCausalLM

    return path, AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()




def wait_ready(server, count: int) -> list[dict]:
    deadline = time.monotonic() + BOUND
    while time.monotonic() < deadline:
        instances = [i for i in httpx.get(server.url + "/admin/status", timeout=10).json()["instances"]
                     if i["state"] == "ready"]
        if len(instances) >= count:
            return instances
        time.sleep(0.2)
    pytest.fail(f"{count} instances not ready:\n{server.log()[-3000:]}")


def hf_text(path, tokens: list[int]) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path)).decode(tokens, skip_special_tokens=True)


def test_disaggregated_serving_matches_hf_and_survives_a_killed_decode_instance(tiny):
    path, model = tiny
    prompt = list(range(5, 60))
    with serve("--model", str(path), "--served-model-name", "tiny", *ENGINE, *PD, timeout=BOUND) as server:
        roles = sorted(i["role"] for i in wait_ready(server, 3))
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=BOUND)
        answer = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                           extra_body={"ignore_eos": True})
        assert answer.choices[0].text == hf_text(path, hf_greedy(model, prompt, 12))
        assert answer.usage.completion_tokens == 12
        metrics = httpx.get(server.url + "/metrics", timeout=10).text
        assert 'flowserve:kv_transfer_bytes_total{model_name="tiny"}' in metrics
        moved = float(metrics.split('flowserve:kv_transfer_bytes_total{model_name="tiny"} ')[1].split()[0])
        assert moved > 0
        fetching = float(metrics.split('flowserve:kv_transfer_seconds_total{model_name="tiny"} ')[1].split()[0])
        assert fetching > 0
        for role in ("prefill", "decode"):  # per-role queues (idle now: nothing waits)
            for family in ("flowserve:role_num_requests_waiting", "flowserve:role_waiting_prefill_tokens"):
                assert f'{family}{{model_name="tiny",role="{role}"}} 0.0' in metrics, (family, role)

        # A long stream; its decode instance is killed mid-way: the rest is decoded elsewhere.
        long_prompt, new = list(range(100, 140)), 150
        text: list[str] = []  # a random model's text: compared as streamed (byte tokens)
        first = threading.Event()

        def stream() -> None:
            for chunk in client.completions.create(model="tiny", prompt=long_prompt, max_tokens=new, temperature=0,
                                                   stream=True, extra_body={"ignore_eos": True}):
                text.append(chunk.choices[0].text if chunk.choices else "")
                if len(text) > 5:
                    first.set()

        thread = threading.Thread(target=stream)
        thread.start()
        assert first.wait(BOUND)
        victims = {i["pid"] for i in wait_ready(server, 3) if i["role"] == "decode"}
        for pid in victims:  # the stream's decode instance is one of them
            os.kill(pid, signal.SIGKILL)
        thread.join(BOUND)
        assert not thread.is_alive(), "the stream hung after its decode instance died"
        # The same stream undisturbed: the streamed text is a function of the tokens alone.
        again = client.completions.create(model="tiny", prompt=long_prompt, max_tokens=new, temperature=0,
                                          stream=True, extra_body={"ignore_eos": True})
        assert "".join(text) == "".join(c.choices[0].text if c.choices else "" for c in again)
        assert not victims & {i["pid"] for i in wait_ready(server, 3)}  # both replaced
    assert roles == ["decode", "decode", "prefill"]
