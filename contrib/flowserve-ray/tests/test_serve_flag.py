"""``flowserve serve --scaler ray --ray-address …``: the plugin's flag reaches the scaler's options."""

import pytest
from typer.testing import CliRunner

from flowserve_core.cli import build_cli
from flowserve_core.config import load_config
from flowserve_core.errors import ConfigError
from flowserve_core.plugins import PluginManager
from flowserve_ray.cluster import read_options


def test_ray_address_is_a_serve_flag_that_sets_the_scalers_option(monkeypatch):
    configs = []
    monkeypatch.setattr("flowserve_core.cli.run_server_command",
                        lambda _pm, path, overrides: configs.append(load_config(path, overrides)))
    app = build_cli(PluginManager())
    result = CliRunner().invoke(app, ["serve", "--model", "/models/tiny", "--scaler", "ray",
                                      "--ray-address", "10.0.0.5:6379", "--min-instances", "2",
                                      "--max-instances", "4"])
    assert result.exit_code == 0, result.output
    (spec,) = configs[0].deployments
    assert spec.scaler == "ray" and read_options(spec).ray_address == "10.0.0.5:6379"
    assert "--ray-address VALUE" in CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}).output


def test_a_ray_client_address_is_refused_with_what_to_do_instead(monkeypatch):
    # Ray Client cannot stream actor calls; the engine actors stream their tokens.
    spec = load_config(None, {"model": "/models/tiny", "scaler": "ray",
                              "options": {"ray_address": "ray://head:10001"}}).deployments[0]
    with pytest.raises(ConfigError, match="Ray Client, which cannot stream actor calls.*--ray-address auto"):
        read_options(spec)
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    with pytest.raises(ConfigError, match="Ray Client"):
        read_options(load_config(None, {"model": "/models/tiny", "scaler": "ray"}).deployments[0])
