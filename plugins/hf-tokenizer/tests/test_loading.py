"""Finding, loading and caching tokenizers; the plugin's registration; the GGUF header reader."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from flowserve_core.config import default_model_path
from flowserve_core.errors import ConfigError
from flowserve_core.interfaces import ChatMessage
from flowserve_core.types import DeploymentSpec
from flowserve_hf_tokenizer import loading
from flowserve_hf_tokenizer.gguf_metadata import GGUFFormatError, gguf_model_facts, read_gguf_scalars
from flowserve_hf_tokenizer.testing import build_llama_style_tokenizer, write_tiny_gguf
from flowserve_hf_tokenizer.tokenizer import build_hf_tokenizer


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWSERVE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def tiny_gguf(tmp_path):
    return write_tiny_gguf(tmp_path / "model" / "tiny.gguf", eot_token_id=0)


def test_the_plugin_registers_hf_without_importing_transformers(pm):
    component = pm.get("tokenizer", "hf")
    assert component.distribution == "flowserve-hf-tokenizer"
    probe = ("import sys, flowserve_hf_tokenizer.plugin\n"
             "print(' '.join(m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_a_gguf_tokenizer_is_built_once_then_loaded_from_the_cache(tiny_gguf, cache_dir, monkeypatch):
    first = build_hf_tokenizer(DeploymentSpec(model=str(tiny_gguf)))
    entry = loading.gguf_cache_dir(tiny_gguf)
    assert entry.parent.parent == cache_dir and (entry / loading.FACTS_FILE).is_file()
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # no staging directory left

    def no_conversion(gguf):
        raise AssertionError(f"{gguf} was converted again instead of read from the cache")

    monkeypatch.setattr(loading, "_convert_gguf_tokenizer", no_conversion)
    again = build_hf_tokenizer(DeploymentSpec(model=str(tiny_gguf)))
    assert again.hf_tokenizer.name_or_path == str(entry)
    for tokenizer in (first, again):
        assert tokenizer.eos_token_ids == [2, 0]  # EOS, then the GGUF's end-of-turn id
        assert tokenizer.max_model_len == 2048
        assert tokenizer.encode(" world") == [261, 262]
        assert tokenizer.decode(tokenizer.apply_chat_template([ChatMessage(role="user", content="hi")]),
                                skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_a_changed_gguf_file_gets_a_new_cache_entry(tiny_gguf, cache_dir):
    before = loading.gguf_cache_dir(tiny_gguf)
    os.utime(tiny_gguf, ns=(1, 1))
    assert loading.gguf_cache_dir(tiny_gguf) != before


def test_a_broken_cache_entry_is_rebuilt(tiny_gguf, cache_dir, caplog):
    build_hf_tokenizer(DeploymentSpec(model=str(tiny_gguf)))
    entry = loading.gguf_cache_dir(tiny_gguf)
    (entry / "tokenizer.json").write_text("{ not json")
    with caplog.at_level(logging.WARNING, logger="flowserve_hf_tokenizer.loading"):
        tokenizer = build_hf_tokenizer(DeploymentSpec(model=str(tiny_gguf)))
    assert "rebuilding a broken tokenizer cache" in caplog.text
    assert tokenizer.encode(" world") == [261, 262]
    assert build_hf_tokenizer(DeploymentSpec(model=str(tiny_gguf))).hf_tokenizer.name_or_path == str(entry)


def test_an_unwritable_cache_only_costs_speed(tiny_gguf, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("FLOWSERVE_CACHE_DIR", str(blocker))
    with caplog.at_level(logging.WARNING, logger="flowserve_hf_tokenizer.loading"):
        assert build_hf_tokenizer(DeploymentSpec(model=str(tiny_gguf))).encode(" world") == [261, 262]
    assert "cannot cache" in caplog.text


def test_a_directory_holding_one_gguf_file_loads_it(tiny_gguf, cache_dir):
    assert build_hf_tokenizer(DeploymentSpec(model=str(tiny_gguf.parent))).max_model_len == 2048


def missing_path(directory):
    return directory / "missing"


def weights_file(directory):
    (directory / "weights.bin").write_bytes(b"x")
    return directory / "weights.bin"


def empty_directory(directory):
    return directory


def two_ggufs(directory):
    for name in ("a.gguf", "b.gguf"):
        write_tiny_gguf(directory / name)
    return directory


@pytest.mark.parametrize("make, message", [
    (missing_path, "does not exist"),
    (weights_file, "not a .gguf file"),
    (empty_directory, "has no tokenizer: it has none of tokenizer.json"),
    (two_ggufs, r"several GGUF files \(a.gguf, b.gguf\); name one"),
])
def test_a_bad_model_path_is_named_in_the_error(tmp_path, cache_dir, make, message):
    model = str(make(tmp_path))
    with pytest.raises(ConfigError, match=message) as error:
        build_hf_tokenizer(DeploymentSpec(model=model))
    assert repr(model) in str(error.value)


def test_a_hub_id_that_is_not_downloaded_is_refused_offline_and_when_the_hub_is_unreachable(tmp_path):
    """HF_HUB_OFFLINE (the test session sets it) refuses at once; without it, a Hub that cannot be
    reached (here a closed port) refuses too; both name the id and the way out."""
    code = ("from flowserve_core.types import DeploymentSpec\n"
            "from flowserve_hf_tokenizer.tokenizer import build_hf_tokenizer\n"
            "try:\n    build_hf_tokenizer(DeploymentSpec(model='flowserve-tests/no-such-model'))\n"
            "except Exception as exc:\n    print(type(exc).__name__, exc)\n")
    base = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"} | {"HF_HOME": str(tmp_path / "hf")}
    for env, why in (({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
                     ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "the Hugging Face Hub cannot give it")):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                                env=base | env)
        assert result.stdout.startswith("ConfigError"), result.stdout + result.stderr
        assert "'flowserve-tests/no-such-model'" in result.stdout and why in result.stdout
        assert "hf download flowserve-tests/no-such-model" in result.stdout and "local path" in result.stdout


def test_a_model_directory_loads_with_its_configs(tmp_path):
    directory = build_llama_style_tokenizer(tmp_path / "m")
    facts = loading.directory_facts(directory)
    assert (facts.eos_token_ids, facts.context_length) == ([2, 5], 512)


def test_the_gguf_header_reader_finds_smollm2s_facts():
    metadata = read_gguf_scalars(default_model_path())
    assert metadata["general.architecture"] == "llama"
    assert gguf_model_facts(metadata) == ([2], 8192)
    assert "tokenizer.ggml.tokens" not in metadata  # arrays are skipped, not decoded


def test_the_gguf_header_reader_refuses_other_files(tmp_path, tiny_gguf):
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    with pytest.raises(GGUFFormatError, match="not a GGUF file"):
        read_gguf_scalars(not_gguf)
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(tiny_gguf.read_bytes()[:200])
    with pytest.raises(GGUFFormatError, match="truncated"):
        read_gguf_scalars(truncated)


def test_a_gguf_without_a_tokenizer_is_refused_with_its_path(tmp_path, cache_dir):
    import gguf

    path = tmp_path / "weights-only.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConfigError, match=f"cannot read a tokenizer from the GGUF file {path}"):
        build_hf_tokenizer(DeploymentSpec(model=str(path)))
