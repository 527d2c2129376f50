"""Telemetry: a span per request (GenAI semantic conventions) with its job and task spans,
and request metrics through OpenTelemetry (the conventions' ``gen_ai.server.*`` names),
exported where the standard ``OTEL_*`` variables say; with none set, nothing is installed.
(plugins/openai/tests/test_tracing.py follows a caller's traceparent through a live server.)

Each case runs in a fresh interpreter, because OpenTelemetry's global providers can be set
only once per process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

# Serves three requests on the toy components, then prints what the kernel's telemetry holds.
SCRIPT = textwrap.dedent("""
    import json, anyio
    from opentelemetry import metrics, trace
    from flowserve_core import telemetry
    from flowserve_core.deployment import Deployment
    from flowserve_core.plugins import PluginManager
    from flowserve_core.types import Request, SamplingParams
    from flowserve_test_fixtures import toy_spec

    async def main():
        telemetry.setup_telemetry()
        deployment = Deployment(toy_spec(), PluginManager())
        async with anyio.create_task_group() as tg:
            await tg.start(deployment.run)
            for first in (10, 20, 30):
                request = Request(prompt_token_ids=[first, first], params=SamplingParams(max_tokens=4))
                async with deployment.open(request) as handle:
                    async for _ in handle:
                        pass
            tg.cancel_scope.cancel()
        print("RESULT " + json.dumps({
            "tracing": telemetry.tracer_enabled(),
            "tracer_provider": type(trace.get_tracer_provider()).__name__,
            "meter_provider": type(metrics.get_meter_provider()).__name__,
            "instruments": sorted(telemetry._instruments)}), flush=True)
        provider = trace.get_tracer_provider()
        if hasattr(provider, "shutdown"):
            provider.shutdown()  # flushes the batched spans to the console exporter
        provider = metrics.get_meter_provider()
        if hasattr(provider, "shutdown"):
            provider.shutdown()  # one last metrics export

    anyio.run(main)
""")


def run(**env: str) -> tuple[dict, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env={**clean, **env}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):]), done.stdout + done.stderr


def test_without_otel_variables_nothing_is_installed_and_no_instrument_is_made():
    result, out = run()
    assert result["tracing"] is False
    assert result["tracer_provider"] in ("ProxyTracerProvider", "NoOpTracerProvider")
    assert result["meter_provider"] in ("_ProxyMeterProvider", "NoOpMeterProvider")
    assert result["instruments"] == []
    assert "text_completion toy" not in out and "gen_ai" not in out


def test_console_exporters_get_a_span_per_request_and_the_request_metrics():
    result, out = run(OTEL_TRACES_EXPORTER="console", OTEL_METRICS_EXPORTER="console",
                      OTEL_SERVICE_NAME="flowserve-test")
    assert result["tracing"] is True and result["tracer_provider"] == "TracerProvider"
    assert result["meter_provider"] == "MeterProvider"
    assert result["instruments"] == ["duration", "generation", "prompt", "tpot", "ttft"]
    blocks = [b for b in map(json.loads, _json_blocks(out)) if "context" in b and "name" in b]  # the spans
    spans = [s for s in blocks if s["name"] == "text_completion toy"]  # no frontend: the kernel's operation
    assert len(spans) == 3
    assert {s["attributes"]["gen_ai.usage.input_tokens"] for s in spans} == {2}
    assert {s["attributes"]["gen_ai.usage.output_tokens"] for s in spans} == {4}
    assert {s["attributes"]["gen_ai.request.max_tokens"] for s in spans} == {4}
    assert {s["attributes"]["gen_ai.request.model"] for s in spans} == {"toy"}
    assert {tuple(s["attributes"]["gen_ai.response.finish_reasons"]) for s in spans} == {("length",)}
    assert len({s["attributes"]["gen_ai.response.id"] for s in spans}) == 3
    assert spans[0]["resource"]["attributes"]["service.name"] == "flowserve-test"
    # under each request span its job (task spans come from the job schedulers that open them:
    # colocated's and the PD ones, not the toy least-tasks scheduler of these tests)
    jobs = [s for s in blocks if s["name"] == "flowserve.job"]
    assert sorted(j["parent_id"] for j in jobs) == sorted(s["context"]["span_id"] for s in spans)
    # the metrics export: 3 requests of 2 prompt and 4 generated tokens each
    exported = json.loads(next(b for b in _json_blocks(out) if '"resource_metrics"' in b))
    points = {m["name"]: m["data"]["data_points"]
              for rm in exported["resource_metrics"] for sm in rm["scope_metrics"] for m in sm["metrics"]}
    assert sum(p["value"] for p in points["flowserve.generation_tokens"]) == 12
    assert sum(p["value"] for p in points["flowserve.prompt_tokens"]) == 6
    assert sum(p["count"] for p in points["gen_ai.server.time_to_first_token"]) == 3
    assert sum(p["count"] for p in points["gen_ai.server.request.duration"]) == 3
    assert sum(p["count"] for p in points["gen_ai.server.time_per_output_token"]) == 3
    assert points["flowserve.generation_tokens"][0]["attributes"] == {
        "gen_ai.operation.name": "text_completion", "gen_ai.provider.name": "flowserve",
        "gen_ai.request.model": "toy", "gen_ai.response.model": "toy"}


def test_an_exporter_that_is_not_installed_is_named_and_telemetry_stays_off():
    result, out = run(OTEL_TRACES_EXPORTER="no-such-exporter")
    assert result["tracing"] is False
    assert "OTEL_TRACES_EXPORTER=no-such-exporter: no such exporter is installed" in out


def _json_blocks(text: str) -> list[str]:
    """The top-level JSON objects printed one after another (the console exporters indent them)."""
    blocks, depth, start = [], 0, None
    for i, ch in enumerate(text):
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
            if depth == 0:
                blocks.append(text[start:i + 1])
    return blocks

