"""Rate sweeps: one run per arrival rate (``--request-rate 1,2,4,inf``), and their plot.

Each rate is a whole run of the same configuration (same seed, so the same requests), one
after the other against the same server. The plot needs matplotlib, an optional extra
(``pip install 'flowserve-bench[plot]'``); without it ``plot_sweep`` says so and draws nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import msgspec

from flowserve_bench.errors import BenchError
from flowserve_bench.results import BenchConfig, BenchResult

Rate = float | Literal["inf"]


def parse_rates(text: str) -> list[Rate]:
    """``"1,2,4,inf"`` → ``[1.0, 2.0, 4.0, "inf"]``; each rate > 0, at most one of each."""
    rates: list[Rate] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            rate = float(item)
        except ValueError:
            raise BenchError(f"--request-rate {text!r}: {item!r} is not a rate (requests/s, or inf)") from None
        if not rate > 0:
            raise BenchError(f"--request-rate must be > 0 requests/s (or inf), got {item}")
        value: Rate = "inf" if math.isinf(rate) else rate
        if value in rates:
            raise BenchError(f"--request-rate {text!r} names {item} twice")
        rates.append(value)
    if not rates:
        raise BenchError(f"--request-rate {text!r} names no rate")
    return rates


def rate_word(rate: Rate | None) -> str:
    """A rate as it appears in file names and on the plot: ``2``, ``0.5``, ``inf``."""
    if rate is None or rate == "inf":
        return "inf"
    return f"{rate:g}"


def sweep_configs(config: BenchConfig, rates: Sequence[Rate]) -> list[BenchConfig]:
    """``config`` once per rate (only ``request_rate`` differs)."""
    return [msgspec.structs.replace(config, request_rate=rate) for rate in rates]


def result_path(path: Path, rate: Rate | None, sweeping: bool) -> Path:
    """Where one run's results go: ``path`` itself for a single run; in a sweep, one file per
    rate beside it, ``<stem>-<rate>qps<suffix>`` (as ``run-2qps.json``, ``run-infqps.json``)."""
    if not sweeping:
        return path
    return path.with_name(f"{path.stem}-{rate_word(rate)}qps{path.suffix or '.json'}")


def plot_sweep(results: Sequence[BenchResult], path: Path) -> str | None:
    """Draw throughput and latency against the offered rate into ``path`` (png, svg or pdf,
    by its suffix). Returns None when drawn, or why it was not (matplotlib missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: files only
        import matplotlib.pyplot as plt
    except ImportError:
        return "the plot needs matplotlib: pip install 'flowserve-bench[plot]'"
    labels = [rate_word(r.config.request_rate) for r in results]
    positions = list(range(len(results)))  # categorical: "inf" has no place on a number line
    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(11, 4.2))
    throughput.plot(positions, [r.output_throughput for r in results], marker="o", label="output tok/s")
    throughput.plot(positions, [r.total_token_throughput for r in results], marker="o", label="total tok/s")
    throughput.set_ylabel("tokens/s")
    requests = throughput.twinx()
    requests.plot(positions, [r.request_throughput for r in results], marker="s", color="grey",
                  linestyle="--", label="requests/s")
    requests.set_ylabel("requests/s")
    throughput.set_title("throughput")
    throughput.legend(loc="upper left")
    for name, summary_of in (("TTFT", lambda r: r.ttft), ("ITL", lambda r: r.itl), ("E2E", lambda r: r.e2e)):
        for q, style in (("p50", "-"), ("p99", ":")):
            values = [getattr(summary_of(r), q) for r in results]
            latency.plot(positions, [v * 1000 if v is not None else math.nan for v in values],
                         marker="o", linestyle=style, label=f"{name} {q}")
    latency.set_yscale("log")
    latency.set_ylabel("ms")
    latency.set_title("latency")
    latency.legend(fontsize="small")
    for axes in (throughput, latency):
        axes.set_xticks(positions, labels)
        axes.set_xlabel("offered request rate (req/s)")
        axes.grid(alpha=0.3)
    title = results[0].label or results[0].model
    figure.suptitle(f"flowserve bench — {title}")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return None
