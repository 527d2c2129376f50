"""The plugin test kit's public path: ``flowserve_core.testing`` is the module ``flowserve_testing``
of the distribution ``flowserve-testing``, and ``flowserve_core.testing.X`` is ``flowserve_testing.X``."""

import importlib
import pkgutil
import sys

try:
    import flowserve_testing
except ImportError as exc:
    raise ImportError(f"the plugin test kit is not installed: pip install flowserve-testing ({exc})") from exc

for _module in pkgutil.iter_modules(flowserve_testing.__path__):  # one module object per file, not two
    sys.modules[f"{__name__}.{_module.name}"] = importlib.import_module(f"flowserve_testing.{_module.name}")
sys.modules[__name__] = flowserve_testing
