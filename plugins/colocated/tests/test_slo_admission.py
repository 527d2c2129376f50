"""SLO admission of the ``colocated`` job scheduler: with ``slo_ttft_seconds`` set, a request
that would queue behind full batches is refused (429) once the fitted time to first token for
that many tasks ahead exceeds the SLO; never while a batch slot is free."""

from __future__ import annotations

import anyio
import pytest

from flowserve_core.errors import RejectedError
from flowserve_core.types import Request, SamplingParams
from flowserve_test_fixtures import toy_spec
from flowserve_testing import run_deployment

pytestmark = pytest.mark.anyio
SLOTS, STEP, TOKENS = 2, 0.02, 10  # each request holds a slot for TOKENS steps of STEP s


async def offer(slo: float | None, count: int = 40, gap: float = 0.01) -> tuple[list, list, object]:
    """``count`` requests, one every ``gap`` s (faster than two slots drain them): what each
    saw at admission (tasks ahead on the instance) and the refusals."""
    spec = toy_spec(job_scheduler="colocated", max_num_seqs=SLOTS, slo_ttft_seconds=slo,
                    options={"step_delay": STEP})
    admitted, refused = [], []
    async with run_deployment(spec) as runner:
        deployment = runner.deployment
        (instance,) = deployment.pool.ready()

        async def one(i: int) -> None:
            ahead = instance.num_tasks
            request = Request(prompt_token_ids=[10 + i], params=SamplingParams(max_tokens=TOKENS, ignore_eos=True))
            try:
                async with deployment.open(request) as handle:
                    async for _ in handle:
                        pass
            except RejectedError as exc:
                refused.append((ahead, exc.rejection))
                return
            assert handle.output.finish_reason == "length"
            admitted.append(ahead)

        async with anyio.create_task_group() as group:
            for i in range(count):
                group.start_soon(one, i)
                await anyio.sleep(gap)
        fit = deployment.job_scheduler.ttft_by_tasks_ahead
    return admitted, refused, fit


async def test_requests_that_would_miss_the_ttft_slo_are_refused_early():
    admitted, refused, fit = await offer(slo=3 * STEP * TOKENS / SLOTS)
    assert refused, "a queue growing without bound must meet the SLO's limit"
    for ahead, rejection in refused:
        assert ahead >= SLOTS, "a request that finds a free slot is never refused"
        assert rejection.status == 429 and rejection.retry_after >= 1
        assert "exceeds the deployment's TTFT SLO" in rejection.message
    overhead, seconds_per_task = fit.terms()
    assert seconds_per_task > 0  # it learned that each task ahead delays the first token
    assert len(admitted) + len(refused) == 40


async def test_without_an_slo_nothing_is_refused_below_max_queue():
    admitted, refused, _ = await offer(slo=None, count=20)
    assert not refused and len(admitted) == 20


def test_the_fit_gives_an_upper_quantile_from_its_residuals():
    from flowserve_colocated.estimate import LinearFit

    fit = LinearFit(decay=1.0)
    for x in range(10):
        for noise in (+1.0, -1.0):  # scatter of exactly one standard deviation around the line
            fit.add(x, 2.0 + 0.5 * x + noise)
    assert fit.predict(4) == pytest.approx(4.0)
    assert fit.predict_quantile(4, 1.2816) == pytest.approx(4.0 + 1.2816)
