"""The bodies of FlowServe's own endpoints beside the OpenAI API, as msgspec Structs:
``/health`` and ``/ready``, and the admin API under ``/admin`` (scale, status, deployments,
aliases). Like ``protocol``'s, ``/openapi.json`` is generated from them.
"""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta, Struct

from flowserve_openai.protocol import INT32_MAX


class DeploymentHealth(Struct, kw_only=True):
    """How one deployment stands: ``ready``, ``warming``, ``starting``, ``scaled-to-zero`` or ``dead``."""

    state: Literal["ready", "warming", "starting", "scaled-to-zero", "dead"]
    instances: dict[str, int]
    error: str | None = None


class HealthResponse(Struct, kw_only=True):
    """``GET /health`` and ``GET /ready``."""

    status: Literal["ok", "unavailable"]
    deployments: dict[str, DeploymentHealth]


class ScaleRequest(Struct, kw_only=True):
    """``POST /admin/scale``: set a deployment's instance count."""

    instances: Annotated[int, Meta(ge=0, le=INT32_MAX)]
    deployment: str | None = None


class ScaleResponse(Struct, kw_only=True):
    """``POST /admin/scale``: the deployment and the instance count it now aims for."""

    deployment: str
    target: int


class InstanceStatus(Struct, kw_only=True):
    """One instance in ``GET /admin/status``."""

    id: str
    role: str
    state: str
    start_path: str
    start_seconds: float
    pid: int | None
    error: str | None = None


class StatusResponse(Struct, kw_only=True):
    """``GET /admin/status``: a deployment's instances and its target count."""

    deployment: str
    target: int
    instances: list[InstanceStatus]


class DeploymentStatus(Struct, kw_only=True):
    """One deployment in ``GET /admin/deployments``: what it serves, how it stands, and its
    instances counted by state (``warming``, ``ready``, ``draining``, ``gone``)."""

    name: str
    model: str
    state: Literal["ready", "warming", "starting", "scaled-to-zero", "dead"]
    target: int
    min_instances: int
    max_instances: int
    scaler: str
    job_scheduler: str
    instances: dict[str, int]
    aliases: list[str]
    num_running: int
    num_waiting: int
    dtype: str = "auto"
    slo_ttft_seconds: float | None = None
    slo_tpot_seconds: float | None = None
    scale_to_zero_after: float | None = None


class DeploymentList(Struct, kw_only=True):
    """``GET /admin/deployments``: every deployment, and every alias with its deployment."""

    deployments: list[DeploymentStatus]
    aliases: dict[str, str]


class RemovedDeployment(Struct, kw_only=True):
    """``DELETE /admin/deployments/NAME``: the deployment is drained and its instances stopped."""

    name: str
    removed: bool = True
    aliases_removed: list[str] = []


class AliasRequest(Struct, kw_only=True):
    """``POST /admin/aliases``: serve ``alias`` with ``deployment`` (new, or a switch)."""

    alias: Annotated[str, Meta(min_length=1, max_length=256)]
    deployment: Annotated[str, Meta(min_length=1, max_length=256)]


class AliasResponse(Struct, kw_only=True):
    """An alias after the call, and the deployment it pointed at before (None: it is new)."""

    alias: str
    deployment: str | None
    previous: str | None = None
