"""From request records to a ``BenchResult``: counts, throughputs, percentiles, goodput."""

from __future__ import annotations

from collections.abc import Sequence

from flowserve_bench.results import BenchConfig, BenchResult, ErrorSummary, LatencySummary, RequestRecord
from flowserve_bench.stats import percentile, percentile_key, std


def summarize_latency(values: Sequence[float], percentiles: Sequence[float] = (50.0, 90.0, 99.0)) -> LatencySummary:
    """Count, mean, median, std, p50, p90, p99, min, max and each of ``percentiles`` of
    ``values`` (all None when empty), by the project's one definition (``stats.percentile``)."""
    if not values:
        return LatencySummary()
    ordered = sorted(values)
    return LatencySummary(count=len(ordered), mean=sum(ordered) / len(ordered), median=percentile(ordered, 50),
                          std=std(ordered), p50=percentile(ordered, 50), p90=percentile(ordered, 90),
                          p99=percentile(ordered, 99), min=ordered[0], max=ordered[-1],
                          percentiles={percentile_key(q): percentile(ordered, q) for q in percentiles})


def meets_slo(record: RequestRecord, config: BenchConfig) -> bool:
    """Whether a request completed within every SLO set. Without a first token it misses a
    TTFT SLO; with one output token it has no TPOT and meets a TPOT SLO."""
    if not record.ok:
        return False
    if config.slo_ttft is not None and (record.ttft is None or record.ttft > config.slo_ttft):
        return False
    if config.slo_tpot is not None and record.tpot is not None and record.tpot > config.slo_tpot:
        return False
    return True


def error_summaries(records: Sequence[RequestRecord]) -> list[ErrorSummary]:
    """Failed requests grouped by status (most frequent first), with the first message."""
    groups: dict[str, ErrorSummary] = {}
    for record in records:
        if record.error is None:
            continue
        group = groups.setdefault(record.error.status, ErrorSummary(record.error.status, 0, record.error.message))
        group.count += 1
    return sorted(groups.values(), key=lambda g: (-g.count, g.status))


def summarize(*, config: BenchConfig, model: str, url: str, started_at: str, prompt_source: str,
              records: Sequence[RequestRecord], duration: float, warmup_failed: int = 0) -> BenchResult:
    """Aggregate ``records`` of a run that took ``duration`` seconds."""
    records = sorted(records, key=lambda r: r.index)
    done = [r for r in records if r.ok]
    prompt_tokens = sum(r.prompt_tokens or 0 for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    per_second = (lambda n: n / duration) if duration > 0 else (lambda n: 0.0)
    result = BenchResult(
        label=config.label, model=model, url=url, endpoint=config.endpoint, started_at=started_at,
        config=config, prompt_source=prompt_source, duration=duration,
        num_requests=len(records), completed=len(done), failed=len(records) - len(done),
        errors=error_summaries(records), warmup_failed=warmup_failed,
        total_prompt_tokens=prompt_tokens, total_output_tokens=output_tokens,
        request_throughput=per_second(len(done)), output_throughput=per_second(output_tokens),
        total_token_throughput=per_second(prompt_tokens + output_tokens),
        ttft=summarize_latency([r.ttft for r in done if r.ttft is not None], config.percentiles),
        tpot=summarize_latency([r.tpot for r in done if r.tpot is not None], config.percentiles),
        itl=summarize_latency([gap for r in done for gap in r.itl], config.percentiles),
        e2e=summarize_latency([r.e2e for r in done if r.e2e is not None], config.percentiles),
        requests=list(records),
    )
    if config.slo_ttft is not None or config.slo_tpot is not None:
        good = sum(meets_slo(r, config) for r in records)
        result.good_requests = good
        result.goodput = per_second(good)
        result.goodput_fraction = good / len(records) if records else 0.0
    return result
