"""The CPU server's container image (``Dockerfile``): built, run, asked one chat completion.

It runs where this machine can run containers (a ``docker`` or ``podman`` that answers ``info``)
and can get the base image; anywhere else it skips and says why. The build installs torch and
the plugins from the package indexes, so it takes minutes."""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

ROOT = Path(__file__).resolve().parents[1]
BASE_IMAGE = "python:3.11-slim"


def container_tool() -> str:
    """The first container engine that can run containers here; skips the test otherwise."""
    reasons = []
    for tool in ("podman", "docker"):
        if shutil.which(tool) is None:
            reasons.append(f"no {tool}")
            continue
        info = subprocess.run([tool, "info"], capture_output=True, text=True, timeout=60)
        if info.returncode == 0:
            return tool
        reasons.append(f"{tool} cannot run containers ({(info.stderr.strip().splitlines() or ['?'])[-1]})")
    pytest.skip("no container engine: " + "; ".join(reasons))


def test_the_image_serves_the_default_model_as_a_non_root_user():
    tool = container_tool()
    if subprocess.run([tool, "pull", BASE_IMAGE], capture_output=True, timeout=600).returncode != 0:
        pytest.skip(f"{tool} cannot pull the base image {BASE_IMAGE} (no registry reachable)")
    tag = f"flowserve-cpu-test:{uuid.uuid4().hex[:8]}"
    build = subprocess.run([tool, "build", "-t", tag, str(ROOT)], capture_output=True, text=True, timeout=3600)
    assert build.returncode == 0, build.stderr[-3000:]
    name = f"flowserve-test-{uuid.uuid4().hex[:8]}"
    try:
        run = subprocess.run([tool, "run", "-d", "--name", name, "-p", "127.0.0.1::8000", "--shm-size=2g",
                              "-e", "FLOWSERVE_API_KEY=test-key", tag], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        user = subprocess.run([tool, "exec", name, "id", "-u"], capture_output=True, text=True, timeout=60)
        assert user.stdout.strip() not in ("", "0"), user.stdout
        port = subprocess.run([tool, "port", name, "8000"], capture_output=True, text=True,
                              timeout=60).stdout.strip().rsplit(":", 1)[-1]
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        else:
            logs = subprocess.run([tool, "logs", name], capture_output=True, text=True, timeout=60)
            pytest.fail(f"the container never became ready:\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}")
        client = OpenAI(base_url=f"{base}/v1", api_key="test-key")
        answer = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=8,
                                                messages=[{"role": "user", "content": "Say hello."}])
        assert answer.choices[0].message.content and answer.usage.completion_tokens > 0
    finally:
        subprocess.run([tool, "rm", "-f", name], capture_output=True, timeout=120)
        subprocess.run([tool, "rmi", "-f", tag], capture_output=True, timeout=120)
