"""Find a model's weights and load them into the runner's modules, shard by shard.

Two public steps, kept apart so weights can be resolved once and loaded many times (a later
scaler pre-loads them into shared memory and forks loaded processes):

- ``resolve_weights(model)`` → ``ResolvedWeights``: a directory with ``config.json`` and
  ``*.safetensors``. A HF model directory is used as it is. A ``.gguf`` file is dequantized
  once by transformers and cached as safetensors under
  ``$FLOWSERVE_CACHE_DIR/spmd-weights/<stem>-<key>`` (default ``~/.cache/flowserve``), keyed
  by the file's path, size and modification time so a changed file is converted again;
  later loads memory-map the cache.
- ``load_model(resolved, config, ...)`` builds the module tree without memory ("meta"),
  allocates it on the device in the wanted dtype, and copies in only this rank's slice of
  each checkpoint tensor (``TensorSource`` reads slices straight from the safetensors files).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import msgspec
import torch
from safetensors import safe_open

from flowserve_core.errors import ConfigError
from flowserve_core.interfaces import PluginLookup
from flowserve_spmd_executor.architectures import model_factory
from flowserve_spmd_executor.distributed import TensorParallelGroup
from flowserve_spmd_executor.hub import hub_snapshot, looks_like_hub_id
from flowserve_spmd_executor.model_config import ModelConfig
from flowserve_spmd_executor.options import cache_root

if TYPE_CHECKING:
    from flowserve_spmd_executor.models.base import CausalLM

log = logging.getLogger(__name__)

#: Bump when what a GGUF cache entry holds changes, so old entries are ignored.
CACHE_FORMAT = 1
_DONE_MARKER = "flowserve-converted.json"


class ResolvedWeights(msgspec.Struct, frozen=True, kw_only=True):
    """A loadable checkpoint: ``directory`` holds ``config.json`` and the safetensors ``files``."""

    directory: str
    files: list[str]
    source: str
    converted_from_gguf: bool = False


def resolve_weights(model: str) -> ResolvedWeights:
    """Locate (and for GGUF, convert once) the weights of ``model``: a HF model directory,
    a ``.gguf`` file (or a directory holding exactly one), or a Hub id (from the local Hugging
    Face cache, downloaded into it first when missing: ``hub.py``). Raises ``ConfigError``
    naming what is wrong."""
    if not model:
        raise ConfigError("no model given: set the deployment's model to a model directory or a .gguf file")
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ConfigError(f"model {model!r} is a file but not a .gguf file; give a GGUF file or "
                              "a model directory with config.json and *.safetensors")
        return _resolve_gguf(path)
    if path.is_dir():
        if (path / "config.json").exists():
            return _resolve_directory(path, model)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _resolve_gguf(ggufs[0])
        raise ConfigError(f"model directory {model!r} has no config.json" +
                          (f" and several GGUF files ({', '.join(p.name for p in ggufs)}); name one"
                           if ggufs else " and no .gguf file"))
    if looks_like_hub_id(model):
        return _resolve_directory(hub_snapshot(model), model)
    raise ConfigError(f"model {model!r} does not exist: give a model directory, a .gguf file, or a "
                      "Hugging Face id (owner/name)")


def _resolve_directory(directory: Path, source: str) -> ResolvedWeights:
    files = sorted(str(p) for p in directory.glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        raise ConfigError(f"model directory {directory} has no *.safetensors files" +
                          (f" (it has {', '.join(found)}; convert them to safetensors)" if found else ""))
    return ResolvedWeights(directory=str(directory), files=files, source=source)


def gguf_cache_dir(gguf: Path) -> Path:
    """The cache directory of one GGUF file's dequantized weights (path + size + mtime + format)."""
    stat = gguf.stat()
    key = f"{CACHE_FORMAT}\0{gguf.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    return cache_root() / "spmd-weights" / f"{gguf.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _resolve_gguf(gguf: Path) -> ResolvedWeights:
    target = gguf_cache_dir(gguf)
    if not (target / _DONE_MARKER).exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # One converter at a time (e.g. several instances starting together); the others
        # wait for it and then find the entry ready.
        with open(target.parent / f".{target.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (target / _DONE_MARKER).exists():
                convert_gguf(gguf, target)
    resolved = _resolve_directory(target, str(gguf))
    return msgspec.structs.replace(resolved, converted_from_gguf=True)


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize ``gguf`` with transformers and write ``target`` (config.json + model.safetensors),
    atomically: the entry is built beside ``target`` and renamed into place when complete."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    log.info("converting %s to safetensors (once; cached in %s)", gguf, target,
             extra={"gguf": str(gguf), "cache": str(target)})
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    bar_was_on = hf_logging.is_progress_bar_enabled()
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    try:
        with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
            task = progress.add_task(f"Dequantizing {gguf.name} (once, then cached)", total=None)
            hf_logging.disable_progress_bar()
            try:
                hf_model = AutoModelForCausalLM.from_pretrained(
                    str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True)
            except Exception as exc:  # transformers' GGUF reader raises many kinds (struct.error…)
                raise ConfigError(f"cannot read model weights from the GGUF file {gguf}: "
                                  f"{type(exc).__name__}: {exc}") from exc
            progress.update(task, description=f"Writing {target.name}/model.safetensors")
            config = hf_model.config.to_dict()
            config.pop("quantization_config", None)
            config.setdefault("architectures", [type(hf_model).__name__])
            if not config.get("architectures"):
                config["architectures"] = [type(hf_model).__name__]
            state = {name: t.contiguous() for name, t in hf_model.state_dict().items()}
            if config.get("tie_word_embeddings"):
                state.pop("lm_head.weight", None)
            save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
            (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
            (staging / _DONE_MARKER).write_text(json.dumps({"gguf": str(gguf), "format": CACHE_FORMAT}))
        shutil.rmtree(target, ignore_errors=True)  # a broken entry left by a crash
        os.rename(staging, target)
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
        shutil.rmtree(staging, ignore_errors=True)


class TensorSource:
    """One checkpoint tensor, read lazily: ``read()`` gives all of it, ``read(dim, start, n)``
    only rows (dim 0) or columns (dim 1) ``[start, start + n)``."""

    def __init__(self, handle: Any, name: str):
        self._slice = handle.get_slice(name)
        self.shape = tuple(self._slice.get_shape())
        self.ndim = len(self.shape)

    def read(self, dim: int | None = None, start: int = 0, length: int | None = None) -> torch.Tensor:
        if dim is None:
            return self._slice[:]
        stop = self.shape[dim] if length is None else start + length
        if stop > self.shape[dim]:
            raise ValueError(f"slice [{start}:{stop}] of dim {dim} is outside shape {self.shape}")
        return self._slice[start:stop] if dim == 0 else self._slice[:, start:stop]


def iter_checkpoint(resolved: ResolvedWeights) -> Iterator[tuple[str, TensorSource]]:
    """Every tensor of the checkpoint as ``(name, TensorSource)``; files are memory-mapped."""
    for file in resolved.files:
        with safe_open(file, framework="pt", device="cpu") as handle:
            for name in handle.keys():
                yield name, TensorSource(handle, name)


def tensor_names(resolved: ResolvedWeights) -> set[str]:
    """The names of every tensor in the checkpoint (reads only the files' headers)."""
    names: set[str] = set()
    for file in resolved.files:
        with safe_open(file, framework="pt", device="cpu") as handle:
            names.update(handle.keys())
    return names


def build_model(config: ModelConfig, group: TensorParallelGroup, *, dtype: torch.dtype,
                device: torch.device, max_positions: int, allocate: bool = True,
                plugins: PluginLookup | None = None) -> CausalLM:
    """The model's modules for this rank, allocated on ``device`` in ``dtype``, uninitialised
    (with ``allocate=False`` the parameters stay on the "meta" device, for the caller to swap
    in tensors it already has, e.g. views of a DRAM image)."""
    factory = model_factory(config.model_type, plugins)
    with torch.device("meta"):
        model = factory(config, group, max_positions, dtype, device)
    model.to(dtype=dtype)
    if allocate:
        model.to_empty(device=device)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def load_model(resolved: ResolvedWeights, config: ModelConfig, group: TensorParallelGroup, *,
               dtype: torch.dtype, device: torch.device, max_positions: int,
               show_progress: bool = True, plugins: PluginLookup | None = None) -> CausalLM:
    """Build the model for this rank and fill it with its shard of the checkpoint's weights."""
    model = build_model(config, group, dtype=dtype, device=device, max_positions=max_positions, plugins=plugins)
    with torch.inference_mode():
        load_weights(model, resolved, show_progress=show_progress, rank=group.rank)
    return model


def load_weights(model: CausalLM, resolved: ResolvedWeights, *, show_progress: bool = True,
                 rank: int = 0) -> None:
    """Copy the checkpoint's tensors into ``model`` (the owning module's ``weight_loader``, if
    it has one, takes its rank's slice). Raises ``ConfigError`` if a parameter found no tensor."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    params = dict(model.named_parameters())
    config = model.config
    expected = model.expected_shards()
    loaded: set[tuple[str, Any]] = set()
    names = tensor_names(resolved)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True, disable=not show_progress) as progress:
        task = progress.add_task(f"Loading {Path(resolved.source).name} (rank {rank})",
                                 total=len(names))
        for name, source in iter_checkpoint(resolved):
            progress.advance(task)
            target, shard_id = model.checkpoint_target(name)
            if target is None:
                continue  # another tower of a multimodal checkpoint
            if target == "lm_head.weight" and config.tie_word_embeddings:
                if any(n.endswith("embed_tokens.weight") for n in names):
                    continue  # tied: the embedding already provides it
                target = "model.embed_tokens.weight"
            param = params.get(target)
            if param is None:
                if name.endswith("rotary_emb.inv_freq"):
                    continue  # old checkpoints saved a buffer we recompute
                log.warning("ignoring checkpoint tensor %s (no such parameter)", name)
                continue
            owner = model.get_submodule(target.rpartition(".")[0])
            loader = getattr(owner, "weight_loader", None)
            if loader is None:
                param.data.copy_(source.read())
            else:
                loader(param, source, shard_id)
            loaded.add((target, shard_id))
    missing = sorted(f"{n}[{s}]" if s is not None else n for n, s in expected - loaded)
    if missing:
        raise ConfigError(f"checkpoint {resolved.directory} lacks weights for: {', '.join(missing[:8])}"
                          + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
