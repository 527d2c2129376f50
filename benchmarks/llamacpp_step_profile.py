"""Where a ``llamacpp`` executor step's time goes, at a given concurrency, without a server.

The script drives ``LlamaCppExecutor`` directly, as the engine does (one ``StepBatch`` per
step): ``--seqs`` sequences of ``--prompt`` random token ids are prefilled, then decoded for
``--steps`` steps, greedy with ``ignore_eos`` and ``min_tokens`` (what ``flowserve bench``
asks for). Each decode step is split into ``llama_decode`` (ggml's work), FlowServe's sampler,
and the rest (the executor's Python: the ``llama_batch``, reading the logits, the slots).

Each variant (``--variant name:opt=value,opt=value``, options as ``-o`` takes them) runs in
a process of its own, and the variants take turns ``--repeats`` times, so that a noisy
machine disturbs them alike. It prints the median per variant, and the instance's memory
once its executor is made and after the run (``/proc/self/smaps_rollup``: RSS, and how much
of it is anonymous memory); ``step_cpu_ms`` is the process's CPU time per step (all its threads), which
other work on the machine disturbs less than the wall time. With ``--decode-steps N`` each step
decodes N tokens in rounds (multi-step decoding), and ``between_decodes_us`` is the median time
from one round's ``llama_decode`` to the next: the executor's and the sampler's Python.

    .venv/bin/python benchmarks/llamacpp_step_profile.py --seqs 32
    .venv/bin/python benchmarks/llamacpp_step_profile.py --seqs 1 --steps 16 --decode-steps 8
    .venv/bin/python benchmarks/llamacpp_step_profile.py --variant fa-on:flash_attn=true \\
        --variant fa-off:flash_attn=false
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from typing import Any


def _options(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in text.split(",") if item)


def _memory() -> dict[str, int]:
    """This process's RSS and anonymous memory (KiB), from ``/proc/self/smaps_rollup``."""
    fields: dict[str, int] = {}
    with open("/proc/self/smaps_rollup") as handle:
        for line in handle:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1])
    return {"rss_kib": fields.get("Rss", 0), "anonymous_kib": fields.get("Anonymous", 0)}


