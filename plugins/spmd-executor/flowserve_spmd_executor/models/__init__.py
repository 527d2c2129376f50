"""Model architectures, one file each, built from ``layers/``; ``architectures.py`` registers
them by ``model_type`` and ``base.CausalLM`` is what the runner needs of any of them."""
