"""`flowserve bench` as people coming from `vllm bench serve` use it, against a live server
(``benchmarks/naive_server.py`` with a tiny random Llama): ShareGPT and JSONL prompts, a rate
sweep, chosen percentiles, and results that a reader of vLLM's result files reads back.

No timing is asserted: counts, token lengths, keys, and that every number a reader gets is
the one computed from the same run's per-request records with numpy.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import anyio
import numpy as np
import pytest
from transformers import AutoTokenizer

from flowserve_bench import BenchConfig, BenchResult, run_benchmark
from flowserve_bench.errors import BenchError

READER = Path(__file__).with_name("read_vllm_results.py")
QUESTIONS = [("the quick brown fox", "jumps over the lazy dog"), ("serving language models", "needs batching"),
             ("what is a prefill", "the prompt read in one step by the engine"), ("decode", "one token a step")]


def sharegpt_file(path: Path) -> Path:
    conversations = [{"id": str(i), "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
                     for i, (q, a) in enumerate(QUESTIONS)]
    conversations.append({"id": "short", "conversations": [{"from": "human", "value": "a single turn"}]})  # skipped
    path.write_text(json.dumps(conversations))
    return path


def flowserve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flowserve_core.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "COLUMNS": "200", "TERM": "dumb"})


def test_a_sharegpt_rate_sweep_is_read_back_by_a_vllm_results_reader(naive_server, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(naive_server.model_dir)
    answer_lengths = {q: len(tokenizer.encode(a, add_special_tokens=False)) for q, a in QUESTIONS}
    out = tmp_path / "out"
    run = flowserve("bench", "--url", naive_server.url, "--tokenizer", str(naive_server.model_dir),
                    "--dataset-name", "sharegpt", "--dataset-path", str(sharegpt_file(tmp_path / "sharegpt.json")),
                    "--num-requests", "5", "--request-rate", "8,inf", "--percentiles", "50,90,99,99.9",
                    "--label", "sweep", "--result-file", str(out / "run.json"), "--result-csv", str(out / "runs.csv"),
                    "--plot", str(out / "sweep.png"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "p99.9" in run.stdout and "dataset: sharegpt" in run.stdout
    files = [out / "run-8qps.json", out / "run-infqps.json"]
    assert all(f.is_file() for f in files)

    reader = subprocess.run([sys.executable, str(READER), *map(str, files)], capture_output=True, text=True,
                            timeout=60)
    assert reader.returncode == 0, reader.stderr
    assert reader.stdout.startswith("| Request rate (req/s) |")
    read = json.loads(reader.stdout.strip().splitlines()[-1])

    for path, row, rate in zip(files, read, (8.0, "inf")):
        result = BenchResult.from_json(path.read_bytes())  # FlowServe's own view of the same run
        assert result.config.request_rate == rate and row["request_rate"] == rate
        assert row["completed"] == result.completed == 5 and row["failed"] == 0
        for record in result.requests:  # each output is its reference answer's length
            assert record.output_tokens == record.requested_output_tokens
            assert record.output_tokens in answer_lengths.values()
        assert row["total_output_tokens"] == row["sum_output_lens"] == result.total_output_tokens
        assert row["total_input_tokens"] == sum(r.prompt_tokens for r in result.requests)
        assert row["duration"] == result.duration
        assert row["request_throughput"] == pytest.approx(5 / result.duration)
        assert row["output_throughput"] == pytest.approx(result.total_output_tokens / result.duration)
        ttft_ms = np.array([r.ttft for r in result.requests]) * 1000
        e2el_ms = np.array([r.e2e for r in result.requests]) * 1000
        itl_ms = np.array([gap for r in result.requests for gap in r.itl]) * 1000
        assert row["num_ttfts"] == 5 and row["num_itls"] == len(itl_ms) == result.itl.count
        assert row["mean_ttft_ms"] == pytest.approx(ttft_ms.mean())
        assert row["median_ttft_ms"] == pytest.approx(np.median(ttft_ms))
        assert row["p99_ttft_ms"] == pytest.approx(np.percentile(ttft_ms, 99))
        assert row["p99_itl_ms"] == pytest.approx(np.percentile(itl_ms, 99))
        assert row["p99_e2el_ms"] == pytest.approx(np.percentile(e2el_ms, 99))
        assert {f"p{p}_{m}_ms" for p in ("50", "90", "99", "99.9") for m in ("ttft", "tpot", "itl", "e2el")} \
            <= set(row["percentile_keys"])
        full = json.loads(path.read_text())
        assert full["p99.9_ttft_ms"] == pytest.approx(np.percentile(ttft_ms, 99.9))
        assert full["std_ttft_ms"] == pytest.approx(ttft_ms.std())
        assert full["max_concurrent_requests"] >= 1 and full["endpoint_type"] == "openai"

    with open(out / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["request_rate"] for r in rows] == ["8.0", "inf"]
    assert [float(r["mean_ttft_ms"]) for r in rows] == pytest.approx([row["mean_ttft_ms"] for row in read])
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.anyio
async def test_jsonl_prompts_and_messages_go_to_the_chat_endpoint(naive_server, tmp_path):
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text("\n".join(json.dumps(line) for line in (
        {"prompt": "the quick brown fox", "output_len": 3},
        {"messages": [{"role": "system", "content": "answer briefly"},
                      {"role": "user", "content": "what is decode"}], "output_len": 4},
        {"messages": [{"role": "user", "content": "serving"}]},  # no length of its own: --output-len
    )) + "\n\n")
    config = BenchConfig(url=naive_server.url, endpoint="chat", dataset_name="jsonl", dataset_path=str(dataset),
                         num_requests=6, output_len="2", concurrency=2, percentiles=[25.0, 75.0])
    with anyio.fail_after(120):
        result = await run_benchmark(config)
    assert result.completed == 6 and result.failed == 0
    assert sorted(r.output_tokens for r in result.requests) == [2, 2, 3, 3, 4, 4]  # every entry twice
    assert sorted(result.ttft.percentiles) == ["25", "75"]
    assert result.prompt_source.startswith("dataset: jsonl")

    wrong_endpoint = BenchConfig(url=naive_server.url, dataset_name="jsonl", dataset_path=str(dataset),
                                 num_requests=3)
    with pytest.raises(BenchError, match="--endpoint chat"):
        await run_benchmark(wrong_endpoint)
