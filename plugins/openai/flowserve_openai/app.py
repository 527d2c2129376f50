"""``build_app(server)``: the starlette application of the OpenAI frontend.

Built in a function, not at import, so tests compose several apps (each with its own
Prometheus registry). Middleware is pure ASGI, so streamed responses are never buffered:
CORS (only when ``cors_origins`` is set) outside, bearer keys inside, then the caller's trace
context, then the routes.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, AsyncIterator

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from flowserve_openai import admin, api, deployments, embeddings, ops, responses_api, tokenize
from flowserve_openai.auth import BearerKeyMiddleware
from flowserve_openai.context import AppContext
from flowserve_openai.errors import APIError
from flowserve_openai.responses import error_response
from flowserve_openai.tracing import TraceContextMiddleware

if TYPE_CHECKING:
    from flowserve_core.server import Server

log = logging.getLogger(__name__)


def build_app(server: Server) -> Starlette:
    """The ASGI app serving ``server``'s deployments with the OpenAI API."""
    config = server.config
    context = AppContext(server)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        """While the app runs, follow the deployments' instances (for /health)."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(context.health.watch)
            yield
            tg.cancel_scope.cancel()

    routes = [
        Route("/v1/models", api.list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", api.retrieve_model, methods=["GET"]),
        Route("/v1/completions", api.create_completion, methods=["POST"]),
        Route("/v1/chat/completions", api.create_chat_completion, methods=["POST"]),
        Route("/v1/embeddings", embeddings.create_embedding, methods=["POST"]),
        Route("/tokenize", tokenize.tokenize, methods=["POST"]),
        Route("/detokenize", tokenize.detokenize, methods=["POST"]),
        Route("/v1/responses", responses_api.create_response, methods=["POST"]),
        Route("/health", ops.health, methods=["GET"]),
        Route("/ready", ops.ready, methods=["GET"]),
        Route("/metrics", ops.metrics, methods=["GET"]),
        Route("/openapi.json", ops.openapi, methods=["GET"]),
        Route("/admin/scale", admin.scale, methods=["POST"]),
        Route("/admin/status", admin.status, methods=["GET"]),
        Route("/admin/deployments", deployments.list_deployments, methods=["GET"]),
        Route("/admin/deployments", deployments.add_deployment, methods=["POST"]),
        Route("/admin/deployments/{name:path}", deployments.remove_deployment, methods=["DELETE"]),
        Route("/admin/aliases", deployments.set_alias, methods=["POST"]),
        Route("/admin/aliases/{alias:path}", deployments.remove_alias, methods=["DELETE"]),
    ]
    middleware = []
    if config.cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(config.cors_origins),
                                     allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
                                     allow_headers=["authorization", "content-type"]))
    middleware.append(Middleware(BearerKeyMiddleware, api_key=config.api_key, admin_key=config.admin_key))
    middleware.append(Middleware(TraceContextMiddleware))
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan, exception_handlers={
        APIError: _api_error, HTTPException: _http_error, Exception: _internal_error})
    app.state.flowserve = context
    return app


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 in OpenAI's shape."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message, code = f"{request.method} {request.url.path} is not an endpoint of this server.", "not_found"
    elif exc.status_code == 405:
        message, code = f"{request.method} is not allowed on {request.url.path}.", "method_not_allowed"
    else:
        message, code = str(exc.detail), None
    error = APIError(exc.status_code, message, code=code, headers=dict(exc.headers or {}))
    return error_response(error)


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(APIError(500, "The server failed to handle this request; see its log.",
                                   code="internal_error"))
