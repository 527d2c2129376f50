"""Find and load a model's tokenizer: a directory, a GGUF file, or a Hub id (downloaded when missing).

A GGUF tokenizer is rebuilt by transformers from the file's vocabulary and merges, which
takes ~10 s; the result is saved once (``save_pretrained``) under
``$FLOWSERVE_CACHE_DIR/hf-tokenizer/<key>`` (default ``~/.cache/flowserve``), keyed by the
file's path, size and modification time, together with the facts the GGUF header gives
(end-of-sequence ids, context length). Later loads read that directory in well under a second.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import msgspec

from flowserve_core.errors import ConfigError
from flowserve_hf_tokenizer.gguf_metadata import gguf_model_facts, read_gguf_scalars

logger = logging.getLogger(__name__)

#: Bump when what the cache holds changes, so old entries are ignored.
CACHE_FORMAT = 1
FACTS_FILE = "flowserve-tokenizer.json"
#: What a tokenizer reads from a Hub repository (never the weights).
_HUB_FILES = ["*.json", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
# Config keys that hold a model's context length, most common first.
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


class ModelFacts(msgspec.Struct, kw_only=True):
    """What the model (not its tokenizer) says: end-of-sequence ids and context length."""

    eos_token_ids: list[int] = []
    context_length: int | None = None
    source: str = ""


class LoadedTokenizer(msgspec.Struct, kw_only=True):
    """A transformers tokenizer plus the model facts found beside it."""

    tokenizer: Any
    facts: ModelFacts
    model: str


def cache_root() -> Path:
    """Where FlowServe caches derived files: ``$FLOWSERVE_CACHE_DIR`` or ``~/.cache/flowserve``."""
    return Path(os.environ.get("FLOWSERVE_CACHE_DIR") or "~/.cache/flowserve").expanduser()


def load_tokenizer(model: str) -> LoadedTokenizer:
    """Load the tokenizer of ``model``: a ``.gguf`` file, a model directory, or a Hub id (from
    the local Hugging Face cache; its tokenizer files are downloaded first when missing and
    the Hub may be asked). Raises ``ConfigError`` naming what is wrong."""
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ConfigError(f"model {model!r} is a file but not a .gguf file; give a GGUF file "
                              "or a model directory (with tokenizer.json or tokenizer_config.json)")
        return _load_gguf(path)
    if path.is_dir():
        if any((path / name).exists() for name in _TOKENIZER_FILES):
            return _load_directory(path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _load_gguf(ggufs[0])
        found = f"several GGUF files ({', '.join(p.name for p in ggufs)}); name one" if ggufs else \
            f"none of {', '.join(_TOKENIZER_FILES)} and no .gguf file"
        raise ConfigError(f"model directory {model!r} has no tokenizer: it has {found}")
    if model.count("/") == 1 and not model.startswith((".", "/", "~")):
        return _load_directory(_hub_snapshot(model))
    raise ConfigError(f"model {model!r} does not exist: give a model directory, a .gguf file, "
                      "or a Hugging Face id (owner/name)")


def _hub_snapshot(repo_id: str) -> Path:
    """The local snapshot of ``repo_id``'s tokenizer files; downloaded (with progress) when
    missing, unless ``HF_HUB_OFFLINE`` is set or the Hub cannot be reached."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError):
        if constants.HF_HUB_OFFLINE:
            why = "HF_HUB_OFFLINE is set"
        else:
            try:
                return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES))
            except (HfHubHTTPError, LocalEntryNotFoundError, ValueError, OSError) as exc:
                why = f"the Hugging Face Hub cannot give it ({type(exc).__name__})"
    raise ConfigError(f"model {repo_id!r} is not in the local Hugging Face cache and {why}: pass a local "
                      f"path (a model directory or a .gguf file), or run `hf download {repo_id}` where the "
                      "Hub is reachable") from None


