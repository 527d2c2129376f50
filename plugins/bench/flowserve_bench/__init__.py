"""flowserve-bench: ``flowserve bench``, a load generator for OpenAI-compatible servers.

The library side, for scripts under ``benchmarks/``::

    from flowserve_bench import BenchConfig, run_benchmark   # run_benchmark is async (anyio)

``run_benchmark`` is imported on first use, so loading the plugin (``flowserve --help``)
pulls in no HTTP client.
"""

from __future__ import annotations

from typing import Any

from flowserve_bench.results import BenchConfig, BenchResult, LatencySummary, RequestRecord

__all__ = ["BenchConfig", "BenchResult", "LatencySummary", "RequestRecord", "run_benchmark"]


def __getattr__(name: str) -> Any:
    if name == "run_benchmark":
        from flowserve_bench.runner import run_benchmark

        return run_benchmark
    raise AttributeError(f"module 'flowserve_bench' has no attribute {name!r}")
