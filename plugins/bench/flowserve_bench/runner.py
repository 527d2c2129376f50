"""The load generator: ``run_benchmark(config)`` drives a server and returns a ``BenchResult``.

It is an ordinary async function (anyio on asyncio, aiohttp), so a script can run it in-process::

    import anyio
    from flowserve_bench import BenchConfig, run_benchmark

    result = anyio.run(run_benchmark, BenchConfig(url="http://127.0.0.1:8000/v1", concurrency=8))
    print(result.output_throughput, result.ttft.p99)

Every prompt and output length is decided before the run (seeded), so two runs with the same
seed send the same requests whatever the load pattern.
"""

from __future__ import annotations

import datetime
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import anyio
import msgspec

from flowserve_bench.client import PlannedRequest, api_base, client_session, first_model, send_request
from flowserve_bench.datasets import DatasetEntry, load_dataset, sample_entries, token_counter
from flowserve_bench.errors import BenchError
from flowserve_bench.lengths import LengthDistribution, parse_length
from flowserve_bench.metrics import summarize
from flowserve_bench.prompts import PromptFactory, find_vocabulary
from flowserve_bench.results import BenchConfig, BenchResult, RequestRecord

OnRequestDone = Callable[[RequestRecord], None]
Fire = Callable[[PlannedRequest], Awaitable[None]]


def validate(config: BenchConfig) -> tuple[LengthDistribution, LengthDistribution]:
    """Check the options that can be wrong; return the parsed prompt and output lengths."""
    if config.concurrency is not None and config.request_rate is not None:
        raise BenchError("give either --concurrency (closed loop) or --request-rate (open loop), not both")
    if config.concurrency is not None and config.concurrency < 1:
        raise BenchError(f"--concurrency must be at least 1, got {config.concurrency}")
    rate = config.arrival_rate
    if rate is not None and not rate > 0:
        raise BenchError(f"--request-rate must be > 0 requests/s (or inf), got {config.request_rate}")
    if config.max_concurrency is not None and config.max_concurrency < 1:
        raise BenchError(f"--max-concurrency must be at least 1, got {config.max_concurrency}")
    if config.num_requests < 1:
        raise BenchError(f"--num-requests must be at least 1, got {config.num_requests}")
    if config.warmup < 0:
        raise BenchError(f"--warmup must be >= 0, got {config.warmup}")
    if not config.timeout > 0:
        raise BenchError(f"--timeout must be > 0 seconds, got {config.timeout}")
    for name, slo in (("--slo-ttft", config.slo_ttft), ("--slo-tpot", config.slo_tpot)):
        if slo is not None and not slo >= 0:
            raise BenchError(f"{name} must be >= 0 seconds, got {slo}")
    if not config.percentiles or not all(0 <= q <= 100 for q in config.percentiles):
        raise BenchError(f"--percentiles must name percentiles between 0 and 100, got {config.percentiles}")
    if config.dataset_name == "random" and config.dataset_path is not None:
        raise BenchError("--dataset-path needs --dataset-name sharegpt or jsonl (random prompts read no file)")
    return (parse_length(config.prompt_len, what="--prompt-len"),
            parse_length(config.output_len, what="--output-len"))


def plan_requests(count: int, prompt_len: LengthDistribution, output_len: LengthDistribution,
                  prompts: PromptFactory, rng: random.Random) -> list[PlannedRequest]:
    """Draw ``count`` requests: lengths first, then each prompt."""
    planned = []
    for index in range(count):
        n_prompt, n_output = prompt_len.sample(rng), output_len.sample(rng)
        planned.append(PlannedRequest(index, prompts.make(n_prompt, rng), n_prompt, n_output))
    return planned


def plan_dataset_requests(count: int, entries: list[DatasetEntry], output_len: LengthDistribution,
                          config: BenchConfig, rng: random.Random) -> list[PlannedRequest]:
    """Draw ``count`` requests from a dataset's entries (seeded order, see ``sample_entries``);
    an entry's own output length wins unless ``config.dataset_output_len`` is off."""
    planned = []
    for index, entry in enumerate(sample_entries(entries, count, rng)):
        drawn = output_len.sample(rng)  # drawn always, so the sequence does not depend on the entries
        n_output = entry.output_len if config.dataset_output_len and entry.output_len else drawn
        if entry.messages is not None and config.endpoint != "chat":
            raise BenchError(f"the dataset {config.dataset_path} holds chat messages: run it with --endpoint chat")
        planned.append(PlannedRequest(index, entry.text or "", 0, n_output, messages=entry.messages))
    return planned


async def closed_loop(planned: Sequence[PlannedRequest], concurrency: int, fire: Fire) -> None:
    """``concurrency`` clients, each sending its next request once its last one finished."""
    queue = iter(planned)  # shared: each client takes the next request not yet sent

    async def client() -> None:
        for request in queue:
            await fire(request)

    async with anyio.create_task_group() as tg:
        for _ in range(min(concurrency, len(planned))):
            tg.start_soon(client)


