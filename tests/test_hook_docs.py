"""Every hook is documented: in its docstring, and on the hook reference page."""

import re
from pathlib import Path

from flowserve_core import hookspecs

PAGE = Path(__file__).parents[1] / "docs" / "reference" / "hooks.md"


def test_every_hook_is_on_the_reference_page_and_nothing_else(pm):
    documented = set(re.findall(r"^::: flowserve_core\.hookspecs\.(\w+)$", PAGE.read_text(), re.M))
    hooks = {name for name in dir(pm.hook) if name.startswith("flowserve_")}
    assert documented == hooks


def test_every_hook_says_what_it_takes_returns_and_where_it_runs(pm):
    for name in (n for n in dir(pm.hook) if n.startswith("flowserve_")):
        doc = getattr(hookspecs, name).__doc__ or ""
        assert "firstresult" in doc, f"{name} must say whether it is firstresult"
        assert ":param" in doc, f"{name} must document its arguments"
        assert "process" in doc.lower(), f"{name} must say in which process it is called"
