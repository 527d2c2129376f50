"""The third-party plugin kit: ``flowserve plugin new``, the template, and the test helpers."""

from __future__ import annotations

import filecmp
import importlib.util
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flowserve_core.cli import build_cli
from flowserve_testing import LiveServer, plugin_manager, run_deployment
from flowserve_testing.scaffold import KINDS, write_project

ROOT = Path(__file__).parents[1]
TEMPLATE = ROOT / "contrib" / "plugin-template"


def _modules_after(code: str) -> set[str]:
    probe = code + "\nimport sys; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    return set(out.stdout.split())


def test_the_kit_imports_nothing_heavy_and_the_kernel_loads_only_its_plugin():
    heavy = {"torch", "transformers", "uvicorn", "starlette"}
    # every process that loads plugins imports flowserve_testing: not even pytest
    assert not (heavy | {"pytest"}) & _modules_after("import flowserve_testing")
    # the public path, imported by tests only, loads each submodule once (the fixtures: pytest)
    assert not heavy & _modules_after("import flowserve_core.testing")
    help_run = ("import sys; sys.argv = ['flowserve', 'plugin', 'new', '--help']\n"
                "from flowserve_core.cli import main\n"
                "try:\n    main()\nexcept SystemExit:\n    pass\n"
                "import flowserve_core.server, flowserve_core.engine\n"
                "from flowserve_core.plugins import get_plugin_manager\n"
                "assert get_plugin_manager().get('scaler', 'inproc')")
    loaded = _modules_after(help_run)
    # the plugin module (and its package, whose names load on first use), never the rest of the kit
    assert {m for m in loaded if m.startswith("flowserve_testing")} == {"flowserve_testing", "flowserve_testing.plugin"}
    assert "flowserve_core.testing" not in loaded


def test_the_template_is_what_plugin_new_writes(tmp_path):
    write_project("my-scheduler", "scheduler", tmp_path / "fresh")
    ignored = ["__pycache__", ".pytest_cache", "build", "flowserve_my_scheduler.egg-info"]

    def differences(compared: filecmp.dircmp) -> list[str]:
        found = [*compared.left_only, *compared.right_only, *compared.diff_files, *compared.funny_files]
        return found + [f for sub in compared.subdirs.values() for f in differences(sub)]

    assert differences(filecmp.dircmp(TEMPLATE, tmp_path / "fresh", ignore=ignored)) == [], \
        "regenerate it: flowserve plugin new my-scheduler --kind scheduler -d contrib/plugin-template"


def test_plugin_new_refuses_bad_names_unknown_kinds_and_non_empty_directories(pm, tmp_path):
    cli = build_cli(pm)
    for args, message in [(["Bad_Name", "--kind", "scheduler"], "lowercase letters"),
                          (["fine", "--kind", "router"], "kinds are scheduler, executor"),
                          (["fine", "--kind", "scheduler", "-d", str(ROOT)], "is not empty")]:
        result = CliRunner().invoke(cli, ["plugin", "new", *args], env={"COLUMNS": "300"})
        assert result.exit_code == 2 and message in result.output, result.output
    help_text = CliRunner().invoke(cli, ["plugin", "new", "--help"], env={"COLUMNS": "300"}).output
    assert "|".join(KINDS) in help_text  # the help lists exactly the kinds the kit writes


def test_every_kind_plugin_new_writes_passes_its_own_tests_once_installed(tmp_path):
    """As a new user would: write each kind, pip install it, run its tests, uninstall it."""
    tag = uuid.uuid4().hex[:6]
    projects = {kind: tmp_path / kind for kind in KINDS}
    for kind, directory in projects.items():
        result = CliRunner().invoke(build_cli(plugin_manager()),
                                    ["plugin", "new", f"kit{tag}-{kind}", "--kind", kind, "-d", str(directory)])
        assert result.exit_code == 0, result.output
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    dists = [f"flowserve-kit{tag}-{kind}" for kind in KINDS]
    try:
        # Building in this environment (its setuptools) is much faster than in isolated ones.
        isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
        install = subprocess.run([*pip, "install", "--no-deps", *isolation,
                                  *(a for d in projects.values() for a in ("-e", str(d)))],
                                 capture_output=True, text=True, timeout=300)
        assert install.returncode == 0, install.stderr
        # In a fresh process, from the projects' own folder: none of this repository's conftest.
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              "--import-mode=importlib", *map(str, projects.values())],
                             cwd=tmp_path, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "COLUMNS": "200"})
        assert run.returncode == 0 and " failed" not in run.stdout, run.stdout[-6000:] + run.stderr[-3000:]
        assert "skipped" not in run.stdout, run.stdout[-3000:]  # every kind ran its deployment test
    finally:
        subprocess.run([*pip, "uninstall", "-y", *dists], capture_output=True, timeout=120)


def test_the_template_scheduler_is_the_one_flowserve_serve_runs(live_server, tiny_engine):
    """The issue's "done": the template, installed, chosen with --batch-scheduler, serves a request."""
    pytest.importorskip("flowserve_my_scheduler", reason="install contrib/plugin-template (scripts/install.sh)")
    pytest.importorskip("flowserve_openai")
    import openai

    server = live_server(*tiny_engine.serve_args(batch_scheduler="my-scheduler"), frontend="openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    completion = client.completions.create(model="tiny", prompt="Hello world", max_tokens=3)
    assert 1 <= completion.usage.completion_tokens <= 3
    queued = [line for line in server.log().splitlines() if "my-scheduler queued task" in line]
    assert len(queued) == 1 and '"batch_scheduler": "my-scheduler"' in queued[0], server.log()[-3000:]


def test_plugin_manager_names_what_is_not_installed():
    with pytest.raises(LookupError, match="no FlowServe plugin named 'flowserve-nope' is installed"):
        plugin_manager("flowserve-nope")
    only = plugin_manager("flowserve-test-fixtures")
    assert set(only.components("executor")) == {"counter"} and set(only.components("scaler")) == {"inproc"}


@pytest.mark.anyio
async def test_run_deployment_reports_an_instance_that_cannot_start(tiny_engine):
    pm = plugin_manager("flowserve-test-fixtures")
    with pytest.raises(RuntimeError, match="injected start failure of the counter executor"):
        async with run_deployment(tiny_engine.spec(**{
                "model": "toy", "tokenizer": "whitespace", "executor": "counter", "kv_cache": "unbounded",
                "batch_scheduler": "fifo", "job_scheduler": "least-tasks",
                "options": {"fail_to_start": True}}), pm=pm, timeout=30):
            pass


def test_a_live_server_that_cannot_start_says_why(tmp_path):
    server = LiveServer("--model", "toy", "--tokenizer", "whitespace", "--executor", "no-such-executor",
                        frontend="openai", log_path=tmp_path / "server.log")
    with pytest.raises(RuntimeError, match="(?s)exited with status 1.*no executor named 'no-such-executor'"):
        server.start(timeout=60)
    assert server.process.poll() is not None
