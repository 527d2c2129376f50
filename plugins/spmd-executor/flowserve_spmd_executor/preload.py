"""Fast instance starts for scalers: pre-warming, DRAM images of weights, pre-loaded models.

A plugin-level API of the ``spmd`` executor (its factory, ``SpmdExecutorFactory``, offers
``prewarm``, ``preload``, ``share`` and ``attach`` as the ``FastStartExecutorFactory`` and
``DeviceSharingExecutorFactory`` Protocols, so a scaler finds them without importing this
package by name). Each takes the plugin manager that knows the model's architecture:

- ``prewarm(device)`` — import torch and the executor's modules and open the device, so a
  pre-warmed process pays none of it when a model is assigned.
- ``ensure_image(spec)`` — the model's weights as this executor holds them (fused, in the
  run dtype) written once into a DRAM image: one flat file in this server's private session
  directory under ``/dev/shm/flowserve-<uid>`` (``$FLOWSERVE_SHM_DIR``; see ``image_store``
  for who may read it and when it is removed) plus a JSON index recording its size and
  SHA-256. Built by a separate process (``python -m flowserve_spmd_executor.preload``) so
  the caller never computes; one builder at a time (a file lock), atomically renamed into
  place. An existing image is checked against its index before it is mapped, and built
  again if it does not match.
- ``preload(spec)`` — build the model in this process with every parameter a view into the
  image, memory-mapped copy-on-write (``torch.from_file(shared=False)``): nothing is read,
  parsed or converted, and every process mapping the image shares one copy of its pages.
  The next ``SpmdExecutor`` with the same model, dtype, device and length built in this
  process takes that model instead of loading (``take_preloaded``). A process that forks
  after ``preload`` hands the mapped (and, on CPU, oneDNN-packed) model to its children.

- ``share(spec)`` / ``attach(spec, handles)`` — on CUDA (and NPU when torch-npu has IPC
  reductions): a holder process loads the model onto the device once and hands out IPC
  handles of its parameters; a new instance process attaches them, so its weights are the
  holder's device memory, not a copy.

Pre-loading supports ``tensor_parallel = 1``; images are for CPU, IPC handles for devices.
Where it cannot, these raise ``PreloadUnsupported`` and the caller starts the instance the
ordinary way.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import logging
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from flowserve_core.errors import ConfigError
from flowserve_core.interfaces import PluginLookup
from flowserve_core.types import DeploymentSpec
from flowserve_spmd_executor import image_store
from flowserve_spmd_executor.image_store import image_dir  # noqa: F401  (callers find it here)

log = logging.getLogger(__name__)

#: Bump when what an image holds changes, so old images are ignored.
IMAGE_FORMAT = 2
_ALIGN = 64


class PreloadUnsupported(RuntimeError):
    """This deployment cannot start from a pre-loaded model (the message says why)."""


class ImageEntry(msgspec.Struct, frozen=True):
    """One tensor in an image: where its bytes are and what they are."""

    name: str
    dtype: str
    shape: list[int]
    offset: int
    nbytes: int


class ImageIndex(msgspec.Struct, frozen=True, kw_only=True):
    """The JSON index beside an image's data file."""

    format: int
    source: str
    dtype: str
    nbytes: int
    tensors: list[ImageEntry]
    #: of the data file, recorded when it was built and checked before it is mapped
    sha256: str = ""


class ModelKey(msgspec.Struct, frozen=True, kw_only=True):
    """What makes two executors' models interchangeable."""

    weights: str
    dtype: str
    device_type: str
    max_model_len: int
    packed_linear: bool


def prewarm(device: str = "auto") -> None:
    """Import torch and this executor's modules and open ``device``; builds no model."""
    import torch

    import flowserve_spmd_executor.executor  # noqa: F401  (the whole runner and its layers)
    from flowserve_spmd_executor.options import resolve_device_type

    kind = resolve_device_type(device)
    if kind == "cuda":
        torch.cuda.init()
    elif kind == "npu":
        torch.npu.init()  # type: ignore[attr-defined]  # added by torch_npu


