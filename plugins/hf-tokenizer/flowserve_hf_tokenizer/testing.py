"""Test support for this plugin and for plugins that need a real tokenizer in their tests.

``build_llama_style_tokenizer(directory)`` trains (in milliseconds) a small Llama-2-style
tokenizer: BPE with byte fallback, ``▁`` for spaces and a decoder that strips the leading
space, saved with a ``config.json`` and a ``generation_config.json`` and no chat template.
``WIDE_CHARACTERS`` take 2–4 UTF-8 bytes (and several byte tokens) each.
"""

from __future__ import annotations

import json
from pathlib import Path

WIDE_CHARACTERS = ["é", "ñ", "ß", "世", "界", "東", "京", "語", "🙂", "🚀", "👍🏽", "🇫🇷", "👩‍💻", "∑", "ﬁ",
                   "\u00a0"]

CORPUS = [
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "The quick brown fox jumps over the lazy dog.",
    "Streaming text arrives one token at a time, and stop strings cut it.",
    "naïve café résumé déjà vu", "東京 大阪 世界",
]


def build_llama_style_tokenizer(directory: Path, *, max_position_embeddings: int | None = 512) -> Path:
    """Train a small Llama-2-style tokenizer and save it (with model configs) in ``directory``:
    EOS ``</s>`` (id 2), generation_config EOS ids ``[2, 5]``, no chat template."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.normalizer = normalizer
    trained.train_from_iterator(CORPUS * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    model = json.loads(trained.to_str())["model"]
    vocab = model["vocab"]
    for byte in range(256):  # byte fallback: characters outside the vocabulary become bytes
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m) for m in model["merges"]],
                                     byte_fallback=True, unk_token="<unk>"))
    tokenizer.normalizer = normalizer
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                           decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                 unk_token="<unk>")
    directory.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(directory))
    config = {"model_type": "llama", "eos_token_id": 2}
    if max_position_embeddings is not None:
        config["max_position_embeddings"] = max_position_embeddings
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    return directory


TINY_GGUF_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_tiny_gguf(path: Path, *, context_length: int = 2048, eot_token_id: int | None = None) -> Path:
    """Write a GGUF file holding a tiny byte-level BPE tokenizer (263 tokens: specials
    ``<|endoftext|>`` 0, ``<|im_start|>`` 1, ``<|im_end|>`` 2 = EOS, the 256 byte symbols, and
    merges for " world"), a chat template, and one tensor. Loads in about a second."""
    import gguf
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *bytes_to_unicode().values(), "Ġw", "or", "Ġwor", "ld"]
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(context_length)
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges(["Ġ w", "o r", "Ġw or", "l d"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if eot_token_id is not None:
        writer.add_eot_token_id(eot_token_id)
    writer.add_chat_template(TINY_GGUF_CHAT_TEMPLATE)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
