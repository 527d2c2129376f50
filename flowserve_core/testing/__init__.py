"""The plugin test kit's public path: ``flowserve_core.testing`` is ``flowserve_testing``
(``pip install flowserve-testing``), and ``flowserve_core.testing.X`` is ``flowserve_testing.X``."""

import importlib.util
import sys

try:
    import flowserve_testing
except ImportError as exc:
    raise ImportError(f"the plugin test kit is not installed: pip install flowserve-testing ({exc})") from exc


# ``flowserve_core.testing.X`` imports as the module ``flowserve_testing.X`` itself: found on the
# kit's path, it would load a second time, with classes of its own (a second ConformanceError).
class _Alias:
    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name.startswith(__name__ + ".") else None

    def create_module(self, spec):
        module = importlib.import_module("flowserve_testing" + spec.name[len(__name__):])
        spec.loader_state = module.__spec__  # loading replaces it by ``spec``: exec_module puts it back
        return module

    def exec_module(self, module):
        module.__spec__ = module.__spec__.loader_state


sys.meta_path.insert(0, _Alias())
sys.modules[__name__] = flowserve_testing
