"""Logging, OpenTelemetry traces and metrics.

Off by default, and then it costs nothing: the OpenTelemetry API's no-op providers stay in
place. ``OTEL_TRACES_EXPORTER`` / ``OTEL_METRICS_EXPORTER`` set to ``console`` or ``otlp``
(the standard variables; ``otlp`` needs ``opentelemetry-exporter-otlp``) turn them on.
``FLOWSERVE_LOG_FORMAT=json`` makes logs one JSON object per line.

Traces follow OpenTelemetry's GenAI semantic conventions: a request span named
``{gen_ai.operation.name} {gen_ai.request.model}`` with ``gen_ai.*`` attributes, under it a
``flowserve.job`` span, and under that one span per task (``flowserve.prefill``,
``flowserve.decode``, ``flowserve.colocated``, and ``flowserve.kv_transfer`` in a decode task
that imports a prefill's KV) naming the instance that ran it. A frontend wraps each incoming
call in ``incoming_call(headers, operation)``, so a W3C ``traceparent`` makes the request span
a child in the caller's trace. Metrics use the conventions' names where they define one
(``gen_ai.server.time_to_first_token``, ``gen_ai.server.request.duration``,
``gen_ai.server.time_per_output_token``)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context, metrics, propagate, trace

from flowserve_core.hookspecs import hookimpl
from flowserve_core.types import InstanceInfo, Job, Request, RequestOutput, Task, TaskRole

if TYPE_CHECKING:
    from flowserve_core.deployment import Deployment

tracer = trace.get_tracer("flowserve")
meter = metrics.get_meter("flowserve")
_instruments: dict[str, Any] = {}  # made once setup_telemetry installed a meter provider
#: the GenAI operation of the call being served (``chat``, ``text_completion``), set by the frontend
_OPERATION = otel_context.create_key("flowserve.gen_ai.operation")
PROVIDER = "flowserve"  # gen_ai.provider.name: the server answering, as the conventions let a server say


def _exporter(signal: str) -> Any:
    """The exporter ``OTEL_{SIGNAL}_EXPORTER`` names, found as the OpenTelemetry SDK finds it:
    by entry point (``console`` ships with the SDK, ``otlp`` with opentelemetry-exporter-otlp)."""
    variable = f"OTEL_{signal.upper()}_EXPORTER"
    name = os.environ.get(variable, "none").lower()
    found = importlib.metadata.entry_points(group=f"opentelemetry_{signal}_exporter", name=name)
    if name != "none" and not found:
        logging.getLogger(__name__).warning("%s=%s: no such exporter is installed (otlp: pip install "
                                            "opentelemetry-exporter-otlp)", variable, name)
    return next(iter(found)).load()() if found else None


def setup_telemetry(service_name: str = "flowserve") -> None:
    """Install SDK providers for whichever exporters the OTEL_* variables ask for."""
    global tracer, meter
    from opentelemetry.sdk.resources import Resource

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    if span_exporter := _exporter("traces"):
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider(resource=resource)
        provider.add_span_processor(BatchSpanProcessor(span_exporter))
        trace.set_tracer_provider(provider)
        tracer = trace.get_tracer("flowserve")
    if metric_exporter := _exporter("metrics"):
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        metrics.set_meter_provider(MeterProvider(
            resource=resource, metric_readers=[PeriodicExportingMetricReader(metric_exporter)]))
        meter = metrics.get_meter("flowserve")
        _instruments.update(
            ttft=meter.create_histogram("gen_ai.server.time_to_first_token", unit="s",
                                        description="Time to generate the first token"),
            duration=meter.create_histogram("gen_ai.server.request.duration", unit="s",
                                            description="Time from the request's arrival to its last token"),
            tpot=meter.create_histogram("gen_ai.server.time_per_output_token", unit="s",
                                        description="Time per output token after the first, per request"),
            generation=meter.create_counter("flowserve.generation_tokens", unit="{token}", description="generated"),
            prompt=meter.create_counter("flowserve.prompt_tokens", unit="{token}", description="prompt"))


def tracer_enabled() -> bool:
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider | trace.NoOpTracerProvider)


@contextlib.contextmanager
def incoming_call(headers: Mapping[str, str], operation: str) -> Iterator[None]:
    """Serve one incoming call inside this: the W3C trace context of its ``headers``
    (``traceparent``, ``tracestate``) becomes the parent of the request spans it opens, and
    ``operation`` (a ``gen_ai.operation.name``: ``chat``, ``text_completion``) names them.
    Does nothing while tracing is off. Frontends call it; ``headers`` keys are lower case."""
    if not tracer_enabled():
        yield
        return
    ctx = otel_context.set_value(_OPERATION, operation, propagate.extract(headers))
    token = otel_context.attach(ctx)
    try:
        yield
    finally:
        otel_context.detach(token)


def _operation() -> str:
    value = otel_context.get_value(_OPERATION)
    return value if isinstance(value, str) else "text_completion"  # the kernel's own view: tokens in, tokens out


def request_span(request: Request, deployment: str) -> contextlib.AbstractContextManager[object]:
    """A span covering one request from admission to its last event (none while tracing is off),
    with the GenAI conventions' request attributes; ``flowserve_request_finished`` adds the
    response's."""
    if not tracer_enabled():
        return contextlib.nullcontext()
    params, operation = request.params, _operation()
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": operation, "gen_ai.provider.name": PROVIDER,
        "gen_ai.request.model": request.model or deployment, "gen_ai.response.id": request.id,
        "gen_ai.request.temperature": params.temperature, "gen_ai.request.top_p": params.top_p,
        "gen_ai.request.frequency_penalty": params.frequency_penalty,
        "gen_ai.request.presence_penalty": params.presence_penalty,
        "flowserve.deployment": deployment, "flowserve.request_id": request.id,
    }
    if params.max_tokens is not None:
        attributes["gen_ai.request.max_tokens"] = params.max_tokens
    if params.top_k > 0:
        attributes["gen_ai.request.top_k"] = params.top_k
    if params.seed is not None:
        attributes["gen_ai.request.seed"] = params.seed
    if params.stop:
        attributes["gen_ai.request.stop_sequences"] = list(params.stop)
    return tracer.start_as_current_span(f"{operation} {request.model or deployment}",
                                        kind=trace.SpanKind.SERVER, attributes=attributes)


