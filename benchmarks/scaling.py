"""Scaling benchmark: how fast N engine instances become ready, per start path, side by side.

For each start path of the ``prewarm`` scaler — ``naive`` (a new process imports torch and
loads the weights: the GGUF's safetensors cache, converted once, read and copied),
``prewarmed`` (a pre-warmed pool process loads them), ``preloaded`` (a pre-warmed pool
process maps the DRAM image) and ``forked`` (fork-clone of the zygote) — and each N, it
measures the time from "scale to N" until N instances are ready, and the memory of those
instances (PSS and USS from /proc/PID/smaps_rollup; the zygote's PSS is counted with the
forked ones). Also: a request arriving at zero instances, time to its first token, per
path; and one naive start with an empty cache (the GGUF dequantized again).

The pool is filled and warm, the zygote loaded and the DRAM image built before the clock
starts: that is what those paths buy, once, ahead of demand.

    .venv/bin/python benchmarks/scaling.py                      # SmolLM2, N = 1, 8, 64
    .venv/bin/python benchmarks/scaling.py --counts 1,8 --paths forked,preloaded
    .venv/bin/python benchmarks/scaling.py --executor llamacpp --kv-cache-memory 64MiB

``--executor`` picks the executor plugin (default ``spmd``). The DRAM image and the
empty-cache naive start are the spmd executor's (its safetensors cache and image); with
another executor they are skipped, and its own ``preload`` (if it has one) does the rest.
llamacpp keeps its KV cache in float16 (23,040 bytes a token for SmolLM2): 32 MiB holds
fewer tokens than ``--max-model-len`` 2048, and the deployment refuses to start.

Writes a JSON result file and an SVG plot; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from flowserve_bench.stats import median
from flowserve_core.config import default_model_path
from flowserve_core.deployment import Deployment
from flowserve_core.plugins import PluginManager
from flowserve_core.types import DeploymentSpec, Request, SamplingParams

PATHS = {"naive": "naive", "prewarmed": "prewarm", "preloaded": "preload", "forked": "fork"}


def spec_for(args: argparse.Namespace, path: str, count: int, **options: Any) -> DeploymentSpec:
    return DeploymentSpec(
        name="bench", model=args.model, executor=args.executor, scaler="prewarm", min_instances=0,
        max_instances=max(count, 1),
        kv_cache_memory=args.kv_cache_memory, max_model_len=args.max_model_len, dtype=args.dtype,
        options={"start_path": PATHS[path], "pool_size": count if path in ("prewarmed", "preloaded") else 0,
                 "pool_refill": False, "autoscale": False, **options})


def memory(pid: int) -> dict[str, int]:
    """PSS, USS and RSS of ``pid`` in bytes (0s if it is gone)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return {"pss": 0, "uss": 0, "rss": 0}
    fields = {}
    for line in text.splitlines()[1:]:
        name, _, rest = line.partition(":")
        fields[name] = int(rest.split()[0]) * 1024
    return {"pss": fields["Pss"], "uss": fields["Private_Clean"] + fields["Private_Dirty"], "rss": fields["Rss"]}


async def prepared(deployment: Deployment, path: str, count: int) -> None:
    """Wait until what the path prepares ahead of demand is ready (pool warm, zygote loaded)."""
    resources = deployment.scaler.resources
    if path == "forked":
        if await resources.zygotes.get(deployment.spec) is None:
            raise RuntimeError("the zygote could not pre-load the model")
    if path in ("prewarmed", "preloaded"):
        while len(resources.pool.idle) < count or not all(p.warm() for p in resources.pool.idle):
            await anyio.sleep(0.1)


async def wait_ready(deployment: Deployment, count: int, timeout: float) -> None:
    with anyio.fail_after(timeout):
        while len(deployment.pool.ready()) < count:
            failed = [i.info.error for i in deployment.pool.instances.values() if i.info.error]
            if failed:
                raise RuntimeError(f"an instance failed: {failed[0]}")
            with anyio.move_on_after(0.5):
                await deployment.pool.wait_changed()


async def scale_to(args: argparse.Namespace, path: str, count: int) -> dict[str, Any]:
    """Time 'scale to ``count``' until ``count`` instances are ready, and their memory."""
    deployment = Deployment(spec_for(args, path, count), PluginManager())
    async with anyio.create_task_group() as tg:
        await tg.start(deployment.run)
        await prepared(deployment, path, count)
        started = time.monotonic()
        deployment.scaler.set_target(count)
        await wait_ready(deployment, count, args.timeout)
        seconds = time.monotonic() - started
        instances = deployment.pool.ready()
        pids = [i.info.pid for i in instances]
        if path == "forked":
            pids += [z.pid for z in deployment.scaler.resources.zygotes.by_key.values()]
        usage = [memory(pid) for pid in pids]
        result = {
            "path": path, "instances": count, "seconds": seconds,
            "start_paths": sorted({i.info.start_path for i in instances}),
            "start_seconds_median": median(i.info.start_seconds for i in instances),
            "pss_gib": sum(u["pss"] for u in usage) / 2**30,
            "uss_gib": sum(u["uss"] for u in usage) / 2**30,
            "rss_gib_per_instance": max(u["rss"] for u in usage) / 2**30,
        }
        await deployment.stop()
        tg.cancel_scope.cancel()
    return result


