"""The errors ``flowserve bench`` raises on purpose; the CLI prints them without a traceback."""

from __future__ import annotations

from flowserve_core.errors import FlowServeError


class BenchError(FlowServeError):
    """A benchmark that cannot run: bad option, unreachable server, unusable tokenizer."""
