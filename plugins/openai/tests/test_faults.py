"""Faults in the machines behind a live server: a SIGKILLed instance process, a frozen one
(SIGSTOP), and a killed tensor-parallel rank of the real engine.

Every affected stream must end with an error event within a bounded time, the unaffected
ones must finish with the right tokens, and the deployment must replace the instance.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import psutil
import pytest
from openai_live import MODEL, serve_command, toy_only, write_config

from flowserve_testing import write_tiny_llama

#: Seconds within which a fault must surface as an error event (generous: a busy 2-core CI).
BOUND = 60


class StreamRecorder(threading.Thread):
    """One streaming completion read in a thread: its text, and how it ended."""

    def __init__(self, url: str, body: dict):
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.first_token = threading.Event()
        self.text = ""
        self.error: dict | None = None
        self.finish_reason: str | None = None
        self.done = False
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.stream("POST", self.url + "/v1/completions", json=self.body, timeout=BOUND) as response:
                assert response.status_code == 200, response.read()
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: "):]
                    if data == "[DONE]":
                        self.done = True
                        break
                    payload = json.loads(data)
                    if "error" in payload:
                        self.error = payload["error"]
                        continue
                    choice = payload["choices"][0]
                    self.text += choice["text"]
                    self.finish_reason = choice["finish_reason"] or self.finish_reason
                    self.first_token.set()
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.failure = exc
        finally:
            self.first_token.set()

    def outcome(self) -> str:
        """'ok', 'error' (an error event, then [DONE]), or what went wrong."""
        self.join(BOUND)
        if self.is_alive():
            return "still running"
        if self.failure is not None:
            return f"failed: {self.failure!r}"
        if not self.done:
            return "no [DONE]"
        return "error" if self.error else "ok"


def admin_status(server) -> dict:
    return httpx.get(server.url + "/admin/status", timeout=10).json()


def ready_pids(server) -> set[int]:
    return {i["pid"] for i in admin_status(server)["instances"] if i["state"] == "ready"}


def wait_replaced(server, victim: int | None, count: int) -> set[int]:
    """The ready instances' pids, once ``count`` are ready and ``victim`` is not among them."""
    deadline = time.monotonic() + BOUND
    while time.monotonic() < deadline:
        pids = ready_pids(server)
        if len(pids) == count and victim not in pids:
            return pids
        time.sleep(0.1)
    pytest.fail(f"the deployment did not replace instance process {victim}: {admin_status(server)}\n"
                f"{server.log()[-3000:]}")


def wait_ready(server, count: int) -> set[int]:
    """The ready instances' pids once ``count`` are (the server answers once one is)."""
    return wait_replaced(server, None, count)


def counter_text(first: int, count: int) -> str:
    """What the toy counter executor continues the prompt ``t{first}`` with."""
    return "".join(f" t{(first + i) % 1000}" for i in range(1, count + 1))


def assert_serves(server) -> None:
    """A completion after the fault has the toy counter's tokens."""
    answer = httpx.post(server.url + "/v1/completions", timeout=BOUND,
                        json={"model": MODEL, "prompt": "t500", "max_tokens": 3})
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["text"] == counter_text(500, 3)



@pytest.fixture(scope="module")
def two_instances(start_server):
    """Two instance processes (scaler ``static``), the default step timeout (120 s) and
    heartbeat timeout (5 s)."""
    return start_server(serve_command("--min-instances", "2", "--max-instances", "2",
                                      "-o", "step_delay=0.02", scaler="static"))


def start_streams(server, count: int, max_tokens: int = 150) -> list[StreamRecorder]:
    """``count`` streams, each started once the previous one has its first token, so the
    job scheduler (fewest tasks first) spreads them over the instances."""
    streams = []
    for i in range(count):
        first = 10 + 200 * i
        stream = StreamRecorder(server.url, {"model": MODEL, "prompt": f"t{first}", "max_tokens": max_tokens,
                                             "stream": True})
        stream.start()
        assert stream.first_token.wait(BOUND), server.log()[-3000:]
        streams.append(stream)
    return streams


