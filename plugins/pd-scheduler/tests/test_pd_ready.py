"""``/ready`` under PD (issue 20, item 13): a PD-disaggregated deployment is ready only when
both its prefill and its decode role have a ready instance; a Kubernetes readiness probe
sends traffic on that word.

The decode instance process is SIGSTOPped while it warms, so that the prefill instance is
ready alone for as long as the test needs; once it resumes, ``/ready`` says 200 and a
request is served through both.
"""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

pytest.importorskip("flowserve_spmd_executor")

from flowserve_testing import serve, write_tiny_llama  # noqa: E402  (after the importorskip above)

ENGINE = ["--tokenizer", "hf", "--executor", "spmd", "--kv-cache", "paged", "--batch-scheduler", "continuous",
          "--scaler", "static", "--dtype", "float32", "--device", "cpu", "--kv-cache-memory", "16MiB",
          "--job-scheduler", "pd-disaggregated", "--prefill-instances", "1", "--decode-instances", "1"]
BOUND = 120


def instances(server) -> list[dict]:
    return httpx.get(server.url + "/admin/status", timeout=10).json()["instances"]


def test_ready_waits_for_every_role(tmp_path):
    path = write_tiny_llama(tmp_path / "tiny", num_hidden_layers=2, seed=3)
    with serve("--model", str(path), "--served-model-name", "tiny", *ENGINE, timeout=BOUND) as server:
        deadline = time.monotonic() + BOUND
        decode = None
        while decode is None or not decode.get("pid"):  # stop it as soon as its process said hello
            assert time.monotonic() < deadline, instances(server)
            decode = next((i for i in instances(server) if i["role"] == "decode"), None)
            time.sleep(0.01)
        assert decode["state"] == "warming", f"the decode instance became ready before it could be stopped: {decode}"
        os.kill(decode["pid"], signal.SIGSTOP)
        try:
            while not any(i["role"] == "prefill" and i["state"] == "ready" for i in instances(server)):
                assert time.monotonic() < deadline, server.log()[-3000:]
                time.sleep(0.1)
            for _ in range(10):  # the prefill instance is ready, the decode one is not: not ready
                answer = httpx.get(server.url + "/ready", timeout=10)
                assert answer.status_code == 503, answer.text
                assert answer.json()["deployments"]["tiny"]["state"] == "warming", answer.text
                time.sleep(0.1)
            assert httpx.get(server.url + "/health", timeout=10).status_code == 200  # alive, just not ready
        finally:
            os.kill(decode["pid"], signal.SIGCONT)
        while (answer := httpx.get(server.url + "/ready", timeout=10)).status_code != 200:
            assert time.monotonic() < deadline, server.log()[-3000:]
            time.sleep(0.1)
        assert sorted(i["role"] for i in instances(server) if i["state"] == "ready") == ["decode", "prefill"]
        completion = httpx.post(server.url + "/v1/completions", timeout=BOUND,
                                json={"model": "tiny", "prompt": [5, 6, 7, 8], "max_tokens": 4, "ignore_eos": True})
        assert completion.status_code == 200 and completion.json()["usage"]["completion_tokens"] == 4, completion.text
