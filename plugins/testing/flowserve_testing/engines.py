"""A tiny real model, and the smallest installed engine to run a plugin on in a test.

``write_tiny_llama`` imports torch and transformers when called, never at import time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Literal

import msgspec

from flowserve_core.cli import field_flag
from flowserve_core.plugins import PluginManager
from flowserve_core.types import DeploymentSpec
from flowserve_testing.plugin import with_kit_plugin


def write_tiny_llama(directory: str | os.PathLike, *, seed: int = 0, num_hidden_layers: int = 2,
                     hidden_size: int = 64, max_position_embeddings: int = 512,
                     initializer_range: float = 0.35) -> Path:
    """Write a tiny random Llama checkpoint (safetensors, float32) with its tokenizer.

    Weights are drawn wider than transformers' default (``initializer_range``) so that the
    top logits stand well apart: greedy comparisons against HF then never hinge on a tie.

    The tokenizer is flowserve-hf-tokenizer's small Llama-style BPE (EOS ``</s>`` = 2), so
    ``--tokenizer-plugin hf`` and HF transformers both load the directory. Takes about a second.
    :returns: ``directory``, ready for ``DeploymentSpec(model=str(directory))``.
    """
    try:
        from flowserve_hf_tokenizer.testing import build_llama_style_tokenizer
    except ImportError:
        raise ImportError("write_tiny_llama builds its tokenizer with flowserve-hf-tokenizer: "
                          "pip install flowserve-hf-tokenizer") from None
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = build_llama_style_tokenizer(Path(directory), max_position_embeddings=max_position_embeddings)
    vocab_size = len(AutoTokenizer.from_pretrained(str(path)))
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False, dtype="float32", initializer_range=initializer_range)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).float().save_pretrained(str(path), safe_serialization=True)
    return path


#: Spec fields of each engine: a tiny real one, and FlowServe's own toy components.
REAL_ENGINE: dict[str, Any] = dict(
    tokenizer="hf", executor="spmd", kv_cache="paged", batch_scheduler="continuous",
    job_scheduler="colocated", dtype="float32", device="cpu", kv_cache_memory="8MiB")
TOY_ENGINE: dict[str, Any] = dict(
    model="toy", tokenizer="whitespace", executor="counter", kv_cache="unbounded",
    batch_scheduler="fifo", job_scheduler="least-tasks")


def hf_greedy(model: Any, prompt: list[int], new_tokens: int) -> list[int]:
    """The oracle: transformers ``generate(do_sample=False)`` from ``prompt``, exactly
    ``new_tokens`` token ids (EOS does not stop it), as FlowServe must produce them greedily."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


class TinyEngine(msgspec.Struct, kw_only=True):
    """Deployment settings of the smallest engine installed, for plugin tests.

    ``kind`` is ``real`` (the tiny Llama on hf + spmd + paged + continuous + colocated) or
    ``toy`` (the counter executor and friends of FlowServe's ``flowserve-test-fixtures``).
    A test replaces one component by its own: ``tiny_engine.spec(batch_scheduler="mine")``.
    """

    kind: Literal["real", "toy"]
    fields: dict[str, Any]

    def spec(self, **overrides: Any) -> DeploymentSpec:
        """A ``DeploymentSpec`` (name ``tiny``, scaler ``inproc``) with ``overrides``;
        ``options`` are merged, not replaced."""
        fields = {"name": "tiny", "scaler": "inproc", "max_model_len": 256, **self.fields}
        options = {**fields.get("options", {}), **overrides.pop("options", {})}
        return DeploymentSpec(**{**fields, **overrides, "options": options})

    def serve_args(self, **overrides: Any) -> list[str]:
        """The same deployment as ``flowserve serve`` flags (``--served-model-name tiny`` …)."""
        spec = self.spec(**overrides)
        args: list[str] = []
        for field in DeploymentSpec.__struct_fields__:
            value = getattr(spec, field)
            if field == "options":
                args += [a for key, v in value.items() for a in ("-o", f"{key}={v}")]
            elif value is not None and value != getattr(DeploymentSpec(), field):
                args += [field_flag(field), str(value)]
        return args


def find_tiny_engine(model_directory: Callable[[], Path], pm: PluginManager | None = None) -> TinyEngine | None:
    """The real tiny engine if its plugins are installed, else the toy one if installed, else
    None. ``FLOWSERVE_TEST_ENGINE=toy|real`` forces one. ``model_directory()`` is called only
    for the real engine (it should return ``write_tiny_llama``'s directory)."""
    pm = pm or with_kit_plugin(PluginManager())
    wanted = os.environ.get("FLOWSERVE_TEST_ENGINE")
    engines: list[tuple[Literal["real", "toy"], dict[str, Any]]] = [("real", REAL_ENGINE), ("toy", TOY_ENGINE)]
    for kind, fields in engines:
        if wanted in (None, "", kind) and all(
                fields[k] in pm.components(k) for k in ("tokenizer", "executor", "kv_cache",
                                                         "batch_scheduler", "job_scheduler")):
            if kind == "real":
                fields = {**fields, "model": str(model_directory())}
            return TinyEngine(kind=kind, fields=dict(fields))
    return None
