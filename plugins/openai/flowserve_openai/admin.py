"""Admin endpoints: ``POST /admin/scale`` sets a deployment's instance count through its
scaler; ``GET /admin/status`` lists its instances. Guarded by the admin key (else the API
key) when keys are configured."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response

from flowserve_openai.context import AppContext
from flowserve_openai.errors import APIError
from flowserve_openai.ops_protocol import InstanceStatus, ScaleRequest, ScaleResponse, StatusResponse
from flowserve_openai.responses import json_response

if TYPE_CHECKING:
    from flowserve_core.deployment import Deployment


def _ctx(request: Request) -> AppContext:
    return request.app.state.flowserve


def _target(deployment: Deployment) -> int:
    """How many instances the deployment aims for (the scaler's override, else its spec)."""
    return len(deployment.role_targets(deployment.scaler.target))


async def scale(request: Request) -> Response:
    """Set the instance count of ``deployment`` (default: the first) to ``instances``,
    within ``0 … max_instances``."""
    ctx = _ctx(request)
    body = await ctx.decode(request, ScaleRequest)
    deployment = ctx.lookup(body.deployment, param="deployment")
    limit = deployment.spec.max_instances
    if body.instances > limit:
        raise APIError(400, f"instances must be between 0 and {limit} (max_instances of {deployment.name!r}), "
                            f"got {body.instances}", param="instances", code="invalid_value")
    deployment.scaler.set_target(body.instances)
    return json_response(ScaleResponse(deployment=deployment.name, target=_target(deployment)))


async def status(request: Request) -> Response:
    """The instances of ``?deployment=`` (default: the first) and the count it aims for."""
    ctx = _ctx(request)
    deployment = ctx.lookup(request.query_params.get("deployment"), param="deployment")
    instances = [InstanceStatus(id=i.info.id, role=i.info.role.value, state=i.info.state.value,
                                start_path=i.info.start_path, start_seconds=round(i.info.start_seconds, 3),
                                pid=i.info.pid, error=i.info.error)
                 for i in list(deployment.pool.instances.values())]
    return json_response(StatusResponse(deployment=deployment.name, target=_target(deployment), instances=instances))
