"""Tokenizers shared by this plugin's tests (session scope: SmolLM2's GGUF takes seconds).

* ``smollm2_cold``: the ``hf`` tokenizer built from SmolLM2's GGUF with an empty cache, so its
  ``hf_tokenizer`` is transformers' own GGUF tokenizer: the oracle.
* ``smollm2``: the same model loaded again, from the cache the first load wrote.
* ``llama_style_dir``: a SentencePiece-style tokenizer (BPE with byte fallback, ``▁`` for
  spaces, a decoder that strips the leading space) trained in the test, saved with a
  ``config.json`` and a ``generation_config.json`` and no chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flowserve_core.types import DeploymentSpec

CORPUS = [
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "The quick brown fox jumps over the lazy dog.",
    "Streaming text arrives one token at a time, and stop strings cut it.",
    "naïve café résumé déjà vu", "東京 大阪 世界",
]


def build_llama_style_tokenizer(directory: Path, *, max_position_embeddings: int | None = 512) -> Path:
    """Train a small Llama-2-style tokenizer and save it (with model configs) in ``directory``."""
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


@pytest.fixture(scope="session")
def tokenizer_cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("flowserve-cache")


@pytest.fixture(scope="session")
def smollm2_cold(tokenizer_cache_dir):
    from flowserve_hf_tokenizer.tokenizer import build_hf_tokenizer

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FLOWSERVE_CACHE_DIR", str(tokenizer_cache_dir))
        return build_hf_tokenizer(DeploymentSpec())


@pytest.fixture(scope="session")
def smollm2(smollm2_cold, tokenizer_cache_dir):
    from flowserve_hf_tokenizer.tokenizer import build_hf_tokenizer

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FLOWSERVE_CACHE_DIR", str(tokenizer_cache_dir))
        return build_hf_tokenizer(DeploymentSpec())


@pytest.fixture(scope="session")
def llama_style_dir(tmp_path_factory) -> Path:
    return build_llama_style_tokenizer(tmp_path_factory.mktemp("llama-style"))


@pytest.fixture(scope="session")
def llama_style(llama_style_dir):
    from flowserve_hf_tokenizer.tokenizer import build_hf_tokenizer

    return build_hf_tokenizer(DeploymentSpec(model=str(llama_style_dir)))
