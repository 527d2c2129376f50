"""Fixtures: a tiny random Llama with a tokenizer trained here, served by
``benchmarks/naive_server.py`` in a subprocess for the whole session."""

from __future__ import annotations

import os
import queue
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
NAIVE_SERVER = REPO / "benchmarks" / "naive_server.py"
WORDS = ("the quick brown fox jumps over lazy dog serving language models needs batching "
         "scheduling memory cache tokens prefill decode latency throughput request queue "
         "instance deployment plugin kernel engine stream answer question simple naive").split()


def build_tiny_llama(directory: Path) -> Path:
    """Save a 2-layer random Llama (hidden 64) and a byte-level BPE tokenizer (400 tokens,
    trained on a small generated corpus) into ``directory``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(400)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    tokenizer.save_pretrained(directory)

    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=eos, eos_token_id=eos)
    LlamaForCausalLM(config).save_pretrained(directory)
    GenerationConfig(bos_token_id=eos, eos_token_id=eos).save_pretrained(directory)
    return directory


class NaiveServerProcess:
    """``benchmarks/naive_server.py`` running in a subprocess on a free port."""

    def __init__(self, model_dir: Path, log_path: Path) -> None:
        self.model_dir = model_dir
        self.model = model_dir.name
        self.log_path = log_path
        self.log = open(log_path, "w")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.process = subprocess.Popen(
            [sys.executable, str(NAIVE_SERVER), "--model", str(model_dir), "--port", "0", "--dtype", "float32",
             "--device", "cpu"], stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.process.stdout], daemon=True).start()
        try:
            ready = lines.get(timeout=180)
        except queue.Empty:
            ready = ""
        if "ready at " not in ready:
            self.stop()
            raise RuntimeError(f"the naive server did not start: {ready!r}\n{log_path.read_text()[-3000:]}")
        self.url = ready.split("ready at ")[1].split()[0]  # http://127.0.0.1:PORT/v1

    def stop(self) -> None:
        """Terminate it (kill if it lingers)."""
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)
        self.log.close()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("bench") / "tiny-llama")


@pytest.fixture(scope="session")
def naive_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    server = NaiveServerProcess(tiny_model, tmp_path_factory.mktemp("naive-log") / "server.log")
    yield server
    server.stop()
