"""Bad input: property-based fuzzing of a live server with hostile requests (hypothesis) and
with cases schemathesis derives from the server's own ``/openapi.json``.

A hostile request must get a 4xx in OpenAI's error shape; one that happens to be valid may
get a 200 (and then a well-formed answer). Never a 5xx, never a dropped connection, and the
server answers correctly afterwards. The toy engine takes most cases (it is fast); a short
run on the real engine (a tiny random Llama) reaches its tokenizer's vocabulary and context
checks. The hostile requests themselves are hypothesis strategies in ``hostile.py``.

``FLOWSERVE_FUZZ_CASES`` sets the hostile cases per run (default 150; the same number of
schemathesis cases follows, a fifth of both on the real engine); ``FLOWSERVE_FUZZ_REPORT``
names a JSON file that receives the tally (requests sent, answers by status). On demand::

    FLOWSERVE_FUZZ_CASES=1000 FLOWSERVE_FUZZ_REPORT=fuzz.json pytest plugins/openai/tests/test_fuzz.py
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from hostile import Target, encode, hostile_requests
from hypothesis import HealthCheck, given, settings, strategies as st
from openai_live import MODEL, TOY_ENGINE, serve_command, write_config

from flowserve_testing import write_tiny_llama

FUZZ_CASES = int(os.environ.get("FLOWSERVE_FUZZ_CASES", "150"))
FUZZ_REPORT = os.environ.get("FLOWSERVE_FUZZ_REPORT")
ADMIN_KEY = "adm-fuzz"
MAX_N, MAX_BODY, TOY_CONTEXT = 4, 1024 * 1024, 64
FUZZ_SETTINGS = dict(deadline=None, database=None, derandomize=False, print_blob=True,
                     suppress_health_check=list(HealthCheck))

@dataclass
class Tally:
    """Requests sent and answers seen (by status) in one run."""

    sent: int = 0
    statuses: Counter = field(default_factory=Counter)
    dropped: int = 0
    by_kind: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {"sent": self.sent, "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
                "dropped": self.dropped, "by_kind": dict(self.by_kind)}

    def write(self, path: str | None, name: str) -> None:
        """Add this tally under ``name`` to the JSON report at ``path`` (if given)."""
        if not path:
            return
        report = Path(path)
        data = json.loads(report.read_text()) if report.exists() else {}
        data[name] = self.as_dict()
        report.write_text(json.dumps(data, indent=2))


def check_answer(response: httpx.Response, what: str) -> None:
    """A 4xx in OpenAI's error shape, or a well-formed 200; never a 5xx."""
    status = response.status_code
    assert status < 500, f"{what}: {status} {response.text[:500]}"
    if status >= 400:
        assert response.headers.get("content-type", "").startswith("application/json"), (what, response.headers)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, (what, error)
        assert isinstance(error["message"], str) and error["message"], (what, error)
        if status == 429:
            assert response.headers.get("retry-after", "").isdigit(), (what, response.headers)
        return
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        assert response.text.endswith("data: [DONE]\n\n"), (what, response.text[-300:])
        assert '"error"' not in response.text, (what, response.text[-500:])
    elif response.request.url.path.endswith("completions"):
        assert response.json()["choices"], (what, response.text[:300])


def send(client: httpx.Client, tally: Tally, kind: str, method: str, path: str,
         content: bytes | Iterator[bytes] | None = None, headers: dict | None = None) -> httpx.Response:
    """Send one request (a body, or one streamed in chunks), count it, and check its answer
    (a dropped connection fails)."""
    shown = content[:200] if isinstance(content, bytes) else b"(streamed)" if content else b""
    tally.sent += 1
    tally.by_kind[kind] += 1
    try:
        response = client.request(method, path, content=content, headers=headers)
    except httpx.TransportError as exc:
        tally.dropped += 1
        raise AssertionError(f"{kind} {method} {path}: the connection failed: {exc!r}; body {shown!r}") from exc
    tally.statuses[response.status_code] += 1
    check_answer(response, f"{kind} {method} {path} {shown!r}")
    return response


