"""Soak: a live ``flowserve serve`` at saturation for minutes, its streaming clients hanging up
at random; afterwards every request has ended and every KV block has come back, and the
memory of the server and its instance processes has not grown.

    .venv/bin/python benchmarks/soak.py --minutes 10                 # the full soak
    .venv/bin/python benchmarks/soak.py --minutes 3 --out soak.json  # a short one

The engine is the real one (hf tokenizer, spmd executor, paged KV, continuous batching,
colocated jobs) on a tiny random Llama written on the fly, each instance in its own process
(scaler ``static``), so KV blocks are really allocated and freed. ``--engine toy`` uses the
toy components instead. The other load scripts (``benchmarks/overload.py``) reuse the
helpers here: ``LiveServer``, ``engine_args``, ``tree_rss``.

Checks (exit status 1 when one fails): no unexpected errors or lost requests (each stream
ends with ``[DONE]`` or is hung up by its client on purpose), ``num_requests_running`` and
``num_requests_waiting`` back to 0 and ``kv_cache_usage_perc`` back to 0 after the load,
RSS (server and instance processes) at the end of the load within ``--rss-slack`` (default
10 %) of RSS halfway through it (a leak grows with every request; warming caches level off),
and no growth once the load has stopped. RSS after the warm-up is reported too: the engine
process's native memory keeps growing for the first few hundred requests before it levels.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import anyio
import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

MODEL = "soak"
LISTENING = re.compile(r"serving the OpenAI API on (http://[^\s\"]+)")
TOY = ["--model", "toy", "--tokenizer", "whitespace", "--executor", "counter", "--kv-cache", "unbounded",
       "--batch-scheduler", "fifo", "--job-scheduler", "least-tasks"]


def engine_args(engine: str, workdir: Path) -> list[str]:
    """``flowserve serve`` flags for the ``real`` engine (a tiny random Llama) or the ``toy`` one."""
    if engine == "toy":
        return list(TOY)
    from flowserve_testing import write_tiny_llama

    model = write_tiny_llama(workdir / "tiny-llama")
    return ["--model", str(model), "--tokenizer", "hf", "--executor", "spmd", "--kv-cache", "paged",
            "--batch-scheduler", "continuous", "--job-scheduler", "colocated", "--kv-cache-memory", "16MiB",
            "--device", "cpu", "--dtype", "float32"]


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (server, instances, ranks)."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


class LiveServer:
    """A ``flowserve serve`` process on a free port of 127.0.0.1."""

    def __init__(self, args: list[str], workdir: Path, config: str = ""):
        self.log_path = workdir / "server.log"
        extra = []
        if config:
            path = workdir / "flowserve.toml"
            path.write_text(config)
            extra = ["--config", str(path)]
        command = [sys.executable, "-m", "flowserve_core.cli", "serve", "--host", "127.0.0.1", "--port", "0",
                   "--served-model-name", MODEL, *extra, *args]
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"})
        self.url = ""

    def wait_ready(self, timeout: float = 300) -> LiveServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"flowserve serve exited:\n{self.log_path.read_text()[-3000:]}")
            if not self.url and (match := LISTENING.search(self.log_path.read_text(errors="replace"))):
                self.url = match[1]
            if self.url and httpx.get(self.url + "/ready", timeout=10).status_code == 200:
                return self
            time.sleep(0.2)
        raise SystemExit(f"flowserve serve was not ready within {timeout} s")

    def metrics(self, *names: str) -> list[float]:
        """The values of ``names`` (summed over their labels) from one scrape of /metrics."""
        text = httpx.get(self.url + "/metrics", timeout=30).text
        values = dict.fromkeys(names, 0.0)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in values and sample.labels.get("model_name") == MODEL:
                    values[sample.name] += sample.value
        return list(values.values())

    def metric(self, name: str) -> float:
        return self.metrics(name)[0]

    def histogram(self, name: str) -> dict[float, float]:
        """The cumulative bucket counts of histogram ``name`` (``le`` → count), from one scrape."""
        text = httpx.get(self.url + "/metrics", timeout=30).text
        buckets: dict[float, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name + "_bucket" and sample.labels.get("model_name") == MODEL:
                    le = float(sample.labels["le"])
                    buckets[le] = buckets.get(le, 0.0) + sample.value
        return buckets

    def rss(self) -> int:
        return tree_rss(self.process.pid)

    def wait_metric_zero(self, name: str, timeout: float = 60) -> float:
        deadline = time.monotonic() + timeout
        while (value := self.metric(name)) != 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        return value

    def stop(self) -> int:
        """SIGTERM (graceful); its exit status."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(30)
        finally:
            self._log.close()


@dataclass
class SoakResult:
    """What one soak run saw and measured."""

    engine: str
    minutes: float
    clients: int
    started: int = 0
    completed: int = 0
    hung_up: int = 0
    errors: int = 0
    lost: int = 0
    statuses: dict = field(default_factory=dict)
    rss_before_mib: float = 0.0
    rss_peak_mib: float = 0.0
    rss_midway_mib: float = 0.0
    rss_end_mib: float = 0.0
    rss_after_mib: float = 0.0
    rss_timeline_mib: list = field(default_factory=list)
    running_after: float = -1.0
    waiting_after: float = -1.0
    kv_usage_during_max: float = 0.0
    kv_usage_after: float = -1.0
    error_samples: list = field(default_factory=list)
    checks: dict = field(default_factory=dict)


