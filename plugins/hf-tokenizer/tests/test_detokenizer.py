"""Streaming detokenization with real tokenizers: SmolLM2's byte-level BPE (from its GGUF) and
a SentencePiece-style BPE with byte fallback trained in the test.

Properties: any split of any token sequence streams to the full decode; text made of whole
characters never streams a U+FFFD; stop strings anywhere (across token boundaries too) cut
the text exactly and are never streamed unless asked for.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings, strategies as st

from flowserve_core.interfaces import ChatMessage, IncrementalDetokenizer, TextDelta
from flowserve_core.types import SamplingParams
from flowserve_hf_tokenizer.detokenizer import HFDetokenizer
from flowserve_hf_tokenizer.testing import WIDE_CHARACTERS as WIDE

characters = st.sampled_from(list("abcdefghij ,.!\n") + ["Hello", " world", " the"] + WIDE)
texts = st.lists(characters, max_size=25).map("".join)
# More examples for a thorough local run: FLOWSERVE_HF_TOKENIZER_EXAMPLES=5000.
EXAMPLES = int(os.environ.get("FLOWSERVE_HF_TOKENIZER_EXAMPLES", "150"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def chunks(ids: list[int], sizes: list[int]) -> list[list[int]]:
    """``ids`` cut into pieces of the given sizes (cycled), as an engine might deliver them."""
    pieces, start, sizes = [], 0, sizes or [1]
    while start < len(ids):
        size = sizes[len(pieces) % len(sizes)]
        pieces.append(ids[start:start + size])
        start += size
    return pieces


def stream(detokenizer: IncrementalDetokenizer, pieces: list[list[int]]) -> tuple[list[str], bool]:
    """Push every piece until a stop; the deltas (``finish()`` last) and whether it stopped."""
    deltas = []
    for piece in pieces:
        delta = detokenizer.push(piece)
        assert isinstance(delta, TextDelta)
        deltas.append(delta.text)
        if delta.stopped:
            assert detokenizer.push([piece[0]]) == TextDelta(text="", stopped=True)
            return deltas, True
    deltas.append(detokenizer.finish())
    return deltas, False


def chat_prompt(tokenizer) -> list[int]:
    return tokenizer.apply_chat_template([ChatMessage(role="user", content="Say something.")])


# ---------------------------------------------------------------- SmolLM2 (byte-level BPE)


@SETTINGS
@given(data=st.data(), skip=st.booleans(), sizes=st.lists(st.integers(1, 5), max_size=6))
def test_any_token_ids_stream_to_the_full_decode(smollm2, data, skip, sizes):
    token = st.one_of(st.integers(0, smollm2.vocab_size - 1), st.sampled_from([0, 1, 2, 216, 7906, 240]))
    output = data.draw(st.lists(token, max_size=30), label="output")
    prompt = data.draw(st.one_of(st.just(chat_prompt(smollm2)), st.lists(token, max_size=8)), label="prompt")
    # any ids: an end-of-sequence token among them is text here (ignore_eos), not the end
    detokenizer = smollm2.detokenizer(prompt, SamplingParams(skip_special_tokens=skip, ignore_eos=True))
    deltas, stopped = stream(detokenizer, chunks(output, sizes))
    assert not stopped
    assert "".join(deltas) == smollm2.decode(output, skip_special_tokens=skip)
    assert smollm2.decode(output, skip_special_tokens=skip) == \
        smollm2_oracle_decode(smollm2, output, skip)


def test_the_token_that_ends_a_sequence_is_not_text_unless_asked_for(smollm2):
    """As vLLM: with special tokens kept, an answer ending at EOS (or at a stop token id) does
    not end in its text; ``include_stop_str_in_output`` keeps it."""
    eos = smollm2.eos_token_ids[0]
    said = smollm2.encode("Hello there", add_special_tokens=False)
    for params, ender, shown in [(SamplingParams(skip_special_tokens=False), eos, False),
                                 (SamplingParams(skip_special_tokens=False, include_stop_str_in_output=True), eos, True),
                                 (SamplingParams(stop_token_ids=[said[-1]]), said[-1], False)]:
        output = [*said, ender] if ender != said[-1] else said
        deltas, _ = stream(smollm2.detokenizer(chat_prompt(smollm2), params), chunks(output, [2]))
        whole = smollm2.decode(output, skip_special_tokens=params.skip_special_tokens)
        assert "".join(deltas) == (whole if shown else smollm2.decode(output[:-1], skip_special_tokens=False))


def smollm2_oracle_decode(tokenizer, ids, skip):
    return tokenizer.hf_tokenizer.decode(ids, skip_special_tokens=skip)


@SETTINGS
@given(text=texts, sizes=st.lists(st.integers(1, 4), max_size=6))
def test_whole_characters_stream_without_a_replacement_character(smollm2, text, sizes):
    output = smollm2.encode(text, add_special_tokens=False)
    deltas, _ = stream(smollm2.detokenizer(chat_prompt(smollm2), SamplingParams()), chunks(output, sizes))
    assert "".join(deltas) == text
    assert not any("\ufffd" in delta for delta in deltas)


def test_a_character_split_over_byte_tokens_is_held_until_complete(smollm2):
    output = smollm2.encode("世界", add_special_tokens=False)
    assert len(output) > 2  # several byte-level pieces per character
    detokenizer = smollm2.detokenizer([], SamplingParams())
    deltas = [detokenizer.push([token]).text for token in output]
    assert [d for d in deltas if d] == ["世", "界"]


@SETTINGS
@given(data=st.data(), text=texts, include=st.booleans(), sizes=st.lists(st.integers(1, 4), max_size=6))
def test_stop_strings_anywhere_cut_exactly_and_never_stream(smollm2, data, text, include, sizes):
    output = smollm2.encode(text, add_special_tokens=False)
    substrings = st.tuples(st.integers(0, len(text)), st.integers(1, 6)).map(lambda p: text[p[0]:p[0] + p[1]])
    stops = data.draw(st.lists(st.one_of(substrings, st.sampled_from(["\n", " wor", "🙂", "xyz"])).filter(bool),
                               min_size=1, max_size=3), label="stops")
    params = SamplingParams(stop=stops, include_stop_str_in_output=include)
    deltas, stopped = stream(smollm2.detokenizer(chat_prompt(smollm2), params), chunks(output, sizes))
    matches = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
    if matches:
        end, start = min(matches)
        assert stopped and "".join(deltas) == (text[:end] if include else text[:start])
    else:
        assert not stopped and "".join(deltas) == text


def test_streamed_text_never_contains_what_a_later_stop_string_swallows(smollm2):
    output = smollm2.encode("The answer is 42. The end", add_special_tokens=False)
    detokenizer = smollm2.detokenizer([], SamplingParams(stop=["42. The"]))
    streamed = ""
    for token in output:
        delta = detokenizer.push([token])
        streamed += delta.text
        assert "42" not in streamed
        if delta.stopped:
            break
    assert streamed == "The answer is " and delta.stopped


def test_special_tokens_are_skipped_or_kept_as_asked(smollm2):
    output = smollm2.encode("Hi there", add_special_tokens=False) + smollm2.eos_token_ids
    for skip, expected in ((True, "Hi there"), (False, "Hi there<|im_end|>")):
        deltas, _ = stream(smollm2.detokenizer([], SamplingParams(skip_special_tokens=skip, ignore_eos=True)),
                           chunks(output, [1]))
        assert "".join(deltas) == expected


def test_detokenizers_satisfy_the_protocol(smollm2):
    assert isinstance(smollm2.detokenizer([1, 2], SamplingParams()), IncrementalDetokenizer)
    assert isinstance(smollm2.detokenizer([1, 2], SamplingParams()), HFDetokenizer)


def test_finish_releases_an_incomplete_character_once(smollm2):
    first_byte_of_world = smollm2.encode("世", add_special_tokens=False)[0]
    detokenizer = smollm2.detokenizer([], SamplingParams())
    assert detokenizer.push([first_byte_of_world]).text == ""
    assert detokenizer.finish() == smollm2.decode([first_byte_of_world]) == "\ufffd"
    assert detokenizer.finish() == ""


# ---------------------------------------------------------------- SentencePiece style


@SETTINGS
@given(prompt_text=texts, text=texts, skip=st.booleans(), sizes=st.lists(st.integers(1, 4), max_size=6))
def test_sentencepiece_output_keeps_its_leading_space_after_a_prompt(llama_style, prompt_text, text, skip, sizes):
    prompt = llama_style.encode(prompt_text)  # with <s>
    output = llama_style.encode(text, add_special_tokens=False)
    deltas, _ = stream(llama_style.detokenizer(prompt, SamplingParams(skip_special_tokens=skip, ignore_eos=True)),
                       chunks(output, sizes))
    before = llama_style.decode(prompt, skip_special_tokens=skip)
    whole = llama_style.decode(prompt + output, skip_special_tokens=skip)
    assert whole.startswith(before)
    assert "".join(deltas) == whole[len(before):]
    assert not any("\ufffd" in delta for delta in deltas)


def test_sentencepiece_leading_space_depends_on_the_prompt(llama_style):
    output = llama_style.encode("world", add_special_tokens=False)
    assert llama_style.decode(output) == "world"  # decoded alone, the space is stripped
    after_text, _ = stream(llama_style.detokenizer(llama_style.encode("Hello"), SamplingParams()), [output])
    after_bos, _ = stream(llama_style.detokenizer(llama_style.encode(""), SamplingParams()), [output])
    assert "".join(after_text) == " world"
    assert "".join(after_bos) == "world"


def byte_fallback_ids(tokenizer) -> set[int]:
    vocab = tokenizer.hf_tokenizer.get_vocab()
    return {i for piece, i in vocab.items() if piece.startswith("<0x") and piece.endswith(">")}


@SETTINGS
@given(data=st.data(), sizes=st.lists(st.integers(1, 4), max_size=6))
def test_sentencepiece_random_ids_stream_to_the_full_decode(llama_style, data, sizes):
    # Random ids, with byte-fallback tokens only as whole characters (see the next test).
    byte_ids = byte_fallback_ids(llama_style)
    other_ids = sorted(set(range(llama_style.vocab_size)) - byte_ids)
    whole_characters = st.sampled_from(WIDE).map(lambda c: llama_style.encode(c, add_special_tokens=False))
    parts = st.lists(st.one_of(st.sampled_from(other_ids).map(lambda i: [i]), whole_characters), max_size=20)
    output = [i for part in data.draw(parts, label="output") for i in part]
    deltas, _ = stream(llama_style.detokenizer([], SamplingParams(ignore_eos=True)), chunks(output, sizes))
    assert "".join(deltas) == llama_style.decode(output)


def test_an_invalid_byte_fallback_run_streams_its_valid_characters(llama_style):
    # Known limit, shared with vLLM and tokenizers' DecodeStream: a byte-fallback decoder turns
    # *every* byte of an invalid run into U+FFFD, so a valid character streamed before the bad
    # byte arrived stays in the stream while decode() of the whole replaces it.
    vocab = llama_style.hf_tokenizer.get_vocab()
    smile, bad = [vocab[f"<0x{b:02X}>"] for b in "🙂".encode()], vocab["<0x80>"]
    deltas, _ = stream(llama_style.detokenizer([], SamplingParams()), chunks(smile + [bad], [1]))
    assert "".join(deltas) == "🙂\ufffd"
    assert llama_style.decode(smile + [bad]) == "\ufffd" * 5


@SETTINGS
@given(data=st.data(), text=texts, include=st.booleans(), sizes=st.lists(st.integers(1, 4), max_size=6))
def test_sentencepiece_stop_strings_cut_exactly(llama_style, data, text, include, sizes):
    output = llama_style.encode(text, add_special_tokens=False)
    full = llama_style.decode(output)
    stop = data.draw(st.tuples(st.integers(0, len(full)), st.integers(1, 5)).map(
        lambda p: full[p[0]:p[0] + p[1]]).filter(bool) | st.just("zz"), label="stop")
    params = SamplingParams(stop=[stop], include_stop_str_in_output=include)
    deltas, stopped = stream(llama_style.detokenizer([], params), chunks(output, sizes))
    if stop in full:
        start = full.find(stop)
        assert stopped and "".join(deltas) == full[:start + len(stop) if include else start]
    else:
        assert not stopped and "".join(deltas) == full
