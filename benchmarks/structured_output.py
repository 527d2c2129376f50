"""Structured-output benchmark (issue 19): schema compile time (cold and cached) with the
``xgrammar`` backend, and output tok/s of ``json_schema`` requests against unconstrained ones
at a given concurrency on a live ``flowserve serve`` (SmolLM2, spmd executor by default).

Both kinds of request generate exactly ``--max-tokens`` tokens, so the batches stay the same
size throughout: unconstrained ones with ``ignore_eos``, constrained ones with a schema that
cannot be complete sooner (an array of at least 1000 integers). Each kind runs ``--rounds``
times, alternating, and the best round counts (the machine is shared).

    .venv/bin/python benchmarks/structured_output.py                    # concurrency 32
    .venv/bin/python benchmarks/structured_output.py --concurrency 8 --max-tokens 64

Prints a Markdown table; writes benchmarks/results/structured_output.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from pathlib import Path

SCHEMA = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 1000}
COMPILED = [{"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                              "tags": {"type": "array", "items": {"type": "string"}}},
             "required": ["name", "age"], "additionalProperties": False, "title": f"person{i}"} for i in range(5)]


def compile_times() -> dict[str, float]:
    """Seconds to check a schema: the first ever (tokenizer and vocabulary load included), a new
    schema after that (the median of several), and a schema compiled before."""
    from flowserve_core.types import DeploymentSpec, StructuredOutput
    from flowserve_xgrammar.backend import XGrammarBackend

    backend = XGrammarBackend(DeploymentSpec())
    constraints = [StructuredOutput(json=json.dumps(schema)) for schema in COMPILED]
    started = time.perf_counter()
    backend.check(constraints[0])
    first = time.perf_counter() - started
    cold = []
    for constraint in constraints[1:]:
        started = time.perf_counter()
        backend.check(constraint)
        cold.append(time.perf_counter() - started)
    started = time.perf_counter()
    for _ in range(100):
        backend.check(constraints[0])
    cached = (time.perf_counter() - started) / 100
    return {"first_ever_s": first, "new_schema_s": sorted(cold)[len(cold) // 2], "cached_s": cached}


async def run_round(url: str, model: str, concurrency: int, max_tokens: int, constrained: bool) -> float:
    """Output tok/s of ``concurrency`` chat requests at once."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    extra = {"guided_json": SCHEMA} if constrained else {"ignore_eos": True}

    async def one(i: int) -> int:
        chat = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"Write many numbers, round {i}."}],
            max_tokens=max_tokens, temperature=0.8, seed=i, extra_body=extra)
        assert chat.usage is not None
        return chat.usage.completion_tokens

    started = time.perf_counter()
    tokens = await asyncio.gather(*(one(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - started
    await client.close()
    assert all(t == max_tokens for t in tokens), tokens
    return sum(tokens) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--executor", default="spmd")
    args = parser.parse_args()
    from flowserve_core.config import default_model_path
    from flowserve_testing.live import LiveServer

    times = compile_times()
    engine = ["--dtype", "float32"] if args.executor == "spmd" else []
    server = LiveServer("--model", default_model_path(), "--served-model-name", "smol", "--executor", args.executor,
                        "--kv-cache-memory", "512MiB", "--max-model-len", "1024", "--max-num-seqs",
                        str(max(64, args.concurrency)), *engine).start(timeout=300)
    try:
        rates: dict[str, list[float]] = {"unconstrained": [], "json_schema": []}
        asyncio.run(run_round(server.url, "smol", 2, 8, True))  # warm up both paths
        for _ in range(args.rounds):
            for kind in rates:
                rates[kind].append(asyncio.run(run_round(server.url, "smol", args.concurrency, args.max_tokens,
                                                         kind == "json_schema")))
    finally:
        server.stop()
    best = {kind: max(values) for kind, values in rates.items()}
    result = {"machine": platform.processor() or platform.machine(), "executor": args.executor,
              "concurrency": args.concurrency, "max_tokens": args.max_tokens, "rounds": rates, "best": best,
              "ratio": best["json_schema"] / best["unconstrained"], "compile": times}
    out = Path(__file__).parent / "results" / "structured_output.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"| concurrency | unconstrained tok/s | json_schema tok/s | ratio |\n|---|---|---|---|\n"
          f"| {args.concurrency} | {best['unconstrained']:.1f} | {best['json_schema']:.1f} | {result['ratio']:.2f} |")
    print(f"\ncompile: first ever {times['first_ever_s'] * 1000:.0f} ms (tokenizer load included), new schema "
          f"{times['new_schema_s'] * 1000:.1f} ms, cached {times['cached_s'] * 1e6:.0f} us")


if __name__ == "__main__":
    main()
