"""Every distribution is publishable as it stands: licence, README, URLs, ``py.typed``, bounded
requirements on FlowServe's own distributions, and no ``test`` extra naming one that is not
published (``tests/fixture_plugin`` is a development aid, installed by scripts/install.sh)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DISTRIBUTIONS = [ROOT, *sorted(d for group in ("plugins", "contrib") for d in (ROOT / group).iterdir()
                                if (d / "pyproject.toml").is_file())]
PUBLISHED = {tomllib.loads((d / "pyproject.toml").read_text())["project"]["name"] for d in DISTRIBUTIONS}


def _project(directory: Path) -> dict:
    return tomllib.loads((directory / "pyproject.toml").read_text())


def test_the_licence_is_at_the_top_and_there_is_a_changelog():
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    assert "## Unreleased" in (ROOT / "CHANGELOG.md").read_text()


@pytest.mark.parametrize("directory", DISTRIBUTIONS, ids=lambda d: d.name if d != ROOT else "flowserve-core")
def test_each_distribution_is_publishable(directory: Path):
    data = _project(directory)
    project = data["project"]
    assert data["build-system"]["requires"] == ["setuptools>=77"], "the SPDX license field needs setuptools>=77"
    assert project["license"] == "Apache-2.0"
    assert (directory / project["readme"]).is_file()
    assert {"Homepage", "Source", "Issues"} <= set(project["urls"])
    packages = [p for p in directory.iterdir() if (p / "__init__.py").is_file() and p.name != "tests"]
    assert packages and all((p / "py.typed").is_file() for p in packages)
    requirements = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    for requirement in requirements:
        name = re.match(r"[A-Za-z0-9._-]+", requirement)[0]
        if name.startswith("flowserve"):
            assert name in PUBLISHED, f"{requirement!r}: not a published distribution"
            assert re.fullmatch(rf"{name}>=0\.1,<0\.2", requirement), f"{requirement!r}: bound it, >=0.1,<0.2"
