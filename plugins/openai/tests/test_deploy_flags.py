"""``flowserve deploy``'s flags are made from ``DeploymentSpec``, like ``flowserve serve``'s."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import httpx
import msgspec

from flowserve_core.cli import OLD_SPELLINGS, field_flag
from flowserve_core.types import DeploymentSpec


def flowserve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flowserve_core.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "300", "TERM": "dumb"})


def has_flag(help_text: str, flag: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text) is not None


def test_deploy_has_a_flag_for_every_deployment_field():
    """Drift check: ``deploy`` and ``serve`` cannot disagree about DeploymentSpec again."""
    help_text = flowserve("deploy", "--help").stdout
    for field in msgspec.structs.fields(DeploymentSpec):
        if field.name not in ("name", "options"):  # NAME is the argument; options are -o KEY=VALUE
            assert has_flag(help_text, field_flag(field.name)), field.name
    assert has_flag(help_text, "-tp") and has_flag(help_text, "--tensor-parallel-size")
    assert not any(has_flag(help_text, old) for old in OLD_SPELLINGS.values())


def test_deploy_sends_the_generated_flags(start_server, serve_command):
    server = start_server(serve_command())
    result = flowserve("deploy", "second", "--model", "toy", "--url", server.url, "--dtype", "float32",
                       "--tensor-parallel-size", "1", "--max-instances", "2", "--slo-ttft-seconds", "5",
                       "--tokenizer", "whitespace")
    assert result.returncode == 0 and "second: added" in result.stdout, result.stderr
    assert "--tokenizer is now --tokenizer-plugin" in result.stderr
    listed = httpx.get(server.url + "/admin/deployments", timeout=30).json()["deployments"]
    second = next(d for d in listed if d["name"] == "second")
    assert (second["dtype"], second["max_instances"], second["slo_ttft_seconds"]) == ("float32", 2, 5.0)
    refused = flowserve("deploy", "third", "--model", "toy", "--url", server.url, "-tp", "0")
    assert refused.returncode == 1 and "tensor_parallel must be at least 1" in refused.stderr
