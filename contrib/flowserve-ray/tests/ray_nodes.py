"""A real multi-node Ray cluster on this machine for tests: ``ray start --head`` plus more
``ray start --address`` nodes, each a process group of its own, stopped (by those process
ids and their sessions only) at the end."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class _LocalRay:
    """Whether this process is connected to the tests' shared local Ray instance."""

    up = False


LOCAL = _LocalRay()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ports() -> list[str]:
    """Distinct ports for everything a node listens on (two raylets share this host)."""
    names = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port")
    return [arg for name in names for arg in (name, str(free_port()))]


def _sessions_of(leaders: list[int]) -> list[int]:
    """Every process whose session is one of ``leaders`` (the nodes we started, and what they
    started: raylet, GCS, workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) in leaders:  # field 6 of stat: the session id
            found.append(int(entry.name))
    return found


@contextmanager
def ray_cluster(nodes: int = 2, cpus_per_node: int = 1, timeout: float = 90.0) -> Iterator[str]:
    """Start a head and ``nodes - 1`` worker nodes; yield the head's ``HOST:PORT``."""
    import ray

    if ray.is_initialized():  # leave the shared local instance (or any other cluster) first
        ray.shutdown()
    LOCAL.up = False
    ray_bin = str(Path(sys.executable).with_name("ray"))
    temp_dir = tempfile.mkdtemp(prefix="fsray")  # short: Unix socket paths have a length limit
    # Token authentication with Ray's default token file, which every process here reads
    # (a driver caches the token it first saw, so all must agree on that one file).
    from ray._private.authentication.authentication_token_setup import (
        _enable_token_auth,
        _get_default_token_path,
        generate_and_save_token,
    )

    if not _get_default_token_path().exists():
        generate_and_save_token()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_AUTH_TOKEN", None)
    _enable_token_auth()  # this process too: sets RAY_AUTH_MODE and refreshes Ray's cached config
    started: list[subprocess.Popen] = []
    port = free_port()
    address = f"127.0.0.1:{port}"
    log = open(os.path.join(temp_dir, "nodes.log"), "wb")

    def node(*args: str) -> None:
        started.append(subprocess.Popen(
            [ray_bin, "start", "--block", "--num-cpus", str(cpus_per_node), "--disable-usage-stats", *_ports(),
             *args], env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT))

    try:
        node("--head", "--port", str(port), "--temp-dir", temp_dir, "--include-dashboard", "false")
        deadline = time.monotonic() + timeout
        while True:
            try:
                ray.init(address=address, namespace="flowserve", log_to_driver=False)
                break
            except (ConnectionError, RuntimeError) as error:
                if time.monotonic() > deadline or started[0].poll() is not None:
                    raise RuntimeError(f"the Ray head did not start: {Path(temp_dir, 'nodes.log').read_text()[-2000:]}") \
                        from error
                time.sleep(0.5)
        for _ in range(nodes - 1):
            node("--address", address)
        while len([n for n in ray.nodes() if n["Alive"]]) < nodes:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(ray.nodes())} of {nodes} Ray nodes joined")
            time.sleep(0.5)
        yield address
    finally:
        ray.shutdown()
        leaders = [p.pid for p in started]
        for pid in leaders:
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        time.sleep(2)
        for pid in _sessions_of(leaders):  # what a graceful stop left (GCS, workers)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for process in started:
            process.wait(10)
        log.close()
