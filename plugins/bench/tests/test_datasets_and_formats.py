"""The pieces behind vLLM-compatible runs: the percentile definition, rate lists, dataset
files and their errors, vLLM's key names."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest

from flowserve_bench.datasets import DatasetEntry, load_dataset, sample_entries
from flowserve_bench.errors import BenchError
from flowserve_bench.metrics import summarize
from flowserve_bench.results import BenchConfig, BenchResult, RequestRecord
from flowserve_bench.stats import parse_percentiles, percentile, percentile_key, std
from flowserve_bench.sweep import parse_rates, result_path
from flowserve_bench.vllm_format import max_concurrent_requests, to_csv, vllm_result


def test_the_one_percentile_definition_is_numpys_for_any_order_and_size():
    rng = random.Random(3)
    for size in (1, 2, 3, 10, 101):
        values = [rng.uniform(0, 5) for _ in range(size)]
        for q in (0, 12.5, 50, 90, 99, 99.9, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
        assert std(values) == pytest.approx(float(np.std(values)))
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)
    assert [percentile_key(q) for q in (50.0, 99.0, 99.9)] == ["50", "99", "99.9"]
    assert parse_percentiles("50, 90,99.9") == [50.0, 90.0, 99.9]
    with pytest.raises(ValueError, match="between 0 and 100"):
        parse_percentiles("50,101")


def test_rate_lists_and_the_file_of_each_rate(tmp_path):
    assert parse_rates("1,2.5,inf") == [1.0, 2.5, "inf"]
    for bad, message in (("0", "> 0"), ("1,x", "not a rate"), ("2,2", "twice"), (",", "no rate")):
        with pytest.raises(BenchError, match=message):
            parse_rates(bad)
    assert result_path(tmp_path / "r.json", 2.5, True).name == "r-2.5qps.json"
    assert result_path(tmp_path / "r.json", "inf", True).name == "r-infqps.json"
    assert result_path(tmp_path / "r.json", 2.0, False) == tmp_path / "r.json"


def test_dataset_files_say_what_is_wrong_with_them(tmp_path):
    sharegpt = tmp_path / "s.json"
    sharegpt.write_text(json.dumps([{"conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "x"}]},
                                    {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a b"}]}]))
    (entry,) = load_dataset("sharegpt", str(sharegpt), count_tokens=lambda text: len(text.split()))
    assert (entry.text, entry.output_len) == ("q", 2)
    assert load_dataset("sharegpt", str(sharegpt))[0].output_len is None  # nothing to count with
    cases = [("sharegpt", "{}", "JSON list"), ("sharegpt", "[1]", "conversations"), ("sharegpt", "x", "not JSON"),
             ("jsonl", '{"prompt": ""}', "needs \"prompt\""), ("jsonl", '{"prompt": "a", "output_len": 0}', "positive"),
             ("jsonl", "[1]", "object"), ("jsonl", "\n", "no usable prompt")]
    for name, text, message in cases:
        path = tmp_path / f"bad.{name}"
        path.write_text(text)
        with pytest.raises(BenchError, match=message):
            load_dataset(name, str(path))
    with pytest.raises(BenchError, match="is not a file"):
        load_dataset("jsonl", str(tmp_path / "missing.jsonl"))


def test_a_small_dataset_fills_a_longer_run_each_entry_once_per_round():
    entries = [DatasetEntry(text=word) for word in ("a", "b", "c")]
    chosen = sample_entries(entries, 7, random.Random(0))
    assert len(chosen) == 7
    assert sorted(e.text for e in chosen[:3]) == sorted(e.text for e in chosen[3:6]) == ["a", "b", "c"]


def _record(index: int, start: float, ttft: float, e2e: float, out: int) -> RequestRecord:
    return RequestRecord(index=index, start=start, requested_prompt_tokens=4, requested_output_tokens=out,
                         prompt_tokens=4, output_tokens=out, ttft=ttft, e2e=e2e,
                         tpot=(e2e - ttft) / (out - 1), itl=[(e2e - ttft) / (out - 1)] * (out - 1))


def test_vllm_keys_closed_loop_and_csv():
    records = [_record(0, 0.0, 0.1, 0.5, 5), _record(1, 0.2, 0.2, 0.4, 3), _record(2, 0.8, 0.1, 0.3, 2)]
    config = BenchConfig(url="http://x/v1", concurrency=2, percentiles=[50.0, 99.9], label="c2")
    result = summarize(config=config, model="m", url="http://x/v1", started_at="2026-12-07T04:00:00+00:00",
                       prompt_source="ids", records=records, duration=1.0)
    out = vllm_result(result)
    assert (out["request_rate"], out["max_concurrency"], out["date"]) == ("inf", 2, "20261207-040000")
    assert out["total_input_tokens"] == 12 and out["total_output_tokens"] == 10 and out["completed"] == 3
    assert out["mean_e2el_ms"] == pytest.approx(400.0) and out["p99.9_ttft_ms"] == pytest.approx(
        np.percentile([100, 200, 100], 99.9))
    assert "p50_itl_ms" in out and "p99_itl_ms" not in out  # only the percentiles asked for
    assert max_concurrent_requests(records) == 2  # 0 and 1 overlap; 2 starts after both ended
    assert BenchResult.from_json(json.dumps(out)) == result
    header, row = to_csv([result]).splitlines()
    assert header.startswith("date,endpoint_type,backend,label") and "goodput_fraction" in header
    assert "ttfts" not in header and row.count(",") == header.count(",")


def test_the_plot_is_skipped_with_a_hint_without_matplotlib(tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None\n"  # as if it were not installed
            "from pathlib import Path\nfrom flowserve_bench.sweep import plot_sweep\n"
            f"print(plot_sweep([], Path({str(tmp_path / 'p.png')!r})))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "pip install 'flowserve-bench[plot]'" in run.stdout and not (tmp_path / "p.png").exists()
