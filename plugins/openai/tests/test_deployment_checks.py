"""A deployment that can never run is refused at once (issue 20, item 4): ``POST
/admin/deployments`` answers 400 with the reason the executor's check gives, the server keeps
serving, and no instance is started for it. ``--min-instances 2`` alone means 2 instances
(``max_instances`` defaults to ``min_instances``), not an error."""

from __future__ import annotations

import time

import httpx
import pytest
from openai_live import MODEL, serve_command

from flowserve_testing import write_tiny_llama


@pytest.fixture(scope="module")
def two_instance_server(start_server):
    return start_server(serve_command("--min-instances", "2"))


def test_min_instances_alone_starts_that_many(two_instance_server):
    server = two_instance_server
    deadline = time.monotonic() + 60
    while (status := httpx.get(server.url + "/admin/status", timeout=10).json()) and \
            sum(i["state"] == "ready" for i in status["instances"]) < 2:
        assert time.monotonic() < deadline, status
        time.sleep(0.1)
    deployment = httpx.get(server.url + "/admin/deployments", timeout=10).json()["deployments"][0]
    assert (deployment["min_instances"], deployment["max_instances"]) == (2, 2)


def test_an_impossible_deployment_is_a_400_with_the_reason(two_instance_server, tmp_path):
    server = two_instance_server
    model = write_tiny_llama(tmp_path / "tiny")  # 4 attention heads: 3 ranks cannot split them
    body = {"name": "tiny-tp3", "model": str(model), "tokenizer": "hf", "executor": "spmd", "kv_cache": "paged",
            "batch_scheduler": "continuous", "job_scheduler": "colocated", "scaler": "static",
            "device": "cpu", "dtype": "float32", "tensor_parallel": 3, "min_instances": 1}
    answer = httpx.post(server.url + "/admin/deployments", json=body, timeout=60)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert "tensor_parallel=3 does not divide the model's 4 attention heads" in error["message"], error
    names = [d["name"] for d in httpx.get(server.url + "/admin/deployments", timeout=10).json()["deployments"]]
    assert names == [MODEL]
    too_small = {**body, "name": "tiny-small-kv", "tensor_parallel": 1, "kv_cache_memory": "16KiB", "max_model_len": 512}
    answer = httpx.post(server.url + "/admin/deployments", json=too_small, timeout=60)
    assert answer.status_code == 400 and "fewer than one sequence" in answer.json()["error"]["message"], answer.text
    assert httpx.post(server.base_url + "/completions", json={"model": MODEL, "prompt": "t1", "max_tokens": 2},
                      timeout=30).status_code == 200
