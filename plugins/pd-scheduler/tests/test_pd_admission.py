"""SLO admission of the PD job schedulers: the time-to-first-token model it uses, and a real
deployment that refuses (429) what would miss its TTFT SLO, but only once it has measured."""

from __future__ import annotations

import anyio
import pytest

from flowserve_colocated.estimate import LinearFit
from flowserve_core.errors import RejectedError
from flowserve_core.types import DeploymentSpec, TaskRole

torch = pytest.importorskip("torch")
pytest.importorskip("flowserve_spmd_executor")

from flowserve_testing import run_deployment, write_tiny_llama  # noqa: E402  (after the importorskip above)

pytestmark = pytest.mark.anyio


def test_fit_learns_overhead_and_per_token_cost():
    fit = LinearFit()
    assert fit.predict(100) is None
    for _ in range(5):
        fit.add(50, 0.3)
    assert fit.predict(100) is None  # one x value: no slope can be told from the overhead
    for tokens in (60, 1000, 1500, 40, 800):
        fit.add(tokens, 0.25 + tokens * 0.001)
    intercept, slope = fit.terms()
    assert 0.2 < intercept < 0.35 and 0.0008 < slope < 0.0012
    # What dividing tokens by seconds would say of a 1,500-token prompt: 50 / 0.3 tok/s →
    # 9 s, a certain miss of a 2 s SLO; the fit says about 1.75 s.
    assert fit.predict(1500) < 2.0


async def test_deployment_refuses_what_would_miss_its_ttft_slo_after_measuring(tmp_path):
    path = write_tiny_llama(tmp_path / "tiny", num_hidden_layers=2, seed=13)
    # An SLO no prefill can meet: requests are refused once the fit can predict, whenever
    # they would queue behind another prefill. (A small step budget: prefills take a while.)
    spec = DeploymentSpec(name="tiny", model=str(path), tokenizer="hf", executor="spmd", kv_cache="paged",
                          batch_scheduler="continuous", job_scheduler="pd-disaggregated", scaler="inproc",
                          dtype="float32", device="cpu", kv_cache_memory="8MiB", prefill_instances=1,
                          decode_instances=1, slo_ttft_seconds=1e-6, max_num_batched_tokens=16)
    async with run_deployment(spec) as runner:
        admitted = []
        for length in (5, 60, 20, 110):  # the fit's first samples: nothing is refused blind
            output = await runner.generate(list(range(3, 3 + length)), max_tokens=3, temperature=0.0,
                                           ignore_eos=True)
            admitted.append(output.finish_reason)
        # An idle prefill instance: admitted (it delays nobody; its time refreshes the fit).
        idle = await runner.generate(list(range(3, 80)), max_tokens=3, temperature=0.0, ignore_eos=True)
        # A busy one: refused.
        prefill = runner.deployment.pool.ready(TaskRole.PREFILL)[0]
        async with anyio.create_task_group() as group:
            group.start_soon(lambda: runner.generate(list(range(3, 500)), max_tokens=3, temperature=0.0))
            with anyio.fail_after(60):
                while not prefill.num_tasks:
                    await anyio.sleep(0.005)
            with pytest.raises(RejectedError) as refused:
                await runner.generate(list(range(3, 80)), max_tokens=3, temperature=0.0)
    assert admitted == ["length"] * 4 and idle.finish_reason == "length"
    rejection = refused.value.rejection
    assert rejection.status == 429 and rejection.retry_after and rejection.retry_after >= 1
    assert "TTFT SLO" in rejection.message
