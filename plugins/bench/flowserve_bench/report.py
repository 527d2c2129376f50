"""What a person sees: the progress bar while running, the results table at the end."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from flowserve_bench.results import BenchResult, LatencySummary, RequestRecord
from flowserve_bench.stats import percentile_key


class RequestProgress:
    """A rich progress bar over the measured requests, counting failures as they happen."""

    def __init__(self, total: int, label: str | None = None, console: Console | None = None) -> None:
        self.failed = 0
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("[red]{task.fields[failed]}"), TimeElapsedColumn(), TextColumn("eta"),
            TimeRemainingColumn(), console=console or Console(stderr=True))
        self.task = self.progress.add_task(label or "requests", total=total, failed="")

    def start(self) -> None:
        """Show the bar."""
        self.progress.start()

    def advance(self, record: RequestRecord) -> None:
        """Count one finished request."""
        if not record.ok:
            self.failed += 1
        self.progress.update(self.task, advance=1, failed=f"{self.failed} failed" if self.failed else "")

    def stop(self) -> None:
        """Leave the final state on screen."""
        self.progress.stop()


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value * 1000:.2f}"


def _latency_row(table: Table, name: str, summary: LatencySummary, keys: list[str]) -> None:
    table.add_row(name, _ms(summary.mean), *(_ms(summary.percentiles.get(k)) for k in keys), str(summary.count))


def render_report(result: BenchResult) -> list[Table]:
    """The report as rich tables: the run, then the latency distributions."""
    config = result.config
    title = f"flowserve bench — {result.label}" if result.label else "flowserve bench"
    run = Table(title=title, show_header=False, title_justify="left")
    run.add_column("metric", style="bold")
    run.add_column("value")
    rows = [
        ("target", f"{result.url} ({result.endpoint})"),
        ("model", result.model),
        ("load", config.load_description),
        ("requests", f"{result.num_requests} (+{config.warmup} warm-up)" if config.warmup else str(result.num_requests)),
        ("prompt / output lengths", f"{config.prompt_len if config.dataset_name == 'random' else 'dataset'} / "
                                    f"{config.output_len}{' or the dataset' * (config.dataset_name != 'random')}"
                                    f"{' (ignore_eos)' if config.ignore_eos else ''}"),
        ("prompts", result.prompt_source),
        ("duration", f"{result.duration:.2f} s"),
        ("completed", str(result.completed)),
        ("failed", f"[red]{result.failed}[/]" if result.failed else "0"),
    ]
    rows += [(f"  status {e.status}", f"{e.count}: {e.message[:80]}") for e in result.errors]
    rows += [
        ("prompt tokens / output tokens", f"{result.total_prompt_tokens} / {result.total_output_tokens}"),
        ("request throughput", f"{result.request_throughput:.2f} req/s"),
        ("output token throughput", f"{result.output_throughput:.1f} tok/s"),
        ("total token throughput", f"{result.total_token_throughput:.1f} tok/s"),
    ]
    if result.goodput is not None:
        slos = ", ".join(s for s in (f"TTFT ≤ {config.slo_ttft:g} s" if config.slo_ttft is not None else "",
                                     f"TPOT ≤ {config.slo_tpot:g} s" if config.slo_tpot is not None else "") if s)
        rows.append((f"goodput ({slos})", f"{result.goodput:.2f} req/s, "
                                          f"{result.good_requests}/{result.num_requests} = {result.goodput_fraction:.1%}"))
    for name, value in rows:
        run.add_row(name, value)

    keys = [percentile_key(q) for q in config.percentiles]
    latency = Table(title="latency (ms)", title_justify="left")
    latency.add_column("")
    for column in ("mean", *(f"p{k}" for k in keys), "count"):
        latency.add_column(column, justify="right")
    _latency_row(latency, "TTFT", result.ttft, keys)
    _latency_row(latency, "TPOT", result.tpot, keys)
    _latency_row(latency, "ITL", result.itl, keys)
    _latency_row(latency, "E2E", result.e2e, keys)
    return [run, latency]


def print_report(result: BenchResult, console: Console | None = None) -> None:
    """Print the report (stdout unless ``console`` says otherwise)."""
    console = console or Console()
    for table in render_report(result):
        console.print(table)
