"""Turn a DeploymentSpec's strings (device, dtype, memory sizes) into what torch needs.

``device = "auto"`` picks an Ascend NPU (if ``torch_npu`` imports), else CUDA, else the CPU.
``dtype = "auto"`` picks bfloat16 on NPU and CUDA, and on CPUs with native bfloat16
arithmetic (AVX512-BF16 or AMX), else float32.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from flowserve_core.config import parse_memory_size as parse_memory_size  # re-exported for this module's callers
from flowserve_core.errors import ConfigError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def npu_available() -> bool:
    """True when ``torch_npu`` imports and sees an Ascend NPU."""
    try:
        import torch_npu  # noqa: F401  (registers the "npu" device with torch)
    except ImportError:
        return False
    npu = getattr(torch, "npu", None)  # added by torch_npu, unknown to torch's stubs
    return bool(npu and npu.is_available())


def resolve_device_type(device: str) -> str:
    """``"npu"``, ``"cuda"`` or ``"cpu"`` for the spec's ``device`` (``auto`` or one of them,
    optionally with an index such as ``cuda:0``; with tensor parallelism rank r takes index r)."""
    kind = device.split(":", 1)[0].strip().lower()
    if kind == "auto":
        if npu_available():
            return "npu"
        return "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cpu":
        return "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} asked for CUDA but torch {torch.__version__} sees no "
                              "CUDA device; use device = 'cpu' or 'auto'")
        return "cuda"
    if kind == "npu":
        if not npu_available():
            raise ConfigError(f"device {device!r} asked for an Ascend NPU but torch_npu is not installed "
                              "or sees no NPU; use device = 'cpu' or 'auto'")
        return "npu"
    raise ConfigError(f"device {device!r} is not one of auto, cpu, cuda, npu")


def rank_device(device_type: str, rank: int, base_index: int = 0) -> torch.device:
    """The torch device of one tensor-parallel rank: accelerator index ``base_index + rank``."""
    if device_type == "cpu":
        return torch.device("cpu")
    return torch.device(device_type, base_index + rank)


def device_base_index(device: str) -> int:
    """The accelerator index rank 0 uses: ``cuda:2`` → 2, ``cuda``/``auto`` → 0."""
    _, _, index = device.partition(":")
    return int(index) if index.strip().isdigit() else 0


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True on CPUs whose flags (``/proc/cpuinfo``) show AVX512-BF16 or AMX-BF16."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
            break
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_dtype(dtype: str, device_type: str) -> torch.dtype:
    """The torch dtype for the spec's ``dtype`` on ``device_type`` (see the module docstring)."""
    if dtype == "auto":
        if device_type in ("cuda", "npu") or cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ConfigError(f"dtype {dtype!r} is not one of auto, {', '.join(_DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def cache_root() -> Path:
    """Where FlowServe caches derived files: ``$FLOWSERVE_CACHE_DIR`` or ``~/.cache/flowserve``."""
    return Path(os.environ.get("FLOWSERVE_CACHE_DIR") or "~/.cache/flowserve").expanduser()