# ---------------------------------------------------------------- the servers


def fuzz_config(directory: Path) -> str:
    """Configured limits the fuzzer must hit: the body size, ``n``; /admin needs a key."""
    return write_config(directory, f'admin_key = "{ADMIN_KEY}"\nmax_n = {MAX_N}\nmax_body_bytes = {MAX_BODY}\n')


@pytest.fixture(scope="module")
def toy_target(start_server, tmp_path_factory) -> Target:
    server = start_server(serve_command("--config", fuzz_config(tmp_path_factory.mktemp("fuzz")),
                                       "--max-model-len", str(TOY_CONTEXT)))
    return Target(url=server.url, model=MODEL, vocab_size=1000, max_model_len=TOY_CONTEXT, max_n=MAX_N,
                  max_body_bytes=MAX_BODY)


@pytest.fixture(scope="module")
def real_target(start_server, tmp_path_factory) -> Target:
    """The real engine (hf tokenizer, spmd executor, paged KV, continuous batching) in the
    server process, on a tiny random Llama with a 128-token context."""
    from transformers import AutoTokenizer

    model = write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
    command = serve_command("--config", fuzz_config(tmp_path_factory.mktemp("fuzz-real")), "--max-model-len", "128")
    at = command.index("--model")
    command[at:at + len(TOY_ENGINE)] = [
        "--model", str(model), "--served-model-name", MODEL, "--tokenizer", "hf", "--executor", "spmd",
        "--kv-cache", "paged", "--batch-scheduler", "continuous", "--job-scheduler", "colocated",
        "--kv-cache-memory", "4MiB", "--device", "cpu", "--dtype", "float32"]
    server = start_server(command, env={"HF_HUB_OFFLINE": "1"})
    return Target(url=server.url, model=MODEL, vocab_size=len(AutoTokenizer.from_pretrained(str(model))),
                  max_model_len=128, max_n=MAX_N, max_body_bytes=MAX_BODY)


def still_serves(target: Target, toy: bool) -> None:
    """After the fuzz: a right answer, /health 200, nothing left running."""
    with httpx.Client(base_url=target.url, timeout=60) as client:
        answer = client.post("/v1/completions", json={"model": target.model, "prompt": "t41", "max_tokens": 3,
                                                      "temperature": 0})
        assert answer.status_code == 200, answer.text
        if toy:
            assert answer.json()["choices"][0]["text"] == " t42 t43 t44"
        else:
            assert answer.json()["usage"]["completion_tokens"] >= 1
        assert client.get("/health").status_code == 200
        running = [line for line in client.get("/metrics").text.splitlines()
                   if line.startswith("flowserve:num_requests_running{")]
        assert running and all(line.endswith(" 0.0") for line in running), running


# ---------------------------------------------------------------- the runs


def run_hostile(target: Target, cases: int, name: str) -> Tally:
    tally = Tally()
    with httpx.Client(base_url=target.url, timeout=60) as client:

        @settings(max_examples=cases, **FUZZ_SETTINGS)
        @given(request=hostile_requests(target))
        def hostile(request: tuple[str, bytes]) -> None:
            path, content = request
            send(client, tally, "hypothesis", "POST", path, content, {"content-type": "application/json"})

        hostile()
    tally.write(FUZZ_REPORT, name)
    assert tally.sent >= cases and tally.dropped == 0
    return tally


def run_schemathesis(target: Target, cases: int, name: str) -> Tally:
    """Positive and negative cases of every operation of /openapi.json, checked by
    schemathesis (no server error, status codes, content types and bodies as documented,
    schema-invalid data refused) and by ``check_answer``."""
    import schemathesis
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation import GenerationMode
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_url(target.url + "/openapi.json")
    # /admin/* answer 401 to a client without the admin key whatever the body (test_security
    # checks that); fuzzing them would only count 401s, so the cases go to the other paths.
    operations = [op for op in (result.ok() for result in schema.get_all_operations())
                  if not op.path.startswith("/admin")]
    strategy = st.one_of([op.as_strategy(generation_mode=mode) for op in operations
                          for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)])
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
              negative_data_rejection]
    tally = Tally()

    @settings(max_examples=cases, **FUZZ_SETTINGS)
    @given(case=strategy)
    def conforming(case: Any) -> None:
        tally.sent += 1
        tally.by_kind[f"schemathesis {case.method} {case.path}"] += 1
        try:
            response = case.call(base_url=target.url, timeout=60)
        except Exception:
            tally.dropped += 1
            raise
        tally.statuses[response.status_code] += 1
        case.validate_response(response, checks=checks)
        assert response.status_code < 500, response.text[:500]
        if response.status_code >= 400:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], error

    conforming()
    tally.write(FUZZ_REPORT, name)
    assert tally.sent >= cases and tally.dropped == 0
    return tally


