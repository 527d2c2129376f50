"""Tokenizers shared by this plugin's tests (session scope: SmolLM2's GGUF takes seconds).

* ``smollm2_cold``: the ``hf`` tokenizer built from SmolLM2's GGUF with an empty cache, so its
  ``hf_tokenizer`` is transformers' own GGUF tokenizer: the oracle.
* ``smollm2``: the same model loaded again, from the cache the first load wrote.
* ``llama_style_dir``: a SentencePiece-style tokenizer (BPE with byte fallback, ``▁`` for
  spaces, a decoder that strips the leading space) trained in the test, saved with a
  ``config.json`` and a ``generation_config.json`` and no chat template.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from flowserve_core.types import DeploymentSpec
from flowserve_hf_tokenizer.testing import build_llama_style_tokenizer


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
