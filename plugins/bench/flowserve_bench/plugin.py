"""Hook implementations: the ``flowserve bench`` command.

Only typer is imported here; aiohttp and the load generator load when the command runs, so
``flowserve --help`` stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from flowserve_core import hookimpl

LENGTH_HELP = "N, uniform:LO:HI or mix:W@SPEC,W@SPEC (e.g. mix:0.2@1500,0.8@100)"


def bench(
    url: str = typer.Option("http://127.0.0.1:8000/v1", help="Base URL of an OpenAI-compatible API."),
    model: Optional[str] = typer.Option(None, help="Model id (default: the first of GET /v1/models)."),
    api_key: Optional[str] = typer.Option(None, envvar=["FLOWSERVE_API_KEY", "OPENAI_API_KEY"],
                                          show_envvar=True, help="Bearer key."),
    endpoint: str = typer.Option("completions", help="completions | chat."),
    concurrency: Optional[int] = typer.Option(
        None, help="Closed loop: N clients, each sending its next request when its last finished "
                   "(the default, with N=1, when --request-rate is not given)."),
    request_rate: Optional[str] = typer.Option(
        None, help="Open loop: Poisson arrivals, requests/s; inf sends all at once. A list "
                   "(1,2,4,inf) sweeps: one run per rate."),
    max_concurrency: Optional[int] = typer.Option(None, help="Open loop: at most this many requests in flight."),
    num_requests: int = typer.Option(100, help="Requests measured."),
    prompt_len: str = typer.Option("128", help=f"Prompt tokens: {LENGTH_HELP}."),
    output_len: str = typer.Option("128", help=f"Output tokens: {LENGTH_HELP}."),
    seed: int = typer.Option(0, help="Seed of lengths, prompts and arrivals."),
    ignore_eos: bool = typer.Option(True, "--ignore-eos/--no-ignore-eos",
                                    help="Ask for exactly the output length (ignore_eos + min_tokens)."),
    temperature: float = typer.Option(0.0, help="Sampling temperature (0: greedy)."),
    slo_ttft: Optional[float] = typer.Option(None, help="TTFT SLO in seconds, for goodput."),
    slo_tpot: Optional[float] = typer.Option(None, help="TPOT SLO in seconds, for goodput."),
    warmup: int = typer.Option(0, help="Requests sent (and not measured) before the run."),
    timeout: float = typer.Option(300.0, help="Seconds one request may take before it counts as failed."),
    tokenizer: Optional[str] = typer.Option(
        None, help="The served model's tokenizer (tokenizer.json, a directory, or a .gguf) for "
                   "exact token-id prompts (default: the model id when it is a path, or SmolLM2)."),
    dataset_name: str = typer.Option(
        "random", help="Prompts: random (synthetic, of --prompt-len), sharegpt (ShareGPT JSON) or "
                       "jsonl (one {\"prompt\"} or {\"messages\"} object a line)."),
    dataset_path: Optional[Path] = typer.Option(None, help="The sharegpt or jsonl file."),
    dataset_output_len: bool = typer.Option(
        True, "--dataset-output-len/--no-dataset-output-len",
        help="A dataset entry's own output length (its output_len, or a ShareGPT answer's tokens) "
             "wins over --output-len."),
    percentiles: str = typer.Option("50,90,99", "--percentiles", "--metric-percentiles",
                                    help="Percentiles reported (numpy's definition), e.g. 50,90,99,99.9."),
    result_file: Optional[Path] = typer.Option(
        None, help="Write the results here: JSON with vllm bench serve's keys (one file per rate "
                   "in a sweep: <stem>-<rate>qps.json)."),
    result_csv: Optional[Path] = typer.Option(None, help="Write one CSV row per run here."),
    plot: Optional[Path] = typer.Option(
        None, help="Draw throughput and latency against the rate here (.png, .svg; needs matplotlib)."),
    label: Optional[str] = typer.Option(None, help="A name for this run, stored in the results."),
) -> None:
    """Benchmark an OpenAI-compatible server: TTFT, TPOT, ITL, throughput, goodput under SLOs."""
    import functools

    import anyio
    import msgspec

    from flowserve_bench.errors import BenchError
    from flowserve_bench.report import print_report
    from flowserve_bench.results import BenchConfig
    from flowserve_bench.runner import run_benchmark
    from flowserve_bench.stats import parse_percentiles
    from flowserve_bench.sweep import parse_rates, plot_sweep, result_path, sweep_configs
    from flowserve_bench.vllm_format import to_csv, write_result_file

    try:
        chosen_percentiles = parse_percentiles(percentiles)
    except ValueError as exc:
        raise BenchError(f"--percentiles: {exc}") from None
    rates = parse_rates(request_rate) if request_rate is not None else None
    settings = {k: v for k, v in locals().items()
                if k in BenchConfig.__struct_fields__ and v is not None and k != "request_rate"}
    settings["percentiles"] = chosen_percentiles
    if dataset_path is not None:
        settings["dataset_path"] = str(dataset_path)
    try:
        config = msgspec.convert(settings, BenchConfig)
    except msgspec.ValidationError as exc:
        raise BenchError(f"bad option: {str(exc).replace('$.', '--').replace('_', '-')}") from None
    configs = sweep_configs(config, rates) if rates is not None else [config]
    results = []
    for one in configs:
        result = anyio.run(functools.partial(run_benchmark, one, show_progress=True))
        print_report(result)
        results.append(result)
        if result_file is not None:
            written = result_path(result_file, one.request_rate, len(configs) > 1)
            write_result_file(result, written)
            typer.echo(f"results written to {written}", err=True)
    if result_csv is not None:
        result_csv.parent.mkdir(parents=True, exist_ok=True)
        result_csv.write_text(to_csv(results))
        typer.echo(f"CSV written to {result_csv}", err=True)
    if plot is not None:
        why_not = plot_sweep(results, plot)
        typer.echo(f"plot skipped: {why_not}" if why_not else f"plot written to {plot}", err=True)


@hookimpl
def flowserve_register_commands(app: typer.Typer) -> None:
    """Add ``flowserve bench``."""
    app.command(name="bench")(bench)
