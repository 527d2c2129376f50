"""One SPMD rank: its model shard, KV cache, tensor-parallel group and runner.

Rank 0 (inside the executor's process) and the worker ranks build the same ``Rank`` from a
``RankSetup`` and run the same calls in the same order; the collectives inside keep them in
step. KV export and import also go through every rank, because each holds only its heads.
"""

from __future__ import annotations

import logging
import time

import msgspec
import torch

from flowserve_core.interfaces import PluginLookup
from flowserve_core.types import DeploymentSpec
from flowserve_spmd_executor.distributed import Rendezvous, TensorParallelGroup
from flowserve_spmd_executor.kv_cache import KVCache
from flowserve_spmd_executor.layers.linear import HeadShard, onednn_linear_available
from flowserve_spmd_executor.loader import ResolvedWeights, load_model
from flowserve_spmd_executor.model_config import load_model_config
from flowserve_spmd_executor.options import rank_device
from flowserve_spmd_executor.plan import StepPlan
from flowserve_spmd_executor.preload import ModelKey, take_preloaded
from flowserve_spmd_executor.runner import ModelRunner, StepOutput

log = logging.getLogger(__name__)


class RankSetup(msgspec.Struct, kw_only=True):
    """Everything a rank needs to build itself; rank 0 sends it to each worker."""

    spec: DeploymentSpec
    weights: ResolvedWeights
    rank: int
    world_size: int
    device_type: str
    device_index: int
    dtype: str
    num_blocks: int
    max_model_len: int
    #: the address rank 0's rendezvous store listens on (see ``launch.py``)
    store_host: str = "127.0.0.1"
    port: int = 0
    group_name: str = ""
    collective_timeout: float = 30.0
    num_threads: int = 0
    #: the accelerator index of this rank where its host process chose it (a Ray actor sees
    #: only its own GPU, as index 0); None: ``device_index + rank``
    local_device_index: int | None = None
    #: CPU: also keep matmul weights pre-packed for oneDNN (faster from 3 tokens a step on;
    #: a second, private copy of the weights)
    packed_linear: bool = True


class Rank:
    """The model shard of one rank, ready to run step plans once ``connect`` was called."""

    def __init__(self, setup: RankSetup, *, show_progress: bool = True, plugins: PluginLookup | None = None):
        started = time.perf_counter()
        self.setup = setup
        if setup.num_threads:
            torch.set_num_threads(setup.num_threads)
        self.device = rank_device(setup.device_type, setup.rank, setup.device_index) \
            if setup.local_device_index is None else torch.device(setup.device_type, setup.local_device_index)
        if setup.device_type == "cuda":
            torch.cuda.set_device(self.device)
        elif setup.device_type == "npu":
            torch.npu.set_device(self.device)  # type: ignore[attr-defined]  # added by torch_npu
        self.dtype = getattr(torch, setup.dtype)
        # The architecture comes from ``plugins`` (rank 0: the manager that built the executor;
        # a worker rank: its own process's).
        self.config = load_model_config(setup.weights.directory, plugins)
        self.shard = HeadShard(self.config.num_heads, self.config.num_kv_heads, setup.rank, setup.world_size)
        self.group = TensorParallelGroup(setup.rank, setup.world_size)
        #: how the weights came: "loaded", or "preloaded" (a model ``preload.preload`` built in
        #: this process, or in the process this one was forked from)
        self.weights_path = "preloaded"
        self.model = take_preloaded(ModelKey(
            weights=setup.weights.directory, dtype=setup.dtype, device_type=setup.device_type,
            max_model_len=setup.max_model_len, packed_linear=setup.packed_linear)) \
            if setup.world_size == 1 else None
        if self.model is None:
            self.weights_path = "loaded"
            self.model = load_model(setup.weights, self.config, self.group, dtype=self.dtype, device=self.device,
                                    max_positions=setup.max_model_len, show_progress=show_progress,
                                    plugins=plugins)
            if setup.packed_linear and setup.device_type == "cpu" and onednn_linear_available(self.dtype):
                self.model.pack_linear_weights()
        self.kv_cache = KVCache(self.config, num_blocks=setup.num_blocks, block_size=setup.spec.block_size,
                                kv_heads=self.shard.kv_heads, dtype=self.dtype, device=self.device)
        self.runner = ModelRunner(self.model, self.kv_cache, self.group, self.device)
        self.load_seconds = time.perf_counter() - started

    def connect(self, rendezvous: Rendezvous | None = None) -> None:
        """Join the other ranks (rank 0 passes its ``Rendezvous``, which owns the store)."""
        setup = self.setup
        host = rendezvous.host if rendezvous else setup.store_host
        self.group.connect(setup.device_type, host=host, port=setup.port, name=setup.group_name,
                           timeout=setup.collective_timeout, join_timeout=max(setup.collective_timeout, 60.0),
                           store=rendezvous.store if rendezvous else None,
                           device=self.device if setup.device_type != "cpu" else None)

    def run(self, plan: StepPlan) -> StepOutput:
        """One forward pass (see ``ModelRunner.run``)."""
        return self.runner.run(plan)

    @torch.inference_mode()
    def export_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """``block_ids`` of every layer with all KV heads, gathered from every rank:
        ``[num_layers, 2, len(block_ids), block_size, num_kv_heads, head_dim]``."""
        local = self.kv_cache.read_blocks(block_ids)
        if self.group.world_size == 1:
            return local
        gathered = self.group.all_gather(local, dim=4)
        if self.shard.replicated_kv:
            # Each rank holds one (replicated) head: keep the first copy of every head.
            copies = self.group.world_size // self.config.num_kv_heads
            keep = torch.arange(0, self.group.world_size, copies, device=gathered.device)
            gathered = gathered.index_select(4, keep)
        return gathered

    @torch.inference_mode()
    def import_blocks(self, block_ids: list[int], blocks: torch.Tensor | None) -> None:
        """Write ``blocks`` (the ``export_blocks`` layout, given on rank 0) into ``block_ids``;
        every rank keeps its own heads."""
        config, cache = self.config, self.kv_cache
        shape = (config.num_layers, 2, len(block_ids), cache.block_size, config.num_kv_heads, config.head_dim)
        if blocks is None:
            blocks = torch.empty(shape, dtype=self.dtype, device=self.device)
        else:
            blocks = blocks.to(device=self.device, dtype=self.dtype).contiguous()
        if self.group.world_size > 1:
            self.group.broadcast(blocks, src=0)
        mine = blocks.narrow(4, self.shard.kv_start, self.shard.kv_heads)
        cache.write_blocks(block_ids, mine)

    def close(self) -> None:
        """Leave the group."""
        self.group.close()
