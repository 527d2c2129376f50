"""Hook implementation: tool-call parsers ``hermes``, ``llama3_json`` and ``mistral``."""

from __future__ import annotations

from typing import Any

from flowserve_core import hookimpl
from flowserve_tool_parsers.parsers import HermesParser, Llama3JSONParser, MistralParser


@hookimpl
def flowserve_register_tool_parsers(register: Any) -> None:
    """Register the three parsers (each factory takes the deployment's spec and ignores it)."""
    register("hermes", lambda spec: HermesParser())
    register("llama3_json", lambda spec: Llama3JSONParser())
    register("mistral", lambda spec: MistralParser())
