"""Many models in one live server (real engine, one process per instance, scaler ``static``).

Two tiny random Llamas of different seeds (``a`` and ``b``: a request on the wrong one
gives other greedy tokens) are served with ``--model a=… --model b=…``; SmolLM2 is added
at run time. Every answer is checked against HF transformers' greedy generation on the
model it must have run on, and against ``system_fingerprint``, which names the model file.

- adding SmolLM2 while 20 streams run against ``a``, then removing it while streams run
  against both: ``a`` never fails, SmolLM2's in-flight streams finish, later ones get 404,
  and the server's memory (its process tree's RSS) gives SmolLM2's instance back;
- switching an alias to ``b`` and back under load: each request runs wholly on one model,
  the one the alias named when it was sent;
- the admin API and its commands, per-deployment metrics and scale to zero.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import httpx
import openai
import psutil
import pytest
from openai_live import LiveServer

from flowserve_testing import write_tiny_llama

MAX_TOKENS = 12
#: SmolLM2's answers are longer, so that some are still running when it is removed.
SMOL_TOKENS = 16
PROMPT_COUNT = 20
REAL_ENGINE = ["--tokenizer", "hf", "--executor", "spmd", "--kv-cache", "paged", "--batch-scheduler", "continuous",
               "--job-scheduler", "colocated", "--scaler", "static", "--dtype", "float32", "--device", "cpu",
               "--kv-cache-memory", "16MiB", "--max-model-len", "256"]
#: Seconds any one wait may take on a busy 2-core machine before the test fails.
BOUND = 180


class Oracle:
    """HF transformers' greedy continuation of each prompt on one model, as the token texts
    OpenAI's logprobs show (``token_text`` of each token id)."""

    def __init__(self, model_dir: str, prompts: list[list[int]], max_tokens: int = MAX_TOKENS,
                 tokenizer_model: str | None = None):
        self.max_tokens = max_tokens
        import torch
        from transformers import AutoModelForCausalLM

        from flowserve_core.types import DeploymentSpec
        from flowserve_hf_tokenizer.tokenizer import build_hf_tokenizer

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a busy 2-core machine: spinning OpenMP threads only slow everyone
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        model.generation_config.eos_token_id = None  # the server is asked to ignore EOS too
        tokenizer = build_hf_tokenizer(DeploymentSpec(model=tokenizer_model or model_dir))
        self.tokens: list[list[str]] = []
        with torch.no_grad():
            for prompt in prompts:
                out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_tokens,
                                     pad_token_id=0)[0, len(prompt):].tolist()
                self.tokens.append([tokenizer.token_text(t) for t in out])
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Any]:
    """Two tiny random Llamas, their prompts and HF's greedy answers."""
    import random

    root = tmp_path_factory.mktemp("models")
    dirs = {name: str(write_tiny_llama(root / name, seed=seed)) for name, seed in (("a", 11), ("b", 22))}
    rng = random.Random(5)
    prompts = [[1] + [rng.randrange(3, 290) for _ in range(rng.randrange(3, 12))] for _ in range(PROMPT_COUNT)]
    oracles = {name: Oracle(path, prompts) for name, path in dirs.items()}
    differ = sum(x != y for x, y in zip(oracles["a"].tokens, oracles["b"].tokens))
    assert differ == PROMPT_COUNT, "the two tiny models must answer every prompt differently"
    return {"dirs": dirs, "prompts": prompts, "oracles": oracles}


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    dirs = models["dirs"]
    command = [sys.executable, "-m", "flowserve_core.cli", "serve", "--host", "127.0.0.1", "--port", "0",
               "--model", f"a={dirs['a']}", "--model", f"b={dirs['b']}", *REAL_ENGINE]
    # One torch thread per instance process: several share two cores with the test itself.
    live = LiveServer(command, tmp_path_factory.mktemp("server") / "server.log",
                      env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    try:
        yield live.wait_listening(BOUND).wait_ready(BOUND)
    finally:
        live.stop()


class Outcome:
    """One completion as a client saw it: what was sent when, and what came back."""

    def __init__(self, model: str, prompt_index: int):
        self.model, self.prompt_index = model, prompt_index
        self.sent = self.ended = 0.0
        self.text = ""
        self.tokens: list[str] = []
        self.fingerprint: str | None = None
        self.completion_tokens: int | None = None
        self.error: BaseException | None = None


def complete(url: str, model: str, prompt: list[int], index: int, stream: bool = True,
             max_tokens: int = MAX_TOKENS) -> Outcome:
    """One greedy completion through the openai client (streamed with usage, or not)."""
    outcome = Outcome(model, index)
    outcome.sent = time.monotonic()
    try:
        with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=BOUND) as client:
            kw = dict(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=0,
                      extra_body={"ignore_eos": True})
            if stream:
                for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
                    outcome.fingerprint = chunk.system_fingerprint or outcome.fingerprint
                    if chunk.choices:
                        outcome.text += chunk.choices[0].text
                        outcome.tokens += chunk.choices[0].logprobs.tokens if chunk.choices[0].logprobs else []
                    if chunk.usage:
                        outcome.completion_tokens = chunk.usage.completion_tokens
            else:
                answer = client.completions.create(**kw)
                outcome.text, outcome.fingerprint = answer.choices[0].text, answer.system_fingerprint
                outcome.tokens = list(answer.choices[0].logprobs.tokens)
                outcome.completion_tokens = answer.usage.completion_tokens
    except BaseException as exc:  # reported by the test
        outcome.error = exc
    outcome.ended = time.monotonic()
    return outcome


