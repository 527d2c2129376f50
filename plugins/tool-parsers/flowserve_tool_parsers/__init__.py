"""Tool-call parsers for ``tool_choice: "auto"``: ``hermes`` (Hermes and Qwen's
``<tool_call>{…}</tool_call>``), ``llama3_json`` (Llama 3's ``{"name", "parameters"}`` objects,
after an optional ``<|python_tag|>``, separated by ``;``) and ``mistral`` (``[TOOL_CALLS]`` then a
JSON list, or ``name[ARGS]{…}`` in newer templates). Each turns a whole reply into content and
calls (text that is not a well-formed call stays content), and reads a reply as it streams
(``stream()``: the call's name as soon as it is written, its arguments as they come)."""

from flowserve_tool_parsers.parsers import HermesParser, Llama3JSONParser, MistralParser

__all__ = ["HermesParser", "Llama3JSONParser", "MistralParser"]