def run_variant(options: dict[str, str], seqs: int, prompt: int, steps: int, kv: str, model: str,
                max_num_seqs: int, decode_steps: int = 1) -> dict[str, Any]:
    """One variant in this process: the per-step medians (ms) and the memory after."""
    import llama_cpp

    from flowserve_core.sampling import SamplingParams
    from flowserve_core.types import DeploymentSpec, ScheduledSequence, StepBatch
    from flowserve_llamacpp_executor.executor import LlamaCppExecutor

    spec = DeploymentSpec(name="profile", model=model, tokenizer="hf", executor="llamacpp", kv_cache="paged",
                          batch_scheduler="continuous", job_scheduler="colocated", scaler="inproc",
                          kv_cache_memory=kv, max_num_seqs=max_num_seqs, options=dict(options))
    executor = LlamaCppExecutor(spec)
    idle = _memory()
    spent = {"decode": 0.0, "sampler": 0.0}
    decode = llama_cpp.llama_decode
    between: list[float] = []  # from one llama_decode's return to the next call, within a step
    last_return: list[float | None] = [None]

    def timed_decode(ctx: Any, batch: Any) -> int:
        start = time.perf_counter()
        if last_return[0] is not None:
            between.append(start - last_return[0])
        try:
            return int(decode(ctx, batch))
        finally:
            last_return[0] = time.perf_counter()
            spent["decode"] += last_return[0] - start

    sampler = executor.sampler

    class TimedSampler:
        """The executor's sampler, timed."""

        def __getattr__(self, name: str) -> Any:
            return getattr(sampler, name)

        def __call__(self, logits: Any, scheduled: Any) -> Any:
            start = time.perf_counter()
            try:
                return sampler(logits, scheduled)
            finally:
                spent["sampler"] += time.perf_counter() - start

    llama_cpp.llama_decode = timed_decode
    executor.sampler = TimedSampler()  # type: ignore[assignment]  # a timing wrapper with the same calls
    rng = random.Random(0)
    tokens_out = steps * decode_steps + 1
    params = SamplingParams(temperature=0.0, ignore_eos=True, min_tokens=tokens_out, max_tokens=tokens_out)
    prompts = {f"s{i}": [rng.randrange(100, 40000) for _ in range(prompt)] for i in range(seqs)}
    outputs: dict[str, list[int]] = {seq_id: [] for seq_id in prompts}
    result = executor._step(StepBatch(seqs=[
        ScheduledSequence(seq_id=seq_id, token_ids=tokens, start_pos=0, block_table=[], params=params,
                          prompt_token_ids=tokens, eos_token_ids=[2]) for seq_id, tokens in prompts.items()]))
    for seq_id, token in result.token_ids.items():
        outputs[seq_id].append(token)
    totals, cpus, decodes, samplers = [], [], [], []
    for _ in range(steps):
        spent["decode"] = spent["sampler"] = 0.0
        batch = StepBatch(seqs=[
            ScheduledSequence(seq_id=seq_id, token_ids=[outputs[seq_id][-1]],
                              start_pos=prompt + len(outputs[seq_id]) - 1, block_table=[], params=params,
                              prompt_token_ids=tokens, output_token_ids=list(outputs[seq_id]), eos_token_ids=[2],
                              decode_steps=decode_steps)
            for seq_id, tokens in prompts.items()])
        last_return[0] = None  # the gap across steps is the engine's, not measured here
        start, cpu = time.perf_counter(), time.process_time()
        result = executor._step(batch)
        totals.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
        decodes.append(spent["decode"])
        samplers.append(spent["sampler"])
        for seq_id, token in result.token_ids.items():
            outputs[seq_id].append(token)
            outputs[seq_id].extend(result.more_token_ids.get(seq_id, []))
    memory = _memory()
    executor.close()

    def ms(values: list[float]) -> float:
        return round(statistics.median(values) * 1000, 2)

    return {"step_ms": ms(totals), "step_cpu_ms": ms(cpus), "llama_decode_ms": ms(decodes),
            "sampler_ms": ms(samplers), "other_python_ms": ms([t - d - s for t, d, s in zip(totals, decodes, samplers)]),
            "between_decodes_us": round(statistics.median(between) * 1e6) if between else None,
            "threads": executor.threads, "idle_rss_kib": idle["rss_kib"], "idle_anonymous_kib": idle["anonymous_kib"],
            **memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="", help="a GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--seqs", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens per sequence")
    parser.add_argument("--steps", type=int, default=64, help="decode steps measured")
    parser.add_argument("--decode-steps", type=int, default=1,
                        help="tokens each step decodes (multi-step decoding, as --decode-steps of flowserve serve)")
    parser.add_argument("--kv-cache-memory", default="720MiB")
    parser.add_argument("--max-num-seqs", type=int, default=0,
                        help="the deployment's max_num_seqs (default: --seqs), as a server would be given")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variant", action="append", default=[],
                        help="name:opt=value,...  (default: one variant with the executor's defaults)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(run_variant(_options(args.child), args.seqs, args.prompt, args.steps,
                                     args.kv_cache_memory, args.model, args.max_num_seqs or args.seqs,
                                     args.decode_steps)))
        return
    variants = [v.split(":", 1) if ":" in v else [v, ""] for v in args.variant] or [["defaults", ""]]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in variants}
    for _ in range(args.repeats):
        for name, options in variants:
            command = [sys.executable, __file__, "--child", options, "--seqs", str(args.seqs), "--prompt",
                       str(args.prompt), "--steps", str(args.steps), "--kv-cache-memory", args.kv_cache_memory,
                       "--model", args.model, "--max-num-seqs", str(args.max_num_seqs),
                       "--decode-steps", str(args.decode_steps)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            runs[name].append(json.loads(output.strip().splitlines()[-1]))
            print(name, runs[name][-1], file=sys.stderr, flush=True)
    summary = {}
    for name, results in runs.items():
        summary[name] = {key: statistics.median(r[key] for r in results) for key in results[0]}
    print(json.dumps({"seqs": args.seqs, "prompt": args.prompt, "steps": args.steps,
                      "decode_steps": args.decode_steps, "repeats": args.repeats, "variants": summary}, indent=2))


if __name__ == "__main__":
    main()
