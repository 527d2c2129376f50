"""The records of a benchmark: its configuration, one record per request, the summary.

All times are in seconds; throughputs per second. A results file is ``BenchResult`` as JSON
(``msgspec.json.decode(data, type=BenchResult)`` reads it back).
"""

from __future__ import annotations

import math
from typing import Literal

import msgspec

Endpoint = Literal["completions", "chat"]
DatasetName = Literal["random", "sharegpt", "jsonl"]


class BenchConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What to run: the target, the load pattern, the request shapes, the SLOs.

    Load: ``concurrency`` N runs a closed loop (N clients, each sending its next request when
    the previous one finished); ``request_rate`` R runs an open loop (Poisson arrivals at R
    requests/s; ``"inf"`` or ``math.inf`` sends all at once), optionally capped by
    ``max_concurrency`` requests in flight. Neither given means ``concurrency=1``.

    ``prompt_len`` and ``output_len`` are length specs: ``"128"``, ``"uniform:64:256"`` or
    ``"mix:0.2@1500,0.8@100"`` (see ``flowserve_bench.lengths``).

    Prompts are synthetic (``dataset_name="random"``, vLLM's name for them) or come from the
    file ``dataset_path``: ShareGPT JSON or JSONL (see ``flowserve_bench.datasets``); then an
    entry's own output length wins over ``output_len`` unless ``dataset_output_len`` is off.
    ``percentiles`` are those reported (``p99_ttft_ms`` and kin), numpy's definition.
    """

    url: str
    model: str | None = None
    api_key: str | None = None
    endpoint: Endpoint = "completions"
    concurrency: int | None = None
    request_rate: float | Literal["inf"] | None = None
    max_concurrency: int | None = None
    num_requests: int = 100
    prompt_len: str = "128"
    output_len: str = "128"
    seed: int = 0
    ignore_eos: bool = True
    temperature: float = 0.0
    slo_ttft: float | None = None
    slo_tpot: float | None = None
    warmup: int = 0
    timeout: float = 300.0
    tokenizer: str | None = None
    label: str | None = None
    dataset_name: DatasetName = "random"
    dataset_path: str | None = None
    dataset_output_len: bool = True
    percentiles: list[float] = msgspec.field(default_factory=lambda: [50.0, 90.0, 99.0])

    def __post_init__(self) -> None:
        # JSON has no infinity (msgspec would write null): keep "inf" as a word.
        if isinstance(self.request_rate, float) and math.isinf(self.request_rate):
            self.request_rate = "inf"

    @property
    def arrival_rate(self) -> float | None:
        """``request_rate`` as a number (``math.inf`` for ``"inf"``); None in a closed loop."""
        return math.inf if self.request_rate == "inf" else self.request_rate

    @property
    def load_description(self) -> str:
        """The load pattern in words, e.g. ``closed loop, concurrency 8``."""
        if self.request_rate is None:
            return f"closed loop, concurrency {self.concurrency or 1}"
        rate = "all at once" if self.request_rate == "inf" else f"Poisson {self.request_rate:g} req/s"
        cap = f", max concurrency {self.max_concurrency}" if self.max_concurrency else ""
        return f"open loop, {rate}{cap}"


class RequestError(msgspec.Struct):
    """Why a request failed: ``status`` is the HTTP status as text (``"404"``) or what went
    wrong before one arrived (``"connect"``, ``"timeout"``, ``"protocol"``, ``"stream"``)."""

    status: str
    message: str


class RequestRecord(msgspec.Struct, kw_only=True):
    """One request as the client saw it.

    ``start`` is when it was sent, relative to the start of the run. ``ttft`` is the time to
    the first chunk carrying text; ``itl`` holds the gap before each later chunk carrying
    text; ``tpot`` is ``(e2e - ttft) / (output_tokens - 1)`` (None with one output token).
    ``prompt_tokens`` and ``output_tokens`` come from the server's ``usage`` when it sent one.
    """

    index: int
    start: float
    requested_prompt_tokens: int
    requested_output_tokens: int
    prompt_tokens: int | None = None
    output_tokens: int = 0
    ttft: float | None = None
    tpot: float | None = None
    e2e: float | None = None
    itl: list[float] = []
    finish_reason: str | None = None
    error: RequestError | None = None

    @property
    def ok(self) -> bool:
        """Whether the request completed without error."""
        return self.error is None


class LatencySummary(msgspec.Struct):
    """Distribution of one latency over the completed requests (None when there is none).

    ``p50``, ``p90`` and ``p99`` are always there; ``percentiles`` holds the run's
    ``BenchConfig.percentiles``, keyed as vLLM names them (``"99"``, ``"99.9"``). ``std`` is
    the population standard deviation. Percentiles are numpy's (``flowserve_bench.stats``).
    """

    count: int = 0
    mean: float | None = None
    median: float | None = None
    std: float | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    min: float | None = None
    max: float | None = None
    percentiles: dict[str, float] = {}


class ErrorSummary(msgspec.Struct):
    """Failed requests grouped by status, with the first message seen."""

    status: str
    count: int
    message: str


class BenchResult(msgspec.Struct, kw_only=True):
    """The outcome of a run: counts, throughputs, latency distributions, goodput, every
    request, and the configuration that produced them.

    ``duration`` runs from the first request sent to the last one finished (warm-up
    excluded). Throughputs count completed requests only. ``goodput`` is the rate of
    completed requests meeting every SLO set (TTFT ≤ ``slo_ttft``, TPOT ≤ ``slo_tpot``; a
    one-token output has no TPOT and meets it); ``goodput_fraction`` is their share of all
    requests. Both are None when no SLO is set.
    """

    label: str | None
    model: str
    url: str
    endpoint: Endpoint
    started_at: str
    config: BenchConfig
    prompt_source: str
    duration: float
    num_requests: int
    completed: int
    failed: int
    errors: list[ErrorSummary]
    warmup_failed: int = 0
    total_prompt_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    ttft: LatencySummary
    tpot: LatencySummary
    itl: LatencySummary
    e2e: LatencySummary
    good_requests: int | None = None
    goodput: float | None = None
    goodput_fraction: float | None = None
    requests: list[RequestRecord] = []

    def to_json(self) -> bytes:
        """The results file's content (indented JSON)."""
        return msgspec.json.format(msgspec.json.encode(self), indent=2)

    @classmethod
    def from_json(cls, data: bytes | str) -> BenchResult:
        """Read back ``to_json``'s output, or a results file (``vLLM``'s keys with this result
        under ``"flowserve"``, as ``flowserve bench --result-file`` writes it)."""
        wrapped = msgspec.json.decode(data, type=_ResultFile)
        if wrapped.flowserve is not None:
            return wrapped.flowserve
        return msgspec.json.decode(data, type=cls)


class _ResultFile(msgspec.Struct):
    """A results file as written (see ``flowserve_bench.vllm_format``): only the key we read."""

    flowserve: BenchResult | None = None
