"""PD-disaggregation inside the ``continuous`` batch scheduler: the KV blocks a prefill task
hands off and the ones a decode task takes over. ``ContinuousBatchScheduler`` owns one
``KVHandoffs``.

**Prefill side.** The job scheduler chose the decode instance before the prefill ran and
put in the prefill task a ``KVHandoff`` without a locator whose ``first_block`` is the first
prompt block that instance lacks. The step that samples the first token exports the prompt's
blocks from there on (``export``), and ``publish`` hands them to the deployment's KV
transport. A prefill task without that template exports every block, as before.

**Decode side.** At admission the decode task's blocks come from the prefix cache; ``fetch``
gets the handoff only when the cache lacks blocks and the handoff holds them all (else the
task recomputes the prompt from what the cache holds: slower, never wrong). The transport's
``fetch`` runs in a daemon thread: a transport may wait on another process (``torch-dist`` up
to its ``kv_transport_timeout``, 60 s by default) and the engine's event loop must keep
stepping the other sequences meanwhile. The batch scheduler polls ``collect`` before each
step; a finished fetch becomes an import (``StepBatch.kv_imports``) of the blocks from the
first one the cache lacks, written by the executor before the step computes. Releases also
run in daemon threads (``torch-dist`` connects to the publisher).

``publish`` stays on the engine's loop: the prefill's last event must carry the locator and
the engine emits events only from a step, so a publish in a thread would hold the event until
a next step that an idle instance never runs. The built-in transports publish without
waiting on another party (a file written in /dev/shm, a copy into a held tensor).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from flowserve_colocated.fits import blocks_for
from flowserve_colocated.sequence import Sequence
from flowserve_core.factories import KVTransports
from flowserve_core.interfaces import KVCacheManager, KVTransport
from flowserve_core.types import DeploymentSpec, KVBlockTransfer, KVHandoff, TaskRole

log = logging.getLogger(__name__)


class BackgroundCall:
    """``fn(*args)`` in a daemon thread; poll ``done``, then read ``value`` or ``error``.

    A daemon thread, not a pool's: a fetch stuck on a dead peer must not hold up the process's
    exit, and nothing waits for it but the sequence that needs its result.
    """

    def __init__(self, fn: Callable[..., Any], *args: Any, name: str = "flowserve-kv-transport"):
        self.value: Any = None
        self.error: BaseException | None = None
        self.seconds = 0.0
        self._done = threading.Event()
        threading.Thread(target=self._run, args=(fn, args), name=name, daemon=True).start()

    def _run(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        started = time.perf_counter()
        try:
            self.value = fn(*args)
        except BaseException as exc:  # reported to whoever collects the call
            self.error = exc
        finally:
            self.seconds = time.perf_counter() - started
            self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until done (tests and shutdown only; never on the event loop)."""
        return self._done.wait(timeout)


class _Fetch:
    """A decode sequence waiting for its handoff: what its prefix cache held, the call."""

    __slots__ = ("seq", "handoff", "num_cached", "call")

    def __init__(self, seq: Sequence, handoff: KVHandoff, num_cached: int, call: BackgroundCall):
        self.seq, self.handoff, self.num_cached, self.call = seq, handoff, num_cached, call


