"""The request-log observer, on an in-process deployment of the smallest installed engine."""

import logging

import msgspec
import pytest

import flowserve_request_log.plugin as request_log
from flowserve_core.testing import plugin_manager, run_deployment
from flowserve_core.types import Request, SamplingParams
from flowserve_request_log.plugin import RequestLogRecord

pytestmark = pytest.mark.anyio


async def test_the_distribution_provides_the_observer():
    pm = plugin_manager("flowserve-request-log")
    observers = {impl.plugin_name for impl in pm.hook.flowserve_request_finished.get_hookimpls()}
    # this distribution's observer, beside the kernel's built-in one (OpenTelemetry metrics)
    assert observers == {pm.pm.get_name(request_log), "flowserve_core.telemetry"}


async def test_every_finished_or_aborted_request_is_one_line_in_the_file(tiny_engine, tmp_path, monkeypatch):
    monkeypatch.delenv("FLOWSERVE_REQUEST_LOG", raising=False)
    path = tmp_path / "requests.jsonl"
    async with run_deployment(tiny_engine.spec(options={"request_log": str(path)})) as deployment:
        done = await deployment.generate([10, 11, 12], max_tokens=4, ignore_eos=True)
        request = Request(prompt_token_ids=[20, 21], params=SamplingParams(max_tokens=50, ignore_eos=True))
        async with deployment.deployment.open(request) as handle:
            async for event in handle:
                if event.token_ids:
                    break  # the client goes away: the request is aborted
    records = [msgspec.json.decode(line, type=RequestLogRecord) for line in path.read_bytes().splitlines()]
    assert [(r.request_id, r.finish_reason) for r in records] == [(done.request_id, "length"), (request.id, "abort")]
    assert (records[0].prompt_tokens, records[0].output_tokens, records[0].deployment) == (3, 4, "tiny")
    assert records[0].ttft_seconds is not None and records[0].total_seconds >= records[0].ttft_seconds
    assert records[1].prompt_tokens == 2 and 1 <= records[1].output_tokens < 50


async def test_without_a_file_records_go_to_the_log(tiny_engine, caplog, monkeypatch):
    monkeypatch.delenv("FLOWSERVE_REQUEST_LOG", raising=False)
    caplog.set_level(logging.INFO, logger="flowserve.request_log")
    async with run_deployment(tiny_engine.spec()) as deployment:
        output = await deployment.generate([5, 6], max_tokens=2, ignore_eos=True)
    [line] = [r.getMessage() for r in caplog.records if r.name == "flowserve.request_log"]
    record = msgspec.json.decode(line.removeprefix("request finished: "), type=RequestLogRecord)
    assert (record.request_id, record.finish_reason, record.output_tokens) == (output.request_id, "length", 2)