async def open_loop(planned: Sequence[PlannedRequest], rate: float, max_concurrency: int | None,
                    fire: Fire, rng: random.Random) -> None:
    """Poisson arrivals at ``rate`` requests/s (all at once when infinite); at most
    ``max_concurrency`` in flight, later arrivals waiting for a slot."""
    slots = anyio.Semaphore(max_concurrency) if max_concurrency else None

    async def arrive(request: PlannedRequest) -> None:
        if slots is None:
            await fire(request)
            return
        async with slots:
            await fire(request)

    async with anyio.create_task_group() as tg:
        next_arrival = anyio.current_time()
        for position, request in enumerate(planned):
            if position and math.isfinite(rate):
                next_arrival += rng.expovariate(rate)
                await anyio.sleep_until(next_arrival)
            tg.start_soon(arrive, request)


async def run_benchmark(config: BenchConfig, *, on_request_done: OnRequestDone | None = None,
                        show_progress: bool = False) -> BenchResult:
    """Run ``config`` against its server and return the results.

    :param config: what to run (see ``BenchConfig``).
    :param on_request_done: called with each measured request's record as it finishes
        (warm-up requests excluded), e.g. to drive a progress bar.
    :param show_progress: draw a rich progress bar on stderr.
    :raises BenchError: for a bad option, or a model that cannot be found. Failed requests
        never raise: they are counted in the result.
    """
    prompt_len, output_len = validate(config)
    base = api_base(config.url)
    async with client_session(config) as client:
        model = config.model or await first_model(client, base)
        if config.dataset_name == "random":
            vocabulary = await anyio.to_thread.run_sync(find_vocabulary, config.tokenizer, model)
            prompts = PromptFactory(vocabulary, config.endpoint)
            prompt_source = prompts.description
            planned = plan_requests(config.num_requests, prompt_len, output_len, prompts,
                                    random.Random(f"requests:{config.seed}"))
            warmup = plan_requests(config.warmup, prompt_len, output_len, prompts,
                                   random.Random(f"warmup:{config.seed}"))
        else:
            tokenizer = config.tokenizer or (model if Path(model).expanduser().exists() else None)
            count_tokens = await anyio.to_thread.run_sync(token_counter, tokenizer)
            entries = await anyio.to_thread.run_sync(load_dataset, config.dataset_name, config.dataset_path,
                                                     count_tokens)
            prompt_source = (f"dataset: {config.dataset_name} {config.dataset_path} ({len(entries)} prompts); "
                             "prompt tokens counted by the server")
            planned = plan_dataset_requests(config.num_requests, entries, output_len, config,
                                            random.Random(f"requests:{config.seed}"))
            warmup = plan_dataset_requests(config.warmup, entries, output_len, config,
                                           random.Random(f"warmup:{config.seed}"))
        url = f"{base}/chat/completions" if config.endpoint == "chat" else f"{base}/completions"

        warmup_failed = 0
        if warmup:
            async def fire_warmup(request: PlannedRequest) -> None:
                nonlocal warmup_failed
                record = await send_request(client, url, config, model, request, time.perf_counter())
                warmup_failed += not record.ok

            await closed_loop(warmup, config.concurrency or config.max_concurrency or 1, fire_warmup)

        records: list[RequestRecord] = []
        progress = _progress_bar(config.num_requests, config.label) if show_progress else None
        run_start = time.perf_counter()

        async def fire(request: PlannedRequest) -> None:
            record = await send_request(client, url, config, model, request, run_start)
            records.append(record)
            if progress is not None:
                progress(record)
            if on_request_done is not None:
                on_request_done(record)

        started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        try:
            rate = config.arrival_rate
            if rate is None:
                await closed_loop(planned, config.concurrency or 1, fire)
            else:
                await open_loop(planned, rate, config.max_concurrency, fire,
                                random.Random(f"arrivals:{config.seed}"))
        finally:
            if progress is not None:
                progress(None)
        duration = time.perf_counter() - run_start
    if config.api_key:  # results files get shared; the key must not travel with them
        config = msgspec.structs.replace(config, api_key="***")
    return summarize(config=config, model=model, url=base, started_at=started_at,
                     prompt_source=prompt_source, records=records, duration=duration,
                     warmup_failed=warmup_failed)


def _progress_bar(total: int, label: str | None) -> Callable[[RequestRecord | None], None]:
    """A rich progress bar on stderr, advanced per record; called with None to close it."""
    from flowserve_bench.report import RequestProgress

    bar = RequestProgress(total, label)
    bar.start()

    def update(record: RequestRecord | None) -> None:
        if record is None:
            bar.stop()
        else:
            bar.advance(record)

    return update
