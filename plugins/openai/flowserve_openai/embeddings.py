"""``POST /v1/embeddings``: each input becomes one kernel ``Request`` with ``pooling`` set, run
through the deployment like any prompt (prefill only: the same job and batch schedulers, the
same instances as generation), all inputs at once; its last event carries the vector.

The pooling (last token or mean) is the deployment's (``DeploymentSpec.pooling``); vectors are
L2-normalized. ``dimensions`` is honoured for Matryoshka models only (a ``config.json`` with
``matryoshka_dimensions`` or ``is_matryoshka``, as vLLM reads it) and refused otherwise, with
vLLM's message. ``encoding_format: base64`` sends each vector's little-endian float32 bytes.
"""

from __future__ import annotations

import base64
import functools
import json
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from starlette.requests import Request as HTTPRequest
from starlette.responses import Response

from flowserve_core.errors import RejectedError
from flowserve_core.types import PoolingParams, Request, SamplingParams
from flowserve_openai.context import AppContext
from flowserve_openai.embeddings_protocol import (
    ENCODING_FORMATS,
    MAX_EMBEDDING_INPUTS,
    Embedding,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
)
from flowserve_openai.errors import APIError
from flowserve_openai.prompts import check_prompt_chars
from flowserve_openai.responses import json_response

if TYPE_CHECKING:
    from flowserve_core.deployment import Deployment


async def create_embedding(request: HTTPRequest) -> Response:
    """``POST /v1/embeddings``."""
    received = time.time()
    ctx: AppContext = request.app.state.flowserve
    body = await ctx.decode(request, EmbeddingRequest)
    if body.encoding_format not in ENCODING_FORMATS:
        raise APIError(400, f"encoding_format must be 'float' or 'base64', not {body.encoding_format!r}",
                       param="encoding_format", code="invalid_value")
    deployment = await ctx.deployment(body.model)
    model = body.model or deployment.name
    if body.dimensions is not None:
        check_dimensions(model, body.dimensions, *await anyio.to_thread.run_sync(matryoshka, deployment.spec.model))
    inputs = await embedding_inputs(ctx, deployment, body)
    pooling = PoolingParams(kind=deployment.spec.pooling, dimensions=body.dimensions)
    vectors = await embed(ctx, deployment, inputs, pooling, received)
    data = [Embedding(index=i, embedding=_base64(v) if body.encoding_format == "base64" else v)
            for i, v in enumerate(vectors)]
    tokens = sum(map(len, inputs))
    return json_response(EmbeddingResponse(data=data, model=model,
                                           usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)))


def _base64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


async def embedding_inputs(ctx: AppContext, deployment: Deployment, body: EmbeddingRequest) -> list[list[int]]:
    """Token ids of each input (a string, strings, token ids or lists of token ids): 400 for an
    empty input, a mix of forms, a token outside the vocabulary or an input past the context."""
    given = body.input
    max_model_len = deployment.max_model_len
    texts: list[str] | None = None
    if isinstance(given, str):
        texts = [given]
    elif not given:
        raise APIError(400, "input must not be empty", param="input", code="invalid_value")
    elif all(isinstance(item, str) for item in given):
        texts = [item for item in given if isinstance(item, str)]
    elif all(isinstance(item, int) for item in given):
        token_lists = [[item for item in given if isinstance(item, int)]]
    elif all(isinstance(item, list) for item in given):
        token_lists = [list(item) for item in given if isinstance(item, list)]
    else:
        raise APIError(400, "input must be a string, a list of strings, a list of token ids or a list of lists "
                            "of token ids, not a mix of them", param="input", code="invalid_value")
    count = len(texts if texts is not None else token_lists)
    if count > MAX_EMBEDDING_INPUTS:
        raise APIError(400, f"input holds {count} inputs; at most {MAX_EMBEDDING_INPUTS} are allowed in one call",
                       param="input", code="invalid_value")

    def name(i: int) -> str:
        return "input" if count == 1 else f"input[{i}]"

    tokenizer = deployment.tokenizer
    if texts is not None:
        for i, text in enumerate(texts):
            if not text:
                raise APIError(400, f"{name(i)} is an empty string; give it text to embed", param=name(i),
                               code="invalid_value")
            check_prompt_chars(len(text), max_model_len, name(i))
        special, chosen = body.add_special_tokens, texts
        token_lists = await ctx.tokenizing.run(
            sum(map(len, texts)), lambda: [tokenizer.encode(t, add_special_tokens=special) for t in chosen])
    for i, ids in enumerate(token_lists):
        if not ids:
            raise APIError(400, f"{name(i)} is empty (no tokens)", param=name(i), code="invalid_value")
        if (bad := next((t for t in ids if t >= tokenizer.vocab_size), None)) is not None:
            raise APIError(400, f"{name(i)} holds the token id {bad}, outside this model's vocabulary "
                                f"(0 to {tokenizer.vocab_size - 1})", param=name(i), code="invalid_value")
        if len(ids) > max_model_len:  # vLLM's message
            raise APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, you "
                                f"requested {len(ids)} tokens in the input for embedding generation. Please reduce "
                                f"the length of the input.", param=name(i), code="context_length_exceeded")
    return token_lists


