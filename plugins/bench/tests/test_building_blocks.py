"""The pieces under the load generator: length specs, prompts, percentiles, goodput."""

from __future__ import annotations

import math
import random

import msgspec
import numpy as np
import pytest

from flowserve_bench.errors import BenchError
from flowserve_bench.lengths import Fixed, LengthSpecError, Mixture, Uniform, parse_length
from flowserve_bench.metrics import summarize, summarize_latency
from flowserve_bench.prompts import PromptFactory, load_vocabulary
from flowserve_bench.results import BenchConfig, BenchResult, RequestError, RequestRecord
from flowserve_bench.runner import plan_requests, validate
from flowserve_bench.stats import percentile


def test_length_specs_parse_and_sample_within_their_support():
    assert parse_length("128") == Fixed(128)
    assert parse_length(" uniform:64:256 ") == Uniform(64, 256)
    mix = parse_length("mix:0.2@1500,0.8@uniform:10:20")
    assert mix == Mixture((0.2, 0.8), (Fixed(1500), Uniform(10, 20)))
    rng = random.Random(0)
    draws = [mix.sample(rng) for _ in range(2000)]
    assert set(draws) <= {1500} | set(range(10, 21))
    assert 1500 in draws and any(d != 1500 for d in draws)
    assert {Uniform(3, 5).sample(rng) for _ in range(200)} == {3, 4, 5}


@pytest.mark.parametrize("spec, fragment", [
    ("abc", "'abc' is not a length spec"),
    ("0", "at least 1"),
    ("uniform:9:3", "1 <= LO <= HI"),
    ("uniform:5", "is not a length spec"),
    ("mix:0.5@10,0.5", "'0.5' is not WEIGHT@SPEC"),
    ("mix:x@10", "weight 'x' is not a number"),
    ("mix:0@10", "not all 0"),
])
def test_bad_length_specs_name_the_option_and_the_spec(spec, fragment):
    with pytest.raises(LengthSpecError, match="--prompt-len") as caught:
        parse_length(spec, what="--prompt-len")
    assert fragment in str(caught.value)


def test_options_that_cannot_run_are_refused_with_their_name():
    for config, fragment in [
        (BenchConfig(url="http://x/v1", concurrency=2, request_rate=1.0), "not both"),
        (BenchConfig(url="http://x/v1", concurrency=0), "--concurrency"),
        (BenchConfig(url="http://x/v1", request_rate=0.0), "--request-rate"),
        (BenchConfig(url="http://x/v1", num_requests=0), "--num-requests"),
        (BenchConfig(url="http://x/v1", timeout=0), "--timeout"),
        (BenchConfig(url="http://x/v1", output_len="many"), "--output-len"),
    ]:
        with pytest.raises(BenchError, match=fragment):
            validate(config)


def test_an_infinite_rate_survives_json():
    config = BenchConfig(url="http://x/v1", request_rate=math.inf, max_concurrency=4)
    assert config.request_rate == "inf" and config.arrival_rate == math.inf
    again = msgspec.json.decode(msgspec.json.encode(config), type=BenchConfig)
    assert again == config and again.arrival_rate == math.inf
    assert "all at once, max concurrency 4" in again.load_description


def test_vocabulary_keeps_ordinary_tokens_and_prompts_have_the_asked_length(tiny_model):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    vocabulary = load_vocabulary(tiny_model)
    special = set(tok.get_added_tokens_decoder())
    assert len(vocabulary.ids) >= 16 and not special & set(vocabulary.ids)
    for token_id in vocabulary.ids:
        assert tok.decode([token_id]).strip().isalpha()

    factory = PromptFactory(vocabulary, "completions")
    plan = plan_requests(20, parse_length("uniform:5:40"), parse_length("7"), factory, random.Random("s"))
    for request in plan:
        assert isinstance(request.prompt, list) and len(request.prompt) == request.prompt_len
        assert set(request.prompt) <= set(vocabulary.ids) and request.output_len == 7
    assert plan == plan_requests(20, parse_length("uniform:5:40"), parse_length("7"), factory, random.Random("s"))
    assert isinstance(PromptFactory(vocabulary, "chat").make(10, random.Random(0)), str)
    assert "common English words" in PromptFactory(None, "completions").description


def test_a_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(BenchError, match="does not exist"):
        load_vocabulary(tmp_path / "nowhere")
    with pytest.raises(BenchError, match="no tokenizer.json"):
        load_vocabulary(tmp_path)


def test_percentiles_match_numpy():
    values = sorted(random.Random(1).expovariate(3.0) for _ in range(101))
    for q in (0, 1, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    summary = summarize_latency(values)
    assert summary.min <= summary.p50 <= summary.p90 <= summary.p99 <= summary.max
    assert summarize_latency([]).p50 is None


def _done(index: int, ttft: float, tpot: float | None, out: int) -> RequestRecord:
    return RequestRecord(index=index, start=0.0, requested_prompt_tokens=10, requested_output_tokens=out,
                         prompt_tokens=10, output_tokens=out, ttft=ttft, tpot=tpot,
                         e2e=ttft + (tpot or 0) * (out - 1), itl=[tpot or 0.0] * (out - 1))


def _failed(index: int, status: str) -> RequestRecord:
    return RequestRecord(index=index, start=0.0, requested_prompt_tokens=10, requested_output_tokens=5,
                         error=RequestError(status, f"{status} went wrong"))


def test_goodput_counts_requests_within_every_slo():
    records = [_done(0, 0.1, 0.01, 5), _done(1, 0.5, 0.01, 5), _done(2, 0.1, 0.05, 5), _done(3, 0.1, None, 1),
               _failed(4, "503"), _failed(5, "timeout"), _failed(6, "503")]
    config = BenchConfig(url="http://x/v1", slo_ttft=0.2, slo_tpot=0.02)
    result = summarize(config=config, model="m", url="http://x/v1", started_at="now", prompt_source="ids",
                       records=records, duration=2.0)
    assert (result.completed, result.failed, result.num_requests) == (4, 3, 7)
    assert [(e.status, e.count) for e in result.errors] == [("503", 2), ("timeout", 1)]
    assert result.good_requests == 2 and result.goodput == 1.0  # records 0 and 3 (no TPOT with 1 token)
    assert result.goodput_fraction == pytest.approx(2 / 7)
    assert result.total_output_tokens == 16 and result.output_throughput == 8.0
    assert result.request_throughput == 2.0 and result.total_token_throughput == (40 + 16) / 2
    assert result.itl.count == 12 and result.tpot.count == 3
    no_slo = summarize(config=BenchConfig(url="http://x/v1"), model="m", url="u", started_at="now",
                       prompt_source="ids", records=records, duration=2.0)
    assert no_slo.goodput is None and no_slo.goodput_fraction is None
    assert BenchResult.from_json(result.to_json()) == result


def test_smollm2s_served_name_finds_its_gguf_vocabulary():
    from flowserve_bench.prompts import find_vocabulary
    from flowserve_core.config import default_model_path

    pytest.importorskip("gguf")
    vocabulary = find_vocabulary(None, "SmolLM2-135M-Instruct.Q4_1.gguf")  # FlowServe's default model id
    assert vocabulary is not None and vocabulary.source == default_model_path()
    assert len(vocabulary.ids) > 10_000
    assert not {0, 1, 2} & set(vocabulary.ids)  # <|endoftext|>, <|im_start|>, <|im_end|>
    assert all(piece.strip().isalpha() and piece.isascii() for piece in vocabulary.pieces)
    assert find_vocabulary(None, "some-remote-model") is None
