"""Hook implementation: structured-output backend ``xgrammar``. Imports nothing heavy; the factory does."""

from __future__ import annotations

from typing import Any

from flowserve_core import hookimpl
from flowserve_core.types import DeploymentSpec


def build_backend(spec: DeploymentSpec) -> Any:
    """Factory of ``xgrammar``: the tokenizer and xgrammar load on the first constraint."""
    from flowserve_xgrammar.backend import XGrammarBackend

    return XGrammarBackend(spec)


@hookimpl
def flowserve_register_structured_output_backends(register: Any) -> None:
    """Register ``xgrammar``: JSON schema, JSON object, regex, choice and EBNF grammar constraints."""
    register("xgrammar", build_backend)
