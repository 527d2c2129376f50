"""Streaming detokenization: token ids in, text deltas out, one output sequence at a time.

Two layers, both cheap per token (this runs on the server's event loop for every token):

* ``IncrementalDecoder`` turns ids into text with vLLM's prefix/read offsets: each step
  decodes only a short window (the tokens of the last delta plus the new ones) and releases
  the text past the window's already-released part, unless it ends in U+FFFD, which means a
  UTF-8 character (or a byte-fallback / byte-level piece) is still incomplete. The window
  starts on the prompt's tail, so the first output token keeps the leading space it has in
  context (SentencePiece decoders strip a leading space at the start of a decode).
* ``StopStringMatcher`` (``stop_strings.py``) cuts the text at the first stop string and holds
  back what may still become one.

Invariant, checked by the tests: the deltas plus ``finish()`` concatenate to
``decode(context + output)[len(decode(context)):]`` where ``context`` is the prompt tail; for
byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM) that is exactly ``decode(output)``, for any ids.
One exception, shared with vLLM and tokenizers' ``DecodeStream``: a byte-fallback decoder
(Llama 2, Mistral v0.1) turns *every* byte of a run of byte tokens into U+FFFD once the run
is invalid UTF-8; characters of that run streamed before the bad byte arrived stay streamed.
"""

from __future__ import annotations

from typing import Callable, Sequence

from flowserve_core.interfaces import TextDelta
from flowserve_core.types import SamplingParams
from flowserve_hf_tokenizer.stop_strings import StopStringMatcher

#: ``decode(token_ids, skip_special_tokens) -> str``
DecodeFn = Callable[[Sequence[int], bool], str]

REPLACEMENT_CHARACTER = "\ufffd"
# The prompt tail used as context: a few tokens are enough for spacing; more are tried only
# while the tail's text still has an incomplete character in it.
_MIN_CONTEXT_TOKENS = 4
_MAX_CONTEXT_TOKENS = 24


def prompt_context(decode: DecodeFn, prompt_token_ids: Sequence[int], skip_special_tokens: bool) -> list[int]:
    """The shortest prompt tail (4–24 tokens) that decodes to whole characters, else none.

    A tail that starts or ends inside a UTF-8 character would make the first deltas wrong;
    with no clean tail (a prompt cut mid-character) the output is decoded on its own.
    """
    prompt = list(prompt_token_ids)
    for length in range(min(_MIN_CONTEXT_TOKENS, len(prompt)), min(_MAX_CONTEXT_TOKENS, len(prompt)) + 1):
        tail = prompt[len(prompt) - length:]
        if REPLACEMENT_CHARACTER not in decode(tail, skip_special_tokens):
            return tail
    return []


class IncrementalDecoder:
    """UTF-8-safe text deltas from a growing list of token ids (vLLM's prefix/read offsets)."""

    __slots__ = ("_decode", "_skip", "_ids", "_prefix_offset", "_read_offset", "_prefix_text")

    def __init__(self, decode: DecodeFn, context_ids: Sequence[int], skip_special_tokens: bool):
        self._decode = decode
        self._skip = skip_special_tokens
        self._ids = list(context_ids)
        # ids[prefix_offset:read_offset] decode to prefix_text, already accounted for (context
        # or released); ids[read_offset:] are new. Both offsets sit on whole characters.
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._prefix_text = decode(self._ids, skip_special_tokens) if self._ids else ""

    def push(self, token_ids: Sequence[int]) -> str:
        """Add ``token_ids``; the newly decided text ("" while a character is incomplete)."""
        self._ids.extend(token_ids)
        text = self._window_text()
        if len(text) <= len(self._prefix_text) or text[-1] == REPLACEMENT_CHARACTER:
            return ""
        delta = text[len(self._prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        # The next window starts at the old read offset: re-decode it in its own window,
        # since decoders such as SentencePiece's strip a leading space at a window's start.
        self._prefix_text = self._decode(self._ids[self._prefix_offset:], self._skip)
        return delta

    def finish(self) -> str:
        """Release everything left, incomplete characters included (as U+FFFD)."""
        delta = self._window_text()[len(self._prefix_text):]
        self._prefix_offset = self._read_offset = len(self._ids)
        self._prefix_text = ""
        return delta

    def _window_text(self) -> str:
        text = self._decode(self._ids[self._prefix_offset:], self._skip)
        if text.startswith(self._prefix_text):
            return text
        # The decoder rewrote text it had already produced: byte fallback turns a whole run
        # of byte tokens into U+FFFD once one byte is invalid. Released text cannot be
        # recalled, so decode the new tokens on their own from here on (as vLLM does).
        self._prefix_offset, self._prefix_text = self._read_offset, ""
        return self._decode(self._ids[self._read_offset:], self._skip)


class HFDetokenizer:
    """``interfaces.IncrementalDetokenizer`` for one output sequence: decoding + stop strings.

    ``push`` returns ``TextDelta(text, stopped)``; after a stop string matched it returns
    ``stopped=True`` with the text up to the match (through it with
    ``include_stop_str_in_output``) and then only empty deltas. ``finish`` releases the
    text held back when the sequence ends for another reason (EOS, length, abort).

    The token that ends a sequence (an end-of-sequence token of ``eos_token_ids``, unless
    ``ignore_eos``, or one of ``stop_token_ids``) is not decoded into the text unless
    ``include_stop_str_in_output``, as vLLM does: with ``skip_special_tokens`` false the text
    does not end in ``</s>``.
    """

    __slots__ = ("_decoder", "_stops", "stopped", "_finished", "_enders")

    def __init__(self, decode: DecodeFn, prompt_token_ids: Sequence[int], params: SamplingParams,
                 eos_token_ids: Sequence[int] = ()):
        skip = params.skip_special_tokens
        self._decoder = IncrementalDecoder(decode, prompt_context(decode, prompt_token_ids, skip), skip)
        self._stops = StopStringMatcher(params.stop, params.include_stop_str_in_output) if params.stop else None
        self.stopped = False
        self._finished = False
        enders = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
        self._enders = frozenset() if params.include_stop_str_in_output else frozenset(enders)

    def push(self, token_ids: Sequence[int]) -> TextDelta:
        """Decode ``token_ids`` (the sequence's next tokens) into the text now decided."""
        if self.stopped or self._finished:
            return TextDelta(text="", stopped=self.stopped)
        if token_ids and token_ids[-1] in self._enders:
            token_ids = token_ids[:-1]
        text = self._decoder.push(token_ids)
        if self._stops is None:
            return TextDelta(text=text)
        text, self.stopped = self._stops.feed(text)
        return TextDelta(text=text, stopped=self.stopped)

    def finish(self) -> str:
        """The sequence ended without a stop string: the text still held back (once)."""
        if self.stopped or self._finished:
            return ""
        self._finished = True
        text = self._decoder.finish()
        if self._stops is None:
            return text
        # The flushed tail can still complete a stop string (one ending in U+FFFD, say).
        text, self.stopped = self._stops.feed(text)
        return text if self.stopped else text + self._stops.flush()
