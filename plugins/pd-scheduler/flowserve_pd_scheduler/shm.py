"""KV transport ``shm``: a prefill's KV bytes as a file in shared memory (``/dev/shm``).

The prefill instance writes one file per handoff; the decode instance maps it (no copy, no
pickling: raw bytes whose layout the ``KVHandoff`` and the executor describe) and removes it
once imported. Both sides must be on one host, as the same user: files are 0600.
``FLOWSERVE_KV_SHM_DIR`` overrides the folder.
"""

from __future__ import annotations

import mmap
import os
import re
import uuid
from pathlib import Path

from flowserve_core.types import DeploymentSpec, KVHandoff

_LOCATOR = re.compile(r"^flowserve-kv-[0-9a-f]{32}$")


def shm_directory() -> Path:
    """Where handoffs live: ``$FLOWSERVE_KV_SHM_DIR``, else ``/dev/shm`` (RAM), else a temp dir."""
    chosen = os.environ.get("FLOWSERVE_KV_SHM_DIR")
    if chosen:
        return Path(chosen)
    return Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(os.environ.get("TMPDIR", "/tmp"))


class SharedMemoryTransport:
    """``publish`` writes a file in shared memory, ``fetch`` maps it, ``release`` removes it."""

    def __init__(self, spec: DeploymentSpec | None = None):
        self.directory = shm_directory()
        self._maps: dict[str, mmap.mmap] = {}

    def publish(self, data: bytes | memoryview, key: str) -> str:
        """Write ``data`` to a new file; its name is the locator (``key`` is only for logs)."""
        locator = f"flowserve-kv-{uuid.uuid4().hex}"
        path = self.directory / locator
        # 0600: /dev/shm is listable by every user, and KV bytes hold what the prompt said.
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600), "wb") as file:
            file.write(memoryview(data).cast("B"))
        return locator

    def fetch(self, handoff: KVHandoff) -> memoryview:
        """The handoff's bytes, mapped read-only (valid until ``release``)."""
        path = self._path(handoff.locator)
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size != handoff.nbytes:
                raise ValueError(f"KV handoff {handoff.locator} holds {size} bytes, its handoff says {handoff.nbytes}")
            mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        if mapped is None:
            return memoryview(b"")
        self._maps[handoff.locator] = mapped
        return memoryview(mapped)

    def release(self, locator: str) -> None:
        """Forget and remove the handoff (whoever is last: the decode side, or the job's owner)."""
        mapped = self._maps.pop(locator, None)
        if mapped is not None:
            try:
                mapped.close()
            except BufferError:  # a view is still alive somewhere; the file goes anyway
                pass
        self._path(locator).unlink(missing_ok=True)

    def _path(self, locator: str) -> Path:
        # Locators come from other processes: never let one name a path outside the folder.
        if not _LOCATOR.match(locator):
            raise ValueError(f"not a shm KV locator: {locator!r}")
        return self.directory / locator
