"""Issue 20, items 9 and 10, on live servers (toy engine):

* with no key, ``flowserve serve`` refuses a non-loopback ``--host`` unless ``--insecure-admin``
  is given (``/admin`` loads any local file as a model); loopback stays open;
* a connection gets ``--header-timeout`` seconds for a request's headers (slowloris: one byte a
  second was kept forever), an idle kept-alive connection is not cut by it, and past
  ``--max-connections`` a new connection gets a 503 in OpenAI's error shape.
"""

from __future__ import annotations

import socket
import subprocess
import time

import httpx
import pytest
from openai_live import MODEL

HEADER_TIMEOUT = 2.0
MAX_CONNECTIONS = 12
REQUEST = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture(scope="module")
def guarded_server(start_server, serve_command):
    return start_server(serve_command("--header-timeout", str(HEADER_TIMEOUT),
                                      "--max-connections", str(MAX_CONNECTIONS)))


def _connect(server) -> socket.socket:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=30)


def _closed_after(sock: socket.socket, drip: bytes, every: float, limit: float) -> tuple[float, bytes]:
    """Send ``drip`` one byte every ``every`` s until the server closes (or ``limit`` s pass);
    the seconds it took and what the server said."""
    started, said = time.monotonic(), b""
    sock.setblocking(False)
    for byte in drip * 1000:
        if time.monotonic() - started > limit:
            break
        try:
            sock.send(bytes([byte]))
        except OSError:
            return time.monotonic() - started, said
        deadline = time.monotonic() + every
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(4096)
            except BlockingIOError:
                time.sleep(0.02)
                continue
            except OSError:
                return time.monotonic() - started, said
            if not chunk:
                return time.monotonic() - started, said
            said += chunk
    return time.monotonic() - started, said


def test_a_slowloris_connection_is_closed_within_the_header_timeout(guarded_server):
    with _connect(guarded_server) as sock:
        took, said = _closed_after(sock, b"GET /health HTTP/1.1\r\nX-Slow: " + b"a" * 100, every=0.5, limit=15)
    assert took < HEADER_TIMEOUT + 1.5, took
    assert said.startswith(b"HTTP/1.1 408 ")


def test_a_connection_that_sends_nothing_is_closed_too(guarded_server):
    with _connect(guarded_server) as sock:
        sock.settimeout(HEADER_TIMEOUT + 5)
        started = time.monotonic()
        said = sock.recv(4096)
        assert time.monotonic() - started < HEADER_TIMEOUT + 1.5
        assert said.startswith(b"HTTP/1.1 408 ")
        assert sock.recv(4096) == b""


def test_a_kept_alive_connection_outlives_the_header_timeout(guarded_server):
    """Between requests the idle limit is uvicorn's keep-alive (65 s), not the header deadline."""
    with httpx.Client(base_url=guarded_server.url, timeout=30) as client:
        assert client.get("/health").status_code == 200
        time.sleep(HEADER_TIMEOUT + 1)
        with _connect(guarded_server) as sock:  # and a whole request sent at once is answered
            sock.sendall(REQUEST)
            assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
        assert client.get("/health").status_code == 200
        assert len(client._transport._pool.connections) == 1  # the same connection served both


def test_past_max_connections_a_new_connection_gets_a_503(guarded_server):
    held = [_connect(guarded_server) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)  # all accepted by the server
        r = httpx.get(guarded_server.url + "/health", timeout=10)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "too_many_connections"
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    answer = guarded_server.client().completions.create(model=MODEL, prompt="t1 t2", max_tokens=2)
    assert answer.choices[0].text


def _serve(serve_command, *flags: str, wait: float = 120) -> tuple[int | None, str]:
    """Run ``flowserve serve`` until it listens (then stop it: None) or exits (its status)."""
    process = subprocess.Popen([*serve_command(*flags)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, deadline = "", time.monotonic() + wait
    try:
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            output += line
            if "serving the OpenAI API on" in line:
                return None, output
            if not line and process.poll() is not None:
                return process.returncode, output
        pytest.fail(f"flowserve serve neither listened nor exited in {wait} s:\n{output[-3000:]}")
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(60)
        process.stdout.close()


def _with_host(serve_command, host: str):
    def command(*flags: str) -> list[str]:
        line = serve_command(*flags)
        line[line.index("--host") + 1] = host
        return line
    return command


def test_an_open_admin_api_on_a_public_address_is_refused(serve_command):
    status, output = _serve(_with_host(serve_command, "0.0.0.0"))
    message = " ".join(output.split())
    assert status == 1, output[-3000:]
    assert "refusing to serve on 0.0.0.0 with no API or admin key" in message and "--insecure-admin" in message
    assert "Traceback" not in output


@pytest.mark.parametrize("flags", [("--insecure-admin",), ("--api-key", "sk-test")], ids=["insecure-admin", "api-key"])
def test_a_public_address_starts_with_a_key_or_the_flag(serve_command, flags):
    status, output = _serve(_with_host(serve_command, "0.0.0.0"), *flags)
    assert status is None, output[-3000:]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_loopback_needs_nothing(serve_command, host):
    status, output = _serve(_with_host(serve_command, host))
    assert status is None, output[-3000:]


def test_the_limits_are_server_settings(tmp_path):
    from flowserve_core.config import ServerConfig, load_config

    assert (ServerConfig().header_timeout, ServerConfig().max_connections, ServerConfig().insecure_admin) == \
        (10.0, 1024, False)
    config = tmp_path / "flowserve.toml"
    config.write_text('host = "0.0.0.0"\ninsecure_admin = true\nheader_timeout = 3.5\nmax_connections = 50\n'
                      'model = "toy"\n')
    loaded = load_config(config)
    assert (loaded.insecure_admin, loaded.header_timeout, loaded.max_connections) == (True, 3.5, 50)
