"""Shared fixtures: tiny random models of the common architectures, saved to a temp dir (nothing downloaded)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

import hfqat  # noqa: F401  (registers the quantizer)

VOCAB = 256


def tiny_config(arch: str):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    if arch == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if arch == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    raise ValueError(arch)


ARCHS = ("llama", "qwen2", "mistral", "gpt2")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """tiny_model_dir(arch) -> path of a saved tiny random float checkpoint of that architecture."""
    cache = {}

    def make(arch: str = "llama"):
        if arch not in cache:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(tiny_config(arch))
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            model.save_pretrained(path)
            cache[arch] = path
        return cache[arch]

    return make


@pytest.fixture
def input_ids():
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))


def text_dataset(n: int = 16, seq_len: int = 24, seed: int = 0):
    """A list of {"input_ids", "labels"} examples of random tokens, ready for Trainer."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, VOCAB, (n, seq_len), generator=g)
    return [{"input_ids": r, "labels": r.clone()} for r in rows]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is fastest and immune to CPU oversubscription (restored afterwards).

    Use per module with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


GLOO_TEARDOWN_ABORT = "terminate called without an active exception"


def run_two_processes(*args: str, env: dict[str, str] | None = None,
                      timeout: int = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 <args>`` on CPU, one thread per process; a non-zero exit fails
    the test with the end of the output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0 and GLOO_TEARDOWN_ABORT in proc.stderr:
        # Seen once in CI (a DDP run had finished training), not reproduced here in 20 runs: gloo aborted a process.
        # Repeated once, visibly; any other failure, or the same one twice, fails the test.
        warnings.warn(f"torchrun: {GLOO_TEARDOWN_ABORT!r}; running it again", stacklevel=2)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc
