"""``SpmdExecutor``: the ``Executor`` of one engine instance, SPMD over tensor-parallel ranks.

Rank 0 lives in the executor's own process and computes in a worker thread (the event loop
never blocks); ranks 1 … N-1 are worker processes (``gang.py``), or whatever the installed
rank launcher starts (``launch.py``: the Ray scaler's are actors). Each step rank 0 builds a
compact ``StepPlan``, announces it to the workers, runs its own shard of the forward pass
(the collectives line the ranks up), and samples from the gathered logits. For embeddings
(``ScheduledSequence.pooling``) the runner sums the pooled rows' final hidden states and rank
0's ``Pooler`` (flowserve-sampler) finishes the vectors.

A worker that dies, or a collective that fails or times out, makes ``execute`` raise
``EngineDeadError`` within a bounded time: a watcher polls the worker processes while a step
runs, and collectives carry a timeout (option ``collective_timeout_seconds``, default 30).

Options (``spec.options``): ``num_threads`` (torch threads of every rank, rank 0's process
included; by default rank 0 keeps torch's setting and CPU worker ranks take
``cpu_count // tensor_parallel``), ``collective_timeout_seconds`` (default 30),
``load_timeout_seconds`` (worker ranks loading, default 600), ``packed_linear`` (CPU: also
keep oneDNN-packed weights, default true).
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import Any, Callable, TypeVar

import anyio
import numpy as np
import torch

from flowserve_core.errors import EngineDeadError
from flowserve_core.interfaces import PluginLookup
from flowserve_core.types import DeploymentSpec, KVBlockTransfer, KVCacheSpec, StepBatch, StepResult
from flowserve_sampler import Pooler, Sampler, deployment_backend, score_prompts
from flowserve_spmd_executor.checks import check_decode_steps, plan_kv_cache
from flowserve_spmd_executor.distributed import CollectiveError, Rendezvous
from flowserve_spmd_executor.gang import WorkerGang
from flowserve_spmd_executor.loader import resolve_weights
from flowserve_spmd_executor.model_config import load_model_config
from flowserve_spmd_executor.options import (
    device_base_index,
    dtype_name,
    resolve_device_type,
    resolve_dtype,
)
from flowserve_spmd_executor.plan import build_step_plan
from flowserve_spmd_executor.protocol import ExportBlocks, ImportBlocks, RunStep
from flowserve_spmd_executor.rank import Rank, RankSetup

log = logging.getLogger(__name__)

_WATCH_INTERVAL = 0.2
T = TypeVar("T")


class SpmdExecutor:
    """Runs a registered architecture (``architectures.py``) over paged KV blocks on ``spec.tensor_parallel`` ranks.

    Construction loads the weights (blocking). ``execute`` computes off the event loop.
    ``export_kv``/``import_kv`` move blocks in the layout ``kv_block_shape`` describes.
    """

    def __init__(self, spec: DeploymentSpec, plugins: PluginLookup | None = None):
        check_decode_steps(spec)
        self.spec = spec
        self.world_size = spec.tensor_parallel
        self.device_type = resolve_device_type(spec.device)
        self.dtype = resolve_dtype(spec.dtype, self.device_type)
        self.weights = resolve_weights(spec.model)
        self.config = load_model_config(self.weights.directory, plugins)
        # the same checks as a deployment's start (``flowserve_check_deployment``)
        kv = plan_kv_cache(spec, self.config, self.dtype)
        self.max_model_len, self.bytes_per_block, self.num_blocks = kv.max_model_len, kv.bytes_per_block, kv.num_blocks
        self._dead: str | None = None
        self._lock = threading.Lock()
        self._gang: WorkerGang | None = None
        self._rendezvous: Rendezvous | None = None
        options = spec.options
        self.collective_timeout = float(options.get("collective_timeout_seconds", 30.0))
        threads = int(options.get("num_threads", 0))
        # Worker ranks on CPU share the cores with rank 0; rank 0's own (process-wide) thread
        # count changes only when asked for.
        worker_threads = threads or (max(1, (os.cpu_count() or 1) // self.world_size)
                                     if self.device_type == "cpu" else 0)
        if self.world_size > 1:
            self._rendezvous = Rendezvous(self.world_size, timeout=max(self.collective_timeout, 60.0))
        setups = [self._setup(rank, threads if rank == 0 else worker_threads) for rank in range(self.world_size)]
        if self.world_size > 1:
            self._gang = WorkerGang(setups[1:])
            self._finalizer = weakref.finalize(self, self._gang.close)
        try:
            self.rank = Rank(setups[0], plugins=plugins)
            if self._gang is not None:
                self._gang.wait_ready(float(options.get("load_timeout_seconds", 600.0)))
                self.rank.connect(self._rendezvous)
        except BaseException:
            if self._gang is not None:
                self._gang.close()
            raise
        self.sampler = Sampler(self.config.vocab_size, self.rank.device, deployment_backend(spec, plugins))
        self.pooler = Pooler()
        self.kv_block_shape = (self.config.num_layers, 2, spec.block_size, self.config.num_kv_heads,
                               self.config.head_dim)
        log.info("spmd executor ready: %s on %s × %d (%s), KV cache %d blocks × %d tokens = %.1f MiB per "
                 "rank (%d tokens), max_model_len %d", self.config.model_type, self.device_type,
                 self.world_size, dtype_name(self.dtype), self.num_blocks, spec.block_size,
                 self.num_blocks * self.bytes_per_block / 2**20, self.num_blocks * spec.block_size,
                 self.max_model_len,
                 extra={"num_blocks": self.num_blocks, "bytes_per_block": self.bytes_per_block,
                        "tensor_parallel": self.world_size, "dtype": dtype_name(self.dtype)})

    def _setup(self, rank: int, threads: int) -> RankSetup:
        return RankSetup(
            spec=self.spec, weights=self.weights, rank=rank, world_size=self.world_size,
            device_type=self.device_type, device_index=device_base_index(self.spec.device),
            dtype=dtype_name(self.dtype), num_blocks=self.num_blocks, max_model_len=self.max_model_len,
            port=self._rendezvous.port if self._rendezvous else 0,
            group_name=self._rendezvous.name if self._rendezvous else "",
            collective_timeout=self.collective_timeout, num_threads=threads,
            packed_linear=_flag(self.spec.options.get("packed_linear", True)))

    # ------------------------------------------------------------------ Executor protocol

    def kv_cache_spec(self) -> KVCacheSpec:
        """The KV blocks this executor reserved (per rank; every rank has as many)."""
        windows = self.config.sliding_windows
        return KVCacheSpec(num_blocks=self.num_blocks, block_size=self.spec.block_size,
                           bytes_per_block=self.bytes_per_block, max_model_len=self.max_model_len,
                           # blocks fall out only of a window every layer has (0: a global layer)
                           sliding_window=max(windows) if windows and all(windows) else 0)

    async def execute(self, batch: StepBatch) -> StepResult:
        """Run one step in a worker thread; ``EngineDeadError`` once a rank is gone."""
        self._check_alive()
        if self._gang is None:
            return await anyio.to_thread.run_sync(self._step, batch)
        return await self._watched(self._step, batch)

    def _step(self, batch: StepBatch) -> StepResult:
        with self._lock:
            self._check_alive()
            self.sampler.forget(batch.finished_seq_ids)
            self.pooler.forget(batch.finished_seq_ids)
            for transfer in batch.kv_imports:  # PD decode: the prefill's KV, before computing
                self._import_locked(transfer.block_ids, transfer.data, transfer.first_block)
            plan, sampled, scored, pooled = build_step_plan(batch, block_size=self.spec.block_size,
                                                            max_model_len=self.max_model_len,
                                                            num_blocks=self.num_blocks)
            self.sampler.prepare(sampled)  # structured-output masks, while the model runs
            logits, sums = self._announced(RunStep(plan=plan), lambda: self.rank.run(plan))
            result = StepResult()
            if sampled:
                assert logits is not None  # the rows to sample have logits
                result = self.sampler(logits[:len(sampled)], sampled)
            if scored:
                assert logits is not None  # so do the prompt rows to score
                result.prompt_logprobs = score_prompts(logits[len(sampled):], scored)
            if pooled:
                assert sums is not None  # the pooled sequences' rows were summed
                result.embeddings = self.pooler(sums, pooled, [end - start for start, end in plan.pool_ranges])
            # PD prefill: the prompt's KV, now computed, leaves with the first token.
            result.kv_exports = [
                KVBlockTransfer(seq_id=t.seq_id, block_ids=t.block_ids,
                                data=self._export_locked(t.block_ids))  # type: ignore[arg-type]  # bytes-like, uncopied
                for t in batch.kv_exports]
            return result

    def _announced(self, message: Any, local: Callable[[], T]) -> T:
        """Tell the workers ``message``, then run rank 0's part ``local``. Once the workers
        were told, any failure leaves the ranks out of step: the executor is dead from then on."""
        if self._gang is None:
            return local()
        try:
            self._gang.send_all(message)
            return local()
        except (CollectiveError, OSError) as exc:
            self._dead = self._gang.dead_reason() or f"tensor-parallel group failed: {exc}"
        except Exception as exc:
            self._dead = f"rank 0 failed in a tensor-parallel step ({type(exc).__name__}: {exc})"
        raise EngineDeadError(f"spmd executor is dead: {self._dead}")

    async def _watched(self, fn: Any, *args: Any) -> Any:
        """``fn`` in a thread, abandoned with ``EngineDeadError`` as soon as a worker dies."""
        outcome: dict[str, Any] = {}

        async def watch(scope: anyio.CancelScope) -> None:
            while True:
                await anyio.sleep(_WATCH_INTERVAL)
                reason = self._gang.dead_reason() if self._gang else None
                if reason:
                    self._dead = self._dead or reason
                    scope.cancel()
                    return

        async with anyio.create_task_group() as group:
            group.start_soon(watch, group.cancel_scope)
            try:
                outcome["value"] = await anyio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)
            except Exception as exc:
                outcome["error"] = exc
            group.cancel_scope.cancel()
        if "error" in outcome:
            raise outcome["error"]
        if "value" not in outcome:
            raise EngineDeadError(self._dead or "the step was abandoned")
        return outcome["value"]

    def _check_alive(self) -> None:
        if self._dead is None and self._gang is not None:
            self._dead = self._gang.dead_reason()
        if self._dead is not None:
            raise EngineDeadError(f"spmd executor is dead: {self._dead}")

    # ------------------------------------------------------------------ KV transfer

    def export_kv(self, block_ids: list[int]) -> memoryview:
        """The K and V of ``block_ids`` in every layer, all KV heads, as raw bytes (the
        executor's dtype, C order) of shape ``[num_layers, 2, len(block_ids), block_size,
        num_kv_heads, head_dim]`` — ``kv_block_shape`` with the blocks inserted as axis 2."""
        self._check_alive()  # before waiting for the lock: an abandoned step may still hold it
        with self._lock:
            self._check_alive()
            return self._export_locked(block_ids)

    def import_kv(self, block_ids: list[int], data: bytes | bytearray | memoryview, first_block: int = 0) -> None:
        """Write blocks exported by ``export_kv`` (same model and dtype) into ``block_ids``:
        the exported blocks ``first_block`` onwards (a receiver skips blocks it has cached).
        ``data`` may be read-only (a mapped file); only the blocks imported are read."""
        self._check_alive()
        with self._lock:
            self._check_alive()
            self._import_locked(block_ids, data, first_block)

    def _export_locked(self, block_ids: list[int]) -> memoryview:
        block_ids = [int(b) for b in block_ids]
        blocks = self._announced(ExportBlocks(block_ids=block_ids), lambda: self.rank.export_blocks(block_ids))
        flat = blocks.detach().to("cpu").contiguous().view(-1).view(torch.uint8)
        return flat.numpy().data

    def _import_locked(self, block_ids: list[int], data: bytes | bytearray | memoryview, first_block: int) -> None:
        block_ids = [int(b) for b in block_ids]
        layers, two, block_size, heads, head_dim = self.kv_block_shape
        view = memoryview(data).cast("B")
        element = torch.empty((), dtype=self.dtype).element_size()
        per_block = layers * two * block_size * heads * head_dim * element
        exported = view.nbytes // per_block if per_block else 0
        if view.nbytes != exported * per_block or first_block + len(block_ids) > exported:
            raise ValueError(f"import_kv got {view.nbytes} bytes, not whole blocks of {per_block} bytes holding "
                             f"blocks {first_block}..{first_block + len(block_ids) - 1} of this model "
                             f"({dtype_name(self.dtype)})")
        if not block_ids:
            return
        # Read only the blocks to import: the export layout is layer-major, so they are
        # ``layers × 2`` byte runs of the (read-only, often mapped) data. Copying a slice of a
        # read-only numpy view touches nothing else (and gives torch the writable memory it
        # wants); copying the whole buffer first would read every block the cache holds.
        raw = np.frombuffer(view, dtype=np.uint8).reshape(layers, two, exported, per_block // (layers * two))
        wanted = raw[:, :, first_block:first_block + len(block_ids)].copy()
        blocks = torch.from_numpy(wanted).view(self.dtype).view(layers, two, len(block_ids), block_size, heads,
                                                                head_dim)
        self._announced(ImportBlocks(block_ids=block_ids), lambda: self.rank.import_blocks(block_ids, blocks))

    # ------------------------------------------------------------------ lifecycle

    @property
    def weights_path(self) -> str:
        """How rank 0 got its weights, ``loaded`` or ``preloaded`` (``ReportsWeightsPath``)."""
        return self.rank.weights_path

    def close(self) -> None:
        """Stop the worker ranks and leave the group; ``execute`` fails afterwards."""
        self._dead = self._dead or "the executor was closed"
        if self._gang is not None:
            self._gang.close()
        self.rank.close()


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("0", "false", "no", "off")
    return bool(value)