def job_span(job: Job, deployment: str) -> contextlib.AbstractContextManager[object]:
    """A span around a job scheduler running ``job`` (none while tracing is off)."""
    if not tracer_enabled():
        return contextlib.nullcontext()
    return tracer.start_as_current_span("flowserve.job", attributes={
        "flowserve.job.id": job.id, "flowserve.deployment": deployment,
        "flowserve.job.tasks": [task.role.value for task in job.tasks]})


def task_span(task: Task, instance: InstanceInfo) -> contextlib.AbstractContextManager[object]:
    """A span around ``task`` running on ``instance``, named by the task's role
    (``flowserve.prefill``, ``flowserve.decode``, ``flowserve.colocated``); job schedulers
    open it where they submit a task. None while tracing is off."""
    if not tracer_enabled():
        return contextlib.nullcontext()
    return tracer.start_as_current_span(f"flowserve.{task.role.value}", attributes={
        "flowserve.task.id": task.id, "flowserve.task.role": task.role.value, "flowserve.job.id": task.job_id,
        **_instance_attributes(instance)})


def kv_transfer_span(task: Task, instance: InstanceInfo) -> contextlib.AbstractContextManager[object]:
    """A span from submitting a decode ``task`` that carries a prefill's KV handoff to
    ``instance`` until its first event: the import of the KV, then the instance's first step.
    None while tracing is off or when ``task`` has no handoff."""
    handoff = task.kv_handoff
    if task.role is not TaskRole.DECODE or handoff is None or not tracer_enabled():
        return contextlib.nullcontext()  # a prefill's handoff says what to export: nothing comes in
    return tracer.start_as_current_span("flowserve.kv_transfer", attributes={
        "flowserve.task.id": task.id, "flowserve.kv.transport": handoff.transport,
        "flowserve.kv.tokens": handoff.num_tokens, "flowserve.kv.first_block": handoff.first_block,
        "flowserve.kv.bytes": handoff.nbytes, **_instance_attributes(instance)})


def _instance_attributes(instance: InstanceInfo) -> dict[str, Any]:
    attributes: dict[str, Any] = {"flowserve.instance.id": instance.id, "flowserve.instance.role": instance.role.value,
                                  "flowserve.instance.start_path": instance.start_path}
    if instance.pid is not None:
        attributes["flowserve.instance.pid"] = instance.pid
    return attributes


@hookimpl
def flowserve_request_finished(request: Request, output: RequestOutput, deployment: Deployment) -> None:
    """Put the response's GenAI attributes on the request span (the current span here) and
    record its latencies and token counts as OpenTelemetry metrics."""
    reason = output.finish_reason or "abort"
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes({"gen_ai.response.model": deployment.name, "gen_ai.response.finish_reasons": [reason],
                             "gen_ai.usage.input_tokens": output.num_prompt_tokens or len(request.prompt_token_ids),
                             "gen_ai.usage.output_tokens": len(output.output_token_ids)})
        if output.num_cached_tokens:
            span.set_attribute("gen_ai.usage.cache_read.input_tokens", output.num_cached_tokens)
        if reason == "error":
            span.set_attribute("error.type", "engine_error")
            span.set_status(trace.Status(trace.StatusCode.ERROR, output.error or "the request failed"))
    if not _instruments:
        return
    attrs = {"gen_ai.operation.name": _operation(), "gen_ai.provider.name": PROVIDER,
             "gen_ai.request.model": request.model or deployment.name, "gen_ai.response.model": deployment.name}
    if reason == "error":
        attrs["error.type"] = "engine_error"
    m = output.metrics
    if m and m.ttft is not None:
        _instruments["ttft"].record(m.ttft, attrs)
    if m and m.finished_time:
        _instruments["duration"].record(m.finished_time - m.arrival_time, attrs)
        if m.first_token_time is not None and len(output.output_token_ids) > 1:
            _instruments["tpot"].record((m.finished_time - m.first_token_time) / (len(output.output_token_ids) - 1),
                                        attrs)
    _instruments["generation"].add(len(output.output_token_ids), attrs)
    _instruments["prompt"].add(output.num_prompt_tokens, attrs)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any ``extra`` fields."""

    _standard = set(vars(logging.makeLogRecord({})))

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
                 "level": record.levelname.lower(), "logger": record.name,
                 "message": record.getMessage()}
        entry.update({k: v for k, v in vars(record).items() if k not in self._standard})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(level: str = "info") -> None:
    """Structured logs: rich for a terminal, JSON lines when FLOWSERVE_LOG_FORMAT=json."""
    handler: logging.Handler
    if os.environ.get("FLOWSERVE_LOG_FORMAT") == "json" or not sys.stderr.isatty():
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
    else:
        from rich.logging import RichHandler
        handler = RichHandler(rich_tracebacks=True, show_path=False)
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
