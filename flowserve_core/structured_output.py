"""The structured-output seam: what a backend plugin (``xgrammar`` by default) provides.

A deployment names its backend (``structured_output_backend``, ``--structured-output-backend``);
plugins register backends with ``flowserve_register_structured_output_backends``. The backend
is used in two places:

- the frontend calls ``check`` (in a worker thread) before admitting a request, so a schema or
  grammar the backend cannot enforce is a 400 that names the feature;
- the sampler, in the process that runs the model, calls ``matcher`` once per constrained
  sequence, feeds it every token the sequence outputs, and before each draw asks it to fill
  the sequence's row of a token bitmask; tokens whose bit is clear are never sampled.

Bitmasks are vLLM's and xgrammar's layout: ``int32`` tensors of ``ceil(vocab_size / 32)`` words
per row, bit ``i % 32`` of word ``i // 32`` set when token ``i`` is allowed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from flowserve_core.sampling import StructuredOutput

if TYPE_CHECKING:
    from flowserve_core.types import DeploymentSpec


class UnsupportedConstraint(ValueError):
    """A constraint the backend cannot compile or enforce; the message names the feature (it
    reaches the client as a 400)."""


@runtime_checkable
class GrammarMatcher(Protocol):
    """One sequence's position in its compiled constraint."""

    def accept_token(self, token_id: int) -> bool:
        """Advance past ``token_id`` (one the sequence output); False when the constraint forbids it."""

    def fill_bitmask(self, bitmask: Any, row: int) -> None:
        """Write the tokens allowed next into row ``row`` of ``bitmask`` (a torch ``int32``
        tensor ``[rows, ceil(vocab_size / 32)]``); once the constraint is complete, only the
        end-of-sequence ids given to ``matcher`` are allowed."""

    def is_terminated(self) -> bool:
        """Whether the constraint is complete and an end-of-sequence token was accepted."""


@runtime_checkable
class StructuredOutputBackend(Protocol):
    """Compiles constraints (cached, bounded: each distinct one once) and makes matchers. Built
    by ``factory(spec: DeploymentSpec)``; thread-safe, since checks run in worker threads."""

    def check(self, constraint: StructuredOutput) -> None:
        """Compile ``constraint`` for the deployment's tokenizer, or raise ``UnsupportedConstraint``
        saying which feature of it cannot be enforced. Blocking (call it off the event loop)."""

    def matcher(self, constraint: StructuredOutput, vocab_size: int, eos_token_ids: list[int]) -> GrammarMatcher:
        """A fresh matcher at the start of ``constraint``, for bitmasks of ``vocab_size`` tokens
        (the model's logits' width); ``eos_token_ids`` end the output once it is complete.
        Raises ``UnsupportedConstraint`` like ``check``. Blocking."""


class StructuredOutputBackendFactory(Protocol):
    """Builds a deployment's structured-output backend (in the server process, and in the
    process that samples); cheap: load vocabularies and compilers on first use."""

    def __call__(self, spec: DeploymentSpec, /) -> StructuredOutputBackend: ...
