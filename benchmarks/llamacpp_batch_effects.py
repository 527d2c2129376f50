"""How the ``llamacpp`` executor's greedy output depends on the batch, and what its prefix
reuse buys, in one run on SmolLM2's Q4_1 GGUF (or ``--model``):

1. **Batch shape.** Each of ``--prompts`` chat prompts is generated alone (batch of one), then
   all of them at once (one deployment, continuous batching, as many as ``--concurrency`` in
   flight). ggml's quantized matrix kernels may round differently for a different batch shape,
   so a greedy text can differ; the script reports how many do, and from which token.
2. **Prefix reuse.** One long prompt is sent twice with prefix slots on (the default) and
   twice with them off (``prefix_slots=0``: the cached prefix is recomputed); it reports the
   second request's time to first token in each case.

    .venv/bin/python benchmarks/llamacpp_batch_effects.py                # 64 prompts, 32 at once
    .venv/bin/python benchmarks/llamacpp_batch_effects.py --prompts 32 --max-tokens 64
"""

from __future__ import annotations

import argparse
import json
import random
import time

import anyio
from rich.console import Console
from rich.progress import Progress

from flowserve_core.types import DeploymentSpec
from flowserve_testing import run_deployment

TOPICS = ["the ocean", "a lighthouse keeper", "prime numbers", "autumn leaves", "a robot learning to paint",
          "the history of bread", "volcanoes", "a chess game", "the moon landing", "bees", "a rainy city",
          "quantum computers", "a dragon", "the Silk Road", "jazz", "a mountain village"]
FORMS = ["Write a short poem about {}.", "Explain {} to a child.", "Tell a story about {}.",
         "List three facts about {}."]


def chat_prompts(count: int, seed: int) -> list[list[dict]]:
    rng = random.Random(seed)
    return [[{"role": "user", "content": rng.choice(FORMS).format(rng.choice(TOPICS))}] for _ in range(count)]


def spec(model: str, kv_unified: str, **options: int) -> DeploymentSpec:
    return DeploymentSpec(name="bench", model=model, tokenizer="hf", executor="llamacpp", kv_cache="paged",
                          batch_scheduler="continuous", job_scheduler="colocated", scaler="inproc",
                          kv_cache_memory="512MiB", max_num_seqs=64, options={**options, "kv_unified": kv_unified})


async def batch_shape(model: str, kv_unified: str, count: int, concurrency: int, max_tokens: int,
                      progress: Progress) -> dict:
    from flowserve_core.interfaces import ChatMessage

    async with run_deployment(spec(model, kv_unified, prefix_slots=0)) as runner:
        prompts = [runner.tokenizer.apply_chat_template([ChatMessage(**m) for m in messages])
                   for messages in chat_prompts(count, seed=1)]
        alone_task = progress.add_task("alone (batch of one)", total=count)
        alone = []
        for prompt in prompts:
            alone.append((await runner.generate(prompt, max_tokens=max_tokens, temperature=0.0)).output_token_ids)
            progress.advance(alone_task)
        batched: list = [None] * count
        limit = anyio.Semaphore(concurrency)
        batched_task = progress.add_task(f"batched ({concurrency} at once)", total=count)

        async def one(i: int) -> None:
            async with limit:
                output = await runner.generate(prompts[i], max_tokens=max_tokens, temperature=0.0)
                batched[i] = output.output_token_ids
                progress.advance(batched_task)

        async with anyio.create_task_group() as group:
            for i in range(count):
                group.start_soon(one, i)
    differing = [i for i in range(count) if alone[i] != batched[i]]
    first_difference = [next((j for j, (a, b) in enumerate(zip(alone[i], batched[i])) if a != b),
                             min(len(alone[i]), len(batched[i]))) for i in differing]
    return {"prompts": count, "concurrency": concurrency, "max_tokens": max_tokens,
            "differing": len(differing), "differing_fraction": len(differing) / count,
            "first_differing_token": first_difference}


async def prefix_reuse(model: str, kv_unified: str, prompt_tokens: int) -> dict:
    results = {}
    for label, slots in (("prefix slots on", 64), ("prefix slots off", 0)):
        async with run_deployment(spec(model, kv_unified, prefix_slots=slots)) as runner:
            rng = random.Random(2)
            prompt = [rng.randrange(100, 40000) for _ in range(prompt_tokens)]
            ttfts = []
            for _ in range(2):
                start = time.perf_counter()
                output = await runner.generate(prompt, max_tokens=1, temperature=0.0)
                ttfts.append(time.perf_counter() - start)
            results[label] = {"first_ttft_s": round(ttfts[0], 4), "second_ttft_s": round(ttfts[1], 4),
                              "second_cached_tokens": output.num_cached_tokens}
    return {"prompt_tokens": prompt_tokens, **results}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="", help="a GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prefix-tokens", type=int, default=1024)
    parser.add_argument("--kv-unified", default="auto", choices=["auto", "true", "false"],
                        help="the executor's KV layout (512 MiB, 64 sequences: auto is the unified cache; "
                             "false gives streams of 364 tokens, so pass --prefix-tokens 300 with it)")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    console = Console()
    with Progress(console=console) as progress:
        shape = await batch_shape(args.model, args.kv_unified, args.prompts, args.concurrency, args.max_tokens, progress)
    with console.status("prefix reuse"):
        reuse = await prefix_reuse(args.model, args.kv_unified, args.prefix_tokens)
    results = {"kv_unified": args.kv_unified, "batch_shape": shape, "prefix_reuse": reuse}
    console.print_json(json.dumps(results))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    anyio.run(main)
