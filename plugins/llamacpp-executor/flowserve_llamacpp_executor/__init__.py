"""FlowServe executor ``llamacpp``: quantized GGUF models on llama.cpp's CPU kernels.

FlowServe stays in charge (batch and job schedulers, scalers, sampler, API); llama.cpp only
computes: each ``StepBatch`` becomes one ``llama_batch`` with a llama.cpp sequence per FlowServe
sequence, and the logits of the rows that sample go to FlowServe's own sampler. Importing this
package is light; ``llama_cpp`` is imported by the modules that need it. See docs/llamacpp.md.
"""
