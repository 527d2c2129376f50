"""Issue 20, item 6: deployment and alias names are 1 to 128 characters of A-Za-z0-9._:/- —
anything else is a 400 from the admin API and a clear error (exit 1) from ``flowserve serve``.
A 100,000-character name could not be deleted and a NUL went raw into a Prometheus label."""

from __future__ import annotations

import subprocess

import httpx
import pytest
from openai_live import MODEL, write_config

BAD_NAMES = ["", "with space", "nul\x00name", "rtl\u202eevil", "x" * 129, "x" * 100_000, "é", "a\nb", "semi;colon"]
GOOD_NAMES = ["a", "Org/Model-1.5:q4_k_m", "x" * 128]


@pytest.mark.parametrize("name", BAD_NAMES, ids=lambda n: repr(n[:12]) + f"[{len(n)}]")
def test_a_bad_deployment_name_is_a_400(toy_server, name):
    r = httpx.post(toy_server.url + "/admin/deployments", json={"name": name, "model": "toy"}, timeout=60)
    assert r.status_code == 400, r.text[:300]
    error = r.json()["error"]
    assert error["param"] == "name" and error["code"] in ("invalid_value", "missing_field")
    assert len(r.content) < 2000  # the message names the rule, not 100,000 characters
    names = [d["name"] for d in httpx.get(toy_server.url + "/admin/deployments", timeout=10).json()["deployments"]]
    assert names == [MODEL]


@pytest.mark.parametrize("name", BAD_NAMES[1:], ids=lambda n: repr(n[:12]) + f"[{len(n)}]")
def test_a_bad_alias_is_a_400(toy_server, name):
    r = httpx.post(toy_server.url + "/admin/aliases", json={"alias": name, "deployment": MODEL}, timeout=10)
    assert r.status_code == 400, r.text[:300]
    assert r.json()["error"]["param"] == "alias"
    if len(name) <= 256:  # longer ones are refused while decoding the body (AliasRequest)
        assert "1 to 128 characters" in r.json()["error"]["message"]
    assert httpx.get(toy_server.url + "/admin/deployments", timeout=10).json()["aliases"] == {}


def test_good_names_work_end_to_end(toy_server):
    name = GOOD_NAMES[1]
    r = httpx.post(toy_server.url + "/admin/deployments", json={"name": name, "model": "toy-2"}, timeout=60)
    assert r.status_code == 201, r.text
    try:
        for alias in (GOOD_NAMES[0], GOOD_NAMES[2]):
            r = httpx.post(toy_server.url + "/admin/aliases", json={"alias": alias, "deployment": name}, timeout=10)
            assert r.status_code == 200, r.text
            answer = toy_server.client().completions.create(model=alias, prompt="t1 t2", max_tokens=2)
            assert answer.choices[0].text
            assert httpx.delete(toy_server.url + f"/admin/aliases/{alias}", timeout=10).status_code == 200
    finally:
        r = httpx.delete(toy_server.url + f"/admin/deployments/{name}", timeout=60)
    assert r.status_code == 200, r.text


def test_serve_refuses_a_bad_name_before_starting_anything(serve_command, tmp_path):
    command = serve_command()
    command[command.index("--served-model-name") + 1] = "my model"
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    message = " ".join(done.stderr.split())  # rich wraps the line
    assert done.returncode == 1
    assert "deployment 'my model'" in message and "1 to 128 characters" in message, message[-2000:]
    assert "--served-model-name" in message
    config = write_config(tmp_path, '[aliases]\n"chat\\u0000" = "toy"\n')
    done = subprocess.run([*serve_command(), "--config", config], capture_output=True, text=True, timeout=120)
    message = " ".join(done.stderr.split())
    assert done.returncode == 1 and "alias 'chat\\x00'" in message, message[-2000:]
