"""``flowserve plugin new NAME --kind KIND``: write a plugin project that is ready to test.

The project is a distribution ``flowserve-NAME`` with a package ``flowserve_NAME``, a
``flowserve`` entry point, one hook implementation and tests written with
``flowserve_core.testing`` (this kit). Its files come from this package's ``templates``
(``common/`` plus the kind's folder), with ``{{placeholders}}`` in names and text filled in.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple, Optional

import typer

from flowserve_core import __version__

TEMPLATES = Path(__file__).parent / "templates"
_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


class Kind(NamedTuple):
    """What a kind of plugin project needs besides the common files."""

    title: str
    class_suffix: str
    usage: str
    dependencies: tuple[str, ...] = ()
    test_dependencies: tuple[str, ...] = ()
    tests: str = "conformance suite, plugin registration, a deployment"  # what its tests check


KINDS: dict[str, Kind] = {
    "scheduler": Kind("batch scheduler", "Scheduler", "flowserve serve --batch-scheduler {{name}}",
                      ("flowserve-colocated",), ("flowserve-paged-kv",)),
    "executor": Kind("executor", "Executor", "flowserve serve --executor {{name}}", ("anyio>=4.4",)),
    "kv-cache": Kind("KV cache manager", "KVCache", "flowserve serve --kv-cache {{name}}",
                     ("flowserve-paged-kv",), ("flowserve-colocated",)),
    "scaler": Kind("scaler", "Scaler", "flowserve serve --scaler {{name}}", ("flowserve-testing", "anyio>=4.4"),
                   tests="plugin registration, a deployment served by its instances"),
    "tokenizer": Kind("tokenizer", "Tokenizer", "flowserve serve --tokenizer-plugin {{name}}",
                      ("flowserve-hf-tokenizer",), tests="conformance suite, plugin registration, NFC encoding"),
    "frontend": Kind("frontend", "Frontend", "flowserve serve --frontend {{name}}",
                     ("msgspec>=0.18", "starlette>=0.40", "uvicorn>=0.30"),
                     tests="plugin registration, a live server answering over HTTP"),
    "command": Kind("command", "Command", "flowserve {{name}} --help", ("typer>=0.12",),
                    tests="the command run on a config file"),
    "model-architecture": Kind("model architecture", "ForCausalLM", "flowserve serve MODEL_DIR --executor spmd",
                               ("flowserve-spmd-executor", "torch>=2.4"),
                               ("flowserve-hf-tokenizer", "flowserve-paged-kv", "flowserve-colocated",
                                "transformers>=4.46"),
                               tests="registration, a tiny checkpoint served greedy-exact against transformers"),
}


def placeholders(name: str, kind: str) -> dict[str, str]:
    """The values of the templates' ``{{placeholders}}`` for plugin ``name`` of ``kind``."""
    spec = KINDS[kind]
    words = "".join(word.capitalize() for word in name.split("-"))
    snake = name.replace("-", "_")

    def quoted(items: tuple[str, ...]) -> str:
        return ", ".join(f'"{_bounded(item)}"' for item in items)

    values = {
        "name": name, "snake": snake, "dist": f"flowserve-{name}", "package": f"flowserve_{snake}",
        "Class": words if words.endswith(spec.class_suffix) else words + spec.class_suffix,
        "title": spec.title,
        "dependencies": quoted((_core_bound(), *spec.dependencies)),
        "test_dependencies": quoted(("pytest>=8", "flowserve-testing", *spec.test_dependencies)),
    }
    values["usage"] = fill(spec.usage, values)
    values["tests"] = spec.tests
    values["listing"] = LISTING.get(kind, "flowserve plugins            # lists {dist} and its {title} '{name}'"
                                    ).format(**values)
    return values


#: How to see the plugin installed, where ``flowserve plugins`` (which lists components) does not
#: show it: a command is in ``flowserve --help``, an architecture in the executor's registry.
LISTING = {
    "command": "flowserve --help             # lists the command '{name}'",
    "model-architecture": ("python -c 'from flowserve_spmd_executor.architectures import architectures; "
                           "print(sorted(architectures()))'   # lists the model_type {name} registers"),
}


def fill(text: str, values: dict[str, str]) -> str:
    """Replace every ``{{key}}`` in ``text``."""
    return re.sub(r"\{\{(\w+)\}\}", lambda match: values[match[1]], text)


def write_project(name: str, kind: str, directory: Path | None = None) -> list[Path]:
    """Write plugin ``name`` of ``kind`` into ``directory`` (default ``./flowserve-NAME``).

    :returns: the files written. Raises ``ValueError`` for a bad name or kind, or a
        ``directory`` that exists and is not empty.
    """
    name = name.removeprefix("flowserve-")
    if not _NAME.match(name):
        raise ValueError(f"plugin name {name!r}: use lowercase letters, digits and single dashes, "
                         f"starting with a letter (e.g. 'fair-share')")
    if kind not in KINDS:
        raise ValueError(f"unknown plugin kind {kind!r}; kinds are {', '.join(KINDS)}")
    values = placeholders(name, kind)
    directory = Path(directory or f"flowserve-{name}")
    if directory.exists() and any(directory.iterdir()):
        raise ValueError(f"{directory} exists and is not empty; choose another --directory")
    written = []
    for root in (TEMPLATES / "common", TEMPLATES / kind):
        for template in sorted(root.rglob("*.tmpl")):
            target = directory / fill(str(template.relative_to(root)), values).removesuffix(".tmpl")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(fill(template.read_text(), values))
            written.append(target)
    return written


def new_project(name: str, kind: str, directory: Optional[Path]) -> None:
    """``flowserve plugin new``: write the project and say what to do next."""
    name = name.removeprefix("flowserve-")
    root = directory or Path(f"flowserve-{name}")
    try:
        files = write_project(name, kind, root)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    typer.echo(f"wrote {len(files)} files in {root}/. Next:\n"
               f"  pip install -e '{root}[test]'\n  pytest {root}\n"
               f"  {placeholders(name, kind)['listing'].split('  #')[0].strip()}\n"
               f"  {placeholders(name, kind)['usage']}")


def _core_bound() -> str:
    """``flowserve-core`` from this minor version up to the next: before 1.0 a minor version
    may change the hooks, so a plugin says which ones it was written against."""
    return _bounded("flowserve-core")


def _bounded(requirement: str) -> str:
    """A bare requirement on one of FlowServe's distributions, bounded to this minor version
    (they are released together); any other requirement as it is."""
    if not requirement.startswith("flowserve-") or not requirement.replace("-", "").isalnum():
        return requirement
    major, minor = (int(part) for part in __version__.split(".")[:2])
    return f"{requirement}>={major}.{minor},<{major}.{minor + 1}"
