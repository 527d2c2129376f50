"""The OpenAI endpoints: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

A generation endpoint checks everything it can before admitting anything — the body, the
model, the prompt's fit in the context — then returns a ``GenerationResponse`` that admits
one kernel request per choice and answers (streamed or not).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from flowserve_core.types import new_id
from flowserve_openai import tools
from flowserve_openai.context import AppContext
from flowserve_openai.errors import APIError
from flowserve_openai.generation import Generation
from flowserve_openai.prompts import chat_messages, chat_prompt, completion_prompts
from flowserve_openai.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from flowserve_openai.rendering import ChatRenderer, CompletionRenderer
from flowserve_openai.responses import GenerationResponse, json_response
from flowserve_openai.sampling import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    ChoicePlan,
    check_context,
    check_request,
    fan_out,
    rest_of_context,
    sampling_params,
)
from flowserve_openai.structured import check_structured_output, structured_output

if TYPE_CHECKING:
    from flowserve_core.deployment import Deployment


def _ctx(request: Request) -> AppContext:
    return request.app.state.flowserve


def _card(ctx: AppContext, model_id: str, deployment: Deployment) -> ModelCard:
    return ModelCard(id=model_id, created=ctx.created(deployment.name), root=deployment.name,
                     max_model_len=deployment.max_model_len)


async def list_models(request: Request) -> Response:
    """Every deployment, then every alias (``root`` names the deployment behind it)."""
    ctx = _ctx(request)
    server = ctx.server
    cards = [_card(ctx, name, deployment) for name, deployment in list(server.deployments.items())]
    cards += [_card(ctx, alias, server.deployments[name]) for alias, name in list(server.aliases.items())
              if name in server.deployments]
    return json_response(ModelList(data=cards))


async def retrieve_model(request: Request) -> Response:
    """One served model by id (a deployment or an alias)."""
    ctx = _ctx(request)
    model_id = request.path_params["model"]
    return json_response(_card(ctx, model_id, ctx.lookup(model_id)))


def _renderer_args(ctx: AppContext, deployment: Deployment, body: Any, prefix: str, plans: list, prompts: list,
                   logprobs: int | None) -> dict[str, Any]:
    return dict(id=new_id(prefix), model=body.model or deployment.name, created=int(time.time()),
                fingerprint=ctx.fingerprint(deployment), tokenizer=deployment.tokenizer, choices=plans,
                prompt_lengths=[len(ids) for ids, _ in prompts], logprobs=logprobs,
                prompt_logprobs=body.prompt_logprobs is not None,
                include_usage=bool(body.stream and body.stream_options and body.stream_options.include_usage))


async def _constraint(ctx: AppContext, deployment: Deployment, body: Any) -> Any:
    """The body's structured-output constraint, checked by the deployment's backend (or None)."""
    asked = structured_output(body)
    if asked is None:
        return None
    constraint, param = asked
    await check_structured_output(ctx.structured_output_backend, deployment, constraint, param)
    return constraint


async def _chat_prompt_ids(ctx: AppContext, deployment: Deployment, body: ChatCompletionRequest) -> list[int]:
    """The chat's prompt: through the tool-aware template when the chat has tools or tool turns."""
    messages = chat_messages(body)
    if not tools.uses_tools(body):
        return await chat_prompt(messages, deployment.tokenizer, deployment.max_model_len, ctx.tokenizing)
    return await tools.tool_chat_prompt(body, messages, deployment.tokenizer, deployment.max_model_len,
                                        ctx.tokenizing)


