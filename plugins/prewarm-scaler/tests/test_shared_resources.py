"""The server-wide pool and zygotes: a model's zygote (its DRAM copy of the weights) lives as
long as some deployment of that model does, and options that do not touch the weights do not
make a second copy."""

from __future__ import annotations

import pytest

from flowserve_core.types import DeploymentSpec
from flowserve_prewarm_scaler.pool import SharedResources, zygote_key

pytestmark = pytest.mark.anyio


def spec(model: str, **options) -> DeploymentSpec:
    return DeploymentSpec(name=model, model=model, options=options)


def test_scaler_and_scheduler_options_do_not_split_a_model_s_zygote():
    assert zygote_key(spec("m", pool_size=2, autoscale=False)) == zygote_key(spec("m", pd_on_failure="fail"))
    assert zygote_key(spec("m", packed_linear=False)) != zygote_key(spec("m"))
    assert zygote_key(spec("m")) != zygote_key(spec("other"))


async def test_the_last_deployment_of_a_model_closes_its_zygote_only(monkeypatch):
    closed: list[str] = []
    resources = SharedResources()

    async def close(spec: DeploymentSpec) -> None:
        closed.append(spec.model)

    monkeypatch.setattr(resources.zygotes, "close", close)
    a1, a2, b = spec("a"), spec("a", pool_size=1), spec("b")
    for s in (a1, a2, b):
        resources.attach(0, [], s)
    await resources.detach(a1)
    assert closed == []  # a2 still serves model a
    await resources.detach(a2)
    assert closed == ["a"]  # b still runs: the pool stays, a's weights go
    assert resources.users == 1
