"""``flowserve serve --scaler ray --ray-address …``: the plugin's flag reaches the scaler's options."""

from typer.testing import CliRunner

from flowserve_core.cli import build_cli
from flowserve_core.config import load_config
from flowserve_core.plugins import PluginManager
from flowserve_ray.cluster import read_options


def test_ray_address_is_a_serve_flag_that_sets_the_scalers_option(monkeypatch):
    configs = []
    monkeypatch.setattr("flowserve_core.cli.run_server_command",
                        lambda _pm, path, overrides: configs.append(load_config(path, overrides)))
    app = build_cli(PluginManager())
    result = CliRunner().invoke(app, ["serve", "--model", "/models/tiny", "--scaler", "ray",
                                      "--ray-address", "ray://head:10001", "--min-instances", "2",
                                      "--max-instances", "4"])
    assert result.exit_code == 0, result.output
    (spec,) = configs[0].deployments
    assert spec.scaler == "ray" and read_options(spec).ray_address == "ray://head:10001"
    assert "--ray-address VALUE" in CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}).output
