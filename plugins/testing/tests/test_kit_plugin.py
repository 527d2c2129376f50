"""flowserve-testing's own promises: ``flowserve_core.testing`` is this kit (each submodule
once), and the kit's plugin brings the scaler ``inproc`` and ``flowserve plugin new``."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from flowserve_core.cli import build_cli
from flowserve_core.plugins import PluginManager
from flowserve_test_fixtures import toy_spec
from flowserve_testing import plugin_manager, run_deployment
from flowserve_testing.inprocess import InprocScaler, LocalInstance


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_the_public_path_re_exports_the_kits_own_objects():
    import flowserve_core.testing
    import flowserve_testing.fixtures
    from flowserve_core.testing import ConformanceError, check_batch_scheduler
    from flowserve_core.testing.fixtures import tiny_engine

    assert sorted(flowserve_core.testing.__all__) == sorted(flowserve_testing.__all__)
    assert check_batch_scheduler is flowserve_testing.check_batch_scheduler
    assert ConformanceError is flowserve_testing.ConformanceError  # not a second copy of _suite
    assert tiny_engine is flowserve_testing.fixtures.tiny_engine
    assert flowserve_testing.fixtures.__spec__.name == "flowserve_testing.fixtures"


def test_a_suite_stays_a_function_when_its_module_is_imported_first():
    result = _run("import flowserve_testing.check_executor, flowserve_testing.check_tokenizer\n"
                  "from flowserve_core.testing import check_executor, check_tokenizer\n"
                  "from flowserve_testing.check_executor import GREEDY\n"
                  "print(type(check_executor).__name__, type(check_tokenizer).__name__)")
    assert result.returncode == 0 and result.stdout.split() == ["function", "function"], result.stderr


def test_without_the_kit_the_public_path_says_what_to_install():
    result = _run("import sys; sys.modules['flowserve_testing'] = None\nimport flowserve_core.testing")
    assert result.returncode == 1 and "pip install flowserve-testing" in result.stderr, result.stderr


def test_the_kits_managers_have_inproc_even_where_an_allow_or_block_list_leaves_it_out(monkeypatch):
    monkeypatch.setenv("FLOWSERVE_BLOCK_PLUGINS", "testing")
    assert "inproc" not in PluginManager().components("scaler")
    component = plugin_manager("flowserve-test-fixtures").get("scaler", "inproc")
    assert component.distribution == "flowserve-testing"
    assert isinstance(component.factory(toy_spec()), InprocScaler)


def test_plugin_new_comes_with_the_kit(pm):
    runner = CliRunner()
    with_kit = runner.invoke(build_cli(pm), ["plugin", "new", "--help"], env={"COLUMNS": "200"})
    assert with_kit.exit_code == 0 and "--kind" in with_kit.output, with_kit.output
    without = runner.invoke(build_cli(PluginManager(blocked=["testing"])), ["plugin", "new", "--help"])
    assert without.exit_code == 2 and "No such command 'plugin'" in without.output, without.output


@pytest.mark.anyio
async def test_inproc_serves_from_local_instances_in_this_process():
    async with run_deployment(toy_spec(), pm=plugin_manager("flowserve-test-fixtures"), timeout=30) as deployment:
        output = await deployment.generate([5, 6], max_tokens=3, ignore_eos=True)
        instances = list(deployment.deployment.pool.instances.values())
        assert isinstance(deployment.deployment.scaler, InprocScaler)
    assert output.output_token_ids == [7, 8, 9] and output.finish_reason == "length"
    assert instances and all(isinstance(i, LocalInstance) for i in instances)
