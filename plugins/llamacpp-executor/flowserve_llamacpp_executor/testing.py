"""Test support: tiny GGUF files made from random transformers checkpoints (no weights ship).

``write_tiny_gguf(path, architecture)`` builds a random ``llama`` or ``qwen2`` model with
transformers itself (2 layers, hidden 64) over SmolLM2's real vocabulary, and writes it as a
float32 GGUF with the ``gguf`` library: tensor names mapped by ``gguf``'s own table, Llama's
q/k rows permuted to llama.cpp's rotary layout (as llama.cpp's converter does), and SmolLM2's
tokenizer and chat template copied from its GGUF (so FlowServe's ``hf`` tokenizer reads it).
The weights are scaled up so greedy decoding has clear winners.

``llama_cpp_greedy(path, prompt, n)`` is the greedy oracle: llama.cpp's own high-level API
(``llama_cpp.Llama``), one sequence, on the same file, with the executor's attention settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

ARCHITECTURES = ("llama", "qwen2")


def _permute(weight: Any, n_head: int) -> Any:
    """HF's rotate-half q/k rows → GGML's interleaved pairs (llama.cpp's converter, ``permute``)."""
    rows = weight.shape[0]
    return (weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _copy_tokenizer(writer: Any, source: Path) -> int:
    """Copy ``source``'s tokenizer keys and chat template into ``writer``; the vocabulary size."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    vocab = 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value = field.contents()
        if key == "tokenizer.ggml.tokens":
            vocab = len(value)
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, value)
        else:
            writer.add_key_value(key, value, kind)
    return vocab


def write_tiny_gguf(path: Path, architecture: str = "llama", *, seed: int = 0, tokenizer_from: str = "") -> Path:
    """A random 2-layer ``architecture`` model as a float32 GGUF at ``path`` (SmolLM2's
    tokenizer, from ``tokenizer_from`` or the default model's GGUF)."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from flowserve_core.config import default_model_path

    source = Path(tokenizer_from or default_model_path())
    path.parent.mkdir(parents=True, exist_ok=True)
    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[architecture]
    writer = gguf.GGUFWriter(str(path), architecture)
    vocab = _copy_tokenizer(writer, source)
    shape: dict[str, Any] = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                 rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2)
    config = LlamaConfig(**shape, tie_word_embeddings=False) if architecture == "llama" else \
        Qwen2Config(**shape, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # clear winners for greedy: small random weights give near-ties
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.mul_(8.0 if "embed" in name or "lm_head" in name else 2.0)
    writer.add_context_length(shape["max_position_embeddings"])
    writer.add_block_count(shape["num_hidden_layers"])
    writer.add_embedding_length(shape["hidden_size"])
    writer.add_feed_forward_length(shape["intermediate_size"])
    writer.add_head_count(shape["num_attention_heads"])
    writer.add_head_count_kv(shape["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(shape["rms_norm_eps"])
    writer.add_rope_freq_base(shape["rope_theta"])
    writer.add_vocab_size(vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    names = gguf.get_tensor_name_map(arch, shape["num_hidden_layers"])
    for name, tensor in model.state_dict().items():
        data = tensor.detach().float().numpy()
        if architecture == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = shape["num_attention_heads"] if "q_proj" in name else shape["num_key_value_heads"]
            data = _permute(data, heads)
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ValueError(f"no GGUF name for {name} ({architecture})")
        writer.add_tensor(target, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama_cpp_greedy(path: Path, prompt: list[int], max_tokens: int) -> list[int]:
    """The oracle: ``max_tokens`` greedy tokens after ``prompt`` from ``llama_cpp.Llama`` alone
    on ``path`` (flash attention on, as the executor's default)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_threads=2, flash_attn=True, verbose=False, seed=0)
    try:
        tokens: list[int] = []
        for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
            tokens.append(token)
            if len(tokens) == max_tokens:
                break
        return tokens
    finally:
        llm.close()


def llama_cpp_prompt_logprobs(path: Path, prompt: list[int]) -> Any:
    """The oracle of prompt scoring: ``llama_cpp.Llama`` alone on ``path`` evaluates ``prompt``
    with every position's logits; their log-softmax (row i scores prompt token i + 1)."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_threads=2, flash_attn=True, verbose=False, seed=0,
                          logits_all=True)
    try:
        next(iter(llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0)))  # evaluates the prompt first
        scores = np.array(llm.scores[:len(prompt)], dtype=np.float64)
    finally:
        llm.close()
    shifted = scores - scores.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