class Load:
    """``workers`` threads sending completions for ``model()`` (read before each request)
    until stopped; every outcome is kept."""

    def __init__(self, url: str, prompts: list[list[int]], model: Callable[[], str], workers: int,
                 max_tokens: int = MAX_TOKENS, until: Callable[[], bool] = lambda: False):
        self.url, self.prompts, self.model, self.max_tokens = url, prompts, model, max_tokens
        self.until = until
        self.outcomes: list[Outcome] = []
        self.stopped = threading.Event()
        self.pool = ThreadPoolExecutor(workers)
        self.futures = [self.pool.submit(self._work, w) for w in range(workers)]

    def _work(self, worker: int) -> None:
        index = worker
        while not self.stopped.is_set() and not self.until():
            i = index % len(self.prompts)
            self.outcomes.append(complete(self.url, self.model(), self.prompts[i], i, max_tokens=self.max_tokens))
            index += 7

    def wait_for(self, count: int, sent_after: float = 0.0) -> None:
        """Until ``count`` requests sent after ``sent_after`` (monotonic) have succeeded."""
        deadline = time.monotonic() + BOUND
        while len([o for o in self.outcomes if o.error is None and o.sent > sent_after]) < count:
            assert time.monotonic() < deadline, f"only {len(self.outcomes)} requests finished"
            assert not any(f.done() and f.exception() for f in self.futures), [f.exception() for f in self.futures]
            time.sleep(0.05)

    def stop(self) -> list[Outcome]:
        self.stopped.set()
        for future in self.futures:
            future.result(BOUND)
        self.pool.shutdown()
        return self.outcomes


def admin(server, method: str, path: str, **kw: Any) -> httpx.Response:
    return httpx.request(method, server.url + path, timeout=BOUND, **kw)


def fingerprints(server) -> dict[str, str]:
    """Each deployment's ``system_fingerprint`` (it hashes the model file's path)."""
    return {name: complete(server.url, name, [1, 5, 6], 0, stream=False).fingerprint
            for name in (d["name"] for d in admin(server, "GET", "/admin/deployments").json()["deployments"])}


