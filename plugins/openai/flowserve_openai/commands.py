"""The admin endpoints from the command line: ``flowserve scale N``, ``flowserve status``,
``flowserve deploy NAME --model PATH``, ``flowserve undeploy NAME``, ``flowserve deployments``
and ``flowserve alias ALIAS DEPLOYMENT``."""

from __future__ import annotations

from typing import Any, Optional

import typer

from flowserve_core.cli import fields_as_flags, parse_option
from flowserve_core.types import DeploymentSpec

DEFAULT_URL = "http://127.0.0.1:8000"
KEY_HELP = "Admin key (default: $FLOWSERVE_ADMIN_KEY, else $FLOWSERVE_API_KEY)."


def add_commands(app: typer.Typer) -> None:
    """Add ``scale``, ``status`` and the deployment commands to the ``flowserve`` CLI."""

    @app.command()
    def scale(
        instances: int = typer.Argument(..., min=0, help="How many instances the deployment should run."),
        url: str = typer.Option(DEFAULT_URL, help="The FlowServe server."),
        deployment: Optional[str] = typer.Option(None, help="The deployment (default: the first)."),
        admin_key: Optional[str] = typer.Option(None, envvar=["FLOWSERVE_ADMIN_KEY", "FLOWSERVE_API_KEY"],
                                                show_envvar=False, help=KEY_HELP),
    ) -> None:
        """Set a deployment's instance count (POST /admin/scale)."""
        body = {"instances": instances, **({"deployment": deployment} if deployment else {})}
        answer = _call("POST", url, "/admin/scale", admin_key, json=body)
        typer.echo(f"{answer['deployment']}: target {answer['target']} instance(s)")

    @app.command()
    def status(
        url: str = typer.Option(DEFAULT_URL, help="The FlowServe server."),
        deployment: Optional[str] = typer.Option(None, help="The deployment (default: the first)."),
        admin_key: Optional[str] = typer.Option(None, envvar=["FLOWSERVE_ADMIN_KEY", "FLOWSERVE_API_KEY"],
                                                show_envvar=False, help=KEY_HELP),
    ) -> None:
        """Show a deployment's instances and target (GET /admin/status)."""
        from rich.console import Console
        from rich.table import Table

        params = {"deployment": deployment} if deployment else None
        answer = _call("GET", url, "/admin/status", admin_key, params=params)
        count, target = len(answer["instances"]), answer["target"]
        table = Table(title=f"{answer['deployment']}: {count} instance(s), target {target}")
        for column in ("id", "role", "state", "start path", "start s", "pid", "error"):
            table.add_column(column)
        for instance in answer["instances"]:
            table.add_row(instance["id"], instance["role"], instance["state"], instance["start_path"],
                          f"{instance['start_seconds']:.2f}", str(instance["pid"] or ""), instance.get("error") or "")
        Console().print(table)


