"""The rank-launcher seam: worker ranks started by a launcher a host installed, connecting
back to rank 0 over TCP as ranks on other hosts do (the Ray scaler's rank actors), give HF's
tokens; a peer without its rank's token is refused without a word; by default the group's
rendezvous listens on loopback only."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
from spmd_helpers import Driver, hf_greedy, random_prompt

from flowserve_core.types import DeploymentSpec
from flowserve_spmd_executor.distributed import Rendezvous
from flowserve_spmd_executor.executor import SpmdExecutor
from flowserve_spmd_executor.launch import ControlAddress, SubprocessHandle, SubprocessLauncher, use_rank_launcher
from flowserve_spmd_executor.protocol import Hello, send_hello

pytestmark = pytest.mark.anyio

_CONNECTING_WORKER = """
import os, sys, msgspec
from flowserve_spmd_executor.launch import ControlAddress
from flowserve_core.plugins import PluginManager
from flowserve_spmd_executor.worker import connect_to_rank0, serve
address = msgspec.msgpack.decode(sys.stdin.buffer.read(), type=ControlAddress)
os._exit(serve(connect_to_rank0(address), plugins=PluginManager()))
"""


class ConnectingLauncher:
    """Worker ranks as processes that connect to rank 0 over TCP (the address and token on
    their stdin). Before each, two intruders try: a wrong token, and an oversized frame."""

    listen_host = "127.0.0.1"

    def __init__(self) -> None:
        self.intruders_heard: list[bytes] = []

    def launch(self, setup, link):
        assert isinstance(link, ControlAddress) and link.host == "127.0.0.1" and len(link.token) >= 32
        self.intruders_heard.append(self._intrude(link, lambda s: send_hello(s, Hello(rank=link.rank, token="0" * 64))))
        self.intruders_heard.append(self._intrude(link, lambda s: s.sendall(struct.pack(">I", 1 << 30) + b"x" * 64)))
        process = subprocess.Popen([sys.executable, "-c", _CONNECTING_WORKER], stdin=subprocess.PIPE)
        process.stdin.write(msgspec.msgpack.encode(link))
        process.stdin.close()
        return SubprocessHandle(process)

    @staticmethod
    def _intrude(link: ControlAddress, say) -> bytes:
        with socket.create_connection((link.host, link.port), timeout=30) as intruder:
            say(intruder)
            return intruder.recv(1 << 16)  # b"": rank 0 hung up without sending anything


async def test_ranks_that_connect_back_with_their_token_give_hf_tokens(tiny_llama, hf_llama):
    launcher = ConnectingLauncher()
    previous = use_rank_launcher(launcher)
    try:
        executor = SpmdExecutor(DeploymentSpec(model=str(tiny_llama), dtype="float32", device="cpu",
                                               kv_cache_memory="4MiB", block_size=16, tensor_parallel=2))
    finally:
        use_rank_launcher(previous)
    try:
        assert executor._rendezvous.host == "127.0.0.1"
        assert launcher.intruders_heard == [b"", b""]
        driver = Driver(executor)
        prompt = random_prompt(30, seed=77)
        driver.add("x", prompt, max_tokens=8)
        assert (await driver.run())["x"] == hf_greedy(hf_llama, prompt, 8)
        assert executor._gang.dead_reason() is None
    finally:
        executor.close()
    assert isinstance(use_rank_launcher(None), SubprocessLauncher)  # the default is back


def _listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp writes them) listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.rpartition(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


def test_the_rendezvous_listens_on_loopback_only_by_default():
    rendezvous = Rendezvous(2, timeout=10)
    assert _listening_addresses(rendezvous.port) == {"0100007F"}  # 127.0.0.1, not every interface
