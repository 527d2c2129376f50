"""From an API body to the kernel's ``SamplingParams``: defaults, checks and the fan-out of ``n``.

``SamplingParams`` validates itself and its errors start with the field's name; they become
400s whose ``param`` is the name the client used (``max_completion_tokens`` rather than
``max_tokens``, ``top_logprobs`` rather than ``logprobs``).
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from flowserve_core.config import ServerConfig
from flowserve_core.types import SamplingParams, StructuredOutput
from flowserve_openai.errors import APIError
from flowserve_openai.protocol import SamplingFields

#: OpenAI's default ``max_tokens`` for ``/v1/completions``.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


@dataclass
class ChoicePlan:
    """One choice of a call: the kernel request it becomes (prompt, params) and its place."""

    index: int
    prompt_index: int
    prompt_token_ids: list[int]
    params: SamplingParams
    echo_text: str = ""


def check_request(body: SamplingFields, config: ServerConfig) -> None:
    """Refuse what no deployment can do, before looking at the model."""
    if body.n > config.max_n:
        raise APIError(400, f"n must be at most {config.max_n} on this server, got {body.n}",
                       param="n", code="invalid_value")
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed when stream is true",
                       param="stream_options", code="invalid_value")
    if body.prompt_logprobs is not None and body.stream:  # as vLLM: they come only with the whole answer
        raise APIError(400, "prompt_logprobs are not available when stream is true",
                       param="prompt_logprobs", code="invalid_value")


def sampling_params(body: SamplingFields, *, max_tokens: int, logprobs: int | None, vocab_size: int,
                    names: dict[str, str] | None = None, structured_output: StructuredOutput | None = None,
                    prompt_logprobs: int | None = None) -> SamplingParams:
    """The kernel's parameters for ``body``; ``names`` maps SamplingParams fields to the
    body's names for error messages. ``prompt_logprobs``: the body's, unless the caller
    knows better (completions' ``echo`` with ``logprobs`` scores the prompt too)."""
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    top_k = body.top_k if body.top_k is not None else 0
    if top_k >= vocab_size:  # as many candidates as the vocabulary: the same as no top-k
        top_k = 0
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=top_k,
            min_p=body.min_p or 0.0,
            seed=body.seed,
            stop=stop,
            stop_token_ids=list(body.stop_token_ids or []),
            include_stop_str_in_output=body.include_stop_str_in_output,
            ignore_eos=body.ignore_eos,
            min_tokens=body.min_tokens,
            logprobs=logprobs,
            prompt_logprobs=body.prompt_logprobs if prompt_logprobs is None else prompt_logprobs,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            skip_special_tokens=body.skip_special_tokens,
            logit_bias=logit_bias(body.logit_bias, vocab_size),
            structured_output=structured_output,
        )
    except ValueError as exc:
        message = str(exc)
        field = message.split(" ", 1)[0]
        param = (names or {}).get(field, field)
        raise APIError(400, param + message[len(field):], param=param, code="invalid_value") from None


def logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float]:
    """``logit_bias``'s keys as token ids: each must be a whole number inside the vocabulary
    (a 400 naming the key otherwise, as vLLM answers)."""
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        token = key.strip()
        if not token.isdigit() or int(token) >= vocab_size:
            raise APIError(400, f"logit_bias key {key!r} is not a token id of this model (0 to {vocab_size - 1})",
                           param="logit_bias", code="invalid_value")
        out[int(token)] = value
    return out


def fan_out(prompts: list[tuple[list[int], str]], params: SamplingParams, n: int) -> list[ChoicePlan]:
    """``n`` choices per prompt, in OpenAI's order; choice ``i`` of a prompt samples with
    ``seed + i`` so that seeded choices differ but stay reproducible."""
    plans = []
    for prompt_index, (token_ids, echo_text) in enumerate(prompts):
        for i in range(n):
            choice_params = params
            if params.seed is not None and i:
                choice_params = msgspec.structs.replace(params, seed=_wrap_int64(params.seed + i))
            plans.append(ChoicePlan(index=prompt_index * n + i, prompt_index=prompt_index,
                                    prompt_token_ids=token_ids, params=choice_params, echo_text=echo_text))
    return plans


def check_context(prompt_tokens: int, max_tokens: int, max_model_len: int, what: str) -> None:
    """A 400 naming both numbers when the prompt plus the completion cannot fit the context."""
    if prompt_tokens + max_tokens > max_model_len:
        raise APIError(
            400, f"This model's maximum context length is {max_model_len} tokens. However, you "
                 f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {what}, "
                 f"{max_tokens} in the completion). Please reduce the length of the {what} or completion.",
            param=what, code="context_length_exceeded")


def rest_of_context(prompt_tokens: int, max_model_len: int, what: str) -> int:
    """The default completion length of a chat: whatever the prompt leaves of the context."""
    if prompt_tokens >= max_model_len:
        raise APIError(
            400, f"This model's maximum context length is {max_model_len} tokens. However, your "
                 f"{what} resulted in {prompt_tokens} tokens, which leaves no room for a completion. "
                 f"Please reduce the length of the {what}.",
            param=what, code="context_length_exceeded")
    return max_model_len - prompt_tokens


def _wrap_int64(value: int) -> int:
    return (value + 2**63) % 2**64 - 2**63