async def cold_request(args: argparse.Namespace, path: str) -> dict[str, Any]:
    """A request at zero instances: time from its arrival to its first token."""
    deployment = Deployment(spec_for(args, path, 1), PluginManager())
    async with anyio.create_task_group() as tg:
        await tg.start(deployment.run)
        await prepared(deployment, path, 1)
        request = Request(prompt_token_ids=deployment.tokenizer.encode("The capital of France is"),
                          params=SamplingParams(max_tokens=8, temperature=0.0))
        started = time.monotonic()
        first = None
        async with deployment.open(request) as stream:
            async for event in stream:
                if event.token_ids and first is None:
                    first = time.monotonic() - started
                if event.finish_reason and event.finish_reason not in ("length", "stop"):
                    raise RuntimeError(f"cold request failed: {event.error}")
        (instance,) = deployment.pool.ready()
        result = {"path": path, "first_token_seconds": first, "start_path": instance.info.start_path}
        await deployment.stop()
        tg.cancel_scope.cancel()
    return result


async def uncached_naive(args: argparse.Namespace) -> dict[str, Any]:
    """One naive start with an empty cache: the instance dequantizes the GGUF itself."""
    with tempfile.TemporaryDirectory() as cache:
        saved = os.environ.get("FLOWSERVE_CACHE_DIR")
        os.environ["FLOWSERVE_CACHE_DIR"] = cache
        try:
            result = await scale_to(args, "naive", 1)
        finally:
            if saved is None:
                os.environ.pop("FLOWSERVE_CACHE_DIR")
            else:
                os.environ["FLOWSERVE_CACHE_DIR"] = saved
    result["path"] = "naive-uncached"
    return result


def fits_in_memory(results: list[dict[str, Any]], path: str, count: int) -> str:
    """Why ``count`` instances of ``path`` would not fit (from the largest measured run), or ''."""
    measured = [r for r in results if r["path"] == path and "pss_gib" in r]
    if not measured:
        return ""
    largest = max(measured, key=lambda r: r["instances"])
    per_instance = largest["pss_gib"] / largest["instances"]
    available = _available_gib()
    needed = per_instance * count
    if needed > 0.6 * available:
        return (f"skipped: {count} × {per_instance:.2f} GiB (PSS per instance at N={largest['instances']}) "
                f"= {needed:.1f} GiB > 60% of the {available:.1f} GiB available")
    return ""


def _available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def prepare_image(args: argparse.Namespace) -> float:
    """Build the DRAM image once (timed; not part of any start)."""
    from flowserve_spmd_executor.preload import ensure_image

    started = time.monotonic()
    ensure_image(spec_for(args, "preloaded", 1), None)  # built-in architectures only
    return time.monotonic() - started


async def run(args: argparse.Namespace) -> dict[str, Any]:
    counts = [int(c) for c in args.counts.split(",")]
    paths = args.paths.split(",")
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "model": args.model,
        "machine": f"{os.cpu_count()} CPUs, {_total_gib():.0f} GiB, {platform.processor() or platform.machine()}",
        "executor": args.executor, "dtype": args.dtype, "kv_cache_memory": args.kv_cache_memory,
        "scale": [], "cold": []}
    spmd = args.executor == "spmd"
    report["image_build_seconds"] = prepare_image(args) if spmd else None
    if spmd:
        print(f"DRAM image ready in {report['image_build_seconds']:.1f} s", flush=True)
    for count in counts:
        for path in paths:
            skip = fits_in_memory(report["scale"], path, count)
            if skip or (count > args.max_slow and path in ("naive", "prewarmed")):
                reason = skip or f"skipped: N > --max-slow {args.max_slow} for the loading paths (time budget)"
                report["scale"].append({"path": path, "instances": count, "skipped": reason})
                print(f"{path:>10} N={count:<3} {reason}", flush=True)
                continue
            result = await scale_to(args, path, count)
            report["scale"].append(result)
            print(f"{path:>10} N={count:<3} ready in {result['seconds']:7.2f} s  "
                  f"PSS {result['pss_gib']:.2f} GiB  USS {result['uss_gib']:.2f} GiB  {result['start_paths']}",
                  flush=True)
    for path in paths:
        result = await cold_request(args, path)
        report["cold"].append(result)
        print(f"{path:>10} cold request: first token after {result['first_token_seconds']:.2f} s", flush=True)
    if not args.skip_uncached and spmd:
        result = await uncached_naive(args)
        report["scale"].append(result)
        print(f"naive-uncached N=1 ready in {result['seconds']:.2f} s", flush=True)
    return report


