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


def float_tol(ref: torch.Tensor, ulps: int = 64) -> float:
    """Absolute tolerance for two computations of ``ref`` that may differ only by rounding (summation order,
    fused kernels): ``ulps`` units of round-off of its dtype at its largest magnitude (at least 1)."""
    return ulps * torch.finfo(ref.dtype).eps * max(1.0, float(ref.abs().max()))


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
    # families without an adapter class of their own: found from the module tree
    gqa = dict(intermediate_size=64, num_key_value_heads=2, max_position_embeddings=256, **common)
    if family == "gemma2":  # alternating sliding-window / global attention, sandwich norms, soft-capping
        return T.Gemma2Config(head_dim=8, sliding_window=16, **gqa)
    if family == "gemma3_text":  # per-layer-type rotary tables and masks, QK-norm
        return T.Gemma3TextConfig(head_dim=8, sliding_window=16, layer_types=["sliding_attention",
                                                                            "full_attention"], **gqa)
    if family == "phi3":  # fused qkv_proj and gate_up_proj
        return T.Phi3Config(pad_token_id=0, **gqa)
    if family == "olmo2":  # norms after attention and MLP
        return T.Olmo2Config(pad_token_id=0, **gqa)
    if family == "granite":
        return T.GraniteConfig(**gqa)
    if family == "mixtral":  # experts stored as 3-D tensors, a router
        return T.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **gqa)
    if family == "qwen3_moe":
        return T.Qwen3MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, head_dim=8,
                                decoder_sparse_step=1, mlp_only_layers=[], **gqa)
    raise KeyError(family)


FAMILIES = ["llama", "mistral", "qwen2", "opt", "gpt_neox", "mamba", "gemma2", "gemma3_text", "phi3", "olmo2",
            "granite", "mixtral", "qwen3_moe"]


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


def weights(d: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files in folder ``d`` (not its subfolders), by name."""
    from safetensors.torch import load_file

    sd = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


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
