"""FlowServe's microkernel. Plugin authors need ``hookimpl`` (the marker for hook implementations),
the Structs in ``flowserve_core.types`` and the Protocols in ``flowserve_core.interfaces``."""

from flowserve_core.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "__version__"]
