"""``LlamaCppExecutor``: FlowServe's ``Executor`` on llama.cpp's kernels.

Each step (in a worker thread; the event loop never blocks):
1. sequences that ended give up their llama.cpp sequence (or keep it for prefix reuse,
   ``slots.py``), PD imports are written (``llama_state_seq_set_data``);
2. every scheduled sequence's tokens go into one ``llama_batch`` under its own llama.cpp
   sequence id (prefill chunks and decode tokens together), with logits asked for only on
   the last token of the sequences that sample; a batch longer than ``n_batch`` is decoded
   in parts;
3. the logits rows are read through one view of ``llama_get_logits`` and go to FlowServe's ``Sampler``;
4. multi-step decoding (``ScheduledSequence.decode_steps``, ``--decode-steps``): the sampled
   tokens are fed back and sampled again, one ``llama_decode`` a round, until a sequence ends
   or the engine has new work (``end_step_early``);
5. PD exports are read (``llama_state_seq_get_data``, ``state.py``).

Embeddings (``ScheduledSequence.pooling``): a step with pooled sequences decodes with the
context's embeddings on (``llama_set_embeddings``, pooling type NONE), which gives every token's
final-norm hidden state (``llama_get_embeddings_ith``) and its logits in the same decode
(llama.cpp then outputs every token of the batch, so such steps pay the LM head on each);
the pooled rows are summed here and finished by the sampler package's ``Pooler``.

KV capacity: the context holds ``kv_cache_memory / bytes per token`` cells, all sequences in
one unified cache; FlowServe's KV manager admits work against ``kv_cache_spec()`` (those
cells as blocks of ``block_size``), so running sequences always fit. Retained prefix slots
are extra: when llama.cpp finds no room (``llama_decode`` returns 1 before computing
anything), the least recently used one is removed and the batch retried.

Options (``spec.options``): ``num_threads`` (default: the CPUs this process may run on),
``n_batch`` (tokens per ``llama_decode``, default 512), ``prefix_slots`` (finished sequences
kept for prefix reuse, default ``max_num_seqs``; 0 turns prefix reuse off),
``flash_attn`` (default true), ``kv_unified`` (true: one cache for all sequences; false: a
stream per sequence, as ``llama-server -np`` does, each capped at ``n_ctx / max_num_seqs``
tokens; ``auto``, the default: streams when every stream holds ``max_model_len`` tokens).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import anyio
import llama_cpp
import msgspec
import numpy as np
import torch

from flowserve_core.config import parse_memory_size
from flowserve_core.errors import ConfigError, EngineDeadError
from flowserve_core.interfaces import PluginLookup
from flowserve_core.types import (
    DeploymentSpec,
    KVBlockTransfer,
    KVCacheSpec,
    ScheduledSequence,
    StepBatch,
    StepResult,
)
from flowserve_llamacpp_executor.host import instance_threads, unmap_large_buffers_when_freed
from flowserve_llamacpp_executor.model import (
    MAX_SEQUENCES,
    LlamaModel,
    kv_per_sequence_streams,
    load_model,
    option_flag,
)
from flowserve_llamacpp_executor.outputs import OutputLogits
from flowserve_llamacpp_executor.rows import Row, tokens_before
from flowserve_llamacpp_executor.slots import SlotTable
from flowserve_llamacpp_executor.state import read_sequence_state, write_sequence_state
from flowserve_sampler import Pooler, Sampler, deployment_backend, score_prompts

log = logging.getLogger(__name__)

#: A token id no vocabulary has: a slot's imported KV whose tokens are not known yet.
_UNKNOWN = -1


class LlamaCppExecutor:
    """Runs a GGUF model with llama.cpp in this process: one context, one unified KV cache.

    Construction loads the model (or takes the one ``preload`` left) and makes the context
    (blocking). ``execute`` computes in a worker thread; ``close`` frees the context.
    ``plugins``: the manager that built it, which builds the sampler's structured-output backend.
    """

    def __init__(self, spec: DeploymentSpec, plugins: PluginLookup | None = None):
        if spec.tensor_parallel != 1:
            raise ConfigError(f"executor 'llamacpp' runs a model in one process; tensor_parallel="
                              f"{spec.tensor_parallel} needs executor 'spmd'")
        self.spec = spec
        self.model: LlamaModel = load_model(spec)
        #: how the weights came: what the prewarm scaler reports as the start path
        self.weights_path = "preloaded" if self.model.preloaded else "loaded"
        options = spec.options
        self.bytes_per_token = self.model.kv_bytes_per_token()
        memory = parse_memory_size(spec.kv_cache_memory)
        cells = memory // self.bytes_per_token // spec.block_size * spec.block_size
        if cells < spec.block_size:
            raise ConfigError(f"kv_cache_memory {spec.kv_cache_memory!r} holds {cells} tokens of this model "
                              f"({self.bytes_per_token} bytes each); give it more")
        self.threads = int(options.get("num_threads", 0)) or instance_threads()
        unmap_large_buffers_when_freed()  # this process runs one executor: its steps' temporaries go back
        self.n_batch = int(options.get("n_batch", 512))
        self.kv_unified = not kv_per_sequence_streams(options.get("kv_unified"), cells, spec.max_num_seqs,
                                                      spec.max_model_len or self.model.n_ctx_train or cells)
        prefix_slots = int(options.get("prefix_slots", spec.max_num_seqs))
        # Unified: kept sequences are extra ids sharing the cells. Per-sequence streams: a
        # stream per running sequence, and a finished one is kept until its stream is wanted.
        extra = max(0, prefix_slots) if self.kv_unified else 0
        self.n_slots = min(MAX_SEQUENCES, spec.max_num_seqs + extra)
        self.retain = prefix_slots > 0
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = cells
        params.n_batch = params.n_ubatch = self.n_batch
        params.n_seq_max = self.n_slots
        params.n_threads = params.n_threads_batch = self.threads
        # Unified: one pool of cells for every sequence, as FlowServe's KV manager counts
        # them, but each token's attention visits every cell in use. Streams (llama-server's
        # layout with -np): each sequence attends over its own stream only, and is capped at
        # n_ctx / n_seq_max tokens (max_model_len says so).
        params.kv_unified = self.kv_unified
        params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO if option_flag(options.get("flash_attn", True))
                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        params.no_perf = True
        params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_NONE  # embeddings: every token's, pooled here
        self.ctx = llama_cpp.llama_init_from_model(self.model.pointer, params)
        if not self.ctx:
            raise ConfigError(f"llama.cpp could not make a context of {cells} tokens for {self.model.path.name} "
                              f"(its log says why; a smaller kv_cache_memory may fit)")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.n_ctx = int(llama_cpp.llama_n_ctx(self.ctx))
        self.n_ctx_seq = int(llama_cpp.llama_n_ctx_seq(self.ctx))
        self.max_model_len = min(spec.max_model_len or self.model.n_ctx_train or self.n_ctx_seq, self.n_ctx_seq)
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.outputs = OutputLogits(self.ctx, self.model.n_vocab)
        self.slots = SlotTable(self.n_slots)
        self.sampler = Sampler(self.model.n_vocab, torch.device("cpu"), deployment_backend(spec, plugins))
        self.pooler = Pooler()
        self._lock = threading.Lock()
        self._dead: str | None = None
        #: set by the engine when work arrives: a multi-step decoding ends after its round
        self._end_early = threading.Event()
        log.info("llamacpp executor ready: %s (%s), %d threads, KV cache %d tokens × %d bytes = %.1f MiB, "
                 "%d sequence ids, max_model_len %d", self.model.path.name, self.model.architecture, self.threads,
                 self.n_ctx, self.bytes_per_token, self.n_ctx * self.bytes_per_token / 2**20, self.n_slots,
                 self.max_model_len, extra={"n_ctx": self.n_ctx, "threads": self.threads, "n_seq_max": self.n_slots})

    # ------------------------------------------------------------------ Executor protocol

    def kv_cache_spec(self) -> KVCacheSpec:
        """The context's cells as blocks of ``block_size`` tokens."""
        return KVCacheSpec(num_blocks=self.n_ctx // self.spec.block_size, block_size=self.spec.block_size,
                           bytes_per_block=self.bytes_per_token * self.spec.block_size,
                           max_model_len=self.max_model_len)

    async def execute(self, batch: StepBatch) -> StepResult:
        """Run one step in a worker thread; ``EngineDeadError`` once llama.cpp failed."""
        self._check_alive()
        return await anyio.to_thread.run_sync(self._step, batch)

    def end_step_early(self) -> None:
        """New work arrived (``EndsStepsEarly``): the step in flight stops decoding more tokens
        after its current round."""
        self._end_early.set()

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"llamacpp executor is dead: {self._dead}")

    def _step(self, batch: StepBatch) -> StepResult:
        with self._lock:
            self._check_alive()
            self.sampler.forget(batch.finished_seq_ids)
            self.pooler.forget(batch.finished_seq_ids)
            for seq_id in batch.finished_seq_ids:
                self._remove(self.slots.close(seq_id, retain=self.retain))
            for transfer in batch.kv_imports:  # PD decode: the prefill's KV, before computing
                self._import(transfer)
            rows = [self._row(scheduled) for scheduled in batch.seqs]
            self.sampler.prepare([row.scheduled for row in rows if row.sample])  # masks overlap the decode
            pooled = [row for row in rows if row.pooled]
            sums = np.zeros((len(pooled), self.model.n_embd), dtype=np.float32)
            logits = self._decode(rows, pooled, sums)
            sampled = [row.scheduled for row in rows if row.sample]
            result = self.sampler(logits[:len(sampled)], sampled) if sampled else StepResult()
            if scored := [(row.scheduled, row.scored) for row in rows if row.scored]:
                result.prompt_logprobs = score_prompts(torch.from_numpy(logits[len(sampled):]), scored)
            if any(row.sample and row.scheduled.decode_steps > 1 for row in rows):
                self._decode_more([row.scheduled for row in rows if row.sample], result)
            if pooled:
                result.embeddings = self.pooler(torch.from_numpy(sums), [row.scheduled for row in pooled],
                                                [len(row.pooled) for row in pooled])
            result.kv_exports = [
                KVBlockTransfer(seq_id=t.seq_id, block_ids=t.block_ids, first_block=t.first_block,
                                data=self._export(t.seq_id))  # type: ignore[arg-type]  # bytes-like, uncopied
                for t in batch.kv_exports]
            # Cleared as the step ends, not as it starts: work that arrives after the engine
            # scheduled the next step but before it runs ends that step after its first round.
            self._end_early.clear()
            return result

    def _decode_more(self, sampled: list[ScheduledSequence], result: StepResult) -> None:
        """Multi-step decoding: feed the tokens just sampled back and sample again, one
        ``llama_decode`` a round for all the sequences, each sampled as its own next step would
        be (penalties, seeds and masks read the outputs so far), so the tokens are those of as
        many single steps. It ends after the round in which any sequence has its
        ``decode_steps`` tokens or sampled one of its ``eos_token_ids`` (once ``min_tokens``
        are out), or when the engine has new work (``end_step_early``): a sequence that ends, and
        a task that arrives, wait no longer than with one token a step."""
        going = [seq for seq in sampled if seq.decode_steps > 1]
        if len(going) < len(sampled):
            return  # a sequence in the batch ends here with its one token
        outputs = {seq.seq_id: [*seq.output_token_ids, result.token_ids[seq.seq_id]] for seq in going}
        no_pooling = np.zeros((0, self.model.n_embd), dtype=np.float32)
        for step in range(1, min(seq.decode_steps for seq in going)):
            if self._end_early.is_set() or any(_ended(seq, outputs[seq.seq_id]) for seq in going):
                return
            seqs = [msgspec.structs.replace(seq, token_ids=outputs[seq.seq_id][-1:], start_pos=seq.start_pos + step,
                                            output_token_ids=list(outputs[seq.seq_id])) for seq in going]
            self.sampler.prepare(seqs)
            more = self.sampler(self._decode([self._row(seq) for seq in seqs], [], no_pooling), seqs)
            for seq in seqs:
                token = more.token_ids[seq.seq_id]
                outputs[seq.seq_id].append(token)
                result.more_token_ids.setdefault(seq.seq_id, []).append(token)
                if (logprob := more.logprobs.get(seq.seq_id)) is not None:
                    result.more_logprobs.setdefault(seq.seq_id, []).append(logprob)

    def _row(self, scheduled: Any) -> Row:
        """Give ``scheduled`` its slot, holding exactly its first ``start_pos`` tokens' KV
        (shared from another slot or recomputed in this step where it did not)."""
        start = scheduled.start_pos
        slot = self.slots.get(scheduled.seq_id)
        if slot is None:
            slot, evicted = self.slots.open(scheduled.seq_id)
            for seq_id in evicted:
                self._remove(seq_id)
            if start:
                known = tokens_before(scheduled, start)
                source, n = self.slots.best_prefix(known, exclude=slot)
                if source is not None:
                    self._share_prefix(source.seq_id, slot.seq_id, n)
                    slot.tokens = known[:n]
        elif len(slot.tokens) > start:  # recomputing from an earlier position
            llama_cpp.llama_memory_seq_rm(self.memory, slot.seq_id, start, -1)
            del slot.tokens[start:]
        elif slot.tokens and slot.tokens[0] == _UNKNOWN:  # imported KV: its tokens are known now
            slot.tokens = tokens_before(scheduled, len(slot.tokens))
        held = len(slot.tokens)
        missing = tokens_before(scheduled, start)[held:] if held < start else []
        return Row(scheduled, slot, missing + list(scheduled.token_ids), held)

    def _share_prefix(self, source: int, target: int, n: int) -> None:
        """Give llama.cpp sequence ``target`` the KV of ``source``'s first ``n`` positions: in a
        unified cache the cells are shared; across streams llama.cpp copies only a whole
        stream, so the copy is cut back to ``n`` positions."""
        if self.kv_unified:
            llama_cpp.llama_memory_seq_cp(self.memory, source, target, 0, n)
        else:
            llama_cpp.llama_memory_seq_cp(self.memory, source, target, -1, -1)
            llama_cpp.llama_memory_seq_rm(self.memory, target, n, -1)

    def _decode(self, rows: list[Row], pooled: list[Row], sums: np.ndarray) -> np.ndarray:
        """Decode every row's tokens (in parts of ``n_batch``); the logits of the sampled rows,
        then of the scored prompt positions (row after row). The final hidden states of the
        ``pooled`` rows' positions are summed into ``sums`` (one row each). A batch of one part
        whose outputs are all sampled rows (a decode step) gets llama.cpp's own output rows,
        uncopied (a copy of 32 rows of a 49k vocabulary is 6 MB): valid until the next decode."""
        llama_cpp.llama_set_embeddings(self.ctx, bool(pooled))
        try:
            return self._decode_rows(rows, {id(row): i for i, row in enumerate(pooled)}, sums)
        finally:
            if pooled:
                llama_cpp.llama_set_embeddings(self.ctx, False)

    def _decode_rows(self, rows: list[Row], pool_index: dict[int, int], sums: np.ndarray) -> np.ndarray:
        num_sampled = sum(1 for row in rows if row.sample)
        num_scored = sum(len(row.scored) for row in rows)
        in_place = (bool(rows) and not pool_index and not num_scored
                    and sum(len(row.tokens) for row in rows) <= self.n_batch)
        logits = None if in_place else np.empty((num_sampled + num_scored, self.model.n_vocab), dtype=np.float32)
        batch = self.batch
        n = 0
        outputs = 0  # tokens of this part that output logits (llama.cpp's output rows)
        pending: list[tuple[int, int]] = []  # (output row of this part, logits row) to read after it
        pending_pool: list[tuple[int, int]] = []  # (index in this part, row of sums)
        every = bool(pool_index)  # with embeddings on, llama.cpp outputs every token
        out, scored_out = 0, num_sampled
        produced = np.empty((0, self.model.n_vocab), dtype=np.float32)  # the last part's output rows
        for row in rows:
            last = len(row.tokens) - 1
            # Scored positions start at the chunk's start, after any prefix recomputed here.
            first_scored = row.scheduled.start_pos - row.first_pos
            scored = range(first_scored, first_scored + len(row.scored))
            for i, token in enumerate(row.tokens):
                wants = row.sample and i == last
                output = wants or i in scored or every
                batch.token[n] = token
                batch.pos[n] = row.first_pos + i
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = row.slot.seq_id
                batch.logits[n] = output
                if i in row.pooled:
                    pending_pool.append((n, pool_index[id(row)]))
                if wants:
                    pending.append((outputs, out))
                    out += 1
                elif i in scored:
                    pending.append((outputs, scored_out))
                    scored_out += 1
                outputs += output
                n += 1
                if n == self.n_batch:  # a batch of exactly n_batch tokens ends here, in one part
                    produced = self._run_part(n, outputs, pending, logits, pending_pool, sums)
                    n, outputs, pending, pending_pool = 0, 0, [], []
            row.slot.tokens.extend(row.tokens)
        if n:
            produced = self._run_part(n, outputs, pending, logits, pending_pool, sums)
        return produced if logits is None else logits

    def _run_part(self, n: int, outputs: int, pending: list[tuple[int, int]], logits: np.ndarray | None,
                  pending_pool: list[tuple[int, int]], sums: np.ndarray) -> np.ndarray:
        """Decode the batch's first ``n`` tokens (``outputs`` of them output logits); copy the
        ``pending`` output rows into ``logits`` (unless it is None) and add the pooled rows'
        hidden states to ``sums``. Returns llama.cpp's output rows (a view)."""
        self.batch.n_tokens = n
        while True:
            code = llama_cpp.llama_decode(self.ctx, self.batch)
            if code != 1:
                break
            # No room: prefix slots kept for reuse hold cells the running sequences need.
            victim = self.slots.evict()
            if victim is None:
                raise RuntimeError(f"llama.cpp found no room for a batch of {n} tokens in its {self.n_ctx}-token "
                                   f"KV cache")
            self._remove(victim)
        if code != 0:
            self._dead = f"llama_decode failed with code {code}"
            raise EngineDeadError(f"llamacpp executor is dead: {self._dead}")
        produced = self.outputs.rows(outputs)
        if logits is not None:
            self.outputs.copy(produced, pending, logits)
        for index, row in pending_pool:
            pointer = llama_cpp.llama_get_embeddings_ith(self.ctx, index)
            sums[row] += np.ctypeslib.as_array(pointer, shape=(self.model.n_embd,))
        return produced

    def _remove(self, seq_id: int | None) -> None:
        if seq_id is not None:
            llama_cpp.llama_memory_seq_rm(self.memory, seq_id, -1, -1)

    # ------------------------------------------------------------------ PD: per-sequence state

    def _export(self, seq_id: str) -> memoryview:
        """The whole KV of ``seq_id``'s slot; an importer takes it whole, whichever blocks it
        already had."""
        slot = self.slots.get(seq_id)
        if slot is None:
            raise RuntimeError(f"cannot export the KV of {seq_id}: it is not on this executor")
        return read_sequence_state(self.ctx, slot.seq_id)

    def _import(self, transfer: KVBlockTransfer) -> None:
        """Write an exported sequence state into ``transfer.seq_id``'s (new) slot. Its tokens
        are learnt when the sequence is scheduled (its position says how many there are)."""
        slot = self.slots.get(transfer.seq_id)
        if slot is None:
            slot, evicted = self.slots.open(transfer.seq_id)
            for seq_id in evicted:
                self._remove(seq_id)
        self._remove(slot.seq_id)
        length = write_sequence_state(self.ctx, self.memory, slot.seq_id, transfer)
        slot.tokens = [_UNKNOWN] * length  # held, not yet known: never matched as a prefix

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Free the context (the model stays loaded for the process's next executor)."""
        with self._lock:
            self._dead = self._dead or "the executor was closed"
            if self.ctx:
                self.outputs.forget()
                llama_cpp.llama_batch_free(self.batch)
                llama_cpp.llama_free(self.ctx)
                self.ctx = None


def _ended(seq: ScheduledSequence, outputs: list[int]) -> bool:
    """Whether the last of ``outputs`` ends ``seq``: a stop token once ``min_tokens`` are out."""
    return outputs[-1] in seq.eos_token_ids and len(outputs) >= seq.params.min_tokens
