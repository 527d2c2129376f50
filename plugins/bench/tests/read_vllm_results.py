"""Read ``vllm bench serve --save-result`` JSON files, as tools built for vLLM's results do.

A stand-in for such a tool (vLLM's nightly-benchmark script that turns result files into a
markdown table reads these same keys): it imports nothing from FlowServe, only the standard
library, and knows only vLLM's key names. For each file it prints one markdown row; the last
line is JSON, the values it read, for a test to compare.

    python read_vllm_results.py results-2qps.json results-infqps.json
"""

from __future__ import annotations

import json
import sys

COLUMNS = {  # vLLM's key → the column title vLLM's markdown script gives it
    "request_rate": "Request rate (req/s)",
    "max_concurrency": "Max concurrency",
    "completed": "Successful requests",
    "failed": "Failed requests",
    "duration": "Benchmark duration (s)",
    "total_input_tokens": "Total input tokens",
    "total_output_tokens": "Total generated tokens",
    "request_throughput": "Tput (req/s)",
    "output_throughput": "Output Tput (tok/s)",
    "total_token_throughput": "Total Tput (tok/s)",
    "mean_ttft_ms": "Mean TTFT (ms)",
    "median_ttft_ms": "Median TTFT (ms)",
    "p99_ttft_ms": "P99 TTFT (ms)",
    "mean_tpot_ms": "Mean TPOT (ms)",
    "median_tpot_ms": "Median TPOT (ms)",
    "p99_tpot_ms": "P99 TPOT (ms)",
    "mean_itl_ms": "Mean ITL (ms)",
    "median_itl_ms": "Median ITL (ms)",
    "p99_itl_ms": "P99 ITL (ms)",
    "mean_e2el_ms": "Mean E2EL (ms)",
    "median_e2el_ms": "Median E2EL (ms)",
    "p99_e2el_ms": "P99 E2EL (ms)",
}


def main(paths: list[str]) -> None:
    read = []
    print("| " + " | ".join(COLUMNS.values()) + " |")
    print("|" + "---|" * len(COLUMNS))
    for path in paths:
        with open(path) as f:
            result = json.load(f)
        row = {key: result[key] for key in COLUMNS}  # a missing key is a KeyError, as in vLLM's script
        row["num_ttfts"] = len(result["ttfts"])
        row["num_itls"] = sum(len(gaps) for gaps in result["itls"])
        row["sum_output_lens"] = sum(result["output_lens"])
        row["percentile_keys"] = sorted(k for k in result if k.startswith("p") and k.endswith("_ms"))
        print("| " + " | ".join(str(result[key]) for key in COLUMNS) + " |")
        read.append(row)
    print(json.dumps(read))


if __name__ == "__main__":
    main(sys.argv[1:])
