"""The plugin manager: entry points, name clashes, missing components, broken plugins."""

import importlib.metadata
import types
import warnings

import pytest

from flowserve_core import hookimpl
from flowserve_core.errors import ComponentNotFoundError, PluginError
from flowserve_core.plugins import PluginManager


def test_entry_point_plugins_are_found_with_their_distribution(pm):
    executor = pm.get("executor", "counter")
    assert executor.distribution == "flowserve-test-fixtures"
    assert executor.plugin == "test_fixtures"
    assert pm.get("scaler", "inproc").distribution == "flowserve-testing"


def test_the_kernel_has_no_scaler_of_its_own_and_a_missing_inproc_names_the_test_kit():
    bare = PluginManager(load_entrypoints=False)
    assert bare.components("scaler") == {}
    with pytest.raises(ComponentNotFoundError, match="no scaler named 'inproc'.* pip install flowserve-testing"):
        PluginManager(blocked=["testing"]).get("scaler", "inproc")


def test_missing_component_lists_installed_names_and_the_pip_command(pm):
    with pytest.raises(ComponentNotFoundError) as info:
        pm.get("frontend", "openai") if "openai" not in pm.components("frontend") else pm.get("frontend", "zzz")
    message = str(info.value)
    assert "Installed:" in message
    if "openai" not in pm.components("frontend"):
        assert "pip install flowserve-openai" in message
    with pytest.raises(ComponentNotFoundError, match=r"no executor named 'nope' is installed\. Installed: .*counter"):
        pm.get("executor", "nope")


def test_a_name_registered_twice_is_an_error_naming_both_distributions(pm):
    clash = types.SimpleNamespace(flowserve_register_executors=hookimpl(
        lambda register: register("counter", object)))
    pm.register(clash, name="clashing", distribution="flowserve-clash")
    with pytest.raises(PluginError, match="registered twice: by flowserve-test-fixtures .* and by flowserve-clash"):
        pm.components("executor")


def test_a_typo_in_a_hook_name_is_refused(pm):
    typo = types.SimpleNamespace(flowserve_register_executor=hookimpl(lambda register: None))
    with pytest.raises(PluginError, match="flowserve_register_executor"):
        pm.register(typo, name="typo")
    assert pm.pm.get_plugin("typo") is None


def _broken_entry_point(monkeypatch):
    broken = importlib.metadata.EntryPoint(name="broken", value="flowserve_no_such_module", group="flowserve")
    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group: [*real(group=group), broken])


def test_a_broken_plugin_is_reported_not_fatal(monkeypatch):
    _broken_entry_point(monkeypatch)
    pm = PluginManager(strict=False)
    assert pm.get("executor", "counter")
    failed = [r for r in pm.records if r.error]
    assert failed and failed[0].name == "broken" and "flowserve_no_such_module" in failed[0].error
    with pytest.raises(ComponentNotFoundError, match="Plugins that failed to load: broken"):
        pm.get("executor", "missing")


def test_strict_mode_makes_a_broken_plugin_fatal(monkeypatch):
    _broken_entry_point(monkeypatch)
    monkeypatch.setenv("FLOWSERVE_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="plugin 'broken' .* failed to load"):
        PluginManager()


def test_allow_list_and_block_list(monkeypatch):
    monkeypatch.setenv("FLOWSERVE_LOAD_PLUGINS", "")
    assert "counter" not in PluginManager().components("executor")
    monkeypatch.setenv("FLOWSERVE_LOAD_PLUGINS", "test_fixtures")
    assert "counter" in PluginManager().components("executor")
    monkeypatch.delenv("FLOWSERVE_LOAD_PLUGINS")
    assert "counter" not in PluginManager(blocked=["test_fixtures"]).components("executor")
    monkeypatch.setenv("FLOWSERVE_BLOCK_PLUGINS", "flowserve-test-fixtures")
    assert "counter" not in PluginManager().components("executor")


def test_register_and_unregister_a_small_plugin(pm):
    plugin = types.SimpleNamespace(flowserve_register_executors=hookimpl(
        lambda register: register("mine", dict)))
    pm.register(plugin, name="mine")
    assert pm.build("executor", "mine", ) == {}
    pm.unregister("mine")
    assert "mine" not in pm.components("executor")


def test_a_scheduler_factory_of_the_older_signature_still_builds_with_a_deprecation_warning():
    """``kv_transports`` joined the batch and job scheduler factories; one written before keeps
    working for a minor version, and says what to change."""
    from flowserve_core.types import DeploymentSpec

    built: list[tuple] = []

    def old_batch_scheduler(spec, kv_cache):
        built.append((spec, kv_cache))
        return "old"

    def new_job_scheduler(spec, kv_transports):
        built.append((spec, kv_transports))
        return "new"

    pm = PluginManager(load_entrypoints=False)
    pm.register(types.SimpleNamespace(
        flowserve_register_batch_schedulers=hookimpl(lambda register: register("old", old_batch_scheduler)),
        flowserve_register_job_schedulers=hookimpl(lambda register: register("new", new_job_scheduler))),
        name="factories")
    spec = DeploymentSpec()
    with pytest.warns(DeprecationWarning, match="its factory takes no 'kv_transports'"):
        assert pm.build("batch_scheduler", "old", spec, "kv", pm.kv_transports(spec)) == "old"
    assert built[-1] == (spec, "kv")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pm.build("job_scheduler", "new", spec, "transports") == "new"
    assert built[-1] == (spec, "transports")
