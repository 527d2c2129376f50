"""A third-party model architecture for the spmd executor: Arcee (AFM), a Llama whose MLP is
not gated, ``down(relu(up(x)) ** 2)``. The hook module stays light: the model code is imported
when a model is built."""

from __future__ import annotations

from typing import Any

from flowserve_core import hookimpl


def build_arcee(config: Any, group: Any, max_positions: int, dtype: Any, device: Any) -> Any:
    """The model of one tensor-parallel rank (the spmd executor's factory signature)."""
    from flowserve_arcee_architecture.model import ArceeForCausalLM

    return ArceeForCausalLM(config, group, max_positions, dtype, device)


@hookimpl
def flowserve_register_model_architectures(register: Any) -> None:
    """Add ``model_type`` ``arcee`` to executors that build models from HF checkpoints."""
    register("arcee", build_arcee, hf_architectures=["ArceeForCausalLM"])
