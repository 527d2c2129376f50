"""Helpers of the spmd executor's tests: tiny random checkpoints, the HF oracle, and a
test-only driver that plays the engine (sequential block allocation, hand-built StepBatches).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flowserve_core.types import SamplingParams, ScheduledSequence, StepBatch, StepResult

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BLOCK_SIZE = 16
VOCAB = 384


def save_tiny(path: Path, kind: str, seed: int) -> Path:
    """A tiny random checkpoint whose greedy choices are far from ties: large weights
    (initializer_range 0.35) make the top logits stand well apart."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=1024, initializer_range=0.35,
                  bos_token_id=None, eos_token_id=None, pad_token_id=0, rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, tie_word_embeddings=False,
                                             rope_theta=5000.0, **common))
    else:  # qwen2: q/k/v biases, one KV head (replicated under tensor parallelism)
        model = Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=1, tie_word_embeddings=True,
                                             rope_theta=10000.0, **common))
        with torch.no_grad():
            for layer in model.model.layers:  # HF initialises biases to zero: make them matter
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    model.save_pretrained(path)
    return path


WINDOW = 12
COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=512, initializer_range=0.35,
    bos_token_id=None, eos_token_id=None, pad_token_id=0, rms_norm_eps=1e-5, tie_word_embeddings=False)

#: model_type → what its tiny config sets beyond ``COMMON`` (each exercises its family's features)
ARCHITECTURES: dict[str, dict[str, Any]] = {
    # a global layer, then a sliding one (max_window_layers)
    "qwen3": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "gemma2": dict(sliding_window=WINDOW, query_pre_attn_scalar=24, attn_logit_softcapping=20.0,
                   final_logit_softcapping=15.0, hidden_activation="gelu_pytorch_tanh"),
    "gemma3_text": dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
                        query_pre_attn_scalar=24, hidden_activation="gelu_pytorch_tanh",
                        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    "phi3": dict(sliding_window=WINDOW, partial_rotary_factor=0.5),
    "olmo2": dict(),
    "granite": dict(embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.1,
                    logits_scaling=2.0),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64, sliding_window=WINDOW),
    # the first layer dense, the second routed; top-k weights not renormalised
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32, norm_topk_prob=False,
                      mlp_only_layers=[0]),
}


def save_tiny_architecture(path: Path, model_type: str, seed: int, **overrides: Any) -> Path:
    """A tiny random checkpoint of ``model_type`` from transformers' own ``from_config``; the
    norms' weights are drawn too (HF starts them at one), so a norm loaded wrongly shows."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **{**COMMON, **ARCHITECTURES[model_type], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # Gemma's norms store weight - 1
                param.normal_(0.0 if model_type.startswith("gemma") else 1.0, 0.3)
    model.save_pretrained(path)
    return path


def write_gguf(hf_model: Any, path: Path, architecture: str) -> Path:
    """``hf_model`` (float32) as a GGUF file of ``architecture`` (its tensors named by ``gguf``'s
    own table; no tokenizer), as llama.cpp's converter writes architectures without q/k
    permutation."""
    import gguf

    config = hf_model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == architecture)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    for name, tensor in hf_model.state_dict().items():
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def load_hf(path: Path, dtype: torch.dtype = torch.float32) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def hf_greedy(model: Any, prompt: list[int], new_tokens: int, **kwargs: Any) -> list[int]:
    """The oracle: HF ``generate(do_sample=False)``."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0, **kwargs)
    return out[0, len(prompt):].tolist()


def random_prompt(length: int, seed: int, vocab: int = VOCAB) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (length,), generator=generator).tolist()


@dataclass
class DrivenSequence:
    prompt: list[int]
    max_tokens: int
    params: SamplingParams
    table: list[int] = field(default_factory=list)
    computed: int = 0
    output: list[int] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return len(self.output) >= self.max_tokens


class Driver:
    """Plays the engine for one executor: blocks are handed out sequentially, each step
    schedules a prefill chunk (at most ``chunk`` tokens) or one decode token per sequence."""

    def __init__(self, executor: Any, first_block: int = 0):
        self.executor = executor
        self.block_size = executor.kv_cache_spec().block_size
        self.next_block = first_block
        self.seqs: dict[str, DrivenSequence] = {}
        self.finished: list[str] = []

    def add(self, seq_id: str, prompt: list[int], max_tokens: int, params: SamplingParams | None = None,
            shared_blocks: list[int] | None = None) -> DrivenSequence:
        """Add a sequence; ``shared_blocks`` are full blocks already holding its first tokens
        (a prefix cache hit), so its first chunk starts after them."""
        seq = DrivenSequence(prompt=list(prompt), max_tokens=max_tokens,
                             params=params or SamplingParams(temperature=0.0, max_tokens=max_tokens))
        if shared_blocks:
            seq.table = list(shared_blocks)
            seq.computed = len(shared_blocks) * self.block_size
        self.seqs[seq_id] = seq
        return seq

    def allocate(self, count: int) -> list[int]:
        blocks = list(range(self.next_block, self.next_block + count))
        self.next_block += count
        return blocks

    def _schedule(self, seq_id: str, seq: DrivenSequence, chunk: int) -> ScheduledSequence:
        history = seq.prompt + seq.output
        if seq.computed < len(seq.prompt):
            tokens = seq.prompt[seq.computed:seq.computed + chunk]
        else:
            tokens = history[-1:]
        start = seq.computed if seq.computed < len(seq.prompt) else len(history) - 1
        end = start + len(tokens)
        need = -(-end // self.block_size) - len(seq.table)
        if need > 0:
            seq.table += self.allocate(need)
        return ScheduledSequence(seq_id=seq_id, token_ids=tokens, start_pos=start, block_table=list(seq.table),
                                 sample=end >= len(seq.prompt), params=seq.params,
                                 prompt_token_ids=seq.prompt, output_token_ids=list(seq.output),
                                 eos_token_ids=[])

    def batch(self, chunk: int = 1 << 30, only: set[str] | None = None) -> StepBatch:
        scheduled = [self._schedule(k, s, chunk) for k, s in self.seqs.items()
                     if not s.done and (only is None or k in only)]
        finished, self.finished = self.finished, []
        return StepBatch(seqs=scheduled, finished_seq_ids=finished)

    def apply(self, batch: StepBatch, result: StepResult) -> None:
        for item in batch.seqs:
            seq = self.seqs[item.seq_id]
            seq.computed = max(seq.computed, item.start_pos + len(item.token_ids))
            if item.sample:
                assert item.seq_id in result.token_ids, f"{item.seq_id} was not sampled"
                seq.output.append(result.token_ids[item.seq_id])
                if item.seq_id in result.logprobs:
                    seq.logprobs.append(result.logprobs[item.seq_id])
                if seq.done:
                    self.finished.append(item.seq_id)
            else:
                assert item.seq_id not in result.token_ids, f"{item.seq_id} sampled mid-prompt"

    async def step(self, chunk: int = 1 << 30, only: set[str] | None = None) -> StepResult:
        batch = self.batch(chunk, only)
        result = await self.executor.execute(batch)
        self.apply(batch, result)
        return result

    async def run(self, chunk: int = 1 << 30) -> dict[str, list[int]]:
        """Step until every sequence is done, then tell the executor which ones finished."""
        while any(not s.done for s in self.seqs.values()):
            await self.step(chunk)
        if self.finished:
            await self.executor.execute(self.batch())
        return {k: s.output for k, s in self.seqs.items()}