def add_deployment_commands(app: typer.Typer) -> None:
    """Add ``deploy``, ``undeploy``, ``deployments`` and ``alias`` to the ``flowserve`` CLI."""

    @app.command()
    @fields_as_flags(DeploymentSpec, skip={"name", "model", "options"})
    def deploy(
        name: str = typer.Argument(..., help="The model id clients will send."),
        model: str = typer.Option(..., "--model", help="Model directory or GGUF file, as the server sees it."),
        url: str = typer.Option(DEFAULT_URL, help="The FlowServe server."),
        option: list[str] = typer.Option([], "--option", "-o", help="Deployment setting KEY=VALUE: any "
                                         "DeploymentSpec field, else a plugin option (repeatable)."),
        admin_key: Optional[str] = typer.Option(None, envvar=["FLOWSERVE_ADMIN_KEY", "FLOWSERVE_API_KEY"],
                                                show_envvar=False, help=KEY_HELP),
        **fields: Any,
    ) -> None:
        """Add a deployment to a running server (POST /admin/deployments). It takes the deployment
        flags of flowserve serve; a flag left out takes the server's default."""
        body: dict[str, Any] = {"name": name, "model": model}
        body.update((key, value) for key, value in fields.items() if value is not None)
        if fields["min_instances"] is not None and fields["max_instances"] is None:
            body["max_instances"] = max(fields["min_instances"], 1)
        for text in option:
            key, value = parse_option(text)
            if key in DeploymentSpec.__struct_fields__:
                body[key] = value
            else:
                body.setdefault("options", {})[key] = value
        answer = _call("POST", url, "/admin/deployments", admin_key, json=body)
        typer.echo(f"{answer['name']}: added ({answer['state']}, target {answer['target']} instance(s))")

    @app.command()
    def undeploy(
        name: str = typer.Argument(..., help="The deployment to remove."),
        url: str = typer.Option(DEFAULT_URL, help="The FlowServe server."),
        admin_key: Optional[str] = typer.Option(None, envvar=["FLOWSERVE_ADMIN_KEY", "FLOWSERVE_API_KEY"],
                                                show_envvar=False, help=KEY_HELP),
    ) -> None:
        """Drain and remove a deployment (DELETE /admin/deployments/NAME)."""
        from urllib.parse import quote

        answer = _call("DELETE", url, f"/admin/deployments/{quote(name, safe='')}", admin_key, timeout=None)
        gone = f" (aliases removed: {', '.join(answer['aliases_removed'])})" if answer["aliases_removed"] else ""
        typer.echo(f"{answer['name']}: removed{gone}")

    @app.command()
    def deployments(
        url: str = typer.Option(DEFAULT_URL, help="The FlowServe server."),
        admin_key: Optional[str] = typer.Option(None, envvar=["FLOWSERVE_ADMIN_KEY", "FLOWSERVE_API_KEY"],
                                                show_envvar=False, help=KEY_HELP),
    ) -> None:
        """List the deployments with their instances by state (GET /admin/deployments)."""
        from rich.console import Console
        from rich.table import Table

        answer = _call("GET", url, "/admin/deployments", admin_key)
        table = Table(title=f"{len(answer['deployments'])} deployment(s)")
        for column in ("name", "model", "state", "target", "instances", "running", "waiting", "aliases"):
            table.add_column(column)
        for d in answer["deployments"]:
            counts = ", ".join(f"{n} {state}" for state, n in d["instances"].items() if n)
            table.add_row(d["name"], d["model"], d["state"], str(d["target"]), counts or "none",
                          str(d["num_running"]), str(d["num_waiting"]), ", ".join(d["aliases"]))
        Console(width=200).print(table)

    @app.command()
    def alias(
        alias: str = typer.Argument(..., help="The served name, e.g. chat."),
        deployment: Optional[str] = typer.Argument(None, help="The deployment it points at."),
        remove: bool = typer.Option(False, "--remove", help="Stop serving the alias instead."),
        url: str = typer.Option(DEFAULT_URL, help="The FlowServe server."),
        admin_key: Optional[str] = typer.Option(None, envvar=["FLOWSERVE_ADMIN_KEY", "FLOWSERVE_API_KEY"],
                                                show_envvar=False, help=KEY_HELP),
    ) -> None:
        """Point an alias at a deployment, or switch it (POST /admin/aliases)."""
        from urllib.parse import quote

        if remove:
            answer = _call("DELETE", url, f"/admin/aliases/{quote(alias, safe='')}", admin_key)
            typer.echo(f"{alias}: removed (was {answer['previous']})")
            return
        if deployment is None:
            raise typer.BadParameter("name the deployment the alias points at (or give --remove)")
        answer = _call("POST", url, "/admin/aliases", admin_key, json={"alias": alias, "deployment": deployment})
        was = f" (was {answer['previous']})" if answer["previous"] else ""
        typer.echo(f"{alias} -> {answer['deployment']}{was}")



def _call(method: str, url: str, path: str, key: str | None, **kw: Any) -> dict:
    """One admin call; a refusal or an unreachable server becomes a message and exit code 1."""
    import httpx

    from flowserve_core.errors import FlowServeError

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        kw.setdefault("timeout", 30)
        response = httpx.request(method, url.rstrip("/") + path, headers=headers, **kw)
    except httpx.HTTPError as exc:
        raise FlowServeError(f"cannot reach {url}: {exc}") from None
    try:
        answer = response.json()
    except ValueError:
        answer = {}
    if not 200 <= response.status_code < 300:
        message = (answer.get("error") or {}).get("message") if isinstance(answer, dict) else None
        raise FlowServeError(f"{url}{path} answered {response.status_code}: {message or response.text[:200]}")
    return answer
