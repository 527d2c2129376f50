"""A prefill instance process SIGKILLed while requests are prefilling on it, with
``pd_on_failure=fail``: each of its requests ends with an error that says so (none hangs),
the others finish, and the deployment goes on serving with the surviving prefill instance."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import httpx
import pytest

pytest.importorskip("torch")
pytest.importorskip("flowserve_spmd_executor")
openai = pytest.importorskip("openai")

from flowserve_testing import serve, write_tiny_llama  # noqa: E402  (after the importorskip above)

BOUND = 120


def ready_instances(server) -> list[dict]:
    return [i for i in httpx.get(server.url + "/admin/status", timeout=10).json()["instances"] if i["state"] == "ready"]


def wait_for(predicate, what: str, server) -> object:
    deadline = time.monotonic() + BOUND
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.02)
    pytest.fail(f"{what} within {BOUND} s:\n{server.log()[-3000:]}")


def requests_in_flight(server) -> float:
    samples = httpx.get(server.url + "/metrics", timeout=10).text.splitlines()
    return sum(float(line.rpartition(" ")[2]) for line in samples
               if line.startswith(("flowserve:num_requests_running{", "flowserve:num_requests_waiting{")))


def test_killed_prefill_instance_fails_its_requests_and_the_survivors_serve_on(tmp_path):
    path = write_tiny_llama(tmp_path / "tiny", num_hidden_layers=2, seed=21)
    config = tmp_path / "pd.toml"
    # A small step budget: six long prompts take many prefill steps, so the kill finds them.
    config.write_text("max_num_batched_tokens = 16\n")
    args = ["--config", str(config), "--model", str(path), "--served-model-name", "tiny", "--tokenizer", "hf",
            "--executor", "spmd", "--kv-cache", "paged", "--batch-scheduler", "continuous", "--scaler", "static",
            "--dtype", "float32", "--device", "cpu", "--kv-cache-memory", "16MiB",
            "--job-scheduler", "pd-disaggregated", "--prefill-instances", "2", "--decode-instances", "1",
            "-o", "pd_on_failure=fail"]
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(serve(*args, timeout=BOUND))
        instances = wait_for(lambda: (r := ready_instances(server)) and len(r) == 3 and r, "3 ready instances",
                             server)
        prefill_pid = next(i["pid"] for i in instances if i["role"] == "prefill")  # one of two
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=BOUND)
        stack.callback(client.close)  # an open keep-alive connection would hold up the server's exit
        outcomes: list[tuple[str, str]] = []

        def one(i: int) -> None:
            prompt = [(i * 31 + j) % 300 + 5 for j in range(480)]
            try:
                answer = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0,
                                                   extra_body={"ignore_eos": True})
                outcomes.append(("ok", str(answer.usage.completion_tokens)))
            except openai.APIError as exc:
                outcomes.append(("error", str(exc)))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        wait_for(lambda: requests_in_flight(server) >= 6, "six requests admitted", server)
        os.kill(prefill_pid, signal.SIGKILL)
        for thread in threads:
            thread.join(BOUND)
        assert not any(t.is_alive() for t in threads), "a request hung after its prefill instance died"

        failed = [message for kind, message in outcomes if kind == "error"]
        assert len(outcomes) == 6 and failed, outcomes
        assert all("prefill instance" in message and "died" in message for message in failed), failed
        assert all(tokens == "8" for kind, tokens in outcomes if kind == "ok"), outcomes

        # The survivors serve on (the scaler replaces the dead process in the background).
        wait_for(lambda: prefill_pid not in {i["pid"] for i in ready_instances(server)}, "the dead instance gone",
                 server)
        again = client.completions.create(model="tiny", prompt=[5, 6, 7, 8], max_tokens=4, temperature=0,
                                          extra_body={"ignore_eos": True})
        assert again.usage.completion_tokens == 4
