"""``/v1/embeddings`` on a live server (``flowserve serve``, real worker processes, the spmd
executor on a tiny random Llama) with the official ``openai`` client: every input form, base64,
``dimensions`` (refused for an ordinary model, honoured for a Matryoshka one), the pooling of
each deployment, long inputs computed in chunks, and embeddings sharing a deployment's steps
with chat generations. The vectors are transformers' ``last_hidden_state`` pooled alike."""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

pytest.importorskip("flowserve_spmd_executor")
pytest.importorskip("flowserve_hf_tokenizer")

import openai  # noqa: E402  (after the importorskips above)
import torch  # noqa: E402  (after the importorskips above)

from flowserve_testing import serve  # noqa: E402  (after the importorskips above)

CONTEXT = 512
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
ENGINE = ["--tokenizer", "hf", "--executor", "spmd", "--kv-cache", "paged", "--batch-scheduler", "continuous",
          "--scaler", "static", "--dtype", "float32", "--device", "cpu", "--kv-cache-memory", "8MiB",
          "--max-num-batched-tokens", "64"]
TEXTS = ["The capital of France is Paris.", "hello world", "a b c d e f g"]


def write_tiny_llama(directory: Path, **config_extra) -> Path:
    """A random two-layer Llama with a small trained tokenizer and a chat template."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from flowserve_hf_tokenizer.testing import build_llama_style_tokenizer

    path = build_llama_style_tokenizer(directory, max_position_embeddings=CONTEXT)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(str(path))
    torch.manual_seed(7)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, initializer_range=0.2)
    LlamaForCausalLM(config).save_pretrained(str(path), safe_serialization=True)
    if config_extra:  # e.g. Matryoshka: what vLLM reads from config.json
        config_file = path / "config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **config_extra}))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("embeddings")
    return {"plain": write_tiny_llama(root / "plain"),
            "matryoshka": write_tiny_llama(root / "matryoshka", matryoshka_dimensions=[16, 32, 64])}


@pytest.fixture(scope="module")
def server(models):
    with serve("--model", str(models["plain"]), "--served-model-name", "tiny", "--pooling", "last", *ENGINE,
               health_path="/ready") as live:
        # A second deployment, mean-pooled, of the Matryoshka copy (same weights)
        added = httpx.post(live.url + "/admin/deployments", timeout=120, json={
            "name": "tiny-mean", "model": str(models["matryoshka"]), "pooling": "mean"})
        assert added.status_code == 201, added.text
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        client.embeddings.create(model="tiny-mean", input="warm")  # waits while its instance starts
        yield live
        client.close()


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
        yield client


class Oracle:
    """transformers' tokenizer and final hidden states (``last_hidden_state``), pooled and normalized."""

    def __init__(self, checkpoint: Path) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
        self.model = AutoModel.from_pretrained(str(checkpoint), dtype=torch.float32).eval()

    def __call__(self, ids: list[int], kind: str = "last", dimensions: int | None = None) -> np.ndarray:
        with torch.no_grad():
            hidden = self.model(torch.tensor([ids])).last_hidden_state[0]
        vector = (hidden[-1] if kind == "last" else hidden.mean(0))[:dimensions]
        return torch.nn.functional.normalize(vector, dim=0).numpy()


@pytest.fixture(scope="module")
def oracle(models) -> Oracle:
    return Oracle(models["plain"])


def close(got, want) -> None:
    got = np.asarray(got, dtype=np.float32)
    assert got.shape == want.shape
    assert abs(np.linalg.norm(got) - 1.0) < 1e-5  # normalized
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_strings_and_token_ids_give_transformers_vectors_in_openais_shape(client, oracle):
    ids = [oracle.tokenizer.encode(text) for text in TEXTS]  # BOS included, as the server's tokenizer adds it
    one = client.embeddings.create(model="tiny", input=TEXTS[0])
    assert one.object == "list" and one.model == "tiny" and len(one.data) == 1
    assert one.data[0].object == "embedding" and one.data[0].index == 0
    assert one.usage.prompt_tokens == one.usage.total_tokens == len(ids[0])
    close(one.data[0].embedding, oracle(ids[0]))
    for given in (TEXTS, ids):  # a list of strings, a list of token-id lists
        many = client.embeddings.create(model="tiny", input=given)
        assert [d.index for d in many.data] == [0, 1, 2]
        assert many.usage.prompt_tokens == sum(map(len, ids))
        for data, tokens in zip(many.data, ids):
            close(data.embedding, oracle(tokens))
    single = client.embeddings.create(model="tiny", input=ids[1])  # one list of token ids
    assert len(single.data) == 1
    close(single.data[0].embedding, oracle(ids[1]))
    raw = httpx.post(str(client.base_url) + "embeddings", json={"model": "tiny", "input": "hello"}).json()
    assert set(raw) == {"object", "data", "model", "usage"} and set(raw["data"][0]) == {"object", "index", "embedding"}


