"""Streamed tool calls under ``tool_choice: "auto"``, live (issue 19): a tiny Llama whose weights
are written so that it says a fixed script (each token's embedding points the LM head at the
next token: a bigram model, layers silenced) writes real tool-call markup token by token — the
Hermes ``<tool_call>`` blocks of two calls after some content, and Mistral's ``[TOOL_CALLS]``,
a special token. Through the spmd executor, the server and the official openai client: the
stream's ``tool_calls`` deltas (index, id, type and name first, then argument fragments as the
tokens come) join into exactly the unstreamed answer's calls, and Mistral's calls parse with the
default request (``skip_special_tokens`` left alone)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("flowserve_spmd_executor")
pytest.importorskip("flowserve_tool_parsers")
pytest.importorskip("flowserve_hf_tokenizer")
openai = pytest.importorskip("openai")

from flowserve_testing import serve  # noqa: E402  (after the importorskip above)

#: What the model says after each start token, piece by piece (one token each).
SCRIPTS = {
    "hermes": ["Let me check.", '\n<tool_call>\n{"name": "get_weather", ', '"arguments": {"city": "Pa',
               'ris", "unit": "celsius"}}', '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": ',
               '{"zone": "CET"}}', "\n</tool_call>"],
    "mistral": ["[TOOL_CALLS]", '[{"name": "get_weather", ', '"arguments": {"city": ', '"Paris", ',
                '"unit": "celsius"}}]'],
}
#: The template ends with the script's start token, picked by the user's message.
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if messages[-1]['content'] == 'mistral' %}<|mistral|>{% else %}<|hermes|>{% endif %}")
TOOLS = [{"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
         for name in ("get_weather", "get_time")]
ENGINE = ["--tokenizer", "hf", "--executor", "spmd", "--kv-cache", "paged", "--batch-scheduler", "continuous",
          "--scaler", "static", "--dtype", "float32", "--device", "cpu", "--kv-cache-memory", "8MiB"]


def write_scripted_llama(directory: Path) -> Path:
    """A one-layer Llama (with its tokenizer) that greedily says ``SCRIPTS[name]`` then ``</s>``
    after the token ``<|name|>``; ``[TOOL_CALLS]`` is a special token, the other pieces added ones."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from flowserve_hf_tokenizer.testing import build_llama_style_tokenizer

    path = build_llama_style_tokenizer(directory)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.add_special_tokens({"additional_special_tokens": ["[TOOL_CALLS]"]})
    pieces = [f"<|{name}|>" for name in SCRIPTS] + [p for s in SCRIPTS.values() for p in s if p != "[TOOL_CALLS]"]
    tokenizer.add_tokens([AddedToken(p, normalized=False) for p in pieces])
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(str(path))
    vocab = len(tokenizer)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, dtype="float32")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float()
    with torch.no_grad():
        for layer in model.model.layers:  # nothing is added to the residual: the last token alone decides
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = torch.randn(vocab, 64)
        head = torch.zeros(vocab, 64)
        for name, script in SCRIPTS.items():
            ids = [tokenizer.convert_tokens_to_ids(p) for p in (f"<|{name}|>", *script)] + [2]
            assert len(set(ids)) == len(ids)
            for current, following in zip(ids, ids[1:]):
                head[following] += embed[current] / embed[current].norm() * 20
        model.model.embed_tokens.weight.copy_(embed)
        model.lm_head.weight.copy_(head)
    model.save_pretrained(str(path), safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def scripted(tmp_path_factory) -> Path:
    return write_scripted_llama(tmp_path_factory.mktemp("scripted") / "model")


def streamed(client, **kwargs) -> tuple[str, list[dict], str | None, int]:
    """The content, the calls (checking each delta's shape) and the finish reason of a stream,
    and how many deltas carried argument fragments."""
    content, calls, finish, fragments = "", [], None, 0
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                if delta.id is not None:  # a call's first delta: the next index, its id, type and name
                    assert delta.index == len(calls) and delta.type == "function" and delta.function.name
                    assert delta.id.startswith("call_")
                    calls.append({"id": delta.id, "name": delta.function.name, "arguments": ""})
                else:
                    assert delta.index == len(calls) - 1 and delta.function.name is None and delta.type is None
                    fragments += 1
                calls[delta.index]["arguments"] += delta.function.arguments or ""
    return content, calls, finish, fragments


@pytest.mark.parametrize("parser, calls", [
    ("hermes", [("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {"zone": "CET"})]),
    ("mistral", [("get_weather", {"city": "Paris", "unit": "celsius"})]),
])
def test_auto_tool_calls_stream_as_openai_deltas_and_match_the_whole_answer(scripted, parser, calls):
    with serve("--model", str(scripted), "--served-model-name", "scripted", *ENGINE, "--tool-call-parser", parser,
               timeout=120) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
        ask = dict(model="scripted", messages=[{"role": "user", "content": parser}], tools=TOOLS, temperature=0,
                   max_tokens=40)
        whole = client.chat.completions.create(**ask).choices[0]  # default request: special tokens skipped
        assert whole.finish_reason == "tool_calls", whole.message
        got = [(c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls]
        assert got == calls
        assert whole.message.content == ("Let me check." if parser == "hermes" else None)
        content, streamed_calls, finish, fragments = streamed(client, **ask)
        assert finish == "tool_calls" and content == (whole.message.content or "")
        assert [(c["name"], c["arguments"]) for c in streamed_calls] == [
            (c.function.name, c.function.arguments) for c in whole.message.tool_calls]
        # the arguments came as the tokens were generated (those of get_weather in several), not whole at the end
        assert fragments > len(calls)
        if parser == "hermes":
            content, single, finish, _ = streamed(client, parallel_tool_calls=False, **ask)
            assert [c["name"] for c in single] == ["get_weather"] and finish == "tool_calls"
            assert len(client.chat.completions.create(parallel_tool_calls=False, **ask).choices[0]
                       .message.tool_calls) == 1
            responses_calls_stream_too(client)
            # without tools the same reply is plain text (the markup and all)
            plain = client.chat.completions.create(model="scripted", messages=ask["messages"], temperature=0,
                                                   max_tokens=40).choices[0]
            assert plain.finish_reason == "stop" and "<tool_call>" in plain.message.content


def responses_calls_stream_too(client) -> None:
    """/v1/responses streams the same calls as their items and argument deltas, in the order
    written (the message first here), and they add up to the unstreamed response."""
    tools = [{"type": "function", "name": t["function"]["name"], "parameters": t["function"]["parameters"]}
             for t in TOOLS]
    ask = dict(model="scripted", input="hermes", tools=tools, temperature=0, max_output_tokens=40)
    whole = client.responses.create(**ask)
    assert [item.type for item in whole.output] == ["message", "function_call", "function_call"]
    events = list(client.responses.create(stream=True, **ask))
    added = [e.item for e in events if e.type == "response.output_item.added"]
    assert [item.type for item in added] == ["message", "function_call", "function_call"]
    assert [item.name for item in added[1:]] == ["get_weather", "get_time"] and not added[1].arguments
    deltas = [e for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(deltas) > 2  # get_weather's arguments in several fragments, as the tokens came
    joined = ["".join(e.delta for e in deltas if e.output_index == index) for index in (1, 2)]
    assert joined == [item.arguments for item in whole.output[1:]]
    final = events[-1]
    assert final.type == "response.completed"
    def summary(output):
        return [(i.type, i.content[0].text if i.type == "message" else (i.name, i.arguments)) for i in output]

    assert summary(final.response.output) == summary(whole.output)
    assert whole.output[0].content[0].text == "Let me check."
