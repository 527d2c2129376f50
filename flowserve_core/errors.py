"""The errors FlowServe raises on purpose, each meant to be read by a person."""

from flowserve_core.types import Rejection


class FlowServeError(Exception):
    """Base class of FlowServe's errors."""


class ConfigError(FlowServeError, ValueError):
    """A configuration file or flag has a bad key or value; the message names it."""


class PluginError(FlowServeError):
    """A plugin could not be loaded, or two plugins claim the same component name."""


class ComponentNotFoundError(PluginError, LookupError):
    """No installed plugin registered the asked-for component; the message says what to install."""


class RejectedError(FlowServeError):
    """A request was refused at admission (queue full, SLO, not ready)."""

    def __init__(self, rejection: Rejection):
        super().__init__(rejection.message)
        self.rejection = rejection


class UnknownModelError(FlowServeError, LookupError):
    """A request named a model that no deployment serves."""


class EngineDeadError(FlowServeError):
    """An engine instance (or one of its worker processes) died; its tasks cannot finish."""
