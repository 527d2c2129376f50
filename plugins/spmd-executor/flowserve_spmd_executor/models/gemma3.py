"""Gemma 3's text model (``model_type`` ``gemma3_text``: Gemma 3 1B, and the language model of
the larger ones saved on their own): Gemma 2's layout with a Gemma RMSNorm on each query and
key head, a separate rope base for the sliding-window layers (``ModelConfig.local_rope``), and
usually no soft-capping."""

from __future__ import annotations

from flowserve_spmd_executor.models.gemma2 import Gemma2ForCausalLM


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    """Gemma 3 (text): Gemma 2 with per-head q/k norm."""

    qk_norm = "head"
