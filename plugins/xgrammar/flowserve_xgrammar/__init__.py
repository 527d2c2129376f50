"""FlowServe's default structured-output backend, ``xgrammar`` (the library vLLM and SGLang use).

Registers ``structured_output:xgrammar``; ``backend.py`` compiles constraints (bounded caches,
one compile per distinct constraint) and makes the matchers whose token masks the sampler
applies; ``schema_check.py`` refuses JSON-schema keywords xgrammar would silently ignore.
"""
