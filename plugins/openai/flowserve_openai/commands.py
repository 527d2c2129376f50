"""``flowserve scale N`` and ``flowserve status``: the admin endpoints from the command line."""

from __future__ import annotations

from typing import Any, Optional

import typer

DEFAULT_URL = "http://127.0.0.1:8000"
KEY_HELP = "Admin key (default: $FLOWSERVE_ADMIN_KEY, else $FLOWSERVE_API_KEY)."


def add_commands(app: typer.Typer) -> None:
    """Add ``scale`` and ``status`` to the ``flowserve`` CLI."""

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


def _call(method: str, url: str, path: str, key: str | None, **kw: Any) -> dict:
    """One admin call; a refusal or an unreachable server becomes a message and exit code 1."""
    import httpx

    from flowserve_core.errors import FlowServeError

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        response = httpx.request(method, url.rstrip("/") + path, headers=headers, timeout=30, **kw)
    except httpx.HTTPError as exc:
        raise FlowServeError(f"cannot reach {url}: {exc}") from None
    try:
        answer = response.json()
    except ValueError:
        answer = {}
    if response.status_code != 200:
        message = (answer.get("error") or {}).get("message") if isinstance(answer, dict) else None
        raise FlowServeError(f"{url}{path} answered {response.status_code}: {message or response.text[:200]}")
    return answer
