"""Observer: one JSON line per finished request, from the ``flowserve_request_finished`` hook.

The line goes to the file named by the deployment option ``request_log`` (``-o
request_log=PATH``) or ``FLOWSERVE_REQUEST_LOG``, else to the logger ``flowserve.request_log``
at INFO. The hook runs once per request on the server's event loop: it appends one line.
"""

from __future__ import annotations

import logging
import os

import msgspec

from flowserve_core import hookimpl
from flowserve_core.deployment import Deployment
from flowserve_core.types import Request, RequestOutput

log = logging.getLogger("flowserve.request_log")


class RequestLogRecord(msgspec.Struct, kw_only=True):
    """One finished request: who served it, how it ended, its token counts and latencies."""

    request_id: str
    deployment: str
    finish_reason: str
    error: str | None = None
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    ttft_seconds: float | None
    total_seconds: float | None


@hookimpl
def flowserve_request_finished(request: Request, output: RequestOutput, deployment: Deployment) -> None:
    """Write ``output``'s record (a request that ended without a reason was aborted)."""
    metrics = output.metrics
    record = RequestLogRecord(
        request_id=request.id, deployment=deployment.name, finish_reason=output.finish_reason or "abort",
        error=output.error, prompt_tokens=len(request.prompt_token_ids), cached_tokens=output.num_cached_tokens,
        output_tokens=len(output.output_token_ids), ttft_seconds=metrics.ttft if metrics else None,
        total_seconds=metrics.finished_time - metrics.arrival_time if metrics and metrics.finished_time else None)
    path = deployment.spec.options.get("request_log") or os.environ.get("FLOWSERVE_REQUEST_LOG")
    if path:
        with open(str(path), "ab") as out:
            out.write(msgspec.json.encode(record) + b"\n")
    else:
        log.info("request finished: %s", msgspec.json.encode(record).decode(), extra={"request_id": request.id})
