"""The kernel stays light: importing it, or `flowserve --help`, pulls in no heavy library."""

import subprocess
import sys

HEAVY = {"torch", "transformers", "uvicorn", "starlette"}


def _modules_after(code: str) -> set[str]:
    probe = code + "\nimport sys; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_importing_the_kernel_imports_no_heavy_library():
    loaded = _modules_after("import flowserve_core, flowserve_core.cli, flowserve_core.server, "
                            "flowserve_core.plugins, flowserve_core.deployment, flowserve_core.engine")
    assert not HEAVY & loaded


def test_flowserve_help_imports_no_heavy_library_with_every_plugin_installed():
    code = ("import sys; sys.argv = ['flowserve', '--help']\n"
            "from flowserve_core.cli import main\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert e.code == 0, e.code")
    loaded = _modules_after(code)
    assert "flowserve_core.cli" in loaded
    assert not HEAVY & loaded, HEAVY & loaded