def test_base64_is_little_endian_float32_of_the_same_vector(client):
    floats = client.embeddings.create(model="tiny", input=TEXTS[:2], encoding_format="float")
    response = httpx.post(str(client.base_url) + "embeddings", json={
        "model": "tiny", "input": TEXTS[:2], "encoding_format": "base64"}).json()
    for data, encoded in zip(floats.data, response["data"]):
        decoded = np.frombuffer(base64.b64decode(encoded["embedding"]), dtype="<f4")
        np.testing.assert_array_equal(decoded, np.asarray(data.embedding, dtype=np.float32))
    # the openai client asks for base64 itself when no format is given, and decodes it
    default = client.embeddings.create(model="tiny", input=TEXTS[0])
    np.testing.assert_array_equal(np.asarray(default.data[0].embedding, dtype=np.float32),
                                  np.asarray(floats.data[0].embedding, dtype=np.float32))


def prompt_tokens_counted(server) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.url + "/metrics", timeout=10).text
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "flowserve:prompt_tokens_total" and s.labels.get("model_name") == "tiny")


def test_a_long_input_is_computed_in_chunks_and_mean_pooling_is_the_deployments(server, client, oracle):
    long = [1] + [(i * 7) % 250 + 3 for i in range(299)]  # 300 tokens: five steps of 64
    counted = prompt_tokens_counted(server)
    close(client.embeddings.create(model="tiny", input=long).data[0].embedding, oracle(long))
    assert prompt_tokens_counted(server) == counted + 300  # the server's metrics count what it embedded
    whole = (long * 2)[:CONTEXT]  # the whole context: an embedding needs no room for output
    close(client.embeddings.create(model="tiny", input=whole).data[0].embedding, oracle(whole))
    close(client.embeddings.create(model="tiny-mean", input=long).data[0].embedding, oracle(long, "mean"))
    # its first two blocks are in the prefix cache now: a mean still computes every position
    close(client.embeddings.create(model="tiny-mean", input=long[:40]).data[0].embedding, oracle(long[:40], "mean"))


def test_dimensions_are_refused_for_an_ordinary_model_and_cut_a_matryoshka_one(client, oracle):
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model="tiny", input="hello", dimensions=16)
    error = refused.value.body
    assert refused.value.status_code == 400 and error["param"] == "dimensions"
    assert "does not support matryoshka representation" in error["message"]
    ids = oracle.tokenizer.encode(TEXTS[0])
    cut = client.embeddings.create(model="tiny-mean", input=TEXTS[0], dimensions=16)
    close(cut.data[0].embedding, oracle(ids, "mean", 16))
    with pytest.raises(openai.BadRequestError) as other:
        client.embeddings.create(model="tiny-mean", input=TEXTS[0], dimensions=20)
    assert other.value.body["param"] == "dimensions" and "[16, 32, 64]" in other.value.body["message"]


@pytest.mark.parametrize("body, param, words", [
    ({"input": ""}, "input", "empty"),
    ({"input": []}, "input", "empty"),
    ({"input": ["fine", ""]}, "input[1]", "empty"),
    ({"input": ["text", 5]}, "input", "mix"),
    ({"input": [[1, 2], [1, 99999]]}, "input[1]", "vocabulary"),
    ({"input": [5] * (CONTEXT + 1)}, "input", f"maximum context length is {CONTEXT} tokens"),
    ({"input": "hi", "encoding_format": "bytes"}, "encoding_format", "base64"),
    ({"input": "hi", "dimensions": 0}, "dimensions", ">= 1"),
])
def test_bad_requests_are_openai_style_400s_naming_the_parameter(server, body, param, words):
    response = httpx.post(server.url + "/v1/embeddings", json={"model": "tiny", **body}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and words in error["message"]


def test_embeddings_and_chat_generations_share_the_deployment_and_both_stay_right(client, oracle):
    chats = [[{"role": "user", "content": f"question {i}"}] for i in range(4)]

    def chat(messages):
        reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                               extra_body={"ignore_eos": True})
        return reply.choices[0].message.content, reply.usage.completion_tokens

    alone = [chat(m) for m in chats]
    batches = [[f"{text} {i}" for text in TEXTS] for i in range(4)]
    with ThreadPoolExecutor(8) as pool:
        replies = [pool.submit(chat, m) for m in chats]
        embedded = [pool.submit(client.embeddings.create, model="tiny", input=batch) for batch in batches]
        assert [r.result() for r in replies] == alone
        for batch, future in zip(batches, embedded):
            for text, data in zip(batch, future.result().data):
                close(data.embedding, oracle(oracle.tokenizer.encode(text)))


def test_the_route_is_in_the_openapi_document(server):
    document = httpx.get(server.url + "/openapi.json").json()
    operation = document["paths"]["/v1/embeddings"]["post"]
    assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/EmbeddingRequest")
    assert "EmbeddingResponse" in document["components"]["schemas"]
