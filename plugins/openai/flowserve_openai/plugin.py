"""Hook implementations: frontend ``openai``; the admin commands ``flowserve scale``, ``status``,
``deploy``, ``undeploy``, ``deployments`` and ``alias``.

Kept light: uvicorn and starlette are imported by the factory, httpx by the commands.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flowserve_core import hookimpl
from flowserve_core.factories import FrontendFactory, Register

if TYPE_CHECKING:
    import typer

    from flowserve_core.config import ServerConfig
    from flowserve_openai.frontend import OpenAIFrontend


def make_frontend(config: ServerConfig) -> OpenAIFrontend:
    """Factory of the ``openai`` frontend."""
    from flowserve_openai.frontend import OpenAIFrontend

    return OpenAIFrontend(config)


@hookimpl
def flowserve_register_frontends(register: Register[FrontendFactory]) -> None:
    """Register the frontend ``openai``."""
    register("openai", make_frontend)


@hookimpl
def flowserve_register_commands(app: typer.Typer) -> None:
    """Add ``flowserve scale``, ``status``, ``deploy``, ``undeploy``, ``deployments``, ``alias``."""
    from flowserve_openai.commands import add_commands, add_deployment_commands

    add_commands(app)
    add_deployment_commands(app)
