"""Micro-benchmark: what streaming detokenization costs per token (SmolLM2's tokenizer).

    .venv/bin/python plugins/hf-tokenizer/benchmarks/bench_detokenizer.py [--tokens 4000]

Pushes one token at a time (the server's case) through ``HFDetokenizer`` with and without
stop strings, and through tokenizers' own ``DecodeStream`` for comparison; prints µs/token.
Not a test: timings vary with the machine and its load.
"""

from __future__ import annotations

import argparse
import time

from flowserve_core.types import DeploymentSpec, SamplingParams
from flowserve_hf_tokenizer.tokenizer import build_hf_tokenizer

TEXT = ("The quick brown fox jumps over the lazy dog. Streaming text arrives one token at a time; "
        "東京と大阪は日本の都市です。 Emoji too: 🙂🚀👍🏽. Numbers 3.14159 and code `x = f(y)`.\n")


def per_token_microseconds(run, token_ids: list[int], repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run(token_ids)
        best = min(best, time.perf_counter() - start)
    return best / len(token_ids) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4000)
    args = parser.parse_args()
    tokenizer = build_hf_tokenizer(DeploymentSpec())
    ids = tokenizer.encode(TEXT * (args.tokens // 40 + 1), add_special_tokens=False)[:args.tokens]
    prompt = tokenizer.encode("Tell me a story.")

    def stream(params: SamplingParams):
        def run(token_ids: list[int]) -> None:
            detokenizer = tokenizer.detokenizer(prompt, params)
            for token in token_ids:
                detokenizer.push((token,))
            detokenizer.finish()
        return run

    def decode_stream(token_ids: list[int]) -> None:
        from tokenizers.decoders import DecodeStream

        stream_, backend = DecodeStream(skip_special_tokens=True), tokenizer.hf_tokenizer.backend_tokenizer
        for token in token_ids:
            stream_.step(backend, token)

    rows = [
        ("HFDetokenizer, no stop strings", stream(SamplingParams())),
        ("HFDetokenizer, 4 stop strings", stream(SamplingParams(stop=["\n\n", "User:", "</s>", "never"]))),
        ("tokenizers DecodeStream (reference)", decode_stream),
        ("decode() of the whole output, per token", lambda t: tokenizer.decode(t)),
    ]
    print(f"{len(ids)} tokens of mixed English/Japanese/emoji text, one push per token")
    for name, run in rows:
        print(f"{name:42s} {per_token_microseconds(run, ids):7.2f} µs/token")


if __name__ == "__main__":
    main()