class KVHandoffs:
    """Exports, publishes, fetches, imports and releases of KV handoffs (module docstring).

    ``bytes``: KV bytes imported (the blocks written into this instance's cache); ``seconds``:
    wall time of the transport's ``fetch`` calls that ended, whether they succeeded or not.
    """

    def __init__(self, spec: DeploymentSpec, kv_cache: KVCacheManager, kv_transports: KVTransports):
        self.spec = spec
        self.kv = kv_cache
        self.kv_transports = kv_transports
        self.block_size: int = kv_cache.block_size
        self.fetching: dict[str, _Fetch] = {}  # admission order
        self.bytes, self.seconds = 0, 0.0
        self._abandoned: list[_Fetch] = []  # aborted or preempted while fetching: release when done
        self._imports: list[KVBlockTransfer] = []  # for the next batch
        #: seq_id → (sequence, handoff) of imports in a batch not yet run
        self._imported: dict[str, tuple[Sequence, KVHandoff]] = {}

    def transport(self) -> KVTransport:
        """The deployment's KV transport (``spec.kv_transport``), built on first use, on the
        event loop (a constructor may connect to a cluster; threads only call its methods)."""
        return self.kv_transports(self.spec.kv_transport)

    # ------------------------------------------------------------------ prefill side

    def export_range(self, seq: Sequence) -> tuple[int, int]:
        """The prompt blocks ``[first, end)`` a prefill task exports: from the first block its
        decode instance lacks (the task's ``KVHandoff`` template; 0 without one) to the last,
        partial or not. ``first`` is at most the number of full blocks: the decode instance
        computes nothing of the prompt, so a partial last block always moves."""
        prompt = len(seq.prompt_token_ids)
        template = seq.task.kv_handoff
        wanted = template.first_block if template is not None else 0
        return min(max(0, wanted), prompt // self.block_size), blocks_for(prompt, self.block_size)

    def export(self, seq: Sequence, block_table: list[int]) -> KVBlockTransfer | None:
        """What the step that samples a prefill task's first token exports; None if nothing."""
        if seq.role is not TaskRole.PREFILL:
            return None
        first, end = self.export_range(seq)
        if first >= end:
            return None
        return KVBlockTransfer(seq_id=seq.seq_id, block_ids=block_table[first:end], first_block=first)

    def publish(self, seq: Sequence, data: Any) -> KVHandoff | None:
        """The handoff of a finished prefill: its exported blocks published through the
        transport, or no locator when its decode instance holds every block; None (the decode
        side recomputes) when there is nothing to publish or the transport failed."""
        first, end = self.export_range(seq)
        handoff = KVHandoff(transport=self.spec.kv_transport, locator="", num_tokens=len(seq.prompt_token_ids),
                            block_size=self.block_size, first_block=first)
        if first >= end:
            return handoff
        if data is None:
            return None
        try:
            handoff.locator = self.transport().publish(data, seq.seq_id)
        except Exception as exc:
            log.warning("KV of %s could not be published (%s); its decode task will recompute", seq.seq_id,
                        exc, extra={"seq_id": seq.seq_id})
            return None
        handoff.nbytes = memoryview(data).nbytes
        return handoff

    # ------------------------------------------------------------------ decode side

    def fetch(self, seq: Sequence, handoff: KVHandoff, num_cached: int) -> bool:
        """Start fetching ``handoff`` for ``seq``, which holds its blocks and found
        ``num_cached`` tokens in the prefix cache. False when there is nothing to fetch: the
        cache holds the whole prompt, or it lacks blocks before the handoff's ``first_block``
        (the job scheduler's guess of what this instance holds was wrong; the prompt is then
        recomputed from ``num_cached``). The handoff is released then."""
        first_needed = num_cached // self.block_size
        if num_cached >= handoff.num_tokens or first_needed < handoff.first_block or not handoff.locator:
            if num_cached < handoff.num_tokens:
                log.info("KV handoff of %s starts at block %d but this instance's cache holds %d; recomputing "
                         "the prompt from there", seq.seq_id, handoff.first_block, first_needed,
                         extra={"seq_id": seq.seq_id})
            self.release(handoff.locator)
            return False
        try:
            transport = self.transport()
        except Exception as exc:  # a transport that cannot be built costs a recompute
            log.warning("KV transport %r could not be built (%s); recomputing the prompt of %s",
                        self.spec.kv_transport, exc, seq.seq_id, extra={"seq_id": seq.seq_id})
            return False
        call = BackgroundCall(transport.fetch, handoff, name=f"flowserve-kv-fetch-{seq.seq_id}")
        self.fetching[seq.seq_id] = _Fetch(seq, handoff, num_cached, call)
        return True

    def collect(self) -> list[tuple[Sequence, int]]:
        """Fetches that ended, in admission order, as ``(sequence, tokens computed)``: the
        whole prompt when its KV arrived (its import goes with the next batch), what its cache
        held when the fetch failed (it recomputes the rest: a lost handoff costs time, never
        the request). Also releases the handoffs of abandoned fetches that ended."""
        if self._abandoned:
            still = []
            for fetch in self._abandoned:
                if fetch.call.done:
                    self.release(fetch.handoff.locator)
                else:
                    still.append(fetch)
            self._abandoned = still
        ended = [fetch for fetch in self.fetching.values() if fetch.call.done]
        for fetch in ended:
            del self.fetching[fetch.seq.seq_id]
        return [(fetch.seq, self._import(fetch)) for fetch in ended]

    def _import(self, fetch: _Fetch) -> int:
        seq, handoff, call = fetch.seq, fetch.handoff, fetch.call
        self.seconds += call.seconds
        if call.error is not None:
            log.warning("KV handoff %s could not be fetched (%s); recomputing the prompt", handoff.locator,
                        call.error, extra={"seq_id": seq.seq_id})
            self.release(handoff.locator)
            return fetch.num_cached
        first_needed = fetch.num_cached // self.block_size
        end = blocks_for(handoff.num_tokens, self.block_size)
        blocks = self.kv.block_table(seq.seq_id)[first_needed:end]
        # The handoff holds blocks first_block..end-1; the import starts at the first one this
        # cache lacks, and reads nothing before it.
        self._imports.append(KVBlockTransfer(seq_id=seq.seq_id, block_ids=blocks, data=call.value,
                                             first_block=first_needed - handoff.first_block))
        self._imported[seq.seq_id] = (seq, handoff)
        self.bytes += handoff.nbytes * len(blocks) // max(1, end - handoff.first_block)
        return handoff.num_tokens

    def take_imports(self) -> list[KVBlockTransfer]:
        """The imports for the batch being built (written before it computes)."""
        imports, self._imports = self._imports, []
        return imports

    def imported(self, transfers: list[KVBlockTransfer]) -> None:
        """The step that carried ``transfers`` ran: the blocks hold the prompt's KV now, so
        their hashes are registered (later prompts share them; not before the data is written:
        a sequence preempted first would leave hashed blocks of garbage in the cache), and
        the handoffs are not needed any more."""
        for transfer in transfers:
            if (imported := self._imported.pop(transfer.seq_id, None)) is not None:
                seq, handoff = imported
                self.kv.commit(seq.seq_id, seq.token_ids, handoff.num_tokens)
                self.release(handoff.locator)

    def cancel(self, seq_id: str) -> None:
        """``seq_id`` is aborted or preempted: its fetch is abandoned (released when it ends)
        and an import not yet run is dropped, since its blocks may go to another sequence."""
        fetch = self.fetching.pop(seq_id, None)
        if fetch is not None:
            self._abandoned.append(fetch)
        if any(t.seq_id == seq_id for t in self._imports):
            self._imports = [t for t in self._imports if t.seq_id != seq_id]
        if (imported := self._imported.pop(seq_id, None)) is not None:
            self.release(imported[1].locator)

    @property
    def busy(self) -> bool:
        """Fetches under way (abandoned ones included: their handoffs still need releasing)."""
        return bool(self.fetching or self._abandoned)

    def release(self, locator: str) -> None:
        """Drop a handoff wherever it is held, in a daemon thread (a no-op without a locator)."""
        if not locator:
            return
        try:
            transport = self.transport()
        except Exception as exc:
            log.warning("KV handoff %s could not be released: %s", locator, exc)
            return
        BackgroundCall(_release_now, transport, locator, name="flowserve-kv-release")


def _release_now(transport: Any, locator: str) -> None:
    try:
        transport.release(locator)
    except Exception as exc:
        log.warning("KV handoff %s could not be released: %s", locator, exc)
