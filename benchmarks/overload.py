"""Overload: offer a live ``flowserve serve`` three times the load it can carry and check that
it sheds the excess instead of drowning in it.

    .venv/bin/python benchmarks/overload.py                    # toy engine, 60 s at 3x
    .venv/bin/python benchmarks/overload.py --engine real --seconds 120 --out overload.json

1. Capacity: ``--max-num-seqs`` closed-loop clients (no queueing) for ``--probe`` seconds;
   capacity = requests finished per second.
2. Overload: open-loop Poisson arrivals at ``--factor`` × capacity for ``--seconds``; every
   request streams, so its TTFT is measured at the client.

The deployment has a queue limit (``max_queue``) sized so that a full queue drains within the
TTFT SLO (``slo_ttft_seconds``). Checks (exit status 1 when one fails): the load generator
really sent at 95 % or more of the rate asked for; the excess gets 429 with ``Retry-After``;
nothing else fails or is lost; the TTFT p90 of admitted requests meets the SLO; running plus
waiting requests never exceed ``max_queue`` (sampled each second); RSS after the run is within
``--rss-slack`` of RSS halfway through the overload (memory stays flat once the engine's
shape-keyed native caches are warm; RSS after the capacity probe is reported too).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
import anyio
import msgspec
from soak import MODEL, LiveServer, engine_args

from flowserve_bench.stats import percentile

JSON_BODY = {"content-type": "application/json"}


@dataclass
class OverloadResult:
    """What one overload run offered, saw and measured."""

    engine: str
    capacity_rps: float = 0.0
    offered_rps: float = 0.0
    seconds: float = 0.0
    #: the rate the load generator really sent at: requests / seconds from the first send to the last
    achieved_rps: float = 0.0
    max_queue: int = 0
    slo_ttft_seconds: float = 0.0
    sent: int = 0
    statuses: dict = field(default_factory=dict)
    completed: int = 0
    rejected_429: int = 0
    rejected_without_retry_after: int = 0
    errors: int = 0
    lost: int = 0
    ttft_p50: float = 0.0
    ttft_p90: float = 0.0
    ttft_p99: float = 0.0
    #: the server's own view (its TTFT histogram: request admitted → first token), p90's bucket bound
    server_ttft_p90_at_most: float = 0.0
    waiting_max: float = 0.0
    admitted_max: float = 0.0
    rss_before_mib: float = 0.0
    rss_half_mib: float = 0.0
    rss_peak_mib: float = 0.0
    rss_after_mib: float = 0.0
    running_after: float = -1.0
    error_samples: list = field(default_factory=list)
    checks: dict = field(default_factory=dict)


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by the project's one definition (numpy's); NaN for no values."""
    return percentile(values, q * 100) if values else math.nan


async def one_request(session: aiohttp.ClientSession, body: bytes, result: OverloadResult, statuses: Counter,
                      ttfts: list[float]) -> None:
    """One streamed completion: its status, its TTFT if admitted, and how it ended."""
    result.sent += 1
    started = time.monotonic()
    try:
        async with session.post("/v1/completions", data=body, headers=JSON_BODY) as response:
            statuses[response.status] += 1
            if response.status == 429:
                result.rejected_429 += 1
                if not response.headers.get("retry-after", "").isdigit():
                    result.rejected_without_retry_after += 1
                await response.read()
                return
            if response.status != 200:
                result.errors += 1
                result.error_samples = (result.error_samples + [(await response.read())[:300].decode()])[-5:]
                return
            first = True
            async for line in response.content:  # one SSE line at a time
                if not line.startswith(b"data: "):
                    continue
                if line.rstrip() == b"data: [DONE]":
                    result.completed += 1
                    return
                if b'"error"' in line:
                    result.errors += 1
                    result.error_samples = (result.error_samples + [line[:300].decode()])[-5:]
                elif first:
                    ttfts.append(time.monotonic() - started)
                    first = False
            result.lost += 1
    except (aiohttp.ClientError, TimeoutError) as exc:
        result.lost += 1
        result.error_samples = (result.error_samples + [repr(exc)[:300]])[-5:]


