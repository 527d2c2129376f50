"""Tensor-parallel-aware building blocks of Llama-family models (nano-vllm's ``layers/``)."""
