"""Logging, OpenTelemetry traces and metrics.

Off by default, and then it costs nothing: the OpenTelemetry API's no-op providers stay in
place. ``OTEL_TRACES_EXPORTER`` / ``OTEL_METRICS_EXPORTER`` set to ``console`` or ``otlp``
(the standard variables; ``otlp`` needs ``opentelemetry-exporter-otlp``) turn them on.
``FLOWSERVE_LOG_FORMAT=json`` makes logs one JSON object per line."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics, trace

from flowserve_core.hookspecs import hookimpl
from flowserve_core.types import Request, RequestOutput

if TYPE_CHECKING:
    from flowserve_core.deployment import Deployment

tracer = trace.get_tracer("flowserve")
meter = metrics.get_meter("flowserve")
_instruments: dict[str, Any] = {}  # made once setup_telemetry installed a meter provider


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
            ttft=meter.create_histogram("flowserve.time_to_first_token", unit="s", description="TTFT"),
            e2e=meter.create_histogram("flowserve.e2e_request_latency", unit="s", description="end to end"),
            generation=meter.create_counter("flowserve.generation_tokens", unit="{token}", description="generated"),
            prompt=meter.create_counter("flowserve.prompt_tokens", unit="{token}", description="prompt"))


def request_span(request: Request, deployment: str) -> contextlib.AbstractContextManager[object]:
    """A span covering one request from admission to its last event (none while tracing is off)."""
    if not tracer_enabled():
        return contextlib.nullcontext()
    return tracer.start_as_current_span("flowserve.request", attributes={
        "flowserve.request_id": request.id, "flowserve.deployment": deployment,
        "flowserve.prompt_tokens": len(request.prompt_token_ids)})


def tracer_enabled() -> bool:
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider | trace.NoOpTracerProvider)


@hookimpl
def flowserve_request_finished(request: Request, output: RequestOutput, deployment: Deployment) -> None:
    """Record a finished request's latencies and token counts as OpenTelemetry metrics."""
    if not _instruments:
        return
    attrs = {"deployment": deployment.name, "finish_reason": output.finish_reason or "abort"}
    m = output.metrics
    if m and m.ttft is not None:
        _instruments["ttft"].record(m.ttft, attrs)
    if m and m.finished_time:
        _instruments["e2e"].record(m.finished_time - m.arrival_time, attrs)
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