def assert_ran_on(outcome: Outcome, model: str, oracle: Oracle, fingerprint: str) -> None:
    assert outcome.error is None, f"{outcome.model}: {outcome.error!r}"
    assert outcome.tokens == oracle.tokens[outcome.prompt_index], (model, outcome.prompt_index)
    assert outcome.completion_tokens == len(oracle.tokens[outcome.prompt_index])
    assert outcome.fingerprint == fingerprint, (model, outcome.fingerprint, fingerprint)


def tree_rss(pid: int) -> int:
    """Resident memory of a process and all its descendants, in bytes."""
    root = psutil.Process(pid)
    total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def test_models_are_listed_and_each_request_runs_on_its_model(server, models):
    listed = {m.id for m in server.client().models.list().data}
    assert listed == {"a", "b"}
    prints = fingerprints(server)
    assert len(set(prints.values())) == 2
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda job: complete(server.url, job[0], models["prompts"][job[1]], job[1],
                                                      stream=job[1] % 2 == 0),
                                 [(name, i) for i in range(8) for name in ("a", "b")]))
    for outcome in outcomes:
        assert_ran_on(outcome, outcome.model, models["oracles"][outcome.model], prints[outcome.model])
    with pytest.raises(openai.NotFoundError) as info:
        server.client().completions.create(model="c", prompt="hello", max_tokens=2)
    assert "'c' does not exist; this server serves: a, b" in str(info.value)
    listing = admin(server, "GET", "/admin/deployments").json()
    assert [(d["name"], d["instances"]["ready"], d["state"]) for d in listing["deployments"]] == \
        [("a", 1, "ready"), ("b", 1, "ready")]


