"""Ray scaling benchmark: time from "scale to N" to N ready instances on Ray (scaler ``ray``)
vs the local ``prewarm`` scaler, side by side in one run, and a cold request's first token.

Paths measured:

- ``ray+object-store``: scaler ``ray``; each new actor maps the model's DRAM image from
  Ray's object store (put once before the clock starts);
- ``ray+pool``: as ``ray+object-store``, with ``pool_size = N`` pre-warmed idle actors
  (worker process up, torch and the executor imported) filled before the clock starts;
- ``ray+load``: scaler ``ray`` with ``weights_via_object_store=false``; each actor loads the
  weights itself;
- ``prewarm forked`` and ``prewarm preloaded``: the local ``prewarm`` scaler, measured by
  ``benchmarks/scaling.py`` (imported, so both sides are measured the same way).

Ray runs as a local instance started here (``ray.init``), with as many logical CPUs as the
largest N (instances reserve 1 logical CPU each; the machine's real cores are shared).

    .venv/bin/python benchmarks/ray_scaling.py                 # SmolLM2, N = 1, 4
    .venv/bin/python benchmarks/ray_scaling.py --counts 1,2 --model /path/to/model

Writes a JSON result file; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).parent))
import scaling  # noqa: E402  (the prewarm side, measured by the same code as docs/benchmarks.md)

from flowserve_bench.stats import median  # noqa: E402  (after the sys.path entry above)
from flowserve_core.config import default_model_path  # noqa: E402  (after the sys.path entry above)
from flowserve_core.deployment import Deployment  # noqa: E402  (after the sys.path entry above)
from flowserve_core.plugins import PluginManager  # noqa: E402  (after the sys.path entry above)
from flowserve_core.types import DeploymentSpec, Request, SamplingParams  # noqa: E402  (after the sys.path entry above)


def ray_spec(args: argparse.Namespace, count: int, object_store: bool, pool: int = 0) -> DeploymentSpec:
    return DeploymentSpec(
        name="bench", model=args.model, scaler="ray", min_instances=0, max_instances=max(count, 1),
        kv_cache_memory=args.kv_cache_memory, max_model_len=args.max_model_len, dtype=args.dtype,
        options={"num_cpus": 1, "autoscale": False, "weights_via_object_store": object_store,
                 "pool_size": pool, "pool_refill": False})


async def started(deployment: Deployment, object_store: bool, pool: int = 0) -> None:
    """Until the scaler joined Ray, (if asked) put the weights into the object store and
    filled its pool of pre-warmed actors."""
    scaler = deployment.scaler
    while not scaler.resources or (object_store and scaler.weights is None) \
            or (pool and len(scaler.pool.idle) < pool):
        await anyio.sleep(0.05)


async def ray_scale_to(args: argparse.Namespace, count: int, object_store: bool, pool: int = 0) -> dict[str, Any]:
    deployment = Deployment(ray_spec(args, count, object_store, pool), PluginManager())
    async with anyio.create_task_group() as tg:
        await tg.start(deployment.run)
        await started(deployment, object_store, pool)
        began = time.monotonic()
        deployment.scaler.set_target(count)
        await scaling.wait_ready(deployment, count, args.timeout)
        seconds = time.monotonic() - began
        instances = deployment.pool.ready()
        name = "ray+pool" if pool else "ray+object-store" if object_store else "ray+load"
        result = {"path": name, "instances": count,
                  "seconds": seconds, "start_paths": sorted({i.info.start_path for i in instances}),
                  "start_seconds_median": median(i.info.start_seconds for i in instances)}
        await deployment.stop()
        tg.cancel_scope.cancel()
    return result


async def ray_cold_request(args: argparse.Namespace, pool: int) -> dict[str, Any]:
    """A request at zero actors: from its arrival to its first token."""
    deployment = Deployment(ray_spec(args, 1, True, pool), PluginManager())
    async with anyio.create_task_group() as tg:
        await tg.start(deployment.run)
        await started(deployment, True, pool)
        request = Request(prompt_token_ids=deployment.tokenizer.encode("The capital of France is"),
                          params=SamplingParams(max_tokens=8, temperature=0.0))
        began, first = time.monotonic(), None
        async with deployment.open(request) as stream:
            async for event in stream:
                if event.token_ids and first is None:
                    first = time.monotonic() - began
                if event.finish_reason and event.finish_reason not in ("length", "stop"):
                    raise RuntimeError(f"cold request failed: {event.error}")
        await deployment.stop()
        tg.cancel_scope.cancel()
    return {"path": "ray+pool" if pool else "ray+object-store", "first_token_seconds": first}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    counts = [int(c) for c in args.counts.split(",")]
    began = time.monotonic()
    # Pooled idle actors hold a logical CPU each while the instances start: room for both.
    ray.init(address="local", num_cpus=2 * max(counts), include_dashboard=False, namespace="flowserve",
             log_to_driver=False, runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    ray_start = time.monotonic() - began
    scaling.prepare_image(args)  # the DRAM image both sides start from, built once, untimed
    results, cold = [], []
    for count in counts:
        for object_store, pool in ((True, count), (True, 0), (False, 0)):
            results.append(await ray_scale_to(args, count, object_store, pool))
            print(results[-1], flush=True)
        for path in ("preloaded", "forked"):
            results.append(await scaling.scale_to(args, path, count))
            results[-1]["path"] = f"prewarm {path}"
            print(results[-1], flush=True)
    cold.append(await ray_cold_request(args, 1))
    cold.append(await ray_cold_request(args, 0))
    prewarm_cold = await scaling.cold_request(args, "forked")
    prewarm_cold["path"] = "prewarm forked"
    cold.append(prewarm_cold)
    ray.shutdown()
    return {"model": args.model, "dtype": args.dtype, "cpus": os.cpu_count(), "machine": platform.processor()
            or platform.machine(), "ray_init_seconds": ray_start, "scale": results, "cold": cold}


def markdown(report: dict[str, Any]) -> str:
    lines = ["| path | N | scale to N ready (s) | median instance start (s) | start path |",
             "|---|---|---|---|---|"]
    for r in report["scale"]:
        lines.append(f"| {r['path']} | {r['instances']} | {r['seconds']:.2f} | {r['start_seconds_median']:.2f} "
                     f"| {', '.join(r['start_paths'])} |")
    lines += ["", "| path | cold request: first token (s) |", "|---|---|"]
    lines += [f"| {c['path']} | {c['first_token_seconds']:.2f} |" for c in report["cold"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="GGUF file or model directory (default: SmolLM2)")
    parser.add_argument("--counts", default="1,4")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--kv-cache-memory", default="32MiB")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--out", default="benchmarks/results/ray_scaling.json")
    args = parser.parse_args()
    args.model = args.model or str(default_model_path())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING)
    report = anyio.run(run, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(markdown(report))


if __name__ == "__main__":
    main()
