"""Prompts from a file: ShareGPT-format JSON, or JSONL of prompts or chat messages.

**ShareGPT** (``--dataset-name sharegpt``; the format of ``ShareGPT_V3_unfiltered_cleaned_split.json``
that ``vllm bench serve`` and GuideLLM read): a JSON list of conversations, each
``{"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}, ...]}``.
As vLLM does, a conversation with fewer than two turns is skipped; the first turn is the
prompt and the second is the reference answer, whose token count is the output length when
the tokenizer can count it (``--tokenizer`` a ``tokenizer.json`` or a directory holding one).

**JSONL** (``--dataset-name jsonl``): one JSON object a line, either ``{"prompt": "text"}``
or ``{"messages": [{"role": "user", "content": "..."}, ...]}`` (the chat endpoint only), with
an optional ``"output_len"`` (or ``"max_tokens"``) giving that request's output length.

Entries without an output length of their own take one from ``--output-len``; so do all of
them with ``--no-dataset-output-len``. Prompt tokens are what the server counts
(``usage.prompt_tokens``).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from flowserve_bench.errors import BenchError

TokenCounter = Callable[[str], int]

_HUMAN = ("human", "user")


@dataclass(frozen=True)
class DatasetEntry:
    """One prompt of a dataset: text, or chat messages; and its own output length, if any."""

    text: str | None = None
    messages: list[dict[str, Any]] | None = None
    output_len: int | None = None


def _read_sharegpt(path: Path, count_tokens: TokenCounter | None) -> list[DatasetEntry]:
    try:
        data = msgspec.json.decode(path.read_bytes())
    except msgspec.DecodeError as exc:
        raise BenchError(f"--dataset-path {path}: not JSON ({exc}); ShareGPT is one JSON list of "
                         "conversations (a .jsonl file is --dataset-name jsonl)") from None
    if not isinstance(data, list):
        raise BenchError(f"--dataset-path {path}: ShareGPT is a JSON list of conversations, "
                         f"this file holds a {type(data).__name__}")
    entries = []
    for position, item in enumerate(data):
        turns = item.get("conversations") if isinstance(item, dict) else None
        if not isinstance(turns, list):
            raise BenchError(f"--dataset-path {path}: conversation {position} has no "
                             "\"conversations\" list of {\"from\", \"value\"} turns")
        if len(turns) < 2:
            continue
        first, second = turns[0], turns[1]
        if not (isinstance(first, dict) and isinstance(second, dict)
                and isinstance(first.get("value"), str) and isinstance(second.get("value"), str)):
            raise BenchError(f"--dataset-path {path}: conversation {position}: each turn is "
                             "{\"from\": ..., \"value\": \"text\"}")
        if first.get("from") not in _HUMAN or not first["value"].strip():
            continue  # a conversation opened by the model, or an empty question: nothing to ask
        reference = count_tokens(second["value"]) if count_tokens is not None else None
        entries.append(DatasetEntry(text=first["value"], output_len=max(reference, 1) if reference is not None else None))
    return entries


def _read_jsonl(path: Path) -> list[DatasetEntry]:
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"--dataset-path {path}, line {number}"
        try:
            item = msgspec.json.decode(line)
        except msgspec.DecodeError as exc:
            raise BenchError(f"{where}: not JSON ({exc})") from None
        if not isinstance(item, dict):
            raise BenchError(f"{where}: each line is an object with \"prompt\" or \"messages\"")
        output_len = item.get("output_len", item.get("max_tokens"))
        if output_len is not None and (not isinstance(output_len, int) or output_len < 1):
            raise BenchError(f"{where}: output_len must be a positive integer, got {output_len!r}")
        prompt, messages = item.get("prompt"), item.get("messages")
        if isinstance(prompt, str) and prompt:
            entries.append(DatasetEntry(text=prompt, output_len=output_len))
        elif isinstance(messages, list) and messages and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            entries.append(DatasetEntry(messages=messages, output_len=output_len))
        else:
            raise BenchError(f"{where}: needs \"prompt\" (a non-empty string) or \"messages\" "
                             "(a non-empty list of {\"role\", \"content\"})")
    return entries


def load_dataset(name: str, path: str | None, count_tokens: TokenCounter | None = None) -> list[DatasetEntry]:
    """The entries of the dataset file ``path`` in the format ``name`` (``sharegpt``, ``jsonl``).

    :param count_tokens: counts a ShareGPT reference answer's tokens (its output length);
        without it those entries take ``--output-len``.
    :raises BenchError: for a missing or malformed file, naming where.
    """
    if path is None:
        raise BenchError(f"--dataset-name {name} needs --dataset-path")
    where = Path(path).expanduser()
    if not where.is_file():
        raise BenchError(f"--dataset-path {path} is not a file")
    entries = _read_sharegpt(where, count_tokens) if name == "sharegpt" else _read_jsonl(where)
    if not entries:
        raise BenchError(f"--dataset-path {path} holds no usable prompt"
                         + (" (ShareGPT: a human turn followed by an answer)" if name == "sharegpt" else ""))
    return entries


def sample_entries(entries: list[DatasetEntry], count: int, rng: random.Random) -> list[DatasetEntry]:
    """``count`` entries in a seeded random order; past the dataset's size it starts again
    on a fresh order, so a small file still fills a long run."""
    chosen: list[DatasetEntry] = []
    while len(chosen) < count:
        order = list(entries)
        rng.shuffle(order)
        chosen.extend(order[:count - len(chosen)])
    return chosen


def token_counter(tokenizer: str | None) -> TokenCounter | None:
    """A function counting the tokens of a text with ``tokenizer`` (a ``tokenizer.json`` or a
    directory holding one); None for anything else (a ``.gguf`` has no encoder here)."""
    if not tokenizer:
        return None
    where = Path(tokenizer).expanduser()
    if where.is_dir():
        where = where / "tokenizer.json"
    if not where.is_file() or where.suffix == ".gguf":
        return None
    from tokenizers import Tokenizer

    try:
        encoder = Tokenizer.from_file(str(where))
    except Exception as exc:
        raise BenchError(f"cannot read the tokenizer {where}: {exc}") from None
    return lambda text: len(encoder.encode(text, add_special_tokens=False).ids)
