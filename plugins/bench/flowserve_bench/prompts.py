"""Synthetic prompts built to a target token count for the served model.

The choice, in order of exactness:

* **Token ids** (``/v1/completions`` with a tokenizer): the prompt is a list of random
  *ordinary* token ids of the served model's vocabulary (tokens that read as a word: ASCII
  letters with an optional leading space; no special, control or byte tokens), sent as
  ``prompt: [ids]``, which FlowServe and vLLM take as-is. The prompt has exactly the asked
  number of tokens and no prefix is shared between requests.
* **Text** (``chat``, or no tokenizer found): words from that vocabulary (or, with no
  tokenizer, common English words, most of them one token in any BPE vocabulary), one per
  asked token. The server's count (``usage.prompt_tokens``, which for chat includes the
  template) is what the results report.

The tokenizer is ``--tokenizer`` (a ``tokenizer.json``, a directory holding one, or a
``.gguf`` file), else the served model id when it is such a path, else SmolLM2's GGUF when the
model id is its file name (FlowServe's default served name).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from flowserve_bench.errors import BenchError

_ORDINARY = re.compile(r" ?[A-Za-z]{2,}")
_SPACE_MARKERS = ("Ġ", "▁")  # byte-level BPE and SentencePiece spell a leading space so
_MIN_ORDINARY = 16

COMMON_WORDS = tuple(
    "the of and to in is was for on that with as it by at from his an were are which this be "
    "has or had first one their its new after who they have her she two been other when there "
    "all during into school time may years more most only over city some world would where "
    "later up such used many can state about national out known university united then made "
    "team under people well while also these than both three year city game season water "
    "river small large long house music album family number record early because part".split())


@dataclass(frozen=True)
class Vocabulary:
    """The ordinary tokens of a tokenizer: their ids and their text (a leading space kept)."""

    source: str
    ids: tuple[int, ...]
    pieces: tuple[str, ...]

    def sample_ids(self, n: int, rng: random.Random) -> list[int]:
        """``n`` random ordinary token ids."""
        return rng.choices(self.ids, k=n)

    def sample_text(self, n: int, rng: random.Random) -> str:
        """About ``n`` tokens of text: ``n`` random words of this vocabulary."""
        words = [p for p in self.pieces if p.startswith(" ")]
        if len(words) >= _MIN_ORDINARY:
            return "".join(rng.choices(words, k=n)).lstrip()
        return " ".join(rng.choices(self.pieces, k=n))


def _vocabulary(source: str, tokens: list[tuple[int, str]]) -> Vocabulary:
    ids, pieces = [], []
    for token_id, token in tokens:
        if token[:1] in _SPACE_MARKERS:
            token = " " + token[1:]
        if _ORDINARY.fullmatch(token):
            ids.append(token_id)
            pieces.append(token)
    if len(ids) < _MIN_ORDINARY:
        raise BenchError(f"the tokenizer {source} has only {len(ids)} ordinary tokens (words of ASCII "
                         f"letters); {_MIN_ORDINARY} are needed to build prompts")
    return Vocabulary(source, tuple(ids), tuple(pieces))


def _from_tokenizer_json(path: Path) -> Vocabulary:
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:
        raise BenchError(f"cannot read the tokenizer {path}: {exc}") from None
    special = set(tok.get_added_tokens_decoder())
    tokens = [(i, t) for t, i in tok.get_vocab(with_added_tokens=False).items() if i not in special]
    return _vocabulary(str(path), sorted(tokens))


def _from_gguf(path: Path) -> Vocabulary:
    try:
        import gguf
    except ImportError:
        raise BenchError(f"reading the tokenizer of {path} needs the gguf package: "
                         "pip install 'flowserve-bench[gguf]'") from None
    try:
        reader = gguf.GGUFReader(str(path))
        tokens_field = reader.fields["tokenizer.ggml.tokens"]
        types_field = reader.fields.get("tokenizer.ggml.token_type")
    except (KeyError, ValueError, OSError) as exc:
        raise BenchError(f"cannot read a tokenizer from {path}: {exc}") from None
    normal = int(gguf.TokenType.NORMAL)
    tokens = []
    for token_id, part in enumerate(tokens_field.data):
        if types_field is not None and int(types_field.parts[types_field.data[token_id]][0]) != normal:
            continue
        tokens.append((token_id, bytes(tokens_field.parts[part]).decode("utf-8", "replace")))
    return _vocabulary(str(path), tokens)


def load_vocabulary(path: str | Path) -> Vocabulary:
    """The ordinary tokens of a ``tokenizer.json``, a directory holding one (or one ``.gguf``),
    or a ``.gguf`` file."""
    where = Path(path).expanduser()
    if where.is_dir():
        if (where / "tokenizer.json").is_file():
            return _from_tokenizer_json(where / "tokenizer.json")
        ggufs = sorted(where.glob("*.gguf"))
        if len(ggufs) == 1:
            return _from_gguf(ggufs[0])
        raise BenchError(f"--tokenizer {path}: the directory holds no tokenizer.json "
                         f"and {'several' if ggufs else 'no'} .gguf files")
    if where.suffix == ".gguf" and where.is_file():
        return _from_gguf(where)
    if where.is_file():
        return _from_tokenizer_json(where)
    raise BenchError(f"--tokenizer {path} does not exist (give a tokenizer.json, a directory "
                     "holding one, or a .gguf file)")


def find_vocabulary(tokenizer: str | None, model: str) -> Vocabulary | None:
    """The vocabulary to build prompts from: ``tokenizer`` when given, else the served model
    id when it is a local path, else SmolLM2 when the id is its file name; None otherwise."""
    if tokenizer:
        return load_vocabulary(tokenizer)
    if Path(model).expanduser().exists():
        return load_vocabulary(model)
    try:
        from flowserve_core.config import default_model_path

        default = Path(default_model_path())
    except Exception:  # the default model is not installed: nothing to fall back on
        return None
    return load_vocabulary(default) if model == default.name else None


class PromptFactory:
    """Builds one prompt of a given token count, as token ids or as text (see the module)."""

    def __init__(self, vocabulary: Vocabulary | None, endpoint: str) -> None:
        self.vocabulary = vocabulary
        self.as_token_ids = vocabulary is not None and endpoint == "completions"

    @property
    def description(self) -> str:
        """How prompts are made, for the results (``prompt_source``)."""
        if self.as_token_ids and self.vocabulary is not None:
            return f"token ids: ordinary tokens of {self.vocabulary.source}"
        if self.vocabulary is not None:
            return f"text: words of {self.vocabulary.source}; prompt tokens counted by the server"
        return "text: common English words (no tokenizer found); prompt tokens counted by the server"

    def make(self, n: int, rng: random.Random) -> list[int] | str:
        """A prompt of ``n`` tokens (token ids), or of about ``n`` tokens (text)."""
        if self.as_token_ids and self.vocabulary is not None:
            return self.vocabulary.sample_ids(n, rng)
        if self.vocabulary is not None:
            return self.vocabulary.sample_text(n, rng)
        return " ".join(rng.choices(COMMON_WORDS, k=n))
