"""Traces on a live server: a call carrying a W3C ``traceparent`` yields FlowServe's request
span as a child in the caller's trace, with the GenAI semantic conventions' attributes, a
job span under it, and under that the prefill and decode task spans (PD-disaggregated), each
naming the instance that ran it; with a real model, whose KV moves from the prefill instance
to the decode instance, the decode task has a KV-transfer span.

The server is ``flowserve serve`` in a subprocess started through a small launcher that
installs OpenTelemetry's in-memory exporter before the CLI runs, and writes what it holds
to a file when the server exits.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
from openai_live import LiveServer, serve_command

LAUNCHER = textwrap.dedent("""
    import atexit, json, sys
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    out_path = sys.argv[1]
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)

    def dump():
        spans = [{"name": s.name, "trace_id": f"{s.context.trace_id:032x}", "span_id": f"{s.context.span_id:016x}",
                  "parent_id": f"{s.parent.span_id:016x}" if s.parent else None,
                  "parent_remote": bool(s.parent and s.parent.is_remote), "kind": s.kind.name,
                  "attributes": dict(s.attributes)} for s in exporter.get_finished_spans()]
        with open(out_path, "w") as out:
            json.dump(spans, out, default=list)

    atexit.register(dump)
    from flowserve_core.cli import main
    sys.argv = ["flowserve", *sys.argv[2:]]
    main()
""")
CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"
PD = ["--kv-cache", "paged", "--batch-scheduler", "continuous", "--job-scheduler", "pd-disaggregated",
      "--prefill-instances", "1", "--decode-instances", "1"]


def traced(command: list[str], tmp_path: Path) -> tuple[LiveServer, Path]:
    """``command`` (a ``flowserve serve`` line) run through the launcher; the spans' file."""
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    spans_file = tmp_path / "spans.json"
    command = [sys.executable, str(launcher), str(spans_file), *command[command.index("serve"):]]
    return LiveServer(command, tmp_path / "server.log").wait_listening(timeout=180).wait_ready(timeout=180), spans_file


def test_a_traceparent_makes_the_request_a_child_with_job_and_task_spans_under_it(tmp_path: Path):
    server, spans_file = traced(serve_command(*PD), tmp_path)
    try:
        client = server.client()
        traceparent = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
        chat = client.chat.completions.create(
            model="toy", messages=[{"role": "user", "content": "t1 t2 t3"}], max_tokens=4, temperature=0.5,
            extra_headers={"traceparent": traceparent})
        completion = client.completions.create(model="toy", prompt="t4 t5", max_tokens=3)  # no trace context
    finally:
        assert server.stop() == 0, server.log()[-3000:]
    spans = json.loads(spans_file.read_text())
    by_id = {s["span_id"]: s for s in spans}

    (request,) = [s for s in spans if s["name"] == "chat toy"]
    assert request["trace_id"] == CALLER_TRACE and request["parent_id"] == CALLER_SPAN
    assert request["parent_remote"] and request["kind"] == "SERVER"
    attributes = request["attributes"]
    assert attributes["gen_ai.operation.name"] == "chat" and attributes["gen_ai.provider.name"] == "flowserve"
    assert attributes["gen_ai.request.model"] == attributes["gen_ai.response.model"] == "toy"
    assert attributes["gen_ai.request.max_tokens"] == 4 and attributes["gen_ai.request.temperature"] == 0.5
    assert attributes["gen_ai.usage.output_tokens"] == chat.usage.completion_tokens == 4
    assert attributes["gen_ai.usage.input_tokens"] == chat.usage.prompt_tokens
    assert attributes["gen_ai.response.finish_reasons"] == ["length"]

    (job,) = [s for s in spans if s["name"] == "flowserve.job" and s["parent_id"] == request["span_id"]]
    assert job["trace_id"] == CALLER_TRACE and job["attributes"]["flowserve.job.tasks"] == ["prefill", "decode"]
    tasks = {s["name"]: s for s in spans if s["parent_id"] == job["span_id"]}
    assert set(tasks) == {"flowserve.prefill", "flowserve.decode"}
    for role, task in tasks.items():
        assert task["attributes"]["flowserve.instance.role"] == role.split(".")[1]
        assert task["attributes"]["flowserve.instance.id"] and task["attributes"]["flowserve.job.id"]
    assert tasks["flowserve.prefill"]["attributes"]["flowserve.instance.id"] != \
        tasks["flowserve.decode"]["attributes"]["flowserve.instance.id"]
    assert not [s for s in spans if s["name"] == "flowserve.kv_transfer"]  # the toy engine moves no KV

    # without a traceparent the request starts a trace of its own, named as a completion
    (plain,) = [s for s in spans if s["name"] == "text_completion toy"]
    assert plain["parent_id"] is None and plain["trace_id"] != CALLER_TRACE
    assert plain["attributes"]["gen_ai.usage.output_tokens"] == completion.usage.completion_tokens == 3
    assert all(by_id.get(s["parent_id"]) or s["parent_id"] in (None, CALLER_SPAN) for s in spans)


def test_the_decode_task_of_a_real_model_has_a_kv_transfer_span(tmp_path: Path):
    pytest.importorskip("flowserve_spmd_executor")
    from flowserve_testing import write_tiny_llama

    model = write_tiny_llama(tmp_path / "tiny-llama", num_hidden_layers=2, seed=9)
    command = ["flowserve", "serve", "--host", "127.0.0.1", "--port", "0", "--model", str(model),
               "--served-model-name", "tiny", "--tokenizer", "hf", "--executor", "spmd", "--scaler", "static",
               "--dtype", "float32", "--device", "cpu", "--kv-cache-memory", "16MiB", *PD]
    server, spans_file = traced(command, tmp_path)
    try:
        answer = server.client().completions.create(
            model="tiny", prompt=list(range(5, 60)), max_tokens=4, temperature=0,
            extra_headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"})
    finally:
        assert server.stop() == 0, server.log()[-3000:]
    spans = json.loads(spans_file.read_text())
    (request,) = [s for s in spans if s["parent_id"] == CALLER_SPAN]
    assert request["name"] == "text_completion tiny" and request["trace_id"] == CALLER_TRACE
    assert request["attributes"]["gen_ai.usage.input_tokens"] == answer.usage.prompt_tokens == 55
    (job,) = [s for s in spans if s["parent_id"] == request["span_id"]]
    decode = next(s for s in spans if s["name"] == "flowserve.decode" and s["parent_id"] == job["span_id"])
    (transfer,) = [s for s in spans if s["name"] == "flowserve.kv_transfer" and s["parent_id"] == decode["span_id"]]
    attributes = transfer["attributes"]
    assert attributes["flowserve.instance.id"] == decode["attributes"]["flowserve.instance.id"]
    assert attributes["flowserve.instance.role"] == "decode" and attributes["flowserve.kv.transport"] == "shm"
    assert attributes["flowserve.kv.tokens"] == 55 and attributes["flowserve.kv.bytes"] > 0
