"""The kit's plugin: scaler ``inproc`` and the command ``flowserve plugin new``.

Every process that loads plugins (the CLI, the server, instance processes) imports this
module, so it and its package import nothing heavy (no pytest, no torch): the scaler and the
scaffold load when used.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from flowserve_core import hookimpl
from flowserve_core.factories import Register, ScalerFactory

if TYPE_CHECKING:
    import typer

    from flowserve_core.plugins import PluginManager
    from flowserve_core.types import DeploymentSpec


def with_kit_plugin(pm: PluginManager) -> PluginManager:
    """``pm``, with this plugin registered if an allow or block list left it out: every
    manager the kit makes has the scaler ``inproc``, as when it was built into the kernel."""
    plugin = sys.modules[__name__]
    if not pm.pm.is_registered(plugin):
        pm.register(plugin, name="testing", distribution="flowserve-testing")
    return pm


def inproc_scaler(spec: DeploymentSpec) -> Any:
    """The scaler ``inproc`` for ``spec`` (``inprocess.InprocScaler``)."""
    from flowserve_testing.inprocess import InprocScaler

    return InprocScaler(spec)


@hookimpl
def flowserve_register_scalers(register: Register[ScalerFactory]) -> None:
    register("inproc", inproc_scaler)


@hookimpl
def flowserve_register_commands(app: typer.Typer) -> None:
    import typer

    plugin_app = typer.Typer(no_args_is_help=True, help="Write FlowServe plugins.")

    @plugin_app.command("new")
    def plugin_new(
        name: str = typer.Argument(..., help="The plugin's name, e.g. fair-share (distribution flowserve-fair-share)."),
        kind: str = typer.Option(..., "--kind", help="scheduler|executor|kv-cache|scaler|tokenizer|frontend|command|model-architecture."),
        directory: Optional[Path] = typer.Option(None, "--directory", "-d", help="Where (default ./flowserve-NAME)."),
    ) -> None:
        """Write a plugin project (pyproject, hook implementation, tests) ready to test."""
        from flowserve_testing.scaffold import new_project

        new_project(name, kind, directory)

    app.add_typer(plugin_app, name="plugin")