def run_huge_bodies(target: Target, name: str) -> Tally:
    """10 MB bodies, declared or streamed without a length: a 413 naming the limit, early."""
    tally = Tally()
    ten_mb = encode({"model": target.model, "prompt": "t1 " * (10 * 1024 * 1024 // 3), "max_tokens": 1})
    assert len(ten_mb) >= 10 * 1024 * 1024

    def chunks():
        for at in range(0, len(ten_mb), 64 * 1024):
            yield ten_mb[at:at + 64 * 1024]

    with httpx.Client(base_url=target.url, timeout=60) as client:
        for path in ("/v1/completions", "/v1/chat/completions", "/admin/scale"):
            headers = {"authorization": f"Bearer {ADMIN_KEY}"} if path.startswith("/admin") else {}
            for content in (ten_mb, chunks()):
                response = send(client, tally, "10 MB body", "POST", path, content, headers)
                assert response.status_code == 413 and str(target.max_body_bytes) in response.json()["error"]["message"]
    tally.write(FUZZ_REPORT, name)
    return tally


def test_hostile_requests_get_4xx_in_openai_shape(toy_target):
    tally = run_hostile(toy_target, FUZZ_CASES, "toy hypothesis")
    assert set(tally.statuses) - {200} and all(status < 500 for status in tally.statuses)
    still_serves(toy_target, toy=True)


def test_strings_that_are_not_utf8_are_400s(toy_target):
    """Found by this fuzzer: msgspec raises UnicodeDecodeError (not a DecodeError) for them."""
    tally = Tally()
    with httpx.Client(base_url=toy_target.url, timeout=60) as client:
        for bad in (b"\xff", b"\xed\xa0\x80", b"\xc3\x28"):
            for path, body in (("/v1/completions", b'{"model": "toy", "prompt": "t1 X", "max_tokens": 1}'),
                               ("/v1/chat/completions", b'{"model": "X", "messages": []}')):
                response = send(client, tally, "invalid UTF-8", "POST", path, body.replace(b"X", bad))
                assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
    still_serves(toy_target, toy=True)


def test_ten_megabyte_bodies_are_413s(toy_target):
    run_huge_bodies(toy_target, "toy 10 MB bodies")
    still_serves(toy_target, toy=True)


def test_schemathesis_cases_from_the_openapi_document(toy_target):
    tally = run_schemathesis(toy_target, FUZZ_CASES, "toy schemathesis")
    assert tally.statuses[200] > 0 and tally.statuses[400] > 0
    still_serves(toy_target, toy=True)


def test_hostile_and_schema_cases_on_the_real_engine(real_target):
    cases = max(20, FUZZ_CASES // 5)
    run_hostile(real_target, cases, "real-engine hypothesis")
    run_schemathesis(real_target, cases, "real-engine schemathesis")
    with httpx.Client(base_url=real_target.url, timeout=60) as client:  # the real tokenizer's own limits
        too_long = client.post("/v1/completions", json={"model": MODEL, "prompt": "hello " * 200, "max_tokens": 1})
        assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
        out_of_range = client.post("/v1/completions", json={"model": MODEL, "prompt": [1, real_target.vocab_size],
                                                             "max_tokens": 1})
        assert out_of_range.status_code == 400 and str(real_target.vocab_size - 1) in out_of_range.text
    still_serves(real_target, toy=False)
