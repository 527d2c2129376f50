"""JSON-schema keywords that xgrammar compiles without enforcing: a schema using one is refused
(a 400 naming the keyword and where it is) rather than answered with output that may break it.
Checked against xgrammar 0.2.9: ``not``, ``if``/``then``/``else``, ``dependentSchemas`` and the
``content*`` keywords are ignored; every other keyword of draft 2020-12 it either enforces or
refuses itself."""

from __future__ import annotations

from typing import Any

from flowserve_core.structured_output import UnsupportedConstraint

UNENFORCED = ("not", "if", "then", "else", "dependentSchemas", "contentEncoding", "contentMediaType",
              "contentSchema")
#: Keywords whose value is a schema, or a list of schemas.
_SUBSCHEMA = ("items", "additionalItems", "additionalProperties", "unevaluatedProperties", "unevaluatedItems",
              "contains", "propertyNames", "prefixItems", "anyOf", "oneOf", "allOf")
#: Keywords whose value maps names to schemas.
_NAMED = ("properties", "patternProperties", "$defs", "definitions")


def check_schema(schema: Any, path: str = "#") -> None:
    """Raise ``UnsupportedConstraint`` naming the first keyword of ``schema`` xgrammar ignores."""
    if isinstance(schema, list):
        for i, item in enumerate(schema):
            check_schema(item, f"{path}/{i}")
        return
    if not isinstance(schema, dict):
        return
    for keyword in UNENFORCED:
        if keyword in schema:
            raise UnsupportedConstraint(
                f"the JSON schema keyword {keyword!r} (at {path}) is not supported by the xgrammar "
                f"structured-output backend")
    for key, value in schema.items():
        if key in _SUBSCHEMA:
            check_schema(value, f"{path}/{key}")
        elif key in _NAMED and isinstance(value, dict):
            for name, sub in value.items():
                check_schema(sub, f"{path}/{key}/{name}")
