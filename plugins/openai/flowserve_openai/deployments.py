"""Admin endpoints for the server's models at run time: add, list and remove deployments,
and point aliases at them (blue/green rollouts). Guarded like every ``/admin`` path.

Names of deployments and aliases follow ``names.py`` (1 to 128 characters of
``A-Za-z0-9._:/-``); any other is a 400.

- ``POST /admin/deployments`` with a ``DeploymentSpec`` (``name`` and ``model`` required):
  starts the deployment and answers 201 once it runs; its first instance warms through its
  scaler, and requests for it wait meanwhile (they are not refused).
- ``GET /admin/deployments``: every deployment with its instances by state, and the aliases.
- ``DELETE /admin/deployments/NAME``: new requests for NAME get 404 at once; those already
  admitted finish (for up to the server's ``drain_timeout``), then its instances stop.
- ``POST /admin/aliases`` ``{"alias", "deployment"}``: one assignment, so each request sees
  the old target or the new one; requests already running finish where they are.
- ``DELETE /admin/aliases/ALIAS``: stop serving that name.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
from starlette.requests import Request
from starlette.responses import Response

from flowserve_core.errors import ConfigError, FlowServeError, UnknownModelError
from flowserve_core.types import DeploymentSpec
from flowserve_openai.context import AppContext
from flowserve_openai.errors import APIError, invalid_body
from flowserve_openai.names import name_problem
from flowserve_openai.ops_protocol import (
    AliasRequest,
    AliasResponse,
    DeploymentList,
    DeploymentStatus,
    RemovedDeployment,
)
from flowserve_openai.responses import json_response

if TYPE_CHECKING:
    from flowserve_core.deployment import Deployment

log = logging.getLogger(__name__)


def _ctx(request: Request) -> AppContext:
    return request.app.state.flowserve


def deployment_status(ctx: AppContext, deployment: Deployment) -> DeploymentStatus:
    """How ``deployment`` stands now, for the admin API."""
    spec, stats = deployment.spec, deployment.stats()
    aliases = sorted(a for a, name in ctx.server.aliases.items() if name == deployment.name)
    return DeploymentStatus(
        name=deployment.name, model=spec.model, state=ctx.health.health(deployment).state,
        target=len(deployment.role_targets(deployment.scaler.target)),
        # max_instances is set by DeploymentSpec.__post_init__ (its type says "may be unset")
        min_instances=spec.min_instances, max_instances=spec.max_instances or spec.min_instances, scaler=spec.scaler,
        job_scheduler=spec.job_scheduler, instances=stats.instances, aliases=aliases,
        num_running=stats.num_running, num_waiting=stats.num_waiting, dtype=spec.dtype,
        slo_ttft_seconds=spec.slo_ttft_seconds, slo_tpot_seconds=spec.slo_tpot_seconds,
        scale_to_zero_after=spec.scale_to_zero_after)


async def list_deployments(request: Request) -> Response:
    """``GET /admin/deployments``."""
    ctx = _ctx(request)
    server = ctx.server
    return json_response(DeploymentList(
        deployments=[deployment_status(ctx, d) for d in list(server.deployments.values())],
        aliases=dict(server.aliases)))


async def add_deployment(request: Request) -> Response:
    """``POST /admin/deployments``: 201 with the new deployment's status."""
    ctx = _ctx(request)
    spec = with_server_defaults(await ctx.decode(request, dict[str, Any]), ctx.config.deployment_defaults)
    for field in ("name", "model"):
        if not getattr(spec, field):
            raise APIError(400, f"a new deployment needs a {field!r}", param=field, code="missing_field")
    if problem := name_problem(spec.name, "deployment"):
        raise APIError(400, problem, param="name", code="invalid_value")
    if ctx.server.stopping:
        raise APIError(503, "The server is shutting down.", code="shutting_down")
    try:
        # Shielded: a client that goes away must not leave a deployment half started.
        with anyio.CancelScope(shield=True):
            deployment = await ctx.server.add_deployment(spec)
    except ConfigError as exc:
        conflict = next((code for text, code in (("already exists", "deployment_exists"),
                                                 ("was removed while", "deployment_removed"))
                         if text in str(exc)), None)
        raise APIError(409 if conflict else 400, str(exc), param="name" if conflict else None,
                       code=conflict or "invalid_value") from None
    except FlowServeError as exc:  # a component that is not installed, a tokenizer that failed…
        raise APIError(400, f"cannot start deployment {spec.name!r}: {exc}", code="deployment_failed") from None
    except Exception as exc:
        log.exception("deployment %s failed to start", spec.name)
        raise APIError(500, f"deployment {spec.name!r} failed to start: {exc}", code="deployment_failed") from None
    ctx.created(deployment.name)
    return json_response(deployment_status(ctx, deployment), 201)


def with_server_defaults(body: dict[str, Any], defaults: dict[str, Any]) -> DeploymentSpec:
    """The spec a ``POST /admin/deployments`` body asks for, on top of the deployment flags the
    server was started with (``--device``, ``--kv-cache-memory``, ``-o`` options…): the body
    wins, key by key, and inside ``options`` option by option. 400 for a bad value."""
    merged = {**defaults, **body}
    if isinstance(defaults.get("options"), dict) and isinstance(body.get("options"), dict):
        merged["options"] = {**defaults["options"], **body["options"]}
    try:
        return msgspec.convert(merged, DeploymentSpec)
    except msgspec.ValidationError as exc:
        raise invalid_body(exc) from None


async def remove_deployment(request: Request) -> Response:
    """``DELETE /admin/deployments/NAME``: answers once the deployment is drained and stopped."""
    ctx = _ctx(request)
    server, name = ctx.server, request.path_params["name"]
    aliases = sorted(a for a, target in server.aliases.items() if target == name)
    try:
        with anyio.CancelScope(shield=True):  # a half-drained deployment would keep its memory
            await server.remove_deployment(name)
    except UnknownModelError as exc:
        raise APIError(404, str(exc), param="name", code="deployment_not_found") from None
    ctx.forget(name)
    return json_response(RemovedDeployment(name=name, aliases_removed=aliases))


async def set_alias(request: Request) -> Response:
    """``POST /admin/aliases``: create or switch an alias."""
    ctx = _ctx(request)
    body = await ctx.decode(request, AliasRequest)
    if problem := name_problem(body.alias, "alias"):
        raise APIError(400, problem, param="alias", code="invalid_value")
    try:
        previous = ctx.server.set_alias(body.alias, body.deployment)
    except UnknownModelError as exc:
        raise APIError(404, str(exc), param="deployment", code="deployment_not_found") from None
    except ConfigError as exc:
        raise APIError(409, str(exc), param="alias", code="alias_conflict") from None
    return json_response(AliasResponse(alias=body.alias, deployment=body.deployment, previous=previous))


async def remove_alias(request: Request) -> Response:
    """``DELETE /admin/aliases/ALIAS``."""
    ctx = _ctx(request)
    alias = request.path_params["alias"]
    try:
        previous = ctx.server.remove_alias(alias)
    except UnknownModelError as exc:
        raise APIError(404, str(exc), param="alias", code="alias_not_found") from None
    return json_response(AliasResponse(alias=alias, deployment=None, previous=previous))
