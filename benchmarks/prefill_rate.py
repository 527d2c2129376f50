"""The engine's prefill rate on this machine, by torch thread count, side by side in one run:
how many prompt tokens per second one rank of the spmd executor prefills in steps of
``--step-tokens`` (the default ``max_num_batched_tokens``, 512) made of ``--seqs`` sequences.

    .venv/bin/python benchmarks/prefill_rate.py                  # SmolLM2, 1 and 2 threads
    .venv/bin/python benchmarks/prefill_rate.py --threads 1 2 4 --steps 5

This is the bound under the TTFT of a burst: when C requests arrive together with P prompt
tokens in all, the median one cannot see its first token before about P/2 tokens have been
prefilled, i.e. before (P/2) / rate seconds, whatever the scheduler does (first come first
served). The table prints that bound for ``--burst-tokens`` (2,048: 32 requests of 32–96
tokens, the serving benchmark's burst at concurrency 32). Each thread count runs in a fresh
child process, one after the other, so their thread pools never meet.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

from rich.console import Console
from rich.table import Table

from flowserve_bench.stats import median


def measure(model: str, threads: int, seqs: int, step_tokens: int, steps: int) -> dict:
    """Prefill tok/s of one rank with ``threads`` torch threads (best and median step)."""
    import torch

    from flowserve_core.types import DeploymentSpec
    from flowserve_spmd_executor.loader import resolve_weights
    from flowserve_spmd_executor.plan import StepPlan
    from flowserve_spmd_executor.rank import Rank, RankSetup

    torch.set_num_threads(threads)
    rank = Rank(RankSetup(spec=DeploymentSpec(model=model), weights=resolve_weights(model), rank=0, world_size=1,
                          device_type="cpu", device_index=0, dtype="float32", num_blocks=1024,
                          max_model_len=2048, num_threads=threads), show_progress=False)
    block, length = 16, step_tokens // seqs
    plan, next_block = StepPlan(), 0
    for _ in range(seqs):  # one fresh prompt per sequence, as a burst's first chunks are
        table = list(range(next_block, next_block + -(-length // block)))
        next_block += len(table)
        plan.token_ids += [100 + i for i in range(length)]
        plan.positions += list(range(length))
        plan.slot_mapping += [table[i // block] * block + i % block for i in range(length)]
        plan.query_lens.append(length)
        plan.context_lens.append(length)
        plan.block_tables.append(table)
        plan.logits_rows.append(len(plan.token_ids) - 1)
    rank.run(plan)  # warm-up: oneDNN primitives are built on the first step of a shape
    seconds = []
    for _ in range(steps):
        started = time.perf_counter()
        rank.run(plan)
        seconds.append(time.perf_counter() - started)
    step = median(seconds)
    return {"threads": threads, "tokens": seqs * length, "best_s": min(seconds), "median_s": step,
            "tok_per_s": seqs * length / step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="GGUF file or HF directory (default: SmolLM2)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seqs", type=int, default=8)
    parser.add_argument("--step-tokens", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--burst-tokens", type=int, default=2048)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from flowserve_core.config import default_model_path

    model = args.model or default_model_path()
    if args.child is not None:
        print(json.dumps(measure(model, args.child, args.seqs, args.step_tokens, args.steps)))
        return
    console = Console()
    rows = []
    with console.status("") as status:
        for threads in args.threads:
            status.update(f"prefill with {threads} thread(s)…")
            command = [sys.executable, __file__, "--model", model, "--child", str(threads), "--seqs", str(args.seqs),
                       "--step-tokens", str(args.step_tokens), "--steps", str(args.steps)]
            out = subprocess.run(command, capture_output=True, text=True, check=True,
                                 env={**os.environ, "OMP_NUM_THREADS": str(threads)})
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    table = Table(title=f"prefill rate: {os.path.basename(model)}, float32, steps of {args.step_tokens} tokens "
                        f"({args.seqs} sequences), {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
    for column in ("threads", "median step (s)", "best step (s)", "prefill tok/s",
                   f"median first token of a {args.burst_tokens}-token burst ≥ (s)"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(str(row["threads"]), f"{row['median_s']:.3f}", f"{row['best_s']:.3f}",
                      f"{row['tok_per_s']:.0f}", f"{args.burst_tokens / 2 / row['tok_per_s']:.2f}")
    console.print(table)


if __name__ == "__main__":
    main()
