"""FlowServe tokenizer ``hf``: transformers tokenizers (model directories or GGUF files),
chat templates, and streaming detokenization that never splits a character or leaks text
that a stop string swallows.

Modules: ``plugin`` (hook implementation, light), ``loading`` (find, load and cache),
``tokenizer`` (``HFTokenizer``), ``detokenizer`` (incremental decoding), ``stop_strings``,
``gguf_metadata``.
"""

__version__ = "0.1.0"
