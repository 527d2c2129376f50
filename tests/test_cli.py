"""The `flowserve` CLI: built from plugins, its commands, and errors for people."""

import os
import subprocess
import sys
import types

import typer
from typer.testing import CliRunner

from flowserve_core import __version__, hookimpl
from flowserve_core.cli import build_cli

runner = CliRunner()


def test_version(pm):
    result = runner.invoke(build_cli(pm), ["version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_plugins_table_lists_distributions_kinds_and_names(pm):
    result = runner.invoke(build_cli(pm), ["plugins"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "flowserve-test-fixtures" in result.output
    assert "counter" in result.output and "whitespace" in result.output
    assert "inproc" in result.output


def test_plugins_add_commands_through_the_hook(pm):
    def register_commands(app: typer.Typer) -> None:
        @app.command()
        def hello(name: str = "world") -> None:
            typer.echo(f"hello {name}")

    pm.register(types.SimpleNamespace(flowserve_register_commands=hookimpl(register_commands)), name="hello")
    result = runner.invoke(build_cli(pm), ["hello", "--name", "flowserve"])
    assert result.exit_code == 0 and "hello flowserve" in result.output


def flowserve(*args):
    env = {**os.environ, "COLUMNS": "300", "TERM": "dumb"}
    return subprocess.run([sys.executable, "-m", "flowserve_core.cli", *args],
                          capture_output=True, text=True, timeout=60, env=env)


def test_serve_with_a_missing_plugin_says_which_pip_install_fixes_it():
    result = flowserve("serve", "--model", "/nowhere/tiny", "--executor", "spmd-nope", "--tokenizer", "whitespace")
    assert result.returncode == 1
    assert "no executor named 'spmd-nope' is installed" in result.stderr
    result = flowserve("--plugin", "no:openai", "--plugin", "no:flowserve-openai",
                       "serve", "--model", "/nowhere/tiny", "--frontend", "openai", "--tokenizer", "whitespace",
                       "--executor", "counter", "--kv-cache", "unbounded", "--batch-scheduler", "fifo",
                       "--job-scheduler", "least-tasks", "--scaler", "inproc")
    assert result.returncode == 1
    assert "pip install flowserve-openai" in result.stderr


def test_serve_rejects_bad_flag_values():
    result = flowserve("serve", "--tensor-parallel", "two")
    assert result.returncode == 2 and "Invalid value for '--tensor-parallel'" in result.stderr
    result = flowserve("serve", "--model", "/m/x", "--tensor-parallel", "0")
    assert result.returncode == 1 and "tensor_parallel must be at least 1" in result.stderr


def test_plugins_give_serve_flags_that_become_options(pm, monkeypatch):
    seen = {}
    monkeypatch.setattr("flowserve_core.cli.run_server_command",
                        lambda _pm, _config, overrides: seen.update(overrides))
    pm.register(types.SimpleNamespace(flowserve_serve_flags=hookimpl(lambda: ["ray_address", "pool_size"])),
                name="flags")
    app = build_cli(pm)
    result = runner.invoke(app, ["serve", "--model", "/m/x", "--ray-address", "auto", "--pool-size=3",
                                 "-o", "step_delay=0.5"])
    assert result.exit_code == 0, result.output
    assert seen["options"] == {"step_delay": 0.5, "ray_address": "auto", "pool_size": 3}
    help_text = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}).output
    assert "--pool-size VALUE, --ray-address VALUE" in help_text
    for args, message in ((["--ray-adress", "auto"], "no such option: --ray-adress"),
                          (["--ray-address"], "--ray-address needs a value"),
                          (["stray"], "unexpected argument 'stray'")):
        result = runner.invoke(app, ["serve", "--model", "/m/x", *args], env={"COLUMNS": "200"})
        assert result.exit_code == 2 and message in result.output, result.output
