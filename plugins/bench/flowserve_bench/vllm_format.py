"""Results in ``vllm bench serve``'s format: its JSON keys, and one CSV row per run.

``vllm bench serve --save-result`` writes one flat JSON object per run: the run's settings
(``date``, ``endpoint_type``, ``label``, ``model_id``, ``tokenizer_id``, ``num_prompts``,
``request_rate``, ``burstiness``, ``max_concurrency``), the totals (``duration``, ``completed``,
``failed``, ``total_input_tokens``, ``total_output_tokens``, ``request_throughput``,
``request_goodput``, ``output_throughput``, ``total_token_throughput``,
``max_concurrent_requests``), per-request lists (``input_lens``, ``output_lens``, ``ttfts``,
``itls``, ``errors``; seconds), and for each of ``ttft``, ``tpot``, ``itl`` and ``e2el``:
``mean_*_ms``, ``median_*_ms``, ``std_*_ms`` and ``p{P}_*_ms`` for each asked percentile.
``flowserve bench`` writes the same keys with the same meanings, and FlowServe's own
``BenchResult`` (every request's record, the errors by status, goodput) under
``"flowserve"``, a key vLLM's readers ignore.

vLLM's closed loop is ``request_rate: "inf"`` with ``max_concurrency: N`` (every request
arrives at once, N in flight), which is what ``--concurrency N`` runs, so that is how it is
written. Keys vLLM writes that this format leaves out: ``generated_texts`` (the answers are
not kept) and ``max_output_tokens_per_s``.
"""

from __future__ import annotations

import csv
import datetime
import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import msgspec

from flowserve_bench.results import BenchResult, RequestRecord
from flowserve_bench.stats import median, percentile, percentile_key, std

#: vLLM's names for the four latency distributions (FlowServe's E2E is its ``e2el``).
LATENCIES = ("ttft", "tpot", "itl", "e2el")


def _latency_keys(name: str, seconds: Sequence[float], percentiles: Sequence[float]) -> dict[str, float]:
    """vLLM's keys of one distribution, in ms; 0 for an empty one, as vLLM writes it."""
    ms = [value * 1000.0 for value in seconds] or [0.0]
    keys = {f"mean_{name}_ms": sum(ms) / len(ms), f"median_{name}_ms": median(ms), f"std_{name}_ms": std(ms)}
    keys.update({f"p{percentile_key(q)}_{name}_ms": percentile(ms, q) for q in percentiles})
    return keys


def max_concurrent_requests(records: Iterable[RequestRecord]) -> int:
    """The most requests in flight at once, from each request's start and end."""
    events = []
    for record in records:
        events.append((record.start, 1))
        if record.e2e is not None:
            events.append((record.start + record.e2e, -1))
    in_flight = peak = 0
    for _, change in sorted(events, key=lambda e: (e[0], e[1])):  # an end before a start at the same instant
        in_flight += change
        peak = max(peak, in_flight)
    return peak


def vllm_result(result: BenchResult) -> dict[str, Any]:
    """The run as ``vllm bench serve`` writes it (see the module), FlowServe's result under
    ``"flowserve"``."""
    config = result.config
    done = [r for r in result.requests if r.ok]
    started = datetime.datetime.fromisoformat(result.started_at)
    closed_loop = config.request_rate is None
    out: dict[str, Any] = {
        "date": started.strftime("%Y%m%d-%H%M%S"),
        "endpoint_type": "openai-chat" if result.endpoint == "chat" else "openai",
        "backend": "openai-chat" if result.endpoint == "chat" else "openai",
        "label": result.label,
        "model_id": result.model,
        "tokenizer_id": config.tokenizer,
        "num_prompts": result.num_requests,
        "request_rate": "inf" if closed_loop else config.request_rate,
        "burstiness": 1.0,
        "max_concurrency": (config.concurrency or 1) if closed_loop else config.max_concurrency,
        "duration": result.duration,
        "completed": result.completed,
        "failed": result.failed,
        "total_input_tokens": result.total_prompt_tokens,
        "total_output_tokens": result.total_output_tokens,
        "request_throughput": result.request_throughput,
        "request_goodput": result.goodput,
        "output_throughput": result.output_throughput,
        "total_token_throughput": result.total_token_throughput,
        "max_concurrent_requests": max_concurrent_requests(result.requests),
        "input_lens": [r.prompt_tokens or 0 for r in result.requests],
        "output_lens": [r.output_tokens if r.ok else 0 for r in result.requests],
        "ttfts": [r.ttft or 0.0 for r in result.requests],
        "itls": [list(r.itl) for r in result.requests],
        "errors": ["" if r.error is None else f"{r.error.status}: {r.error.message}" for r in result.requests],
    }
    per_metric = {
        "ttft": [r.ttft for r in done if r.ttft is not None],
        "tpot": [r.tpot for r in done if r.tpot is not None],
        "itl": [gap for r in done for gap in r.itl],
        "e2el": [r.e2e for r in done if r.e2e is not None],
    }
    for name in LATENCIES:
        out.update(_latency_keys(name, per_metric[name], config.percentiles))
    out["flowserve"] = msgspec.to_builtins(result)
    return out


def write_result_file(result: BenchResult, path: Path) -> None:
    """Write ``vllm_result(result)`` as indented JSON (``BenchResult.from_json`` reads it back)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(msgspec.json.format(msgspec.json.encode(vllm_result(result)), indent=2))


def csv_rows(results: Sequence[BenchResult]) -> tuple[list[str], list[dict[str, Any]]]:
    """The columns (vLLM's scalar keys, in its order, plus ``goodput_fraction``) and one row a run."""
    rows = []
    for result in results:
        full = vllm_result(result)
        row = {k: v for k, v in full.items() if not isinstance(v, (list, dict))}
        row["goodput_fraction"] = result.goodput_fraction
        rows.append(row)
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    return columns, rows


def to_csv(results: Sequence[BenchResult]) -> str:
    """The runs as CSV text: a header, then one row per run (empty cells for None)."""
    columns, rows = csv_rows(results)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buffer.getvalue()
