"""MkDocs hook: ``<!-- fields: ServerConfig -->`` (or ``DeploymentSpec``) in a page becomes a table
of that Struct's keys with their flag, type, default and description, read from the code.

The configuration page is thus made from the same definition as ``flowserve serve``'s flags
(``flowserve_core.cli.fields_as_flags``), and cannot drift from them either."""

from __future__ import annotations

import re
import typing
from typing import Any

import msgspec

from flowserve_core.cli import FLAG_SPELLINGS, field_flag
from flowserve_core.config import ServerConfig
from flowserve_core.types import DeploymentSpec

STRUCTS: dict[str, type[msgspec.Struct]] = {"ServerConfig": ServerConfig, "DeploymentSpec": DeploymentSpec}
MARKER = re.compile(r"<!-- fields: (\w+) -->")
#: keys whose flag is not ``field_flag``'s: set otherwise on the command line, or in the file only
NOT_A_FLAG = {"model": "`--model` or `MODEL`", "options": "`-o KEY=VALUE`",
              "deployments": "file only; `--model NAME=PATH` adds one", "deployment_defaults": "made from the flags"}


def on_page_markdown(markdown: str, **_: Any) -> str:
    """Replace each marker by its Struct's table."""
    return MARKER.sub(lambda match: fields_table(STRUCTS[match[1]]), markdown)


def fields_table(struct: type[msgspec.Struct]) -> str:
    """One row per field: key, flag(s), type, default, description."""
    hints = typing.get_type_hints(struct, include_extras=True)
    rows = ["| key | flag | type | default | meaning |", "|---|---|---|---|---|"]
    for field in msgspec.structs.fields(struct):
        kind, description = hints[field.name], ""
        if typing.get_origin(kind) is typing.Annotated:
            kind, description = kind.__origin__, kind.__metadata__[0].description
        rows.append(f"| `{field.name}` | {flag_cell(field.name, kind)} | `{type_name(kind)}` "
                    f"| {default_cell(field)} | {description.replace('|', '&#124;')} |")
    return "\n".join(rows)


def flag_cell(name: str, kind: Any) -> str:
    """The flag's spellings, or how the key is set if no flag sets it."""
    if name in NOT_A_FLAG:
        return NOT_A_FLAG[name]
    if typing.get_origin(kind) in (list, dict):
        return "file only"
    return ", ".join(f"`{flag}`" for flag in FLAG_SPELLINGS.get(name, (field_flag(name),)))


def type_name(kind: Any) -> str:
    """``int``, ``float | None``, ``Literal['auto', …]``…, as written in the code."""
    return kind.__name__ if isinstance(kind, type) else re.sub(r"\b(typing|flowserve_core\.\w+)\.", "", str(kind))


def default_cell(field: msgspec.structs.FieldInfo) -> str:
    """The default; "unset" for None or "" (the meaning says what then decides)."""
    default = field.default_factory() if field.default_factory is not msgspec.NODEFAULT else field.default
    return "unset" if default in (None, "") else f"`{default!r}`"
