"""Configuration from TOML and flags: merged, validated, errors that name the key and type."""

import pytest

from flowserve_core.config import load_config
from flowserve_core.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "flowserve.toml"
    path.write_text(text)
    return path


def test_simple_file_and_flags(tmp_path):
    path = write(tmp_path, 'port = 9000\nmodel = "/models/tiny"\nexecutor = "counter"\n')
    config = load_config(path, {"tensor_parallel": 2, "host": None, "port": 9100})
    assert config.port == 9100 and config.host == "127.0.0.1"
    (spec,) = config.deployments
    assert spec.model == "/models/tiny" and spec.name == "tiny"
    assert spec.executor == "counter" and spec.tensor_parallel == 2


def test_several_deployments(tmp_path):
    path = write(tmp_path, '[[deployments]]\nname = "a"\nmodel = "/m/a"\n'
                           '[[deployments]]\nname = "b"\nmodel = "/m/b"\njob_scheduler = "pd-disaggregated"\n')
    config = load_config(path, {"kv_cache_memory": "2GiB"})
    assert [d.name for d in config.deployments] == ["a", "b"]
    assert all(d.kv_cache_memory == "2GiB" for d in config.deployments)
    assert config.deployments[1].job_scheduler == "pd-disaggregated"


@pytest.mark.parametrize("text, words", [
    ('model = "m"\ntensor_parallel = "two"\n',
     "Expected `int`, got `str` - at `deployments[0].tensor_parallel`"),
    ('port = "http"\n', "Expected `int`, got `str` - at `port`"),
    ('model = "m"\nexecuter = "spmd"\n', "unknown field `executer`"),
    ('[[deployments]]\nmodel = "m"\nmax_num_seqs = 0\n', "max_num_seqs must be at least 1"),
    ('model = "m"\ndtype = "float8"\n', "Invalid enum value 'float8' - at `deployments[0].dtype` (one of: auto, bfloat16, float16, float32)"),
    ("model = [\n", "is not valid TOML"),
])
def test_bad_config_names_the_key_and_the_expected_type(tmp_path, text, words):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert words in str(info.value), str(info.value)


def test_missing_file_and_duplicate_names(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    path = write(tmp_path, '[[deployments]]\nmodel = "/x/m"\n[[deployments]]\nmodel = "/y/m"\n')
    with pytest.raises(ConfigError, match="two deployments are named 'm'"):
        load_config(path)


def test_command_line_deployment_keys_are_kept_as_defaults_for_deployments_added_later():
    config = load_config(None, {"model": "/m/a", "device": "cpu", "kv_cache_memory": "64MiB", "port": 9000,
                                "options": {"step_delay": 0.1}})
    assert config.deployment_defaults == {"device": "cpu", "kv_cache_memory": "64MiB",
                                          "options": {"step_delay": 0.1}}
    assert config.port == 9000 and config.deployments[0].device == "cpu"
