"""PD-disaggregated vs colocated vs hybrid serving on the same hardware budget, measured by
``flowserve bench`` (``flowserve_bench.run_benchmark``) at several Poisson arrival rates.

Every system runs the same number of instance processes (``--processes``, default 3):
``colocated`` runs that many identical colocated instances (least-loaded routing);
``pd-disaggregated`` splits them into prefill and decode instances (``--prefill-instances``,
the rest decode); ``pd-hybrid`` runs one colocated, one prefill and the rest decode. Each
system is started (``flowserve serve``, scaler ``static``: one process per instance),
measured at every rate, and stopped before the next one starts, so they never share the CPU.

The workload mixes long and short prompts (default: 20% ~1,500 tokens, 80% 32–128) with
64–256 output tokens. Reported per (system, rate): goodput under TTFT ≤ ``--slo-ttft`` and
TPOT ≤ ``--slo-tpot`` (completed requests meeting both, per second, and their share of all
requests; a request refused with 429 by SLO admission counts as not good), TTFT and TPOT
p50/p99, goodput under the issue's reference SLO (2 s, 100 ms) from the same records
whatever ``--slo-*`` say, the KV moved between instances (bytes, seconds, from ``/metrics``) and the longest
per-role queue seen while it ran. Every system gets the SLOs in its DeploymentSpec, so SLO
admission (429 with Retry-After) is on for all three: the PD job schedulers refuse on a
predicted TTFT and the measured TPOT, the colocated one on its p90 TTFT estimate once every
instance's batch is full (it has no TPOT admission).

    .venv/bin/python benchmarks/pd_vs_colocated.py                      # the defaults above
    .venv/bin/python benchmarks/pd_vs_colocated.py --rates 0.25 0.5 1 --num-requests 24 \\
        --prompt-len mix:0.2@1500,0.8@uniform:32:128 --output-len uniform:64:128

Writes one ``flowserve bench`` JSON per run and ``summary.json`` under ``--out``, an SVG plot
(``--plot``), and prints a Markdown table. The numbers are whatever the run measured.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec

from flowserve_bench.metrics import meets_slo
from flowserve_bench.results import BenchConfig, BenchResult
from flowserve_bench.runner import run_benchmark
from flowserve_core.config import default_model_path

ROOT = Path(__file__).resolve().parent.parent
READY = re.compile(r"serving the OpenAI API on (http://[^\s\"]+)")
SYSTEMS = ("colocated", "pd-disaggregated", "pd-hybrid")
#: The SLO of the issue that asked for this benchmark; always reported, whatever --slo-* say.
REFERENCE_SLO = (2.0, 0.1)
COLOURS = {"colocated": "#1f77b4", "pd-disaggregated": "#d62728", "pd-hybrid": "#2ca02c"}


def system_flags(system: str, args: argparse.Namespace) -> list[str]:
    """The ``flowserve serve`` flags giving ``system`` exactly ``args.processes`` instances."""
    n = args.processes
    if system == "colocated":
        return ["--job-scheduler", "colocated", "--min-instances", str(n), "--max-instances", str(n)]
    if system == "pd-disaggregated":
        prefill = args.prefill_instances
        return ["--job-scheduler", "pd-disaggregated", "--prefill-instances", str(prefill),
                "--decode-instances", str(n - prefill)]
    return ["--job-scheduler", "pd-hybrid", "--colocated-instances", "1", "--prefill-instances", "1",
            "--decode-instances", str(n - 2)]


def start(system: str, args: argparse.Namespace, out: Path) -> tuple[subprocess.Popen, str]:
    """Start one server; return it and its URL once every instance is ready."""
    config = out / f"{system}.toml"
    config.write_text(f"slo_ttft_seconds = {args.slo_ttft}\nslo_tpot_seconds = {args.slo_tpot}\n")
    log = out / f"{system}.log"
    command = [sys.executable, "-m", "flowserve_core.cli", "serve", "--config", str(config),
               "--model", args.model, "--served-model-name", "model", "--port", "0", "--scaler", "static",
               "--dtype", args.dtype, "--device", "cpu", "--kv-cache-memory", args.kv_cache_memory,
               "--max-queue", str(args.max_queue), "-o", f"num_threads={args.threads}",
               *system_flags(system, args)]
    process = subprocess.Popen(command, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                               env={**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 600
    url = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{system}: flowserve serve exited with {process.returncode}; see {log}")
        if url is None and (match := READY.search(log.read_text(errors="replace"))):
            url = match[1]
        if url is not None:
            try:
                instances = httpx.get(url + "/admin/status", timeout=5).json()["instances"]
                if sum(i["state"] == "ready" for i in instances) >= args.processes:
                    return process, url
            except (httpx.HTTPError, KeyError, ValueError):
                pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit(f"{system}: instances not ready in 600 s; see {log}")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 60 s."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def scrape(url: str) -> dict[str, float]:
    """The /metrics samples this benchmark reads, by ``name{labels}``."""
    wanted = ("flowserve:kv_transfer_bytes_total", "flowserve:kv_transfer_seconds_total",
              "flowserve:role_num_requests_waiting", "flowserve:role_waiting_prefill_tokens")
    samples: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(wanted):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


class QueueWatcher:
    """Polls /metrics while a run goes on; keeps the longest waiting queue seen per role."""

    def __init__(self, url: str):
        self.url, self.longest, self._stop = url, {}, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> QueueWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(10)

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            try:
                samples = scrape(self.url)
            except httpx.HTTPError:
                continue
            for name, value in samples.items():
                if name.startswith("flowserve:role_num_requests_waiting"):
                    role = re.search(r'role="(\w+)"', name)
                    key = role[1] if role else "?"
                    self.longest[key] = max(self.longest.get(key, 0), int(value))


def bench(url: str, system: str, rate: float, args: argparse.Namespace, out: Path, warmup: int) -> dict[str, Any]:
    """One open-loop run at ``rate`` req/s; the row of the summary (and its results file)."""
    config = BenchConfig(url=url + "/v1", model="model", request_rate=rate, num_requests=args.num_requests,
                         prompt_len=args.prompt_len, output_len=args.output_len, seed=args.seed,
                         slo_ttft=args.slo_ttft, slo_tpot=args.slo_tpot, warmup=warmup,
                         timeout=args.request_timeout, label=f"{system}@{rate:g}")
    before = scrape(url)
    with QueueWatcher(url) as watcher:
        result: BenchResult = anyio.run(lambda: run_benchmark(config, show_progress=True))
    after = scrape(url)
    (out / f"{system}-rate{rate:g}.json").write_bytes(result.to_json())

    def moved(name: str) -> float:
        key = f'{name}{{model_name="model"}}'
        return after.get(key, 0.0) - before.get(key, 0.0)

    rejected = sum(e.count for e in result.errors if e.status == "429")
    reference = msgspec.structs.replace(config, slo_ttft=REFERENCE_SLO[0], slo_tpot=REFERENCE_SLO[1])
    good_reference = sum(meets_slo(record, reference) for record in result.requests)
    return {"system": system, "rate": rate, "requests": result.num_requests, "completed": result.completed,
            "failed": result.failed, "rejected_429": rejected, "goodput": result.goodput,
            "goodput_fraction": result.goodput_fraction,
            "goodput_reference_slo": good_reference / result.duration if result.duration else None,
            "output_tok_s": result.output_throughput,
            "ttft_p50": result.ttft.p50, "ttft_p99": result.ttft.p99, "tpot_p50": result.tpot.p50,
            "tpot_p99": result.tpot.p99, "kv_bytes": moved("flowserve:kv_transfer_bytes_total"),
            "kv_seconds": moved("flowserve:kv_transfer_seconds_total"), "longest_queue": watcher.longest}


def _fmt(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "–" if value is None else f"{value * scale:.{digits}f}"


def markdown(rows: list[dict[str, Any]]) -> str:
    """The summary as a Markdown table."""
    lines = ["| system | rate (req/s) | done/sent | 429 | goodput (req/s) | good % | goodput at 2 s / 100 ms | "
             "TTFT p50 / p99 (s) | TPOT p50 / p99 (ms) | out tok/s | KV moved (MiB, s) | longest queue by role |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        queues = ", ".join(f"{k} {v}" for k, v in sorted(r["longest_queue"].items())) or "–"
        lines.append(f"| {r['system']} | {r['rate']:g} | {r['completed']}/{r['requests']} | {r['rejected_429']} | "
                     f"{_fmt(r['goodput'], digits=3)} | {_fmt(r['goodput_fraction'], 100, 0)} | "
                     f"{_fmt(r['goodput_reference_slo'], digits=3)} | "
                     f"{_fmt(r['ttft_p50'])} / {_fmt(r['ttft_p99'])} | "
                     f"{_fmt(r['tpot_p50'], 1000, 0)} / {_fmt(r['tpot_p99'], 1000, 0)} | "
                     f"{_fmt(r['output_tok_s'], digits=1)} | {r['kv_bytes'] / 2**20:.1f}, {r['kv_seconds']:.2f} | "
                     f"{queues} |")
    return "\n".join(lines)


def svg_plot(rows: list[dict[str, Any]], title: str) -> str:
    """Three panels against the arrival rate: goodput, TTFT p99, TPOT p99, one line per system."""
    panels = [("goodput (req/s)", "goodput", 1.0), ("TTFT p99 (s)", "ttft_p99", 1.0), ("TPOT p99 (ms)", "tpot_p99", 1000.0)]
    width, height, pad, panel_w = 960, 355, 50, 280
    rates = sorted({r["rate"] for r in rows})
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="11">', '<rect width="100%" height="100%" fill="white"/>',
           *(f'<text x="{width / 2}" y="{14 + 14 * i}" text-anchor="middle" font-size="12">{part}</text>'
             for i, part in enumerate(title.split("; ", 1)))]
    for p, (label, key, scale) in enumerate(panels):
        x0, y0, w, h = pad + p * (panel_w + 40), 55, panel_w, height - 125
        values = [r[key] * scale for r in rows if r[key] is not None]
        top = max(values, default=1.0) * 1.1 or 1.0
        span = (max(rates) - min(rates)) or 1.0

        def x(rate: float, x0: float = x0, span: float = span, w: float = w) -> float:
            return x0 + (rate - min(rates)) / span * w

        def y(value: float, y0: float = y0, h: float = h, top: float = top) -> float:
            return y0 + h - value / top * h

        out.append(f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#888"/>')
        out.append(f'<text x="{x0 + w / 2}" y="{y0 - 6}" text-anchor="middle">{label}</text>')
        for tick in range(5):
            value = top * tick / 4
            out.append(f'<text x="{x0 - 4}" y="{y(value) + 4:.1f}" text-anchor="end">{value:.3g}</text>')
        for rate in rates:
            out.append(f'<text x="{x(rate):.1f}" y="{y0 + h + 14}" text-anchor="middle">{rate:g}</text>')
        out.append(f'<text x="{x0 + w / 2}" y="{y0 + h + 28}" text-anchor="middle">arrival rate (req/s)</text>')
        for system in SYSTEMS:
            points = [(x(r["rate"]), y(r[key] * scale)) for r in rows if r["system"] == system and r[key] is not None]
            if points:
                path = " ".join(f"{a:.1f},{b:.1f}" for a, b in points)
                out.append(f'<polyline points="{path}" fill="none" stroke="{COLOURS[system]}" stroke-width="2"/>')
                out.extend(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{COLOURS[system]}"/>' for a, b in points)
    for i, system in enumerate(SYSTEMS):
        lx = pad + i * 200
        out.append(f'<line x1="{lx}" y1="{height - 18}" x2="{lx + 24}" y2="{height - 18}" '
                   f'stroke="{COLOURS[system]}" stroke-width="3"/>')
        out.append(f'<text x="{lx + 30}" y="{height - 14}">{system}</text>')
    out.append("</svg>")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="GGUF file or HF directory (default: SmolLM2)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--processes", type=int, default=3, help="instance processes per system")
    parser.add_argument("--prefill-instances", type=int, default=1, help="of --processes, for pd-disaggregated")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per instance")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0])
    parser.add_argument("--num-requests", type=int, default=40, help="per rate")
    parser.add_argument("--prompt-len", default="mix:0.2@1500,0.8@uniform:32:128")
    parser.add_argument("--output-len", default="uniform:64:256")
    parser.add_argument("--slo-ttft", type=float, default=2.0)
    parser.add_argument("--slo-tpot", type=float, default=0.1)
    parser.add_argument("--kv-cache-memory", default="512MiB")
    parser.add_argument("--max-queue", type=int, default=256)
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--warmup", type=int, default=4, help="requests before the first rate (not measured)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/pd_vs_colocated")
    parser.add_argument("--plot", default="docs/pd-vs-colocated.svg")
    args = parser.parse_args()
    args.model = args.model or default_model_path()
    if args.processes < 3 and "pd-hybrid" in args.systems:
        raise SystemExit("pd-hybrid needs --processes 3 or more (one colocated, one prefill, one decode)")
    if not 1 <= args.prefill_instances < args.processes:
        raise SystemExit(f"--prefill-instances must be in [1, {args.processes - 1}], got {args.prefill_instances}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    for system in args.systems:
        process, url = start(system, args, out)
        try:
            for i, rate in enumerate(args.rates):
                rows.append(bench(url, system, rate, args, out, warmup=args.warmup if i == 0 else 0))
                print(markdown(rows[-1:]).splitlines()[-1], flush=True)
        finally:
            stop(process)
    title = (f"{Path(args.model).name} ({args.dtype}), {args.processes} instance processes, prompts {args.prompt_len}, "
             f"outputs {args.output_len}; SLO TTFT ≤ {args.slo_ttft:g} s, TPOT ≤ {args.slo_tpot * 1000:g} ms")
    summary = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "cpus": os.cpu_count(),
               "wall_seconds": round(time.monotonic() - started, 1), "title": title, "rows": rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=lambda v: None if v != v else v))
    Path(args.plot).write_text(svg_plot(rows, title))
    print(title)
    print(markdown(rows))
    print(f"wall time {summary['wall_seconds']} s; results in {out}, plot in {args.plot}")


if __name__ == "__main__":
    main()