def model_key(spec: DeploymentSpec, plugins: PluginLookup | None, *, devices: tuple[str, ...] = ("cpu",)) -> ModelKey:
    """The key of ``spec``'s model, derived the way ``SpmdExecutor`` derives its settings
    (resolving the weights converts a GGUF file once, as the executor would)."""
    from flowserve_spmd_executor.executor import _flag
    from flowserve_spmd_executor.loader import resolve_weights
    from flowserve_spmd_executor.model_config import load_model_config
    from flowserve_spmd_executor.options import dtype_name, resolve_device_type, resolve_dtype

    if spec.tensor_parallel != 1:
        raise PreloadUnsupported(f"pre-loading needs tensor_parallel = 1, not {spec.tensor_parallel}")
    device_type = resolve_device_type(spec.device)
    if device_type not in devices:
        raise PreloadUnsupported(f"DRAM images are mapped on CPU; device {device_type!r} attaches "
                                 "shared weights through IPC handles instead")
    weights = resolve_weights(spec.model)
    config = load_model_config(weights.directory, plugins)
    return ModelKey(weights=weights.directory, dtype=dtype_name(resolve_dtype(spec.dtype, device_type)),
                    device_type=device_type, max_model_len=spec.max_model_len or config.max_position_embeddings,
                    packed_linear=_flag(spec.options.get("packed_linear", True)))


def image_paths(key: ModelKey) -> tuple[Path, Path]:
    """The data file and the index of ``key``'s image (keyed by checkpoint files and dtype)."""
    directory = Path(key.weights)
    stamp = "\0".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                      for p in sorted(directory.glob("*.safetensors")))
    digest = hashlib.sha256(f"{IMAGE_FORMAT}\0{directory.resolve()}\0{key.dtype}\0{stamp}".encode()).hexdigest()
    stem = f"{directory.name}-{key.dtype}-{digest[:16]}"
    return image_dir() / f"{stem}.weights", image_dir() / f"{stem}.json"


