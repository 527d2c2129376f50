"""Names of deployments and aliases: what a client sends as ``model``, what goes into URLs
(``/admin/deployments/NAME``) and into Prometheus labels, so a small, printable set.

1 to 128 characters of ``A-Z a-z 0-9 . _ : / -`` (issue 20: a 100,000-character name could not
be deleted, a NUL went raw into a label). The same rule holds for the config file, the command
line (checked when the server starts) and the admin API (a 400).
"""

from __future__ import annotations

import re
from typing import Any, Iterable

from flowserve_core.errors import ConfigError

MAX_NAME_LENGTH = 128
NAME_CHARACTERS = "A-Z a-z 0-9 . _ : / -"
_NAME = re.compile(rf"[A-Za-z0-9._:/-]{{1,{MAX_NAME_LENGTH}}}")  # always fullmatch


def name_problem(name: str, what: str) -> str | None:
    """Why ``name`` cannot name a ``what`` (deployment, alias), or None when it can."""
    if _NAME.fullmatch(name):
        return None
    rule = f"a {what} name is 1 to {MAX_NAME_LENGTH} characters of {NAME_CHARACTERS}"
    if not name:
        return f"{rule}; got an empty name"
    if len(name) > MAX_NAME_LENGTH:
        return f"{rule}; got {len(name)} characters ({name[:40]!r}…)"
    bad = next(c for c in name if not _NAME.fullmatch(c))
    return f"{rule}; {name!r} holds {bad!r} (U+{ord(bad):04X})"


def check_server_names(deployments: Iterable[Any], aliases: dict[str, str]) -> None:
    """``ConfigError`` for the first deployment or alias of a configuration with a bad name."""
    for spec in deployments:
        if problem := name_problem(spec.name, "deployment"):
            raise ConfigError(f"deployment {spec.name[:200]!r} (model {spec.model}): {problem}; "
                              "set its name (--served-model-name, or name = … in the config file)")
    for alias in aliases:
        if problem := name_problem(alias, "alias"):
            raise ConfigError(f"alias {alias[:200]!r}: {problem}")