@toy_only
def test_a_killed_instance_process_fails_its_streams_only_and_is_replaced(two_instances):
    server = two_instances
    before = wait_ready(server, 2)
    streams = start_streams(server, 4)
    victim = min(before)
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    outcomes = [stream.outcome() for stream in streams]
    assert time.monotonic() - killed_at < BOUND
    assert sorted(outcomes) == ["error", "error", "ok", "ok"], outcomes
    for i, (stream, outcome) in enumerate(zip(streams, outcomes)):
        first = 10 + 200 * i
        if outcome == "ok":  # unaffected: every token, the right ones
            assert stream.text == counter_text(first, 150) and stream.finish_reason == "length"
        else:  # affected: the tokens before the kill were right, then an error event
            assert counter_text(first, 150).startswith(stream.text)
            assert stream.error["type"] == "server_error" and "is gone" in stream.error["message"]
    after = wait_replaced(server, victim, 2)
    assert before - {victim} <= after
    assert_serves(server)
    assert server.wait_metric("flowserve:num_requests_running", lambda v: v == 0) == 0


@toy_only
def test_a_frozen_instance_process_is_detected_by_its_heartbeat_and_replaced(two_instances):
    """Frozen is told apart from a long step by the heartbeat, which the instance's event loop
    sends while a step computes: it takes seconds, not the 120 s step timeout (issue 20.12)."""
    server = two_instances
    before = wait_ready(server, 2)
    streams = start_streams(server, 2)
    victim = min(before)
    os.kill(victim, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        outcomes = [stream.outcome() for stream in streams]
        assert sorted(outcomes) == ["error", "ok"], outcomes
        frozen = streams[outcomes.index("error")]
        assert "not even a heartbeat, for 5 s (heartbeat_timeout_seconds)" in frozen.error["message"], frozen.error
        assert time.monotonic() - stopped < BOUND  # far below the step timeout: 120 s
        wait_replaced(server, victim, 2)
        assert not psutil.pid_exists(victim) or psutil.Process(victim).status() == psutil.STATUS_ZOMBIE
    finally:
        if psutil.pid_exists(victim):
            os.kill(victim, signal.SIGCONT)
    assert_serves(server)
    assert server.wait_metric("flowserve:num_requests_running", lambda v: v == 0) == 0


@toy_only
def test_a_step_longer_than_the_heartbeat_timeout_is_not_taken_for_a_freeze(start_server):
    """A step of 7 s (over the 5 s heartbeat timeout, under the 120 s step timeout) completes:
    the instance's event loop keeps beating while the step computes in a thread."""
    server = start_server(serve_command("-o", "step_delay=7", scaler="static"))
    answer = httpx.post(server.url + "/v1/completions", timeout=BOUND,
                        json={"model": MODEL, "prompt": "t40", "max_tokens": 2})
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["text"] == counter_text(40, 2)
    assert "frozen" not in server.log()


@pytest.fixture(scope="module")
def tensor_parallel_server(start_server, tmp_path_factory):
    """The real engine (hf + spmd + paged + continuous + colocated) on a tiny random Llama,
    two tensor-parallel ranks per instance process."""
    model = write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
    command = serve_command("--tensor-parallel", "2", "-o", "collective_timeout_seconds=5", scaler="static")
    real = command[:command.index("--model")] + [
        "--model", str(model), "--served-model-name", MODEL, "--tokenizer", "hf", "--executor", "spmd",
        "--kv-cache", "paged", "--batch-scheduler", "continuous", "--job-scheduler", "colocated",
        "--kv-cache-memory", "8MiB", "--device", "cpu", "--dtype", "float32",
        *command[command.index("--tensor-parallel"):]]
    return start_server(real, env={"HF_HUB_OFFLINE": "1"}), model


def instance_and_rank(server) -> tuple[int, psutil.Process]:
    """The one ready instance process (rank 0) and its worker rank 1."""
    deadline = time.monotonic() + BOUND
    while time.monotonic() < deadline:
        pids = ready_pids(server)
        if len(pids) == 1:
            (instance,) = pids
            try:
                ranks = [child for child in psutil.Process(instance).children(recursive=True)
                         if "flowserve_spmd_executor" in " ".join(child.cmdline())]
            except psutil.Error:
                ranks = []
            if len(ranks) == 1:
                return instance, ranks[0]
        time.sleep(0.1)
    pytest.fail(f"no ready instance with one worker rank: {admin_status(server)}\n{server.log()[-3000:]}")


def hf_greedy(model_dir, prompt: list[int], max_tokens: int) -> list[int]:
    """The oracle: HF transformers' greedy continuation."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                         do_sample=False)
    return out[0, len(prompt):].tolist()


def test_a_killed_tensor_parallel_rank_fails_the_stream_and_the_instance_is_replaced(tensor_parallel_server):
    server, model_dir = tensor_parallel_server
    instance, rank = instance_and_rank(server)
    stream = StreamRecorder(server.url, {"model": MODEL, "prompt": "Hello tiny model", "max_tokens": 400,
                                         "ignore_eos": True, "stream": True})
    stream.start()
    assert stream.first_token.wait(BOUND)
    rank.kill()
    assert stream.outcome() == "error", (stream.outcome(), stream.text)
    # rank 0 sees either the gang's death notice or its own failed collective first
    assert "rank 1 died" in stream.error["message"] or "tensor-parallel" in stream.error["message"], stream.error
    wait_replaced(server, instance, 1)
    # the replacement computes right: HF's greedy tokens, as text
    from transformers import AutoTokenizer

    prompt = [5, 17, 42, 99, 7]
    answer = httpx.post(server.url + "/v1/completions", timeout=BOUND, json={
        "model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True})
    assert answer.status_code == 200, answer.text
    expected = AutoTokenizer.from_pretrained(str(model_dir)).decode(hf_greedy(model_dir, prompt, 8),
                                                                     skip_special_tokens=True)
    assert answer.json()["choices"][0]["text"] == expected
    assert server.wait_metric("flowserve:num_requests_running", lambda v: v == 0) == 0


@toy_only
def test_sigterm_stops_admission_drains_up_to_the_timeout_then_exits_0(start_server, tmp_path_factory):
    """A short request in flight finishes; a request that outlives ``drain_timeout`` is cut
    off at the timeout; new connections are refused meanwhile; the exit status is 0."""
    config = write_config(tmp_path_factory.mktemp("drain"), "drain_timeout = 3\n")
    server = start_server(serve_command("--config", config, "-o", "step_delay=0.02", scaler="static"))
    short = StreamRecorder(server.url, {"model": MODEL, "prompt": "t10", "max_tokens": 40, "stream": True})
    long = StreamRecorder(server.url, {"model": MODEL, "prompt": "t300", "max_tokens": 240, "stream": True})
    for stream in (short, long):
        stream.start()
        assert stream.first_token.wait(BOUND)
    signalled = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    refused = None
    while refused is None and time.monotonic() - signalled < 2:
        try:
            answer = httpx.post(server.url + "/v1/completions", timeout=5,
                                json={"model": MODEL, "prompt": "t1", "max_tokens": 1})
            if answer.status_code == 503:
                refused = "503"
        except httpx.TransportError:
            refused = "connection refused"
        time.sleep(0.05)
    assert refused, "the draining server still admitted new requests"
    assert short.outcome() == "ok" and short.text == counter_text(10, 40)
    long.join(BOUND)
    assert long.outcome() == "error" and len(long.text.split()) < 240  # cut off at the drain timeout, said so
    assert long.error["code"] == "shutting_down" and "drain_timeout" in long.error["message"]
    assert server.process.wait(BOUND) == 0
    assert time.monotonic() - signalled < 3 + 30  # the drain timeout, plus the deployments' stop


@pytest.mark.skipif(os.environ.get("FLOWSERVE_SLOW_FAULTS") != "1",
                    reason="~30 s; on demand with FLOWSERVE_SLOW_FAULTS=1 (the executor-level hung-rank test "
                           "of plugins/spmd-executor runs in CI)")
def test_a_frozen_tensor_parallel_rank_is_detected_and_the_instance_replaced(tensor_parallel_server):
    """SIGSTOP on rank 1: rank 0's collectives time out (collective_timeout_seconds=5), the
    engine dies with an error event for the stream, and the deployment starts a new instance."""
    server, _ = tensor_parallel_server
    instance, rank = instance_and_rank(server)
    stream = StreamRecorder(server.url, {"model": MODEL, "prompt": "Hello tiny model", "max_tokens": 400,
                                         "ignore_eos": True, "stream": True})
    stream.start()
    assert stream.first_token.wait(BOUND)
    rank.suspend()
    try:
        assert stream.outcome() == "error", (stream.outcome(), stream.text)
        assert "tensor-parallel" in stream.error["message"], stream.error
        wait_replaced(server, instance, 1)
        rank.wait(BOUND)  # the dead instance's gang killed its frozen rank
    finally:
        if rank.is_running():
            rank.resume()
    assert server.wait_metric("flowserve:num_requests_running", lambda v: v == 0) == 0
