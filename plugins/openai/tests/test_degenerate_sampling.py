"""Issue 20, item 8, through a live server on the real engine (a tiny random Llama, spmd
executor, the shared sampler): ``temperature: 1e-300`` answers what greedy answers (it
returned one token repeated, from NaN weights), and a ``repetition_penalty`` outside
[0.01, 10] is a 400 naming it."""

from __future__ import annotations

import sys

import httpx
import pytest

from flowserve_testing import write_tiny_llama

REAL_ENGINE = ["--tokenizer", "hf", "--executor", "spmd", "--kv-cache", "paged", "--batch-scheduler", "continuous",
               "--job-scheduler", "colocated", "--scaler", "static", "--dtype", "float32", "--device", "cpu",
               "--kv-cache-memory", "16MiB", "--max-model-len", "256"]
PROMPT = [1, 17, 99, 230, 41, 8]


@pytest.fixture(scope="module")
def tiny_server(start_server, tmp_path_factory):
    model = write_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", seed=7)
    return start_server([sys.executable, "-m", "flowserve_core.cli", "serve", "--host", "127.0.0.1", "--port", "0",
                         "--model", str(model), "--served-model-name", "tiny", *REAL_ENGINE],
                        env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})


def complete(server, **params) -> httpx.Response:
    return httpx.post(server.base_url + "/completions", timeout=120, json={
        "model": "tiny", "prompt": PROMPT, "max_tokens": 12, "ignore_eos": True, "logprobs": 0, **params})


def test_a_temperature_of_1e_300_is_greedy(tiny_server):
    greedy = complete(tiny_server, temperature=0).json()["choices"][0]["logprobs"]["tokens"]
    assert len(set(greedy)) > 2  # a real continuation, not one token repeated
    for temperature in (1e-300, 1e-9):
        r = complete(tiny_server, temperature=temperature, seed=5)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["logprobs"]["tokens"] == greedy


@pytest.mark.parametrize("penalty", [1e-300, 0.001, 10.5, 1e300])
def test_a_repetition_penalty_out_of_range_is_a_400(tiny_server, penalty):
    r = complete(tiny_server, repetition_penalty=penalty)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "repetition_penalty" and "repetition_penalty" in error["message"]


@pytest.mark.parametrize("penalty", [0.01, 1.3, 10])
def test_a_repetition_penalty_in_range_samples_real_tokens(tiny_server, penalty):
    r = complete(tiny_server, repetition_penalty=penalty, temperature=0.7, seed=1)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"][0]["logprobs"]["tokens"]) == 12