def test_add_smollm2_under_load_then_remove_it_under_load(server, models):
    from flowserve_core.config import default_model_path
    from flowserve_spmd_executor.loader import resolve_weights

    prompts, oracle_a = models["prompts"], models["oracles"]["a"]
    smol_model = default_model_path()
    smol_prompts = [[1, 504, 3458, 282, 4649, 314], [1, 504, 1345, 282, 253, 1218]]
    # HF on the same dequantized weights the executor loads (its safetensors cache of the GGUF).
    oracle_smol = Oracle(resolve_weights(smol_model).directory, smol_prompts, max_tokens=SMOL_TOKENS,
                         tokenizer_model=smol_model)
    fingerprint_a = fingerprints(server)["a"]
    pid = server.process.pid
    baseline = tree_rss(pid)

    # Add SmolLM2 while 20 streams run against `a` (each until SmolLM2's instance is ready);
    # SmolLM2's first requests, sent at once, wait while it warms.
    smol_ready = threading.Event()
    load = Load(server.url, prompts, lambda: "a", workers=20, until=smol_ready.is_set)
    load.wait_for(20)
    # dtype, device, max_model_len… come from the server's own flags (REAL_ENGINE); the body
    # overrides kv_cache_memory (16MiB there).
    added = admin(server, "POST", "/admin/deployments", json={
        "name": "smol", "model": smol_model, "min_instances": 1, "max_instances": 1, "kv_cache_memory": "32MiB"})
    assert added.status_code == 201, added.text
    assert added.json()["name"] == "smol" and added.json()["state"] in ("warming", "ready")
    card = httpx.get(server.url + "/v1/models/smol", timeout=BOUND).json()
    assert card["max_model_len"] == 256  # SmolLM2's own context is 8,192: the flag was inherited
    with ThreadPoolExecutor(2) as pool:
        first = [pool.submit(complete, server.url, "smol", smol_prompts[i], i, max_tokens=SMOL_TOKENS)
                 for i in range(2)]
        deadline = time.monotonic() + BOUND
        waited_while_warming = False  # a request for smol admitted (waiting) while none of its instances is ready
        while True:
            (smol,) = [d for d in admin(server, "GET", "/admin/deployments").json()["deployments"]
                       if d["name"] == "smol"]
            if smol["instances"]["ready"]:
                break
            waited_while_warming |= smol["num_waiting"] >= 1
            assert time.monotonic() < deadline, "SmolLM2's instance did not start"
            time.sleep(0.1)
        smol_ready.set()
        first = [future.result() for future in first]
    assert waited_while_warming, "no request for smol was seen waiting while its instance warmed"
    prints = fingerprints(server)
    for outcome in first:
        assert_ran_on(outcome, "smol", oracle_smol, prints["smol"])
    for outcome in load.stop():
        assert_ran_on(outcome, "a", oracle_a, fingerprint_a)
    assert len(load.outcomes) >= 20
    status = admin(server, "GET", "/admin/status", params={"deployment": "smol"}).json()
    (instance,) = status["instances"]
    smol_pid = instance["pid"]
    during = tree_rss(pid)
    smol_rss = psutil.Process(smol_pid).memory_info().rss
    assert {m.id for m in server.client().models.list().data} == {"a", "b", "smol"}

    # Remove it while streams run against `a` and against it.
    load = Load(server.url, prompts, lambda: "a", workers=4)
    smol_load = Load(server.url, smol_prompts, lambda: "smol", workers=2, max_tokens=SMOL_TOKENS)
    smol_load.wait_for(1)
    deadline = time.monotonic() + BOUND
    while not admin(server, "GET", "/admin/deployments").json()["deployments"][2]["num_running"]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    removed_at = time.monotonic()
    removed = admin(server, "DELETE", "/admin/deployments/smol")
    assert removed.status_code == 200 and removed.json()["name"] == "smol", removed.text
    smol_outcomes = smol_load.stop()
    load.wait_for(4, sent_after=time.monotonic())  # `a` goes on serving after the removal
    for outcome in load.stop():
        assert_ran_on(outcome, "a", oracle_a, fingerprint_a)
    # Admitted requests finish on smol; later ones are refused as unknown (404), never broken.
    for outcome in smol_outcomes:
        if outcome.error is None:
            assert_ran_on(outcome, "smol", oracle_smol, prints["smol"])
        else:
            assert isinstance(outcome.error, openai.NotFoundError), outcome.error
    assert any(o.error is None and o.ended > removed_at for o in smol_outcomes), "none was in flight"
    assert not psutil.pid_exists(smol_pid) or psutil.Process(smol_pid).status() == psutil.STATUS_ZOMBIE
    after = tree_rss(pid)
    assert after < during - smol_rss // 2, (baseline, during, after, smol_rss)
    assert after < baseline + smol_rss // 4, (baseline, during, after, smol_rss)
    assert {m.id for m in server.client().models.list().data} == {"a", "b"}
    with pytest.raises(openai.NotFoundError, match="serves: a, b"):
        server.client().completions.create(model="smol", prompt="hello", max_tokens=2)


def test_an_alias_switches_under_load_and_each_request_stays_on_one_model(server, models):
    oracles, prompts = models["oracles"], models["prompts"]
    prints = fingerprints(server)

    def set_alias(target):
        return admin(server, "POST", "/admin/aliases", json={"alias": "chat", "deployment": target})

    assert set_alias("a").status_code == 200
    load = Load(server.url, prompts, lambda: "chat", workers=6)
    load.wait_for(6)
    switches = []
    for target in ("b", "a"):  # blue/green: over to b, then back
        sent = time.monotonic()
        answer = set_alias(target)
        switches.append((sent, time.monotonic(), target))
        assert answer.status_code == 200 and answer.json()["previous"] == {"b": "a", "a": "b"}[target], answer.text
        load.wait_for(6, sent_after=switches[-1][1])
    outcomes = load.stop()
    (to_b_sent, to_b_acked, _), (to_a_sent, to_a_acked, _) = switches
    on_b = 0
    for outcome in outcomes:
        ran_on = "b" if outcome.fingerprint == prints["b"] else "a"
        assert_ran_on(outcome, ran_on, oracles[ran_on], prints[ran_on])
        if outcome.ended < to_b_sent or outcome.sent > to_a_acked:
            assert ran_on == "a", (outcome.sent, switches)
        elif to_b_acked < outcome.sent and outcome.ended < to_a_sent:
            assert ran_on == "b", (outcome.sent, switches)
        on_b += ran_on == "b"
    assert on_b >= 6
    listing = admin(server, "GET", "/admin/deployments").json()
    assert listing["aliases"] == {"chat": "a"} and listing["deployments"][0]["aliases"] == ["chat"]
    assert admin(server, "DELETE", "/admin/aliases/chat").json()["previous"] == "a"


