"""Hook implementation: tokenizer ``hf``. Imports nothing heavy; the factory does."""

from __future__ import annotations

from typing import Any

from flowserve_core import hookimpl
from flowserve_core.factories import Register, TokenizerFactory
from flowserve_core.types import DeploymentSpec


def build_tokenizer(spec: DeploymentSpec) -> Any:
    """Factory of tokenizer ``hf``: load ``spec.model``'s tokenizer (transformers, on first use)."""
    from flowserve_hf_tokenizer.tokenizer import build_hf_tokenizer

    return build_hf_tokenizer(spec)


@hookimpl
def flowserve_register_tokenizers(register: Register[TokenizerFactory]) -> None:
    """Register ``hf``: a transformers tokenizer loaded from a model directory or a GGUF file."""
    register("hf", build_tokenizer)
