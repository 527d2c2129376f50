"""`flowserve bench` (CLI and library) against the naive server, and the naive server itself.

The server is ``benchmarks/naive_server.py`` in a subprocess with a tiny random Llama; no
test asserts a timing, only counts, token lengths, orderings and what the SLOs imply.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys

import anyio
import pytest

from flowserve_bench import BenchConfig, BenchResult, run_benchmark


def flowserve(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "TERM": "dumb"}
    return subprocess.run([sys.executable, "-m", "flowserve_core.cli", *args],
                          capture_output=True, text=True, timeout=180, env=env)


def assert_ordered(summary) -> None:
    assert summary.count > 0
    assert summary.min <= summary.p50 <= summary.p90 <= summary.p99 <= summary.max
    assert summary.min <= summary.mean <= summary.max


def assert_consistent(result: BenchResult) -> None:
    """What must hold for any run whose requests all completed with ignore_eos."""
    assert result.completed == result.num_requests == result.config.num_requests
    assert result.failed == 0 and result.errors == []
    assert [r.index for r in result.requests] == list(range(result.num_requests))
    for record in result.requests:
        assert record.ok and record.finish_reason == "length"
        assert record.output_tokens == record.requested_output_tokens
        assert record.ttft is not None and record.ttft <= record.e2e
        assert len(record.itl) <= record.output_tokens - 1
        if record.output_tokens > 1:
            assert record.tpot == pytest.approx((record.e2e - record.ttft) / (record.output_tokens - 1))
    assert result.total_output_tokens == sum(r.requested_output_tokens for r in result.requests)
    assert result.output_throughput == pytest.approx(result.total_output_tokens / result.duration)
    assert result.request_throughput == pytest.approx(result.completed / result.duration)
    for summary in (result.ttft, result.e2e, result.itl):
        assert_ordered(summary)


def test_cli_runs_a_closed_loop_and_writes_a_complete_results_file(naive_server, tmp_path):
    results = tmp_path / "out" / "naive.json"
    run = flowserve("bench", "--url", naive_server.url, "--tokenizer", str(naive_server.model_dir),
                    "--num-requests", "6", "--concurrency", "2", "--prompt-len", "uniform:8:24",
                    "--output-len", "6", "--warmup", "1", "--slo-ttft", "1e-9", "--label", "tiny-cli",
                    "--result-file", str(results))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "flowserve bench — tiny-cli" in run.stdout and "goodput" in run.stdout
    for row in ("TTFT", "TPOT", "ITL", "E2E", "request throughput", "output token throughput"):
        assert row in run.stdout

    result = BenchResult.from_json(results.read_bytes())
    assert result.label == "tiny-cli" and result.model == naive_server.model  # from GET /v1/models
    assert result.config.concurrency == 2 and result.config.warmup == 1 and result.endpoint == "completions"
    assert result.prompt_source.startswith("token ids")
    assert_consistent(result)
    for record in result.requests:  # token-id prompts: exactly the asked length, as the server counted
        assert 8 <= record.prompt_tokens == record.requested_prompt_tokens <= 24
    assert_ordered(result.tpot)
    # nothing reaches a first token within a nanosecond
    assert result.good_requests == 0 and result.goodput == 0 and result.goodput_fraction == 0


@pytest.mark.anyio
async def test_library_open_loop_with_generous_slos_finds_every_request_good(naive_server):
    seen = []
    config = BenchConfig(url=naive_server.url, model=naive_server.model, tokenizer=str(naive_server.model_dir),
                         request_rate=math.inf, max_concurrency=3, num_requests=6, seed=7,
                         prompt_len="mix:0.5@4,0.5@uniform:16:20", output_len="uniform:2:5",
                         slo_ttft=3600.0, slo_tpot=3600.0)
    with anyio.fail_after(120):
        result = await run_benchmark(config, on_request_done=seen.append)
    assert_consistent(result)
    assert sorted(r.index for r in seen) == list(range(6))
    assert {r.prompt_tokens for r in result.requests} <= {4, *range(16, 21)}
    assert {r.output_tokens for r in result.requests} <= {2, 3, 4, 5}
    assert result.good_requests == 6 and result.goodput_fraction == 1.0
    assert result.goodput == pytest.approx(result.request_throughput)
    assert result.config.request_rate == "inf"
    assert BenchResult.from_json(result.to_json()) == result


@pytest.mark.anyio
async def test_chat_prompts_are_text_counted_by_the_server(naive_server):
    config = BenchConfig(url=naive_server.url, endpoint="chat", tokenizer=str(naive_server.model_dir),
                         num_requests=3, prompt_len="10", output_len="4")
    with anyio.fail_after(120):
        result = await run_benchmark(config)
    assert_consistent(result)
    assert result.prompt_source.startswith("text")
    for record in result.requests:  # ten words plus the chat layout
        assert record.prompt_tokens is not None and record.prompt_tokens > 10


@pytest.mark.anyio
async def test_failed_requests_are_counted_never_raised(naive_server):
    wrong_model = BenchConfig(url=naive_server.url, model="no-such-model", num_requests=3, output_len="2",
                              prompt_len="4", concurrency=2, slo_ttft=10.0, api_key="sk-secret")
    with anyio.fail_after(60):
        result = await run_benchmark(wrong_model)
    assert (result.completed, result.failed) == (0, 3)
    (error,) = result.errors
    assert error.status == "404" and error.count == 3 and "no-such-model" in error.message
    assert result.goodput == 0 and result.output_throughput == 0 and result.ttft.p50 is None
    assert result.config.api_key == "***" and b"sk-secret" not in result.to_json()

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
    with anyio.fail_after(60):
        result = await run_benchmark(BenchConfig(url=dead, model="m", num_requests=4, request_rate=50.0))
    assert (result.completed, result.failed) == (0, 4)
    assert [(e.status, e.count) for e in result.errors] == [("connect", 4)]


def test_cli_without_a_model_and_a_dead_url_says_so(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    run = flowserve("bench", "--url", dead, "--num-requests", "2")
    assert run.returncode == 1
    assert "cannot list the models" in run.stderr and "/v1/models" in run.stderr
    assert "Traceback" not in run.stderr
    run = flowserve("bench", "--url", dead, "--prompt-len", "uniform:9")
    assert run.returncode == 1 and "--prompt-len 'uniform:9' is not a length spec" in run.stderr


@pytest.mark.anyio
async def test_a_request_past_its_timeout_fails_and_frees_the_naive_server(naive_server):
    endless = BenchConfig(url=naive_server.url, model=naive_server.model, num_requests=1, prompt_len="4",
                          output_len="2000", timeout=0.5, tokenizer=str(naive_server.model_dir))
    with anyio.fail_after(60):
        result = await run_benchmark(endless)
    assert result.failed == 1 and result.errors[0].status == "timeout"
    # The server noticed the client leave and stopped generating: the next request is served
    # (a server still generating 2000 tokens would hold its lock for a minute or more).
    short = BenchConfig(url=naive_server.url, model=naive_server.model, num_requests=1, prompt_len="4",
                        output_len="3", tokenizer=str(naive_server.model_dir))
    with anyio.fail_after(30):
        result = await run_benchmark(short)
    assert result.completed == 1
    assert "Traceback" not in naive_server.log_path.read_text()  # a client leaving is no error


def test_naive_server_answers_as_transformers_greedy_generate(naive_server):
    import torch
    from openai import OpenAI
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(naive_server.model_dir)
    model = AutoModelForCausalLM.from_pretrained(naive_server.model_dir, dtype=torch.float32).eval()
    client = OpenAI(base_url=naive_server.url, api_key="unused", timeout=60, max_retries=0)
    assert [m.id for m in client.models.list().data] == [naive_server.model]

    for prompt in ([11, 42, 7, 99, 150], "the quick brown fox"):
        ids = prompt if isinstance(prompt, list) else tokenizer.encode(prompt)
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
        expected = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)

        answer = client.completions.create(model=naive_server.model, prompt=prompt, max_tokens=8,
                                           temperature=0, extra_body={"ignore_eos": True})
        assert answer.choices[0].text == expected and answer.choices[0].finish_reason == "length"
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(ids), 8)

        stream = client.completions.create(model=naive_server.model, prompt=prompt, max_tokens=8, temperature=0,
                                           stream=True, stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True})
        chunks = list(stream)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
        assert chunks[-1].usage.completion_tokens == 8 and not chunks[-1].choices
