"""Operational endpoints: ``/health`` (liveness), ``/ready`` (readiness), ``/metrics``
(Prometheus) and ``/openapi.json``. None of them needs a key."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from flowserve_openai.context import AppContext
from flowserve_openai.ops_protocol import HealthResponse
from flowserve_openai.responses import json_response

SERVING = ("ready", "scaled-to-zero")


def _ctx(request: Request) -> AppContext:
    return request.app.state.flowserve


def _states(ctx: AppContext) -> dict:
    return {name: ctx.health.health(deployment) for name, deployment in list(ctx.server.deployments.items())}


async def health(request: Request) -> Response:
    """200 while the process and every deployment's engine live; 503 when one is dead."""
    states = _states(_ctx(request))
    dead = any(state.state == "dead" for state in states.values())
    return json_response(HealthResponse(status="unavailable" if dead else "ok", deployments=states),
                         503 if dead else 200)


async def ready(request: Request) -> Response:
    """200 when every deployment can take a request now (a ready instance of every role it
    runs, or scaled to zero by choice: the first request starts one) or, if added at run time, is still warming
    (requests for it wait); 503 otherwise, and while shutting down."""
    ctx = _ctx(request)
    states = _states(ctx)
    # A model added at run time while it starts does not take the server out of service.
    ok = not ctx.server.stopping and all(state.state in SERVING or (name not in ctx.initial and state.state in
                                                                      ("starting", "warming"))
                                         for name, state in states.items())
    return json_response(HealthResponse(status="ok" if ok else "unavailable", deployments=states),
                         200 if ok else 503)


async def metrics(request: Request) -> Response:
    """The app's Prometheus registry in the text format."""
    ctx = _ctx(request)
    return Response(ctx.metrics.exposition(), media_type=ctx.metrics.content_type)


async def openapi(request: Request) -> Response:
    """The OpenAPI 3.1 document, generated from the request and response Structs."""
    return json_response(_ctx(request).openapi)
