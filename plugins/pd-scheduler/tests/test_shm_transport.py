"""KV transport ``shm``: a handoff's bytes are a file in shared memory that another process
maps (no pickling: the pipe carries only the locator); sizes and locators are checked;
``release`` removes the file."""

from __future__ import annotations

import hashlib
import multiprocessing

import pytest

from flowserve_core.types import KVHandoff
from flowserve_pd_scheduler.shm import SharedMemoryTransport, shm_directory


def handoff(locator: str, nbytes: int) -> KVHandoff:
    return KVHandoff(transport="shm", locator=locator, num_tokens=1, block_size=16, nbytes=nbytes)


def fetch_in_child(connection, directory: str, locator: str, nbytes: int) -> None:
    """A separate process: map the handoff, send back its digest (not its bytes), release it."""
    import os

    os.environ["FLOWSERVE_KV_SHM_DIR"] = directory
    transport = SharedMemoryTransport()
    view = transport.fetch(handoff(locator, nbytes))
    digest = hashlib.sha256(view).hexdigest()
    view.release()
    transport.release(locator)
    connection.send(digest)


def test_another_process_maps_the_bytes_and_release_removes_them(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWSERVE_KV_SHM_DIR", str(tmp_path))
    assert shm_directory() == tmp_path
    data = bytes(range(256)) * 4096  # 1 MiB
    locator = SharedMemoryTransport().publish(memoryview(data), "seq-1")
    assert (tmp_path / locator).stat().st_size == len(data)
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    child = context.Process(target=fetch_in_child, args=(theirs, str(tmp_path), locator, len(data)), daemon=True)
    child.start()
    try:
        assert ours.poll(120), "the fetching process did not answer"
        assert ours.recv() == hashlib.sha256(data).hexdigest()
    finally:
        child.join(30)
    assert child.exitcode == 0
    assert not (tmp_path / locator).exists()  # released by the side that imported it


def test_size_mismatch_bad_locators_and_release_are_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWSERVE_KV_SHM_DIR", str(tmp_path))
    transport = SharedMemoryTransport()
    locator = transport.publish(b"abcdef", "seq")
    with pytest.raises(ValueError, match="holds 6 bytes, its handoff says 7"):
        transport.fetch(handoff(locator, 7))
    assert bytes(transport.fetch(handoff(locator, 6))) == b"abcdef"
    with pytest.raises(ValueError, match="not a shm KV locator"):
        transport.fetch(handoff("../../etc/passwd", 6))
    with pytest.raises(ValueError, match="not a shm KV locator"):
        transport.release("flowserve-kv-../x")
    transport.release(locator)
    transport.release(locator)  # idempotent: the decode side and the job scheduler both release
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError):
        transport.fetch(handoff(locator, 6))


def test_a_handoff_file_is_readable_by_its_user_only(tmp_path, monkeypatch):
    """/dev/shm is listable by every user; KV bytes say what the prompt said."""
    import stat

    monkeypatch.setenv("FLOWSERVE_KV_SHM_DIR", str(tmp_path))
    transport = SharedMemoryTransport()
    locator = transport.publish(b"\x01" * 64, "seq-1")
    assert stat.S_IMODE((tmp_path / locator).stat().st_mode) == 0o600
    transport.release(locator)
