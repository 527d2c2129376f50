"""What every endpoint of one app shares: the server, its health, its metrics, and the
lookups that turn a model name into a deployment that can take a request now."""

from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import msgspec
from starlette.requests import ClientDisconnect, Request

from flowserve_core import __version__
from flowserve_core.errors import UnknownModelError
from flowserve_openai.errors import APIError, invalid_body
from flowserve_openai.health import HealthMonitor
from flowserve_openai.metrics import ServerMetrics
from flowserve_openai.openapi import openapi_schema
from flowserve_openai.prompts import TokenizingLanes
from flowserve_openai.protocol import encoder

if TYPE_CHECKING:
    from flowserve_core.deployment import Deployment
    from flowserve_core.server import Server

T = TypeVar("T")

#: Seconds an inference request waits for a deployment added at run time to finish starting.
START_WAIT = 300.0


class AppContext:
    """The state of one app built by ``build_app(server)`` (its own Prometheus registry)."""

    def __init__(self, server: Server):
        self.server = server
        self.config = server.config
        self.health = HealthMonitor(server)
        self.metrics = ServerMetrics(server)
        self.tokenizing = TokenizingLanes()
        deployments = list(server.deployments.values())
        self.openapi = encoder.encode(openapi_schema(
            # max_instances is set by DeploymentSpec.__post_init__ (its type says "may be unset")
            self.config, max((d.spec.max_instances or d.spec.min_instances for d in deployments), default=None),
            max((d.max_model_len for d in deployments), default=None)))
        self._created: dict[str, int] = {}
        for name in server.deployments:
            self.created(name)
        #: Deployments the server started with; those added later do not hold /ready back.
        self.initial = set(server.deployments)
        self._backends: dict[str, tuple[Any, Any]] = {}
        self._backends_lock = anyio.Lock()

    async def structured_output_backend(self, deployment: Deployment) -> Any:
        """``deployment``'s structured-output backend (``spec.structured_output_backend``), built
        when a constrained request first comes, then kept; a 400 when no plugin of that name is
        installed."""
        return await self.component(deployment, "structured_output", deployment.spec.structured_output_backend,
                                    "Structured output", "unsupported_structured_output")

    async def component(self, deployment: Deployment, kind: str, name: str, what: str, code: str) -> Any:
        """The component ``kind:name`` built for ``deployment`` (in a worker thread, once per
        deployment), or a 400 saying ``what`` is not available and why."""
        async with self._backends_lock:
            key = f"{kind}:{name}:{deployment.name}"
            known = self._backends.get(key)
            if known is not None and known[0] is deployment:
                return known[1]
            try:
                built = await anyio.to_thread.run_sync(deployment.pm.build, kind, name, deployment.spec)
            except Exception as exc:
                raise APIError(400, f"{what} is not available for the model {deployment.name!r}: {exc}",
                               code=code) from None
            self._backends[key] = (deployment, built)
            return built

    def created(self, name: str) -> int:
        """When this app first saw the deployment ``name`` (OpenAI's ``created``)."""
        return self._created.setdefault(name, int(time.time()))

    def forget(self, name: str) -> None:
        """The deployment ``name`` was removed: a new one of that name is a new model."""
        self._created.pop(name, None)
        self.initial.discard(name)

    def lookup(self, model: str | None, param: str = "model") -> Any:
        """The deployment serving ``model`` (name or alias), or a 404 naming what is served."""
        try:
            return self.server.resolve(model)
        except UnknownModelError as exc:
            raise APIError(404, str(exc), param=param, code="model_not_found") from None

    async def deployment(self, model: str | None) -> Any:
        """The deployment for an inference request: it must exist (404) and be able to serve
        (503 when its engine is dead, or while the server shuts down). A deployment added at
        run time that is still starting is waited for (up to ``START_WAIT`` s), not refused."""
        if self.server.stopping:
            raise APIError(503, "The server is shutting down.", code="shutting_down")
        deployment = self.lookup(model)
        health = self.health.health(deployment)
        with anyio.move_on_after(START_WAIT):
            while health.state == "starting":
                await anyio.sleep(0.05)
                if self.server.deployments.get(deployment.name) is not deployment:
                    deployment = self.lookup(model)  # removed (404) or replaced meanwhile
                health = self.health.health(deployment)
        if health.state == "starting":
            raise APIError(503, f"The model {deployment.name!r} is still starting; retry shortly.",
                           code="model_starting", headers={"Retry-After": "5"})
        if health.state == "dead":
            raise APIError(503, f"The model {deployment.name!r} cannot serve now: {health.error}",
                           code="engine_dead")
        if (rejection := deployment.queue_rejection()) is not None:  # before tokenizing anything
            raise APIError.from_rejection(rejection)
        return deployment

    @staticmethod
    def fingerprint(deployment: Deployment) -> str:
        """OpenAI's ``system_fingerprint``: changes when the software or the model setup does."""
        spec = deployment.spec
        key = f"{__version__}|{spec.model}|{spec.executor}|{spec.dtype}|{spec.tensor_parallel}|{spec.tokenizer}"
        return "fp_" + hashlib.sha256(key.encode()).hexdigest()[:10]

    async def decode(self, request: Request, type: type[T]) -> T:
        """The body as ``type``: 413 past ``max_body_bytes``, 400 for bad JSON or values."""
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                chunks.append(chunk)
        except ClientDisconnect:
            raise APIError(400, "The client went away while sending the body.") from None
        try:
            return msgspec.json.decode(b"".join(chunks), type=type)
        except msgspec.DecodeError as exc:
            raise invalid_body(exc) from None
        except UnicodeDecodeError as exc:  # msgspec's own error for bytes that are not UTF-8
            raise APIError(400, f"The request body is not valid UTF-8: {exc}", code="invalid_json") from None
        except RecursionError:
            raise APIError(400, "The request body is nested too deeply.", code="invalid_json") from None


def _too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than this server's limit of {limit} bytes "
                         f"(max_body_bytes).", code="request_too_large")
