"""Shared fixtures: tiny random configs of every supported family, the bundled stories260K, a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prunetune.paths import DEFAULT_MODEL, data_dir

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def tiny_config(family: str):
    import transformers as T

    common = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    if family == "llama":
        return T.LlamaConfig(intermediate_size=64, num_key_value_heads=2, tie_word_embeddings=True,
                             max_position_embeddings=256, **common)
    if family == "mistral":
        return T.MistralConfig(intermediate_size=64, num_key_value_heads=2, max_position_embeddings=256, **common)
    if family == "qwen2":
        return T.Qwen2Config(intermediate_size=64, num_key_value_heads=2, max_position_embeddings=256, **common)
    if family == "opt":
        return T.OPTConfig(ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=256, **common)
    if family == "gpt_neox":
        return T.GPTNeoXConfig(intermediate_size=64, max_position_embeddings=256, **common)
    if family == "mamba":
        return T.MambaConfig(vocab_size=128, hidden_size=32, state_size=4, num_hidden_layers=2, expand=2)
    raise KeyError(family)


FAMILIES = ["llama", "mistral", "qwen2", "opt", "gpt_neox", "mamba"]


def tiny_model(family: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family)).eval()


@pytest.fixture
def stories_dir() -> Path:
    return DEFAULT_MODEL


@pytest.fixture
def shared_data() -> Path:
    d = data_dir()
    if d is None:
        pytest.skip("no local data folder (set PRUNETUNE_DATA)")
    return d


def save_tiny(family: str, path: Path, seed: int = 0) -> Path:
    """A tiny random model saved with the stories260K tokenizer when the vocab fits, else a byte-level one."""
    from transformers import AutoTokenizer

    model = tiny_model(family, seed)
    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    if model.config.vocab_size < len(tok):
        model.resize_token_embeddings(len(tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


#: run by ``run_cli(kill_at=...)``: the CLI in a process that SIGKILLs itself at a known point, put there by
#: patching the module function called at that point (no test hook in the shipped code)
_KILLER = """
import os, signal, sys
kind, k = sys.argv[1], int(sys.argv[2])
if kind == "layer":  # just before pruning decoder layer k (layers < k are finished and saved)
    import prunetune.pruning.sequential as target
    orig = target.prune_layer
    def patched(layer, i, *a, **kw):
        if i == k:
            os.kill(os.getpid(), signal.SIGKILL)
        return orig(layer, i, *a, **kw)
    target.prune_layer = patched
else:  # just before optimiser step k (steps < k are done; the checkpoint at k, if one is due, is written)
    import prunetune.tuning.trainer as target
    orig = target._Runner.global_batch
    def patched(self, step):
        if step == k:
            os.kill(os.getpid(), signal.SIGKILL)
        return orig(self, step)
    target._Runner.global_batch = patched
from prunetune.cli import main
sys.exit(main(sys.argv[3:]))
"""


def run_cli(*args, cwd=None, env=None, timeout=600, kill_at=None):
    """Run ``python -m prunetune ARGS``; returns CompletedProcess with text output. ``kill_at=("layer", k)``
    or ``("step", k)``: the process kills itself with SIGKILL just before pruning layer k / optimiser step k."""
    e = dict(os.environ)
    e.update(env or {})
    e.setdefault("PYTHONUNBUFFERED", "1")
    cmd = [sys.executable, "-m", "prunetune"] if kill_at is None else \
        [sys.executable, "-c", _KILLER, kill_at[0], str(kill_at[1])]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=e, timeout=timeout)


def assert_clean_error(proc, *needles):
    """One clear line, non-zero exit, no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    err_lines = [l for l in proc.stderr.splitlines() if "error:" in l]
    assert len(err_lines) == 1, proc.stderr
    for n in needles:
        assert n.lower() in err_lines[0].lower(), err_lines[0]
    return err_lines[0]
