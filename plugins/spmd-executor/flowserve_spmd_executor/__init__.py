"""FlowServe executor ``spmd``: Llama-family models over paged KV blocks, tensor parallel.

Importing this package is light; torch is imported by the submodules that need it.
See ``docs/executor.md`` for the design (layers, step plan, KV layout, worker ranks).
"""
