"""Removing deployments gives their memory back (issue 20, item 11): after adding and removing
12 scaled-to-zero SmolLM2 deployments (each loads its own tokenizer), the server's RSS comes
back within 10% of where it started, and nothing of them is left in ``/metrics``."""

from __future__ import annotations

import time

import httpx
import psutil
import pytest

pytest.importorskip("flowserve_hf_tokenizer")
pytest.importorskip("flowserve_spmd_executor")

from flowserve_core.config import default_model_path  # noqa: E402  (after the importorskip above)
from flowserve_testing import LiveServer  # noqa: E402  (after the importorskip above)

COUNT = 12


def test_removed_deployments_give_their_memory_back(tmp_path):
    model = default_model_path()
    engine = ["--tokenizer", "hf", "--executor", "spmd", "--scaler", "prewarm", "--device", "cpu",
              "--dtype", "float32", "--min-instances", "0", "-o", "pool_size=0"]
    server = LiveServer("--model", model, "--served-model-name", "base", *engine,
                        env={"FLOWSERVE_SHM_DIR": str(tmp_path / "shm")}).start(timeout=180)
    try:
        process = psutil.Process(server.process.pid)

        def body(name: str) -> dict:
            return {"name": name, "model": model, "min_instances": 0, "max_instances": 1}

        def add_and_remove(names: list[str]) -> float:
            for name in names:
                answer = httpx.post(server.url + "/admin/deployments", json=body(name), timeout=120)
                assert answer.status_code == 201, answer.text
            peak = process.memory_info().rss
            for name in names:
                answer = httpx.delete(server.url + f"/admin/deployments/{name}", timeout=120)
                assert answer.status_code == 200, answer.text
            return peak

        add_and_remove(["warm-up"])  # what is loaded once (modules, caches) is not a leak
        time.sleep(3)
        start = process.memory_info().rss
        peak = add_and_remove([f"smol-{i}" for i in range(COUNT)])
        assert peak > start * 1.15, (start, peak)  # the tokenizers really took memory
        deadline = time.monotonic() + 30
        while (now := process.memory_info().rss) > start * 1.10 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert now <= start * 1.10, f"RSS {start >> 20} MiB at the start, {peak >> 20} with {COUNT} " \
                                     f"deployments, {now >> 20} after removing them"
        names = [d["name"] for d in httpx.get(server.url + "/admin/deployments", timeout=10).json()["deployments"]]
        assert names == ["base"]
        assert "smol-" not in httpx.get(server.url + "/metrics", timeout=10).text
    finally:
        server.stop()


def test_a_removed_deployments_metrics_series_go(start_server):
    """The per-deployment children of the histograms and counters (one set per name ever
    served, before) are dropped once the deployment is removed."""
    from openai_live import TOY_ENGINE, serve_command

    server = start_server(serve_command())
    toy = dict(zip([flag.lstrip("-").replace("-", "_") for flag in TOY_ENGINE[::2]], TOY_ENGINE[1::2]))
    body = {**toy, "name": "extra", "model": "toy", "scaler": "inproc"}
    body.pop("served_model_name")
    assert httpx.post(server.url + "/admin/deployments", json=body, timeout=60).status_code == 201
    answer = httpx.post(server.base_url + "/completions", json={"model": "extra", "prompt": "t1", "max_tokens": 2},
                        timeout=60)
    assert answer.status_code == 200, answer.text
    assert 'flowserve:e2e_request_latency_seconds_count{model_name="extra"} 1.0' in httpx.get(server.url + "/metrics").text
    assert httpx.delete(server.url + "/admin/deployments/extra", timeout=60).status_code == 200
    assert 'model_name="extra"' not in httpx.get(server.url + "/metrics").text