def test_admin_errors_scale_to_zero_per_deployment_and_metrics(server, models):
    bad = admin(server, "POST", "/admin/deployments", json={"name": "x", "model": "/m", "max_num_seqs": 0})
    assert bad.status_code == 400 and "max_num_seqs must be at least 1" in bad.json()["error"]["message"]
    taken = admin(server, "POST", "/admin/deployments", json={"name": "a", "model": models["dirs"]["a"]})
    assert taken.status_code == 409 and "'a' already exists" in taken.json()["error"]["message"]
    missing = admin(server, "POST", "/admin/deployments", json={"name": "y", "model": "/m", "executor": "nope"})
    assert missing.status_code == 400 and "no executor named 'nope'" in missing.json()["error"]["message"]
    assert admin(server, "DELETE", "/admin/deployments/nope").status_code == 404
    assert admin(server, "POST", "/admin/aliases", json={"alias": "a", "deployment": "b"}).status_code == 409
    assert admin(server, "POST", "/admin/aliases", json={"alias": "z", "deployment": "nope"}).status_code == 404

    # Scale b to zero: a keeps its instance; b's next request starts one again.
    scaled = admin(server, "POST", "/admin/scale", json={"deployment": "b", "instances": 0})
    assert scaled.json() == {"deployment": "b", "target": 0}
    deadline = time.monotonic() + BOUND
    while server.metric("flowserve:num_instances", model_name="b", state="ready") != 0:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert server.metric("flowserve:num_instances", model_name="a", state="ready") == 1
    prompts, oracle_b = models["prompts"], models["oracles"]["b"]
    outcome = complete(server.url, "b", prompts[3], 3)
    assert_ran_on(outcome, "b", oracle_b, fingerprints(server)["b"])
    assert server.metric("flowserve:request_success_total", model_name="b", finished_reason="length") >= 1
    assert admin(server, "GET", "/admin/status").json()["deployment"] == "a"  # default: the first


def test_deployment_commands(server, models):
    def flowserve(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "flowserve_core.cli", *args, "--url", server.url],
                              capture_output=True, text=True, timeout=BOUND,
                              env={**os.environ, "COLUMNS": "200", "TERM": "dumb"})

    listed = flowserve("deployments")
    assert listed.returncode == 0 and "2 deployment(s)" in listed.stdout and "1 ready" in listed.stdout
    result = flowserve("deploy", "c", "--model", models["dirs"]["b"], "--dtype", "float32", "--device", "cpu",
                       "-o", "kv_cache_memory=16MiB", "-o", "max_model_len=256")
    assert result.returncode == 0 and "c: added" in result.stdout, result.stderr
    outcome = complete(server.url, "c", models["prompts"][1], 1)
    assert outcome.error is None and outcome.tokens == models["oracles"]["b"].tokens[1]
    alias = flowserve("alias", "chat", "c")
    assert alias.returncode == 0 and "chat -> c" in alias.stdout
    undeploy = flowserve("undeploy", "c")
    assert undeploy.returncode == 0 and "c: removed (aliases removed: chat)" in undeploy.stdout
    again = flowserve("undeploy", "c")
    assert again.returncode == 1 and "no deployment is named 'c'" in again.stderr
