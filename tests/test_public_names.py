"""A plugin builds only on public names: it imports nothing ``_private`` from another distribution.

Every package under ``plugins/*/`` and ``contrib/*/`` is parsed (its tests are not: a test may
look inside what it tests). A module belongs to the distribution whose directory holds its
top-level package; the kernel's distribution holds ``flowserve_core``. Flagged, when the
imported package belongs to another distribution: ``from pkg.mod import _name``, a
``_module`` anywhere in an imported path, and ``name._attr`` on a name bound by such an import.
A class that subclasses another distribution's class may neither override nor use (through
``self``) a ``_private`` member of it: what a subclass may change is public.
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


def _module_file(module: str, dists: dict[Path, set[str]]) -> Path | None:
    top, *rest = module.split(".")
    roots = [ROOT] if top in KERNEL_PACKAGES else [d for d, packages in dists.items() if top in packages]
    for root in roots:
        base = root.joinpath(top, *rest)
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


def _private_members(module: str, name: str, dists: dict[Path, set[str]], depth: int = 0) -> set[str]:
    """The ``_private`` methods and ``self._attributes`` of class ``name`` as ``module`` defines
    or re-exports it (empty when it cannot be found: the check then says nothing)."""
    path = _module_file(module, dists)
    if path is None or depth > 3:
        return set()
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return {n.name for n in ast.walk(node) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                    and _private(n.name)} | \
                {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                 and n.value.id == "self" and isinstance(n.ctx, ast.Store) and _private(n.attr)}
        if isinstance(node, ast.ImportFrom) and node.module and any(
                (a.asname or a.name) == name for a in node.names):
            original = next(a.name for a in node.names if (a.asname or a.name) == name)
            return _private_members(node.module, original, dists, depth + 1)
    return set()


def subclass_reach_ins(source: str, own: set[str], dists: dict[Path, set[str]]) -> list[str]:
    """Private members of another distribution's class that a subclass in ``source`` overrides
    or uses through ``self``; one line per finding."""
    foreign = set(KERNEL_PACKAGES).union(*dists.values())
    tree = ast.parse(source)
    imported: dict[str, tuple[str, str]] = {}  # local name → (module, class name)
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            top = node.module.split(".")[0]
            if top in foreign and top not in own:
                imported.update({a.asname or a.name: (node.module, a.name) for a in node.names})
    found = []
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        private: set[str] = set()
        for base in cls.bases:
            if isinstance(base, ast.Name) and base.id in imported:
                private |= _private_members(*imported[base.id], dists)
        for node in ast.walk(cls):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in private:
                found.append(f"line {node.lineno}: {cls.name} overrides {node.name}")
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id == "self" and node.attr in private:
                found.append(f"line {node.lineno}: {cls.name} uses self.{node.attr}")
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


def test_the_subclass_checker_flags_a_private_override_and_use():
    dists = distributions()
    source = ("from flowserve_colocated import ContinuousBatchScheduler\n"
              "class Mine(ContinuousBatchScheduler):\n"
              "    def _admit(self, seq):\n"
              "        return self._order\n"
              "    def queue_key(self, seq):\n"
              "        return self._mine\n")
    assert subclass_reach_ins(source, {"mine"}, dists) == [
        "line 3: Mine overrides _admit", "line 4: Mine uses self._order"]


def test_no_plugin_subclass_overrides_or_uses_a_private_member_of_another_distribution():
    dists = distributions()
    findings = []
    for directory, own in dists.items():
        for package in sorted(own):
            for path in sorted((directory / package).rglob("*.py")):
                findings += [f"{path.relative_to(ROOT)} {finding}"
                             for finding in subclass_reach_ins(path.read_text(), own, dists)]
    assert not findings, ("a subclass may change only the public members of another "
                          "distribution's class:\n" + "\n".join(findings))


def uses_of_the_global_manager(source: str) -> list[str]:
    """Where ``source`` names ``get_plugin_manager`` (imported or called); one line per finding."""
    return [f"line {node.lineno}: {ast.unparse(node)}" for node in ast.walk(ast.parse(source))
            if (isinstance(node, ast.Name) and node.id == "get_plugin_manager")
            or (isinstance(node, ast.Attribute) and node.attr == "get_plugin_manager")
            or (isinstance(node, ast.ImportFrom) and any(a.name == "get_plugin_manager" for a in node.names))]


def test_no_component_fetches_the_process_global_plugin_manager():
    """A component is handed what it needs (``kv_transports``, a manager built by its process's
    entry point), so a test that composes its own manager is never bypassed. The test kit is
    exempt: composing managers for tests is its job."""
    findings = []
    for directory, own in distributions().items():
        for package in sorted(own - {"flowserve_testing"}):
            for path in sorted((directory / package).rglob("*.py")):
                findings += [f"{path.relative_to(ROOT)} {finding}"
                             for finding in uses_of_the_global_manager(path.read_text())]
    assert not findings, "components must not call get_plugin_manager():\n" + "\n".join(findings)
