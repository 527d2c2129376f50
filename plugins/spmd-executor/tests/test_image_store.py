"""DRAM weight images are private, verified and removed (issue 20, item 5): a directory only
this user can open, files 0600, an image that does not match the size and SHA-256 recorded
when it was built is refused and built again, a server's images go when it exits cleanly,
and the images of a server that was killed go when the next one starts."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import msgspec
import pytest

from flowserve_core.errors import ConfigError
from flowserve_core.types import DeploymentSpec
from flowserve_spmd_executor import image_store
from flowserve_spmd_executor.preload import ImageIndex, ensure_image, image_paths, map_image, model_key
from flowserve_testing import LiveServer, write_tiny_llama


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    """A fresh image root and cache for the test; this process opens its own session in it."""
    monkeypatch.setenv("FLOWSERVE_SHM_DIR", str(tmp_path / "shm"))
    monkeypatch.setenv("FLOWSERVE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(image_store.SESSION_VARIABLE, "")
    return tmp_path / "shm"


def test_an_image_is_private_and_a_tampered_one_is_refused_and_rebuilt(root, tiny_llama, caplog):
    spec = DeploymentSpec(model=str(tiny_llama), dtype="float32", device="cpu")
    data = ensure_image(spec, None)
    _, index_path = image_paths(model_key(spec, None))
    assert data.parent.parent == root and mode(root) == 0o700 and mode(data.parent) == 0o700
    assert mode(data) == 0o600 and mode(index_path) == 0o600
    index = msgspec.json.decode(index_path.read_bytes(), type=ImageIndex)
    good = image_store.digest(data)
    assert index.sha256 == good and index.nbytes == data.stat().st_size
    original = {name: t.clone() for name, t in map_image(model_key(spec, None), None).state_dict().items()}

    with open(data, "r+b") as image:  # overwrite weights in place, as another user did before
        image.seek(index.tensors[0].offset)
        image.write(b"\x7f" * 64)
    assert image_store.digest(data) != good
    assert ensure_image(spec, None) == data
    assert "is refused (its content does not match the SHA-256" in caplog.text
    assert image_store.digest(data) == good  # built again from the checkpoint
    rebuilt = map_image(model_key(spec, None), None).state_dict()
    assert all(rebuilt[name].equal(tensor) for name, tensor in original.items())

    data.write_bytes(data.read_bytes()[:1000])  # cut short
    ensure_image(spec, None)
    assert "it has 1000 bytes" in caplog.text and image_store.digest(data) == good


@pytest.mark.skipif(os.getuid() != 0, reason="giving a directory to another user needs root")
def test_a_root_made_by_another_user_is_refused(root):
    root.mkdir(mode=0o777)
    os.chown(root, 4242, 4242)
    with pytest.raises(ConfigError, match="belongs to uid 4242"):
        image_store.image_root()


def test_a_symlinked_root_is_refused(root, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    root.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="not a directory"):
        image_store.image_root()


def test_a_loose_root_of_this_user_is_tightened(root):
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    assert image_store.image_root() == root and mode(root) == 0o700


def test_sessions_of_dead_servers_are_collected_and_live_ones_kept(root):
    image_store.private_dir(root)
    dead = root / "server-999999"
    dead.mkdir()
    (dead / ".alive").write_text("")
    (dead / "model.weights").write_bytes(b"x" * 1000)
    live = root / "server-live"
    live.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)"), str(live / ".alive")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        fresh_orphan = root / "server-starting"
        fresh_orphan.mkdir()  # no .alive yet: too young to be taken for abandoned
        assert image_store.collect(root) == [dead]
        assert live.exists() and fresh_orphan.exists() and not dead.exists()
    finally:
        holder.kill()
        holder.wait()
    assert image_store.collect(root) == [live]  # its server is gone now


def test_a_child_never_makes_its_servers_session(root, monkeypatch):
    """An image finished after its server exited (and removed its session) must not bring the
    session back: it would hold hundreds of MB in /dev/shm that no server owns."""
    image_store.private_dir(root)
    monkeypatch.setenv(image_store.SESSION_VARIABLE, "server-424242")
    with pytest.raises(ConfigError, match="is gone"):
        image_store.image_dir()
    assert not (root / "server-424242").exists()
    (root / "server-424242").mkdir(mode=0o700)  # while it exists, a child uses it
    assert image_store.image_dir() == root / "server-424242"


def session_images(root: Path) -> list[Path]:
    return sorted(root.glob("server-*/*.weights"))


def test_a_servers_images_go_with_it(tmp_path):
    """SIGTERM: the server removes its session. SIGKILL: its session stays, and the next server
    removes it when it starts."""
    model = write_tiny_llama(tmp_path / "tiny")
    root = tmp_path / "shm"
    env = {"FLOWSERVE_SHM_DIR": str(root), "FLOWSERVE_CACHE_DIR": str(tmp_path / "cache"),
           image_store.SESSION_VARIABLE: ""}
    args = ["--model", str(model), "--tokenizer", "hf", "--executor", "spmd", "--kv-cache", "paged",
            "--batch-scheduler", "continuous", "--job-scheduler", "colocated", "--scaler", "prewarm",
            "--device", "cpu", "--dtype", "float32", "--kv-cache-memory", "8MiB",
            "-o", "start_path=preload", "-o", "pool_size=1", "-o", "autoscale=false"]

    def start_and_wait_for_an_image():
        server = LiveServer(*args, env=env, health_path="/ready").start(timeout=180)
        deadline = time.monotonic() + 180
        while not session_images(root):
            assert time.monotonic() < deadline, server.log()[-3000:]
            time.sleep(0.2)
        instance = httpx.get(server.url + "/admin/status", timeout=10).json()["instances"][0]
        assert instance["start_path"] == "preloaded", instance
        (image,) = session_images(root)
        assert image.parent.name == f"server-{server.process.pid}" and mode(image) == 0o600
        return server, image

    server, image = start_and_wait_for_an_image()
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(60) == 0
    assert not list(root.glob("server-*")), list(root.rglob("*"))

    killed, image = start_and_wait_for_an_image()
    killed.process.kill()
    killed.process.wait(30)
    assert image.exists()  # nobody could clean up
    server, _ = start_and_wait_for_an_image()
    try:
        assert not image.parent.exists()  # collected when the next server opened its session
    finally:
        server.stop()
    assert not list(root.glob("server-*"))