def ensure_image(spec: DeploymentSpec, plugins: PluginLookup | None, timeout: float = 1800.0) -> Path:
    """The image of ``spec``'s weights, built first (in a child process, whose own manager
    must know the model's architecture: an installed plugin does) if absent."""
    key = model_key(spec, plugins)
    data, index = image_paths(key)
    with os.fdopen(image_store.create_private(data.parent / f".{data.stem}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # not while a builder writes it
        if index.exists() and (why := _mismatch(data, index)):
            log.warning("the DRAM image %s is refused (%s); building it again", data, why,
                        extra={"image": str(data)})
            index.unlink(missing_ok=True)
            data.unlink(missing_ok=True)
        if not index.exists():
            started = time.perf_counter()
            process = subprocess.run([sys.executable, "-m", "flowserve_spmd_executor.preload"],
                                     input=msgspec.json.encode(key), capture_output=True, timeout=timeout)
            if process.returncode != 0:
                raise ConfigError(f"building the DRAM image of {spec.model!r} failed: "
                                  f"{process.stderr.decode(errors='replace')[-2000:]}")
            log.info("built the DRAM image of %s in %.1f s: %s", spec.model, time.perf_counter() - started,
                     data, extra={"image": str(data)})
    return data


def _mismatch(data: Path, index_path: Path) -> str:
    """'' if the image matches its index (format, size, SHA-256), else why not."""
    try:
        index = msgspec.json.decode(index_path.read_bytes(), type=ImageIndex)
    except (OSError, msgspec.DecodeError) as exc:
        return f"its index cannot be read: {exc}"
    if index.format != IMAGE_FORMAT:
        return f"format {index.format}, not {IMAGE_FORMAT}"
    return image_store.verify(data, index.nbytes, index.sha256)


def write_image(key: ModelKey, plugins: PluginLookup | None) -> None:
    """Load ``key``'s model the ordinary way and write its parameters as an image (the work of
    ``python -m flowserve_spmd_executor.preload``)."""
    import torch

    from flowserve_spmd_executor.distributed import TensorParallelGroup
    from flowserve_spmd_executor.loader import load_model, resolve_weights
    from flowserve_spmd_executor.model_config import load_model_config

    weights = resolve_weights(key.weights)
    config = load_model_config(weights.directory, plugins)
    model = load_model(weights, config, TensorParallelGroup(), dtype=getattr(torch, key.dtype),
                       device=torch.device("cpu"), max_positions=key.max_model_len, show_progress=False,
                       plugins=plugins)
    data, index = image_paths(key)
    tensors, offset = [], 0
    staging = data.with_name(f".{data.name}.{os.getpid()}")
    sha256 = hashlib.sha256()
    with os.fdopen(image_store.create_private(staging), "wb") as out:
        for name, param in model.named_parameters():  # tied weights appear once
            raw = param.detach().contiguous().view(-1).view(torch.uint8).numpy()
            pad = -offset % _ALIGN
            out.write(b"\0" * pad)
            sha256.update(b"\0" * pad)
            offset += pad
            out.write(raw.data)
            sha256.update(raw.data)
            tensors.append(ImageEntry(name=name, dtype=str(param.dtype).removeprefix("torch."),
                                      shape=list(param.shape), offset=offset, nbytes=raw.nbytes))
            offset += raw.nbytes
    os.rename(staging, data)
    entry = ImageIndex(format=IMAGE_FORMAT, source=weights.source, dtype=key.dtype, nbytes=offset, tensors=tensors,
                       sha256=sha256.hexdigest())
    index_staging = index.with_name(f".{index.name}.{os.getpid()}")
    with os.fdopen(image_store.create_private(index_staging), "wb") as out:
        out.write(msgspec.json.encode(entry))
    os.rename(index_staging, index)  # last: the index existing means the image is complete


def map_image(key: ModelKey, plugins: PluginLookup | None) -> Any:
    """Build ``key``'s model with every parameter a copy-on-write view into its image."""
    import torch

    data, index_path = image_paths(key)
    index = msgspec.json.decode(index_path.read_bytes(), type=ImageIndex)
    if index.format != IMAGE_FORMAT:
        raise PreloadUnsupported(f"image {data} has format {index.format}, not {IMAGE_FORMAT}")
    storage = torch.from_file(str(data), shared=False, size=index.nbytes, dtype=torch.uint8)
    return model_over_image(key, storage, index, plugins, where=str(data))


def model_over_image(key: ModelKey, storage: Any, index: ImageIndex, plugins: PluginLookup | None, *,
                     where: str = "the image") -> Any:
    """Build ``key``'s model with every parameter a view into ``storage`` (a flat uint8 tensor
    laid out as ``index`` says: a mapped image file, or an image shared another way, such as
    Ray's object store). Raises ``PreloadUnsupported`` if the image lacks a tensor."""
    import torch

    from flowserve_spmd_executor.distributed import TensorParallelGroup
    from flowserve_spmd_executor.layers.linear import onednn_linear_available
    from flowserve_spmd_executor.loader import build_model
    from flowserve_spmd_executor.model_config import load_model_config

    config = load_model_config(key.weights, plugins)
    # Parameters stay on "meta" (no memory) until swapped for views of the image; swapping
    # keeps each Parameter object, so tied weights stay tied.
    model = build_model(config, TensorParallelGroup(), dtype=getattr(torch, key.dtype),
                        device=torch.device("cpu"), max_positions=key.max_model_len, allocate=False, plugins=plugins)
    params = dict(model.named_parameters())
    for entry in index.tensors:
        view = storage[entry.offset:entry.offset + entry.nbytes].view(getattr(torch, entry.dtype))
        torch.utils.swap_tensors(params.pop(entry.name),
                                 torch.nn.Parameter(view.view(entry.shape), requires_grad=False))
    left = sorted(params) + [name for name, t in model.named_buffers() if t.is_meta]
    if left:
        raise PreloadUnsupported(f"{where} lacks tensors {left[:4]}")
    if key.packed_linear and onednn_linear_available(getattr(torch, key.dtype)):
        model.pack_linear_weights()
    return model


_preloaded: dict[ModelKey, Any] = {}


def hand_over(key: ModelKey, model: Any) -> None:
    """Leave ``model`` for this process's next ``SpmdExecutor`` of ``key`` (what ``preload``
    does with the model it maps; for hosts that build it from an image of their own)."""
    _preloaded[key] = model


def preload(spec: DeploymentSpec, plugins: PluginLookup | None) -> str:
    """Map ``spec``'s image (building it once) and keep the model for this process's next
    ``SpmdExecutor(spec)``; returns the image's path. Computes nothing (safe before a fork)."""
    key = model_key(spec, plugins)
    data = ensure_image(spec, plugins)
    if key not in _preloaded:
        _preloaded[key] = map_image(key, plugins)
    return str(data)


def take_preloaded(key: ModelKey) -> Any | None:
    """The model ``preload`` built for ``key`` in this process, handed out once (an executor
    attaches its own KV cache to the modules), or None."""
    return _preloaded.pop(key, None)


_holding: dict[ModelKey, Any] = {}


def _reductions(device_type: str) -> Any:
    """torch's IPC reductions for ``device_type`` (CUDA; NPU through torch-npu when it has them)."""
    if device_type == "cuda":
        from torch.multiprocessing import reductions
        return reductions
    if device_type == "npu":
        try:
            from torch_npu.multiprocessing import reductions as npu_reductions
        except ImportError:
            raise PreloadUnsupported("this torch-npu offers no IPC reductions for NPU tensors") from None
        return npu_reductions
    raise PreloadUnsupported("IPC handles are for device weights; on CPU map the DRAM image (preload)")


def share(spec: DeploymentSpec, plugins: PluginLookup | None) -> bytes:
    """Load ``spec``'s model onto its device once, keep it alive in this process (the
    holder), and return IPC handles of its parameters (``torch.multiprocessing``
    reductions) for ``attach`` in other processes on the same device."""
    import torch

    from flowserve_spmd_executor.distributed import TensorParallelGroup
    from flowserve_spmd_executor.loader import load_model, resolve_weights
    from flowserve_spmd_executor.model_config import load_model_config
    from flowserve_spmd_executor.options import device_base_index, rank_device

    key = model_key(spec, plugins, devices=("cuda", "npu"))
    reductions = _reductions(key.device_type)
    if key not in _holding:
        weights = resolve_weights(key.weights)
        _holding[key] = load_model(weights, load_model_config(weights.directory, plugins), TensorParallelGroup(),
                                   dtype=getattr(torch, key.dtype), max_positions=key.max_model_len,
                                   device=rank_device(key.device_type, 0, device_base_index(spec.device)),
                                   show_progress=False, plugins=plugins)
    return pickle.dumps([(name, *reductions.reduce_tensor(param.data))
                         for name, param in _holding[key].named_parameters()])


def attach(spec: DeploymentSpec, handles: bytes, plugins: PluginLookup | None) -> None:
    """Build ``spec``'s model from a holder's IPC handles (``share``): every parameter is the
    holder's device memory, nothing is copied; the next ``SpmdExecutor(spec)`` here takes it."""
    import torch

    from flowserve_spmd_executor.distributed import TensorParallelGroup
    from flowserve_spmd_executor.loader import build_model
    from flowserve_spmd_executor.model_config import load_model_config
    from flowserve_spmd_executor.options import device_base_index, rank_device

    key = model_key(spec, plugins, devices=("cuda", "npu"))
    _reductions(key.device_type)  # imports what the handles' rebuild functions need
    device = rank_device(key.device_type, 0, device_base_index(spec.device))
    model = build_model(load_model_config(key.weights, plugins), TensorParallelGroup(),
                        dtype=getattr(torch, key.dtype), device=device, max_positions=key.max_model_len,
                        allocate=False, plugins=plugins)
    params = dict(model.named_parameters())
    for name, rebuild, args in _TorchHandleUnpickler(io.BytesIO(handles)).load():
        torch.utils.swap_tensors(params.pop(name), torch.nn.Parameter(rebuild(*args), requires_grad=False))
    if params:
        raise PreloadUnsupported(f"the shared weights lack {sorted(params)[:4]}")
    _preloaded[key] = model


class _TorchHandleUnpickler(pickle.Unpickler):
    """Reads ``share``'s handles, which name torch's own rebuild functions: any other global
    (a function of some other module, a class to instantiate) is refused, so the bytes can
    rebuild tensors and nothing else."""

    _ALLOWED = ("torch.multiprocessing.reductions", "torch.storage", "torch._utils", "torch")

    def find_class(self, module: str, name: str) -> Any:
        if module not in self._ALLOWED or name.startswith("_") and module == "torch":
            raise pickle.UnpicklingError(f"IPC handles may not name {module}.{name}")
        return super().find_class(module, name)


def main() -> None:
    """``python -m flowserve_spmd_executor.preload`` with a ``ModelKey`` (JSON) on stdin."""
    from flowserve_core.telemetry import setup_logging

    setup_logging(os.environ.get("FLOWSERVE_LOG_LEVEL", "warning"))  # the server's format: JSON lines
    from flowserve_core.plugins import PluginManager

    # this builder process is an entry point: it builds its own manager, once
    write_image(msgspec.json.decode(sys.stdin.buffer.read(), type=ModelKey), PluginManager())


if __name__ == "__main__":
    main()
