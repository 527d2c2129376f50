"""Conformance suite for tokenizers: ``check_tokenizer(tokenizer)``."""

from __future__ import annotations

from typing import Sequence

from flowserve_core.interfaces import ChatMessage, IncrementalDetokenizer, Tokenizer
from flowserve_core.types import SamplingParams
from flowserve_testing._suite import require

DEFAULT_TEXTS = (
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "naïve café résumé — 東京 🙂 and 👩‍💻, then done.",
)


def check_tokenizer(tokenizer: Tokenizer, texts: Sequence[str] = DEFAULT_TEXTS) -> None:
    """Check that a built tokenizer keeps the ``Tokenizer`` Protocol's promises on ``texts``.

    Rules: ids are ints below ``vocab_size``, and so are ``eos_token_ids``;
    ``decode(encode(text, add_special_tokens=False)) == text``; a detokenizer's deltas, pushed
    one token or several at a time, join (with ``finish()``) into ``decode`` of the same ids
    and never show a replacement character that ``decode`` does not; a stop string ends the
    text right before it (or after it, with ``include_stop_str_in_output``), and nothing comes
    after; ``token_text`` gives a string; ``apply_chat_template`` gives valid ids or raises
    ``ValueError`` (no template). Raises ``ConformanceError`` naming the broken rule.
    """
    require(isinstance(tokenizer, Tokenizer), "a tokenizer has every member of the Tokenizer Protocol",
            type(tokenizer).__name__)
    vocab = tokenizer.vocab_size
    require(isinstance(vocab, int) and vocab > 0, "vocab_size is a positive int", repr(vocab))
    require(all(isinstance(t, int) and 0 <= t < vocab for t in tokenizer.eos_token_ids),
            "eos_token_ids are token ids", repr(tokenizer.eos_token_ids))
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        require(ids and all(isinstance(t, int) and 0 <= t < vocab for t in ids),
                "encode() returns token ids below vocab_size", f"{text!r} -> {ids[:20]}")
        require(all(isinstance(t, int) for t in tokenizer.encode(text)), "encode() with special tokens "
                "returns ints")
        decoded = tokenizer.decode(ids)
        require(decoded == text, "decode(encode(text)) == text", f"{text!r} -> {decoded!r}")
        require(all(isinstance(tokenizer.token_text(t), str) for t in ids[:8]), "token_text() returns a str")
        for chunk in (1, 3):
            joined, _ = _stream(tokenizer, ids, SamplingParams(), chunk)
            require(joined == decoded, "detokenizer deltas (and finish()) join into decode() of the same "
                    "ids", f"{chunk} at a time: {joined!r} vs {decoded!r}")
        _check_stop_strings(tokenizer, ids, decoded)
    try:
        chat = tokenizer.apply_chat_template([ChatMessage(role="user", content=texts[0])])
    except ValueError:
        return  # no chat template: a clear ValueError is what the Protocol asks for
    require(chat and all(isinstance(t, int) and 0 <= t < vocab for t in chat),
            "apply_chat_template() returns token ids", repr(chat[:20]))


def _stream(tokenizer: Tokenizer, ids: list[int], params: SamplingParams, chunk: int) -> tuple[str, bool]:
    """Push ``ids`` ``chunk`` at a time; the joined text and whether a stop string matched.
    Checks that no text comes after the stop and no half character is shown."""
    detokenizer = tokenizer.detokenizer([], params)
    require(isinstance(detokenizer, IncrementalDetokenizer), "detokenizer() returns an IncrementalDetokenizer")
    text, stopped = "", False
    for start in range(0, len(ids), chunk):
        delta = detokenizer.push(ids[start:start + chunk])
        require(not (stopped and delta.text), "after a stop string matched, no more text comes",
                repr(delta.text))
        text += delta.text
        stopped = stopped or delta.stopped
    tail = detokenizer.finish()
    require(not (stopped and tail), "after a stop string matched, finish() returns nothing", repr(tail))
    text += tail
    require("\ufffd" not in text or "\ufffd" in tokenizer.decode(ids),
            "deltas never show half a UTF-8 character (U+FFFD)", repr(text))
    return text, stopped


def _check_stop_strings(tokenizer: Tokenizer, ids: list[int], decoded: str) -> None:
    middle = len(decoded) // 2
    stop = decoded[middle:middle + 4]
    if len(stop.strip()) < 2:
        return
    cut = decoded.find(stop)
    for include, expected in ((False, decoded[:cut]), (True, decoded[:cut + len(stop)])):
        params = SamplingParams(stop=[stop], include_stop_str_in_output=include)
        for chunk in (1, 3):
            text, stopped = _stream(tokenizer, ids, params, chunk)
            require(stopped and text == expected,
                    f"a stop string ends the text {'after' if include else 'before'} it and says stopped",
                    f"stop {stop!r}, {chunk} at a time: {text!r} (stopped={stopped}) vs {expected!r}")