def _total_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def markdown(report: dict[str, Any]) -> str:
    """The results as Markdown tables (scale-up and cold request)."""
    lines = ["| path | N | ready after (s) | median start (s) | PSS total (GiB) | USS total (GiB) | reported paths |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in report["scale"]:
        if "skipped" in r:
            lines.append(f"| {r['path']} | {r['instances']} | — | — | — | — | {r['skipped']} |")
        else:
            lines.append(f"| {r['path']} | {r['instances']} | {r['seconds']:.2f} | {r['start_seconds_median']:.2f} "
                         f"| {r['pss_gib']:.2f} | {r['uss_gib']:.2f} | {', '.join(r['start_paths'])} |")
    lines += ["", "| path | request at zero instances → first token (s) | instance started as |", "|---|---:|---|"]
    lines += [f"| {r['path']} | {r['first_token_seconds']:.2f} | {r['start_path']} |" for r in report["cold"]]
    return "\n".join(lines)


def svg_plot(report: dict[str, Any]) -> str:
    """Grouped bars (log scale): seconds to N ready instances per path, one group per N."""
    import math

    rows = [r for r in report["scale"] if "seconds" in r and r["path"] in PATHS]
    counts = sorted({r["instances"] for r in rows})
    colors = {"naive": "#d62728", "prewarmed": "#ff7f0e", "preloaded": "#2ca02c", "forked": "#1f77b4"}
    width, height, left, bottom, top = 640, 360, 60, 40, 30
    lo, hi = -2, 3  # 10 ms … 1000 s
    plot_h = height - bottom - top

    def y(seconds: float) -> float:
        return top + plot_h * (1 - (math.log10(max(seconds, 10**lo)) - lo) / (hi - lo))

    group_w = (width - left - 20) / max(len(counts), 1)
    bar_w = group_w / (len(PATHS) + 1)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           'font-size="11">', f'<text x="{left}" y="18" font-size="13">Time from "scale to N" to N ready '
           'instances (log scale)</text>']
    for exponent in range(lo, hi + 1):
        yy = y(10**exponent)
        out.append(f'<line x1="{left}" x2="{width - 20}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{yy + 4:.1f}" text-anchor="end">{10.0**exponent:g} s</text>')
    for g, count in enumerate(counts):
        x0 = left + g * group_w
        out.append(f'<text x="{x0 + group_w / 2:.1f}" y="{height - bottom + 16}" text-anchor="middle">N = {count}</text>')
        for k, path in enumerate(PATHS):
            found = [r for r in rows if r["path"] == path and r["instances"] == count]
            if not found:
                continue
            seconds = found[0]["seconds"]
            x, yy = x0 + (k + 0.5) * bar_w, y(seconds)
            out.append(f'<rect x="{x:.1f}" y="{yy:.1f}" width="{bar_w * 0.9:.1f}" height="{top + plot_h - yy:.1f}" '
                       f'fill="{colors[path]}"><title>{path}, N={count}: {seconds:.2f} s</title></rect>')
            out.append(f'<text x="{x + bar_w * 0.45:.1f}" y="{yy - 3:.1f}" text-anchor="middle" font-size="9">'
                       f'{seconds:.2g}</text>')
    for k, path in enumerate(PATHS):
        out.append(f'<rect x="{left + 10 + k * 120}" y="{height - 14}" width="10" height="10" fill="{colors[path]}"/>')
        out.append(f'<text x="{left + 24 + k * 120}" y="{height - 5}">{path}</text>')
    out.append("</svg>")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="GGUF file or model directory (default: SmolLM2)")
    parser.add_argument("--executor", default="spmd", help="executor plugin (flowserve plugins lists them)")
    parser.add_argument("--counts", default="1,8,64")
    parser.add_argument("--paths", default="naive,prewarmed,preloaded,forked")
    parser.add_argument("--max-slow", type=int, default=8,
                        help="largest N for the paths that load weights per instance (naive, prewarmed)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--kv-cache-memory", default="32MiB")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--skip-uncached", action="store_true")
    parser.add_argument("--out", default=None,
                        help="JSON results (default benchmarks/results/scaling.json; scaling-EXECUTOR.json for others)")
    parser.add_argument("--plot", default=None,
                        help="SVG plot (default docs/benchmarks-scaling.svg; benchmarks-scaling-EXECUTOR.svg for others)")
    args = parser.parse_args()
    suffix = "" if args.executor == "spmd" else f"-{args.executor}"
    args.out = args.out or f"benchmarks/results/scaling{suffix}.json"
    args.plot = args.plot or f"docs/benchmarks-scaling{suffix}.svg"
    args.model = args.model or default_model_path()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING)
    report = anyio.run(run, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    Path(args.plot).write_text(svg_plot(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
