"""Hook implementations: frontend ``openai``; the admin commands ``flowserve scale``, ``status``,
``deploy``, ``undeploy``, ``deployments`` and ``alias``.

Kept light: uvicorn and starlette are imported by the factory, httpx by the commands.
"""

from __future__ import annotations

from typing import Any

from flowserve_core import hookimpl


def make_frontend(config: Any) -> Any:
    """Factory of the ``openai`` frontend: ``(config: ServerConfig) -> OpenAIFrontend``."""
    from flowserve_openai.frontend import OpenAIFrontend

    return OpenAIFrontend(config)


@hookimpl
def flowserve_register_frontends(register: Any) -> None:
    """Register the frontend ``openai``."""
    register("openai", make_frontend)


@hookimpl
def flowserve_register_commands(app: Any) -> None:
    """Add ``flowserve scale``, ``status``, ``deploy``, ``undeploy``, ``deployments``, ``alias``."""
    from flowserve_openai.commands import add_commands, add_deployment_commands

    add_commands(app)
    add_deployment_commands(app)