async def one_stream(client: httpx.AsyncClient, rng: random.Random, result: SoakResult,
                     statuses: Counter, hang_up_rate: float) -> None:
    """One streaming completion (prompts of 1-60 words, 8-96 tokens out); hang up at a
    random point with ``hang_up_rate``. (The tiny Llama has no chat template.)"""
    max_tokens = rng.randint(8, 96)
    hang_up_after = rng.randint(0, max_tokens) if rng.random() < hang_up_rate else None
    words = " ".join(f"t{rng.randrange(1, 999)}" for _ in range(rng.randint(1, 60)))
    body = {"model": MODEL, "stream": True, "max_tokens": max_tokens, "ignore_eos": True, "prompt": words}
    result.started += 1
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            statuses[response.status_code] += 1
            if response.status_code != 200:
                await response.aread()
                if response.status_code != 429:
                    result.errors += 1
                    result.error_samples = (result.error_samples + [response.text[:300]])[-5:]
                return
            events = 0
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    result.completed += 1
                    return
                if '"error"' in line:
                    result.errors += 1
                    result.error_samples = (result.error_samples + [line[:300]])[-5:]
                events += 1
                if hang_up_after is not None and events > hang_up_after:
                    result.hung_up += 1
                    return  # leaving the block closes the connection mid-stream
            result.lost += 1  # the stream ended without [DONE]
    except httpx.HTTPError as exc:
        result.lost += 1
        result.error_samples = (result.error_samples + [repr(exc)[:300]])[-5:]


async def drive(server: LiveServer, result: SoakResult, seconds: float, hang_up_rate: float, seed: int) -> None:
    """``result.clients`` clients back to back for ``seconds``; RSS and KV usage sampled."""
    statuses: Counter = Counter()
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=result.clients * 2, max_keepalive_connections=result.clients)

    async def client_loop(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
            while time.monotonic() < deadline:
                await one_stream(client, rng, result, statuses, hang_up_rate)

    async def sample() -> None:
        started = time.monotonic()
        while time.monotonic() < deadline:
            await anyio.sleep(min(10.0, max(1.0, seconds / 30)))
            rss = server.rss() / 2**20
            result.rss_peak_mib = max(result.rss_peak_mib, rss)
            result.rss_timeline_mib.append([round(time.monotonic() - started), round(rss, 1)])
            kv = await anyio.to_thread.run_sync(server.metric, "flowserve:kv_cache_usage_perc")
            result.kv_usage_during_max = max(result.kv_usage_during_max, kv)
            print(f"  {time.monotonic() - started:6.0f} s  rss {rss:8.1f} MiB  kv {kv:.3f}  "
                  f"started {result.started}  done {result.completed}  hung up {result.hung_up}  "
                  f"errors {result.errors}  lost {result.lost}", flush=True)

    async with anyio.create_task_group() as tg:
        tg.start_soon(sample)
        for index in range(result.clients):
            tg.start_soon(client_loop, index)
    result.statuses = {str(k): v for k, v in sorted(statuses.items())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="load duration (the spec asks 10)")
    parser.add_argument("--engine", choices=["real", "toy"], default="real")
    parser.add_argument("--clients", type=int, default=32, help="concurrent streaming clients (saturation)")
    parser.add_argument("--hang-up-rate", type=float, default=0.5, help="share of streams the client abandons")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds of load before RSS 'before'")
    parser.add_argument("--rss-slack", type=float, default=0.10, help="allowed RSS growth (fraction)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="flowserve-soak-"))
    server = LiveServer([*engine_args(args.engine, workdir), "--scaler", "static",
                         "-o", "collective_timeout_seconds=60"],
                        workdir, config="max_num_seqs = 16\nmax_queue = 256\n").wait_ready()
    print(f"server {server.url} (pid {server.process.pid}), log {server.log_path}", flush=True)
    result = SoakResult(engine=args.engine, minutes=args.minutes, clients=args.clients)
    try:
        # warm-up: allocators, caches and pools reach their working size before 'before' is taken
        warm = SoakResult(engine=args.engine, minutes=args.warmup / 60, clients=args.clients)
        anyio.run(drive, server, warm, args.warmup, args.hang_up_rate, args.seed + 1)
        server.wait_metric_zero("flowserve:num_requests_running")
        time.sleep(3)
        result.rss_before_mib = round(server.rss() / 2**20, 1)
        print(f"warm-up done ({warm.started} requests); RSS before: {result.rss_before_mib} MiB", flush=True)
        anyio.run(drive, server, result, args.minutes * 60, args.hang_up_rate, args.seed)
        result.rss_end_mib = round(server.rss() / 2**20, 1)
        timeline = result.rss_timeline_mib
        result.rss_midway_mib = next((rss for at, rss in timeline if at >= args.minutes * 30), result.rss_end_mib)
        result.running_after = server.wait_metric_zero("flowserve:num_requests_running")
        result.waiting_after = server.wait_metric_zero("flowserve:num_requests_waiting")
        result.kv_usage_after = server.wait_metric_zero("flowserve:kv_cache_usage_perc")
        time.sleep(3)
        result.rss_after_mib = round(server.rss() / 2**20, 1)
    finally:
        code = server.stop()
    result.checks = {
        "no unexpected errors": result.errors == 0,
        "no lost requests": result.lost == 0,
        "num_requests_running back to 0": result.running_after == 0,
        "num_requests_waiting back to 0": result.waiting_after == 0,
        "every KV block returned (kv_cache_usage_perc 0)": result.kv_usage_after == 0,
        f"RSS flat over the second half of the load (within {args.rss_slack:.0%})":
            result.rss_end_mib <= result.rss_midway_mib * (1 + args.rss_slack),
        "no RSS growth after the load stops": result.rss_after_mib <= result.rss_end_mib * (1 + args.rss_slack / 10),
        "SIGTERM exit status 0": code == 0,
    }
    summary = {k: v for k, v in asdict(result).items() if k != "rss_timeline_mib"}
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(asdict(result), indent=2))
    return 0 if all(result.checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
