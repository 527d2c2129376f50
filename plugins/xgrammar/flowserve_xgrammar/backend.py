"""The ``xgrammar`` backend: constraints → compiled grammars (cached) → matchers.

The tokenizer is loaded once, when the first constraint comes, with ``flowserve-hf-tokenizer``'s
``load_tokenizer`` (a model directory or a GGUF file); one xgrammar ``GrammarCompiler`` is kept
per vocabulary width (the tokenizer's for the server's checks, the model's logits' for the
sampler). Compiled grammars are cached by the constraint's canonical bytes in a bounded LRU
(``xgrammar_cache_size`` entries, deployment option, default 256), so a schema is compiled once
per process however many requests send it.

JSON is generated on one line by default, spaced as ``json.dumps`` writes it (``{"a": 1, "b":
2}``): a small model let loose on "any whitespace" may emit newlines until ``max_tokens``. The
deployment option ``xgrammar_any_whitespace = true`` allows any whitespace (vLLM's default).
JSON schemas go through ``json_strings`` (xgrammar's length-bounded strings admit raw control
characters otherwise).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import OrderedDict
from typing import Any

from flowserve_core.config import default_model_path
from flowserve_core.structured_output import UnsupportedConstraint
from flowserve_core.types import DeploymentSpec, StructuredOutput
from flowserve_xgrammar.json_strings import compile_json_schema
from flowserve_xgrammar.schema_check import check_schema

DEFAULT_CACHE_SIZE = 256
#: xgrammar's errors start with "[hh:mm:ss] /path/file.cc:123: "; the client sees the rest.
_XGRAMMAR_PREFIX = re.compile(r"^\[[\d:]+\]\s+\S+:\d+:\s*")


class XGrammarMatcher:
    """One sequence's xgrammar ``GrammarMatcher`` behind FlowServe's ``GrammarMatcher`` Protocol."""

    def __init__(self, matcher: Any):
        self._matcher = matcher

    def accept_token(self, token_id: int) -> bool:
        """Advance past ``token_id``; False when the grammar forbids it."""
        return bool(self._matcher.accept_token(token_id))

    def fill_bitmask(self, bitmask: Any, row: int) -> None:
        """The tokens allowed next, into row ``row`` of the int32 bitmask."""
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def is_terminated(self) -> bool:
        """Whether the grammar is complete and an end-of-sequence token was accepted."""
        return bool(self._matcher.is_terminated())


class XGrammarBackend:
    """Compiles JSON schemas, JSON objects, regexes, choices and EBNF grammars with xgrammar."""

    def __init__(self, spec: DeploymentSpec):
        self.spec = spec
        options = spec.options
        self.any_whitespace = str(options.get("xgrammar_any_whitespace", False)).lower() in ("1", "true", "yes")
        self.cache_size = int(options.get("xgrammar_cache_size", DEFAULT_CACHE_SIZE))
        self._lock = threading.Lock()
        self._loaded: Any = None
        self._compilers: dict[int | None, Any] = {}
        self._cache: OrderedDict[tuple[int | None, bytes], Any] = OrderedDict()
        #: seconds each distinct constraint took to compile (the last ``cache_size``), for benchmarks
        self.compile_seconds: dict[bytes, float] = {}

    # ------------------------------------------------------------------ StructuredOutputBackend

    def check(self, constraint: StructuredOutput) -> None:
        """Compile ``constraint`` for the tokenizer's vocabulary (cached); ``UnsupportedConstraint`` if it cannot be."""
        self.compiled(constraint, None)

    def matcher(self, constraint: StructuredOutput, vocab_size: int, eos_token_ids: list[int]) -> XGrammarMatcher:
        """A matcher at the start of ``constraint``, over ``vocab_size`` tokens, ending on ``eos_token_ids``."""
        import xgrammar

        compiled = self.compiled(constraint, vocab_size)
        return XGrammarMatcher(xgrammar.GrammarMatcher(compiled, override_stop_tokens=list(eos_token_ids) or None))

    # ------------------------------------------------------------------ compiling

    def compiled(self, constraint: StructuredOutput, vocab_size: int | None) -> Any:
        """The compiled grammar of ``constraint`` (from the cache when it was compiled before)."""
        key = (vocab_size, constraint.key())
        with self._lock:
            if (hit := self._cache.get(key)) is not None:
                self._cache.move_to_end(key)
                return hit
            compiler = self._compiler(vocab_size)
        started = time.perf_counter()
        compiled = self._compile(compiler, constraint)  # outside the lock: xgrammar is thread-safe
        with self._lock:
            self.compile_seconds[key[1]] = time.perf_counter() - started
            self._cache[key] = compiled
            while len(self._cache) > self.cache_size:
                old, _ = self._cache.popitem(last=False)
                self.compile_seconds.pop(old[1], None)
        return compiled

    def _compiler(self, vocab_size: int | None) -> Any:
        import xgrammar

        if vocab_size not in self._compilers:
            if self._loaded is None:
                from flowserve_hf_tokenizer.loading import load_tokenizer

                self._loaded = load_tokenizer(self.spec.model or default_model_path())
            tokenizer = self._loaded.tokenizer
            info = xgrammar.TokenizerInfo.from_huggingface(
                tokenizer, vocab_size=vocab_size or len(tokenizer),
                stop_token_ids=list(self._loaded.facts.eos_token_ids) or None)
            # xgrammar's own cache stays small: ours (bounded by entries) is the one that counts
            self._compilers[vocab_size] = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        return self._compilers[vocab_size]

    def _compile(self, compiler: Any, constraint: StructuredOutput) -> Any:
        kind = constraint.kind
        try:
            if constraint.json is not None:
                schema = json.loads(constraint.json)
                check_schema(schema)
                return compile_json_schema(compiler, constraint.json, any_whitespace=self.any_whitespace,
                                           strict_mode=True)
            if constraint.json_object:
                return compile_json_schema(compiler, '{"type": "object"}', any_whitespace=self.any_whitespace,
                                           strict_mode=True)
            if constraint.regex is not None:
                return compiler.compile_regex(constraint.regex)
            if constraint.choice is not None:
                literals = " | ".join(json.dumps(choice, ensure_ascii=False) for choice in constraint.choice)
                return compiler.compile_grammar(f"root ::= {literals}")
            assert constraint.grammar is not None
            return compiler.compile_grammar(constraint.grammar)
        except UnsupportedConstraint:
            raise
        except Exception as exc:  # xgrammar raises RuntimeError/ValueError with the parser's reason
            reason = _XGRAMMAR_PREFIX.sub("", str(exc).strip()).strip() or type(exc).__name__
            raise UnsupportedConstraint(f"the {kind.replace('_', ' ')} constraint cannot be compiled by the "
                                        f"xgrammar structured-output backend: {reason}") from None
