"""JSON-schema grammars whose strings are always valid JSON strings.

xgrammar 0.2.9 (the newest release; upstream issue mlc-ai/xgrammar#800, fixes proposed in PRs
#822 and #880, not released) lowers a string with ``minLength``/``maxLength`` (also a
``propertyNames`` bound) to a bounded repetition of the bare class ``[^"\\\\\\r\\n]``. That class
lets raw control characters U+0000–U+001F other than CR/LF into the string, which RFC 8259
forbids and ``json.loads`` rejects, and it has no escape branch, so ``\\"``, ``\\n`` or
``\\u00e9`` cannot be written inside a bounded string at all. Plain strings, ``pattern`` strings
and JSON-object mode use xgrammar's JSON-aware rules and are unaffected.

So the schema is converted to xgrammar's EBNF, each rule made of that bare class alone is
rewritten to one JSON character (an unescaped code point outside the C0 range, a short escape, a
``\\uXXXX`` escape of a non-surrogate, or a surrogate pair: each decodes to one character, which
is what JSON Schema's lengths count), and the EBNF is compiled. Drop this once an xgrammar
release fixes the converter (the test that a control character is masked inside a bounded string
then passes without it).
"""

from __future__ import annotations

import re
from typing import Any

#: A rule that is exactly xgrammar's bare length-bounded string class, as ``str(Grammar)`` prints it.
_BARE_STRING_CHARACTER_RULE = re.compile(r'^(?P<name>[A-Za-z_][\w]*) ::= \(\(\[\^\\"\\\\\\r\\n\]\)\)$', re.MULTILINE)

_HEX = "[0-9a-fA-F]"
#: One character of a JSON string's content, decoded length one (lone surrogates excluded).
JSON_STRING_CHARACTER = " | ".join((
    r'[^\0-\x1f"\\]',
    r'"\\" ["\\/bfnrt]',
    rf'"\\u" [0-9a-cA-Ce-fE-F] {_HEX} {_HEX} {_HEX}',
    rf'"\\u" [dD] [0-7] {_HEX} {_HEX}',
    rf'"\\u" [dD] [89abAB] {_HEX} {_HEX} "\\u" [dD] [c-fC-F] {_HEX} {_HEX}',
))


def json_schema_ebnf(schema: str, *, any_whitespace: bool, strict_mode: bool) -> str:
    """xgrammar's EBNF for ``schema``, with bounded strings limited to valid JSON string characters."""
    import xgrammar

    ebnf = str(xgrammar.Grammar.from_json_schema(schema, any_whitespace=any_whitespace, strict_mode=strict_mode))
    return _BARE_STRING_CHARACTER_RULE.sub(lambda rule: f"{rule['name']} ::= {JSON_STRING_CHARACTER}", ebnf)


def compile_json_schema(compiler: Any, schema: str, *, any_whitespace: bool, strict_mode: bool) -> Any:
    """``compiler.compile_json_schema`` whose output always parses as JSON (see the module docstring)."""
    return compiler.compile_grammar(json_schema_ebnf(schema, any_whitespace=any_whitespace, strict_mode=strict_mode))