def _load_directory(directory: Path) -> LoadedTokenizer:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load a tokenizer from {directory}: {exc}") from exc
    return LoadedTokenizer(tokenizer=tokenizer, facts=directory_facts(directory), model=str(directory))


def directory_facts(directory: Path) -> ModelFacts:
    """EOS ids and context length from ``config.json`` and ``generation_config.json``."""
    eos: list[int] = []
    context: int | None = None
    for name in ("generation_config.json", "config.json"):
        config = _read_json(directory / name)
        # Multimodal configs keep the language model's settings under ``text_config``.
        text_config = config.get("text_config")
        for section in (config, text_config if isinstance(text_config, dict) else {}):
            eos += _as_id_list(section.get("eos_token_id"))
            if name == "config.json" and context is None:
                context = next((int(section[k]) for k in _CONTEXT_KEYS if isinstance(section.get(k), int)), None)
    return ModelFacts(eos_token_ids=list(dict.fromkeys(eos)), context_length=context, source=str(directory))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable %s: %s", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def _as_id_list(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def gguf_cache_dir(gguf: Path) -> Path:
    """The cache directory of one GGUF file's tokenizer (path + size + mtime + format)."""
    stat = gguf.stat()
    key = f"{CACHE_FORMAT}\0{gguf.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    return cache_root() / "hf-tokenizer" / f"{gguf.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _load_gguf(gguf: Path) -> LoadedTokenizer:
    from transformers import AutoTokenizer

    cached = gguf_cache_dir(gguf)
    facts_path = cached / FACTS_FILE
    if facts_path.exists():
        try:
            facts = msgspec.json.decode(facts_path.read_bytes(), type=ModelFacts)
            tokenizer = AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
            logger.debug("GGUF tokenizer loaded from cache", extra={"gguf": str(gguf), "cache": str(cached)})
            return LoadedTokenizer(tokenizer=tokenizer, facts=facts, model=str(gguf))
        except (OSError, ValueError, msgspec.DecodeError) as exc:
            logger.warning("rebuilding a broken tokenizer cache %s: %s", cached, exc)
            shutil.rmtree(cached, ignore_errors=True)
    eos, context = gguf_model_facts(read_gguf_scalars(gguf))
    facts = ModelFacts(eos_token_ids=eos, context_length=context, source=str(gguf))
    tokenizer = _convert_gguf_tokenizer(gguf)
    _save_to_cache(tokenizer, facts, cached)
    return LoadedTokenizer(tokenizer=tokenizer, facts=facts, model=str(gguf))


def _convert_gguf_tokenizer(gguf: Path) -> Any:
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from transformers import AutoTokenizer

    logger.info("building the tokenizer of %s (once; it is cached)", gguf, extra={"gguf": str(gguf)})
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        progress.add_task(f"Reading the tokenizer of {gguf.name} (once, then cached)", total=None)
        try:
            return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
        except Exception as exc:  # transformers raises many kinds for files it cannot convert
            raise ConfigError(f"cannot read a tokenizer from the GGUF file {gguf}: "
                              f"{type(exc).__name__}: {exc}") from exc


def _save_to_cache(tokenizer: Any, facts: ModelFacts, target: Path) -> None:
    """Write the cache entry atomically: build it beside ``target``, then rename it in place,
    so a concurrent loader sees a whole entry or none (the facts file is written last)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    except OSError as exc:
        logger.warning("cannot cache the GGUF tokenizer in %s (%s); the next load will be slow too",
                       target.parent, exc)
        return
    try:
        tokenizer.save_pretrained(str(staging))
        (staging / FACTS_FILE).write_bytes(msgspec.json.encode(facts))
        if (target / FACTS_FILE).exists():
            return  # a concurrent loader finished first; its entry is as good as ours
        shutil.rmtree(target, ignore_errors=True)  # a broken entry left by a crash
        os.rename(staging, target)
    except OSError as exc:
        if not (target / FACTS_FILE).exists():
            logger.warning("cannot cache the GGUF tokenizer in %s: %s", target, exc)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