def check_dimensions(model: str, dimensions: int, supports: bool, allowed: tuple[int, ...], hidden: int) -> None:
    """A 400 unless the model is Matryoshka (``matryoshka``'s answer) and ``dimensions`` is one
    it was trained for (vLLM's checks and messages)."""
    if not supports:
        raise APIError(400, f'Model "{model}" does not support matryoshka representation, changing output '
                            f"dimensions will lead to poor results.", param="dimensions", code="invalid_value")
    if allowed and dimensions not in allowed:
        raise APIError(400, f'Model "{model}" only supports {list(allowed)} matryoshka dimensions, use other output '
                            f"dimensions will lead to poor results.", param="dimensions", code="invalid_value")
    if hidden and dimensions > hidden:
        raise APIError(400, f"dimensions must be at most {hidden}, the size of this model's embeddings",
                       param="dimensions", code="invalid_value")


@functools.lru_cache(maxsize=64)
def matryoshka(model: str) -> tuple[bool, tuple[int, ...], int]:
    """Whether the checkpoint directory ``model`` is Matryoshka (its ``config.json`` has
    ``matryoshka_dimensions`` or ``is_matryoshka``), those dimensions and its hidden size. A
    GGUF file, or a directory without them, is not."""
    config_path = Path(model) / "config.json"
    if not model or not config_path.is_file():
        return False, (), 0
    try:
        config: dict[str, Any] = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return False, (), 0
    allowed = tuple(int(d) for d in config.get("matryoshka_dimensions") or ())
    hidden = config.get("hidden_size") or config.get("text_config", {}).get("hidden_size") or 0
    return bool(allowed) or bool(config.get("is_matryoshka")), allowed, int(hidden)


async def embed(ctx: AppContext, deployment: Deployment, inputs: list[list[int]], pooling: PoolingParams,
                arrival_time: float) -> list[list[float]]:
    """Every input's vector, all inputs run at once; the first failure (a rejection, an engine
    error) cancels the others and becomes the answer."""
    if deployment.stopping:  # removed after the lookup: as if it had not been found
        raise APIError(404, f"The model {deployment.name!r} was removed.", param="model", code="model_not_found")
    vectors: list[list[float] | None] = [None] * len(inputs)
    failures: list[APIError] = []

    async def one(index: int, ids: list[int], scope: anyio.CancelScope) -> None:
        # max_tokens 1: a batch scheduler that does not know pooling generates one token, not a whole context
        request = Request(prompt_token_ids=ids, pooling=pooling, model=deployment.name, arrival_time=arrival_time,
                          params=SamplingParams(max_tokens=1))
        handle = None
        try:
            async with deployment.open(request) as handle:
                async for event in handle:
                    if event.embedding is not None:
                        vectors[index] = event.embedding
                    elif event.finish_reason in ("stop", "length"):  # it ran as if it were a generation
                        spec = deployment.spec
                        failures.append(APIError(
                            400, f"The model {deployment.name!r} cannot embed: its batch scheduler "
                                 f"{spec.batch_scheduler!r} or executor {spec.executor!r} does not pool (the "
                                 f"built-in 'continuous' scheduler with the 'spmd' or 'llamacpp' executor does)",
                            param="model", code="embeddings_unsupported"))
                        scope.cancel()
                    elif event.finish_reason is not None:
                        reason = event.error or f"the engine ended the request ({event.finish_reason})"
                        failures.append(APIError(500, reason, code="engine_error"))
                        scope.cancel()
        except RejectedError as exc:
            failures.append(APIError.from_rejection(exc.rejection))
            scope.cancel()
        finally:
            if handle is not None and ctx.metrics is not None:
                ctx.metrics.request_finished(deployment.name, handle, [])

    async with anyio.create_task_group() as group:
        for index, ids in enumerate(inputs):
            group.start_soon(one, index, ids, group.cancel_scope)
    if failures:
        raise failures[0]
    missing = [i for i, v in enumerate(vectors) if v is None]
    if missing:
        raise APIError(500, f"the engine returned no embedding for input {missing[0]}", code="engine_error")
    return [v for v in vectors if v is not None]
