"""How the next token is picked, and its log-probabilities (public API, also in ``flowserve_core.types``)."""

import math

import msgspec


class StructuredOutput(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A constraint on a sequence's whole output (vLLM's ``StructuredOutputsParams``): exactly
    one of a JSON schema (as JSON text), any JSON object, a regular expression, a choice of
    strings, or an EBNF grammar. The deployment's structured-output backend compiles it into
    per-step token masks that the sampler applies."""

    json: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError(f"structured_output must set exactly one of json, json_object, regex, choice "
                             f"and grammar, got {', '.join(given) or 'none'}")
        if self.choice is not None and not self.choice:
            raise ValueError("structured_output choice must hold at least one string")

    @property
    def kind(self) -> str:
        """Which constraint this is: ``json``, ``json_object``, ``regex``, ``choice`` or ``grammar``."""
        return next(n for n in ("json", "regex", "choice", "grammar") if getattr(self, n) is not None) \
            if not self.json_object else "json_object"

    def key(self) -> bytes:
        """The constraint as canonical bytes: the key compiled grammars are cached under."""
        return msgspec.json.encode(self)


class SamplingParams(msgspec.Struct, kw_only=True):
    """How to pick each next token and when to stop; validated on construction and decode.
    ``max_tokens=None``: until the context is full; ``top_k`` 0 or -1: off."""

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = []
    stop_token_ids: list[int] = []
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    #: also score the prompt: each prompt token's logprob (the first has none) with this many
    #: alternatives (vLLM's ``prompt_logprobs``; the prompt is then computed whole, no prefix-cache hits)
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    skip_special_tokens: bool = True
    #: token id → a number added to its logit before sampling (-100 bans it, 100 all but forces it)
    logit_bias: dict[int, float] = {}
    #: the constraint the whole output must satisfy (JSON schema, regex, …), or none
    structured_output: StructuredOutput | None = None

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number")
        checks = [
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 1, "must be at least 1"),
            ("temperature", self.temperature >= 0, "must be >= 0"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", self.top_k >= -1, "must be -1, 0 (disabled) or a positive number"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("min_tokens", self.min_tokens >= 0, "must be >= 0"),
            ("min_tokens", self.max_tokens is None or self.min_tokens <= self.max_tokens, "must not exceed max_tokens"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "must be in [0, 20]"),
            ("prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20, "must be in [0, 20]"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0"),
            ("stop_token_ids", all(t >= 0 for t in self.stop_token_ids), "must be >= 0"),
            ("stop", all(self.stop), "must not contain empty strings"),
            ("logit_bias", all(t >= 0 for t in self.logit_bias), "keys must be token ids (>= 0)"),
            ("logit_bias", all(math.isfinite(b) and -100 <= b <= 100 for b in self.logit_bias.values()),
             "values must be in [-100, 100]"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"{name} {rule}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


class TopLogprob(msgspec.Struct, array_like=True):
    """One alternative token and its log-probability."""

    token_id: int
    logprob: float


class TokenLogprob(msgspec.Struct, array_like=True):
    """The log-probability of a sampled (or prompt) token, with the ``top`` alternatives asked
    for, and its ``rank`` in the vocabulary (1: the most likely; 0: not computed)."""

    token_id: int
    logprob: float
    top: list[TopLogprob] = []
    rank: int = 0
