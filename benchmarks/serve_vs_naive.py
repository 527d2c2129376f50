"""FlowServe against the naive baseline, both behind the OpenAI API, measured by
``flowserve bench`` at several concurrencies in one run.

The naive server (``benchmarks/naive_server.py``) runs transformers ``generate`` one request
at a time; FlowServe runs ``flowserve serve`` with its defaults (continuous batching, paged
KV, the spmd executor). Both load the same model in the same dtype; each is started, measured
at every concurrency, and stopped before the other starts, so they never share the CPU.

    .venv/bin/python benchmarks/serve_vs_naive.py                       # SmolLM2, 1/8/32
    .venv/bin/python benchmarks/serve_vs_naive.py --rounds 1 --output-len 64  # one cold burst per level

Results: one ``flowserve bench`` JSON file per (server, concurrency) under ``--out``, and a
comparison table (output tok/s, TTFT p50/p90, TPOT p50, and FlowServe's speed-up). With
``--rounds R`` > 1 each client sends R requests one after the other; the table then also
splits TTFT p50 between the first wave (the C requests sent together at the start: a cold
burst) and the requests sent after it (the closed loop's steady state, where a new request
arrives whenever one finishes, as in vLLM's ``benchmark_serving --max-concurrency``).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from flowserve_bench.results import BenchResult
from flowserve_bench.stats import median
from flowserve_core.config import default_model_path

ROOT = Path(__file__).resolve().parent.parent
READY = {"naive": re.compile(r"naive server ready at (http://\S+?)/v1"),
         "flowserve": re.compile(r"serving the OpenAI API on (http://[^\s\"]+)")}


def start(system: str, model: str, dtype: str, log: Path) -> tuple[subprocess.Popen, str]:
    """Start one server on a free port; return it and its base URL once ``/health`` answers."""
    if system == "naive":
        command = [sys.executable, str(ROOT / "benchmarks" / "naive_server.py"), "--model", model,
                   "--port", "0", "--dtype", dtype]
    else:
        command = [sys.executable, "-m", "flowserve_core.cli", "serve", "--model", model, "--port", "0",
                   "--dtype", dtype]
    out = open(log, "wb")
    process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{system} server exited with {process.returncode}; see {log}")
        if match := READY[system].search(log.read_text(errors="replace")):
            url = match[1]
            ready = "/health" if system == "naive" else "/ready"
            try:
                if httpx.get(url + ready, timeout=5).status_code == 200:
                    return process, url
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit(f"{system} server did not become ready in 300 s; see {log}")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 60 s."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def bench(url: str, concurrency: int, args: argparse.Namespace, result_file: Path, label: str) -> BenchResult:
    """One ``flowserve bench`` closed-loop run; its results file, read back."""
    requests = max(args.min_requests, concurrency * args.rounds)
    # A seed per concurrency: each level sends prompts of its own. With one seed for all, the
    # first requests at 32 would repeat those at 8, and FlowServe's prefix cache would skip
    # their prefill (the naive server has none), flattering it.
    command = [sys.executable, "-m", "flowserve_core.cli", "bench", "--url", url + "/v1", "--seed", str(concurrency),
               "--concurrency", str(concurrency), "--num-requests", str(requests),
               "--warmup", str(min(concurrency, 2)), "--prompt-len", args.prompt_len,
               "--output-len", args.output_len, "--slo-ttft", str(args.slo_ttft), "--slo-tpot", str(args.slo_tpot),
               "--label", label, "--result-file", str(result_file)]
    subprocess.run(command, check=True)
    return BenchResult.from_json(result_file.read_bytes())


def ttft_p50_by_wave(result: BenchResult, concurrency: int) -> tuple[float | None, float | None]:
    """TTFT p50 of the first ``concurrency`` requests sent (the burst) and of the rest."""
    ordered = sorted((r for r in result.requests if r.ttft is not None), key=lambda r: r.start)

    def p50(values: list[float]) -> float | None:
        return median(values) if values else None

    return (p50([r.ttft for r in ordered[:concurrency]]), p50([r.ttft for r in ordered[concurrency:]]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="GGUF file or HF directory (default: SmolLM2)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=5, help="requests per client")
    parser.add_argument("--min-requests", type=int, default=4)
    parser.add_argument("--prompt-len", default="uniform:32:96")
    parser.add_argument("--output-len", default="uniform:32:96")
    parser.add_argument("--slo-ttft", type=float, default=2.0)
    parser.add_argument("--slo-tpot", type=float, default=0.1)
    parser.add_argument("--out", default="benchmarks/results/serve_vs_naive")
    args = parser.parse_args()
    model = args.model or default_model_path()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[tuple[str, int], BenchResult] = {}
    for system in ("naive", "flowserve"):
        process, url = start(system, model, args.dtype, out / f"{system}.log")
        try:
            for concurrency in args.concurrency:
                results[system, concurrency] = bench(url, concurrency, args, out / f"{system}-c{concurrency}.json",
                                                     f"{system}-c{concurrency}")
        finally:
            stop(process)
    table = Table(title=f"FlowServe vs naive: {Path(model).name}, {args.dtype}, prompts {args.prompt_len}, "
                        f"outputs {args.output_len}, {os.cpu_count()} CPUs")
    for column in ("concurrency", "server", "requests", "failed", "output tok/s", "TTFT p50 (s)",
                   "TTFT p90 (s)", "TTFT p50 first wave (s)", "TTFT p50 after it (s)", "TPOT p50 (ms)",
                   "goodput", "speed-up"):
        table.add_column(column, justify="right")
    for concurrency in args.concurrency:
        naive = results["naive", concurrency]
        for system in ("naive", "flowserve"):
            r = results[system, concurrency]
            first_wave, after = ttft_p50_by_wave(r, concurrency)
            table.add_row(str(concurrency), system, str(r.num_requests), str(r.failed), f"{r.output_throughput:.1f}",
                          f"{r.ttft.p50:.2f}", f"{r.ttft.p90:.2f}", f"{first_wave:.2f}" if first_wave else "-",
                          f"{after:.2f}" if after else "-", f"{r.tpot.p50 * 1000:.0f}",
                          f"{r.goodput_fraction:.0%}", f"{r.output_throughput / naive.output_throughput:.2f}x")
    Console(width=180).print(table)


if __name__ == "__main__":
    main()
