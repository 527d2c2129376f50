"""A plugin builds only on public names: it imports nothing ``_private`` from another distribution.

Every package under ``plugins/*/`` and ``contrib/*/`` is parsed (its tests are not: a test may
look inside what it tests). A module belongs to the distribution whose directory holds its
top-level package; the kernel's distribution holds ``flowserve_core``. Flagged, when the
imported package belongs to another distribution: ``from pkg.mod import _name``, a
``_module`` anywhere in an imported path, and ``name._attr`` on a name bound by such an import.
Dunder names (``__version__``) are public.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNEL_PACKAGES = frozenset({"flowserve_core"})


def _packages(distribution: Path) -> set[str]:
    """The top-level import packages a distribution directory ships (its tests excluded)."""
    return {p.name for p in distribution.iterdir()
            if p.is_dir() and p.name != "tests" and (p / "__init__.py").is_file()}


def distributions() -> dict[Path, set[str]]:
    """Each plugin and contrib distribution directory → the packages it ships."""
    found = {d: _packages(d) for group in ("plugins", "contrib") for d in sorted((ROOT / group).iterdir())
             if (d / "pyproject.toml").is_file()}
    return {d: packages for d, packages in found.items() if packages}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(source: str, own: set[str], foreign: set[str]) -> list[str]:
    """What ``source`` (a module of a distribution shipping ``own``) takes that is private to
    another distribution (one shipping a package in ``foreign``); one line per finding."""
    tree = ast.parse(source)
    found: list[str] = []
    bound: set[str] = set()  # local names bound to another distribution's modules or objects

    def other(module: str) -> bool:
        top = module.split(".")[0]
        return top in foreign and top not in own

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if not other(alias.name):
                    continue
                if any(_private(part) for part in alias.name.split(".")):
                    found.append(f"line {node.lineno}: import {alias.name}")
                bound.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and other(node.module):
            if any(_private(part) for part in node.module.split(".")):
                found.append(f"line {node.lineno}: from {node.module} import ...")
            for alias in node.names:
                if _private(alias.name):
                    found.append(f"line {node.lineno}: from {node.module} import {alias.name}")
                bound.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in bound:
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_the_checker_flags_each_kind_of_reach_in_and_nothing_public():
    source = ("import other._impl\n"
              "from other._impl import helper\n"
              "from other.router import _InstanceDied, __version__, Public\n"
              "import other.router as router\n"
              "from mine import _fine\n"
              "router._run_on\n"
              "Public._hidden.x\n"
              "Public.__name__\n")
    assert private_imports(source, own={"mine"}, foreign={"mine", "other"}) == [
        "line 1: import other._impl",
        "line 2: from other._impl import ...",
        "line 3: from other.router import _InstanceDied",
        "line 6: router._run_on",
        "line 7: Public._hidden",
    ]


def test_no_plugin_imports_a_private_name_of_another_distribution():
    dists = distributions()
    foreign = set(KERNEL_PACKAGES).union(*dists.values())
    assert {"flowserve_colocated", "flowserve_pd_scheduler", "flowserve_shortest_prompt_first"} <= foreign
    findings, scanned = [], 0
    for directory, own in dists.items():
        for package in sorted(own):
            for path in sorted((directory / package).rglob("*.py")):
                scanned += 1
                findings += [f"{path.relative_to(ROOT)} {finding}"
                             for finding in private_imports(path.read_text(), own, foreign)]
    assert scanned > 50
    assert not findings, ("plugins may use only other distributions' public names; make these "
                          "public (or keep them in their own distribution):\n" + "\n".join(findings))