def client_session(url: str, connections: int) -> aiohttp.ClientSession:
    """The load generator's HTTP client. aiohttp (as vLLM's benchmark uses) rather than httpx:
    it needs a fraction of the CPU per request, and the generator shares the cores with the
    server, so every millisecond it spends shows up in the latencies it measures."""
    return aiohttp.ClientSession(base_url=url, timeout=aiohttp.ClientTimeout(total=120),
                                 connector=aiohttp.TCPConnector(limit=connections))


def bucket_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """The upper bound of the histogram bucket holding quantile ``q`` of what was observed
    between two scrapes (cumulative ``le`` → count)."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    return next((b for b, c in zip(bounds, counts) if total and c >= q * total), math.nan)


def request_body(rng: random.Random, max_tokens: int) -> bytes:
    prompt = " ".join(f"t{rng.randrange(1, 999)}" for _ in range(rng.randint(4, 24)))
    return msgspec.json.encode({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
                                "stream": True})


async def probe_capacity(server: LiveServer, clients: int, seconds: float, max_tokens: int) -> float:
    """Requests per second that ``clients`` back-to-back clients complete (no queueing)."""
    done = 0
    deadline = time.monotonic() + seconds
    scratch = OverloadResult(engine="")

    async def loop(index: int) -> None:
        nonlocal done
        rng = random.Random(index)
        async with client_session(server.url, 1) as session:
            while time.monotonic() < deadline:
                await one_request(session, request_body(rng, max_tokens), scratch, Counter(), [])
                done += 1

    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        for index in range(clients):
            tg.start_soon(loop, index)
    return done / (time.monotonic() - started)


async def offer(server: LiveServer, result: OverloadResult, rps: float, seconds: float, max_tokens: int,
                seed: int) -> None:
    """Poisson arrivals at ``rps`` for ``seconds``, each request on its own task."""
    rng = random.Random(seed)
    statuses: Counter = Counter()
    ttfts: list[float] = []
    async with client_session(server.url, 4096) as session:

        async def watch() -> None:
            while time.monotonic() < deadline:
                await anyio.sleep(1.0)
                waiting, running = await anyio.to_thread.run_sync(
                    server.metrics, "flowserve:num_requests_waiting", "flowserve:num_requests_running")
                result.waiting_max = max(result.waiting_max, waiting)
                result.admitted_max = max(result.admitted_max, waiting + running)
                rss = server.rss() / 2**20
                result.rss_peak_mib = max(result.rss_peak_mib, rss)
                if not result.rss_half_mib and time.monotonic() >= deadline - seconds / 2:
                    result.rss_half_mib = round(rss, 1)

        first_send = time.monotonic()
        deadline = first_send + seconds
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            next_at, spawned = first_send, 0
            while next_at < deadline:
                await anyio.sleep(max(0.0, next_at - time.monotonic()))
                tg.start_soon(one_request, session, request_body(rng, max_tokens), result, statuses, ttfts)
                spawned += 1
                next_at += rng.expovariate(rps)
            # a generator short of CPU falls behind its schedule: report the rate it really sent at
            result.achieved_rps = round(spawned / (time.monotonic() - first_send), 2)
    result.statuses = {str(k): v for k, v in sorted(statuses.items())}
    result.ttft_p50, result.ttft_p90, result.ttft_p99 = (round(quantile(ttfts, q), 3) for q in (0.5, 0.9, 0.99))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=["toy", "real"], default="toy")
    parser.add_argument("--seconds", type=float, default=60.0, help="duration of the overload")
    parser.add_argument("--factor", type=float, default=3.0, help="offered load / capacity")
    parser.add_argument("--probe", type=float, default=20.0, help="seconds of the capacity probe")
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--step-delay", type=float, default=0.02, help="toy engine: seconds per step")
    parser.add_argument("--slo-ttft", type=float, default=2.0, help="the TTFT SLO (seconds, p90)")
    parser.add_argument("--rss-slack", type=float, default=0.10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="flowserve-overload-"))
    engine = engine_args(args.engine, workdir)
    if args.engine == "toy":
        engine += ["-o", f"step_delay={args.step_delay}"]
    # max_queue counts every admitted request (running and waiting): the running batch plus
    # as many waiting as the engine drains within a third of the SLO at the measured capacity
    # (the load generator shares the machine's CPU with the server: keep a margin).
    toy_rate = args.max_num_seqs / (args.max_tokens * args.step_delay) if args.engine == "toy" else None
    config = (f"max_num_seqs = {args.max_num_seqs}\nslo_ttft_seconds = {args.slo_ttft}\n"
              f"max_queue = {{max_queue}}\n")
    # First a probe server to learn the capacity, then the overload server with the queue sized for it.
    server = LiveServer([*engine, "--scaler", "static"], workdir,
                        config=config.format(max_queue=args.max_num_seqs)).wait_ready()
    result = OverloadResult(engine=args.engine, seconds=args.seconds, slo_ttft_seconds=args.slo_ttft)
    try:
        result.capacity_rps = round(anyio.run(probe_capacity, server, args.max_num_seqs, args.probe,
                                              args.max_tokens), 2)
    finally:
        server.stop()
    print(f"capacity: {result.capacity_rps} requests/s (toy estimate {toy_rate})", flush=True)
    result.max_queue = args.max_num_seqs + max(1, int(result.capacity_rps * args.slo_ttft / 3))
    result.offered_rps = round(args.factor * result.capacity_rps, 2)
    workdir2 = Path(tempfile.mkdtemp(prefix="flowserve-overload-"))
    server = LiveServer([*engine, "--scaler", "static"], workdir2,
                        config=config.format(max_queue=result.max_queue)).wait_ready()
    try:
        anyio.run(probe_capacity, server, args.max_num_seqs, min(10.0, args.probe), args.max_tokens)  # warm
        server.wait_metric_zero("flowserve:num_requests_running")
        result.rss_before_mib = round(server.rss() / 2**20, 1)
        print(f"offering {result.offered_rps} requests/s for {args.seconds} s "
              f"(max_queue {result.max_queue}, SLO TTFT p90 {args.slo_ttft} s)", flush=True)
        ttft_before = server.histogram("flowserve:time_to_first_token_seconds")
        anyio.run(offer, server, result, result.offered_rps, args.seconds, args.max_tokens, args.seed)
        result.server_ttft_p90_at_most = bucket_quantile(
            ttft_before, server.histogram("flowserve:time_to_first_token_seconds"), 0.9)
        result.running_after = server.wait_metric_zero("flowserve:num_requests_running")
        time.sleep(3)
        result.rss_after_mib = round(server.rss() / 2**20, 1)
        result.rss_peak_mib = round(result.rss_peak_mib, 1)
    finally:
        code = server.stop()
    result.checks = {
        # a load generator that cannot keep up would offer less than the factor asked for
        f"offered {result.achieved_rps} requests/s >= 95% of {result.offered_rps}":
            result.achieved_rps >= 0.95 * result.offered_rps,
        "excess refused with 429": result.rejected_429 > 0,
        "every 429 has Retry-After": result.rejected_without_retry_after == 0,
        "no other errors": result.errors == 0 and set(result.statuses) <= {"200", "429"},
        "no lost requests": result.lost == 0,
        "every request answered": result.completed + result.rejected_429 == result.sent,
        "queue limit held (running + waiting <= max_queue)": result.admitted_max <= result.max_queue,
        f"TTFT p90 {result.ttft_p90} s <= SLO {args.slo_ttft} s": result.ttft_p90 <= args.slo_ttft,
        # The engine's native caches (oneDNN primitives for each new batch shape) grow until
        # the shapes the load makes have all been seen: flat means no growth after that.
        f"RSS after within {args.rss_slack:.0%} of halfway through the overload":
            result.rss_after_mib <= result.rss_half_mib * (1 + args.rss_slack),
        "num_requests_running back to 0": result.running_after == 0,
        "SIGTERM exit status 0": code == 0,
    }
    print(json.dumps(asdict(result), indent=2))
    if args.out:
        args.out.write_text(json.dumps(asdict(result), indent=2))
    return 0 if all(result.checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