async def create_completion(request: Request) -> Any:
    """``POST /v1/completions``."""
    received = time.time()  # the request's arrival: its TTFT includes parsing and tokenizing
    ctx = _ctx(request)
    body = await ctx.decode(request, CompletionRequest)
    check_request(body, ctx.config)
    deployment = await ctx.deployment(body.model)
    tokenizer = deployment.tokenizer
    prompts = await completion_prompts(body, tokenizer, deployment.max_model_len, ctx.tokenizing)
    max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    # max_tokens 0 with echo scores the prompt alone (as OpenAI and vLLM): one token is made
    # (the engine always samples) and left out of the answer.
    echo_only = max_tokens == 0
    if echo_only and not body.echo:
        raise APIError(400, "max_tokens must be at least 1, got 0 (0 is only allowed with echo)",
                       param="max_tokens", code="invalid_value")
    for ids, _ in prompts:
        check_context(len(ids), max(max_tokens, 1), deployment.max_model_len, "prompt")
    constraint = await _constraint(ctx, deployment, body)
    # vLLM's rule: echo with logprobs scores the prompt with as many alternatives
    scored = body.prompt_logprobs if body.prompt_logprobs is not None or not body.echo else body.logprobs
    params = sampling_params(body, max_tokens=max(max_tokens, 1), logprobs=body.logprobs,
                             vocab_size=tokenizer.vocab_size, structured_output=constraint, prompt_logprobs=scored)
    plans = fan_out(prompts, params, body.n)
    renderer = CompletionRenderer(echo_only=echo_only, **_renderer_args(ctx, deployment, body, "cmpl", plans,
                                                                        prompts, body.logprobs))
    generation = Generation(deployment, plans, ctx.metrics, arrival_time=received)
    return GenerationResponse(generation, renderer, body.stream)


@dataclass
class ChatPlan:
    """A chat request made ready to run: its deployment, its choices (kernel requests), its
    prompt, the logprobs asked for and how replies are read for tools (None: no tools)."""

    deployment: Deployment
    plans: list[ChoicePlan]
    prompts: list[tuple[list[int], str]]
    logprobs: int | None
    tools: tools.ToolPlan | None


async def plan_chat(ctx: AppContext, body: ChatCompletionRequest) -> ChatPlan:
    """Everything a chat request is checked for before anything is admitted (the body, the
    model, the prompt's fit, structured output, tools), and its choices; also used by
    ``/v1/responses``, which is a chat underneath."""
    check_request(body, ctx.config)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs",
                       code="invalid_value")
    deployment = await ctx.deployment(body.model)
    tokenizer = deployment.tokenizer
    prompt_ids = await _chat_prompt_ids(ctx, deployment, body)
    requested: int | None
    if body.max_completion_tokens is not None:
        requested, name = body.max_completion_tokens, "max_completion_tokens"
    else:
        requested, name = body.max_tokens, "max_tokens"
    if requested is None:
        max_tokens = rest_of_context(len(prompt_ids), deployment.max_model_len, "messages")
    else:
        check_context(len(prompt_ids), requested, deployment.max_model_len, "messages")
        max_tokens = requested
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    constraint = await _constraint(ctx, deployment, body)
    tool_plan = None
    tools.tool_choice(body)  # a 400 for a tool_choice that needs tools the request lacks
    if body.tools:
        forced = tools.tool_constraint(body)
        if forced is not None:
            if constraint is not None:
                raise APIError(400, "tool_choice 'required' or a named function cannot be combined with "
                                    "response_format or another structured output", param="tool_choice",
                               code="invalid_value")
            constraint = forced
            await check_structured_output(ctx.structured_output_backend, deployment, constraint, "tools")
        parser = None
        if tools.tool_choice(body) == "auto" and (parser_name := tools.parser_name(deployment, tokenizer)):
            parser = await ctx.component(deployment, "tool_parser", parser_name, "Tool calling",
                                         "unsupported_parameter")
        tool_plan = tools.plan(body, parser)
    params = sampling_params(body, max_tokens=max_tokens, logprobs=logprobs, vocab_size=tokenizer.vocab_size,
                             names={"max_tokens": name, "logprobs": "top_logprobs"}, structured_output=constraint)
    prompts = [(prompt_ids, "")]
    return ChatPlan(deployment, fan_out(prompts, params, body.n), prompts, logprobs, tool_plan)


async def create_chat_completion(request: Request) -> Any:
    """``POST /v1/chat/completions``."""
    received = time.time()  # the request's arrival: its TTFT includes parsing and tokenizing
    ctx = _ctx(request)
    body = await ctx.decode(request, ChatCompletionRequest)
    chat = await plan_chat(ctx, body)
    renderer = ChatRenderer(tools=chat.tools, **_renderer_args(ctx, chat.deployment, body, "chatcmpl", chat.plans,
                                                               chat.prompts, chat.logprobs))
    generation = Generation(chat.deployment, chat.plans, ctx.metrics, arrival_time=received)
    return GenerationResponse(generation, renderer, body.stream)
