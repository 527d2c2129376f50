"""Issue 20, item 7: a model file that is not a GGUF file, or a GGUF header that claims 2^63
tensors, is the client's (or operator's) error: ``POST /admin/deployments`` answers 400 with
the reason (it answered 500 ``deployment_failed``) and ``flowserve serve`` exits 1 with it."""

from __future__ import annotations

import re
import struct
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from openai_live import MODEL

HF = {"tokenizer": "hf"}
SPMD = {"tokenizer": "hf", "executor": "spmd", "kv_cache": "paged", "batch_scheduler": "continuous",
        "job_scheduler": "colocated", "scaler": "static", "device": "cpu", "dtype": "float32"}


def _string(text: str) -> bytes:
    return struct.pack("<Q", len(text.encode())) + text.encode()


def forged_gguf(path: Path) -> Path:
    """A GGUF header of a small Llama, with a tokenizer, whose tensor count says 2^63."""
    keys = [("general.architecture", 8, _string("llama"))]
    keys += [(f"llama.{k}", 4, struct.pack("<I", v)) for k, v in (
        ("context_length", 2048), ("embedding_length", 64), ("block_count", 2), ("feed_forward_length", 128),
        ("attention.head_count", 4), ("attention.head_count_kv", 2), ("vocab_size", 3))]
    keys += [("tokenizer.ggml.model", 8, _string("gpt2")),
             ("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 3) + b"".join(map(_string, ("a", "b", "c"))))]
    header = b"GGUF" + struct.pack("<IQQ", 3, 2**63, len(keys))
    path.write_bytes(header + b"".join(_string(k) + struct.pack("<I", t) + v for k, t, v in keys) + bytes(256))
    return path


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    root = tmp_path_factory.mktemp("bad-models")
    text = root / "notes.gguf"
    text.write_text("These are my notes, not a model.\n" * 20)
    empty = root / "empty.gguf"
    empty.write_bytes(b"")
    return {"text": (text, "is not a GGUF file"), "empty": (empty, "not a GGUF file|cannot mmap an empty file"),
            "2^63 tensors": (forged_gguf(root / "forged.gguf"), f"claims {2**63} tensors")}


@pytest.mark.parametrize("components", [HF, SPMD], ids=["hf-tokenizer", "spmd-executor"])
@pytest.mark.parametrize("kind", ["text", "empty", "2^63 tensors"])
def test_a_file_that_is_not_a_model_is_a_400_with_the_reason(toy_server, bad_files, kind, components):
    path, reason = bad_files[kind]
    r = httpx.post(toy_server.url + "/admin/deployments", timeout=120,
                   json={"name": "bad-model", "model": str(path), **components})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert re.search(reason, error["message"]) and str(path) in error["message"], error
    names = [d["name"] for d in httpx.get(toy_server.url + "/admin/deployments", timeout=10).json()["deployments"]]
    assert names == [MODEL]


@pytest.mark.parametrize("kind", ["text", "2^63 tensors"])
def test_serve_exits_with_the_reason(bad_files, kind):
    path, reason = bad_files[kind]
    done = subprocess.run([sys.executable, "-m", "flowserve_core.cli", "serve", "--host", "127.0.0.1", "--port", "0",
                           "--model", str(path), "--device", "cpu"], capture_output=True, text=True, timeout=180)
    message = " ".join(done.stderr.split())  # rich wraps the line
    assert done.returncode == 1, message[-3000:]
    assert message.startswith("error:") or "\nerror:" in done.stderr, message[-3000:]
    assert re.search(reason, message) and "Traceback" not in done.stderr, message[-3000:]
