"""Tuning data and the shared training loop (CPU, stories260K, a few steps)."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prunetune.errors import PrunetuneError
from prunetune.paths import DEFAULT_MODEL, TINYSTORIES, data_dir
from prunetune.tuning.data import (
    IGNORE_INDEX, alpaca_prompt, collate, load_instruction_data, load_text_data, load_tuning_data,
)
from prunetune.tuning.methods.lora import LoRAMethod
from prunetune.tuning.methods.spp import SPPConfig, SPPMethod, spp_state_dict
from prunetune.tuning.trainer import TrainConfig, TuningMethod, train


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the test machine's cores are shared; one thread is much faster there
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def text_data(tok):
    return load_text_data(TINYSTORIES, tok, seq_len=32, eval_size=4, seed=0)


def load():
    return AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32)


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


# --- data --------------------------------------------------------------------------------------------

def test_alpaca_labels_mask_the_prompt_exactly(tok, tmp_path):
    recs = [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
            {"instruction": "Add the numbers.", "input": "2 and 3", "output": "Five."}]
    f = write_jsonl(tmp_path / "a.jsonl", recs)
    d = load_instruction_data(f, tok, cutoff_len=512, eval_size=0)
    assert len(d.train) == 2 and d.eval == [] and d.kind == "instruction"
    for rec, ex in zip(recs, d.train):
        prompt = alpaca_prompt(rec["instruction"], rec["input"])
        assert ("### Input:" in prompt) == bool(rec["input"])
        p_ids = tok(prompt)["input_ids"]
        r_ids = tok(rec["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert ex["input_ids"] == p_ids + r_ids
        assert ex["labels"] == [IGNORE_INDEX] * len(p_ids) + r_ids
        assert ex["input_ids"][-1] == tok.eos_token_id
    # truncation to cutoff_len keeps the mask aligned
    n_prompt = len(tok(alpaca_prompt(recs[0]["instruction"]))["input_ids"])
    d = load_instruction_data(f, tok, cutoff_len=n_prompt + 1, eval_size=0)
    ex = d.train[0]
    assert len(ex["input_ids"]) == n_prompt + 1 and ex["labels"][-1] != IGNORE_INDEX
    batch = collate(d.train, pad_id=0)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape


def test_real_alpaca_and_text_modes(tok):
    dd = data_dir()
    if dd is not None and (dd / "instruct" / "alpaca_14k.jsonl").is_file():
        d = load_tuning_data(dd / "instruct" / "alpaca_14k.jsonl", tok, seq_len=256, limit=40, eval_size=0.1)
        assert d.kind == "instruction" and len(d.train) + len(d.eval) + d.dropped == 40
        d2 = load_tuning_data(dd / "instruct" / "alpaca_14k.jsonl", tok, seq_len=256, limit=40, eval_size=0.1)
        assert d.fingerprint() == d2.fingerprint()
    t = load_text_data(TINYSTORIES, tok, seq_len=64, eval_size=0.1, seed=1)
    assert all(len(e["input_ids"]) == 64 and e["labels"] == e["input_ids"] for e in t.train + t.eval)
    t2 = load_text_data(TINYSTORIES, tok, seq_len=64, eval_size=0.1, seed=2)
    assert t.eval != t2.eval and len(t.eval) == len(t2.eval)


def test_bad_data_raises_one_liners(tok, tmp_path):
    with pytest.raises(PrunetuneError, match="not found"):
        load_instruction_data(tmp_path / "missing.jsonl", tok)
    f = write_jsonl(tmp_path / "b.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c"}])
    with pytest.raises(PrunetuneError, match=r"b\.jsonl' line 2 .*'output'") as e:
        load_instruction_data(f, tok)
    assert "\n" not in str(e.value)
    f = write_jsonl(tmp_path / "c.jsonl", [{"instruction": "a", "output": "b"}, "{not json"])
    with pytest.raises(PrunetuneError, match="line 2"):
        load_instruction_data(f, tok)
    f = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a long instruction " * 5, "output": "b"}])
    with pytest.raises(PrunetuneError, match="no usable example"):
        load_instruction_data(f, tok, cutoff_len=8)
    for bad in (0, -3):
        with pytest.raises(PrunetuneError, match="positive"):
            load_instruction_data(f, tok, cutoff_len=bad)
        with pytest.raises(PrunetuneError, match="positive"):
            load_text_data(TINYSTORIES, tok, seq_len=bad)
    f = write_jsonl(tmp_path / "e.jsonl", [{"text": "tiny"}])
    with pytest.raises(PrunetuneError, match="not enough"):
        load_text_data(f, tok, seq_len=512)
    with pytest.raises(PrunetuneError, match="'text'"):
        load_text_data(write_jsonl(tmp_path / "f.jsonl", [{"txt": "x"}]), tok)


# --- trainer -----------------------------------------------------------------------------------------

def cfg(**kw):
    base = dict(lr=1e-2, max_steps=6, batch_size=4, warmup=1, schedule="cosine", seed=3,
                eval_every=3, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def test_resume_is_bit_identical_and_refuses_other_runs(tok, text_data, tmp_path):
    method = lambda: SPPMethod(SPPConfig(dropout=0.05, on_dense="ignore"))  # noqa: E731
    full = train(load(), tok, method(), text_data, cfg(), tmp_path / "full")
    assert [h["step"] for h in full["history"]] == list(range(1, 7))
    assert "eval_loss" in full["history"][2] and full["eval_loss"] is not None
    ref = spp_state_dict(full["model"])

    part = train(load(), tok, method(), text_data, cfg(checkpoint_every=2, stop_at_step=3), tmp_path / "r")
    assert part["stopped"] and part["steps"] == 3
    ck = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir())
    assert ck == ["step-000002"]  # atomic: no temporary folder left behind
    with pytest.raises(PrunetuneError, match="different run"):
        train(load(), tok, method(), text_data, cfg(checkpoint_every=2, lr=2e-2), tmp_path / "r", resume=True)
    with pytest.raises(PrunetuneError, match="resume"):
        train(load(), tok, method(), text_data, cfg(checkpoint_every=2), tmp_path / "r", resume=False)
    res = train(load(), tok, method(), text_data, cfg(checkpoint_every=2), tmp_path / "r", resume=True)
    got = spp_state_dict(res["model"])
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    assert [h["loss"] for h in res["history"]] == [h["loss"] for h in full["history"]]
    assert (tmp_path / "r" / "adapters" / "spp_adapters.safetensors").is_file()


class Recorder(TuningMethod):
    """A minimal method: trains only the final norm and adds a tiny extra loss."""

    name = "recorder"

    def __init__(self):
        self.calls = []

    def prepare(self, model):
        for n, p in model.named_parameters():
            p.requires_grad_(n == "model.norm.weight")
        return model

    def on_step_begin(self, model, step, total_steps):
        self.calls.append(("begin", step, total_steps))

    def extra_loss(self, model, step, total_steps):
        reg = 1e-3 * (model.model.norm.weight - 1).square().sum()
        return reg, {"reg": reg.item()}

    def on_step_end(self, model, step, total_steps):
        self.calls.append(("end", step, total_steps))

    def save_adapters(self, model, directory):
        os.makedirs(directory, exist_ok=True)
        torch.save(model.model.norm.weight.detach().clone(), os.path.join(directory, "norm.pt"))

    def load_adapters(self, model, directory):
        model.model.norm.weight.data.copy_(torch.load(os.path.join(directory, "norm.pt")))


def test_custom_method_hooks_and_lora(tok, text_data, tmp_path):
    rec = Recorder()
    r = train(load(), tok, rec, text_data, cfg(max_steps=2, grad_accum=2, batch_size=2), tmp_path / "a")
    assert rec.calls == [("begin", 0, 2), ("end", 1, 2), ("begin", 1, 2), ("end", 2, 2)]
    assert all("reg" in h for h in r["history"])
    r = train(load(), tok, LoRAMethod(r=4), text_data, cfg(max_steps=3), tmp_path / "b")
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in r["history"])
    merged = LoRAMethod(r=4).export(r["model"], tmp_path / "export", tok)
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    x = torch.tensor([[1, 50, 7, 300, 12]])
    with torch.no_grad():
        assert torch.equal(back(x).logits, merged.eval()(x).logits)
        assert not torch.equal(back(x).logits, load()(x).logits)  # the LoRA update is in the export


_DDP_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from prunetune.paths import DEFAULT_MODEL, TINYSTORIES
    from prunetune.tuning.data import load_text_data
    from prunetune.tuning.methods.pat import PATConfig, PATMethod
    from prunetune.tuning.methods.spp import SPPConfig, SPPMethod
    from prunetune.tuning.trainer import TrainConfig, train
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    data = load_text_data(TINYSTORIES, tok, seq_len=32, eval_size=4, seed=0)
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32)
    batch = int(sys.argv[2])
    cfg = TrainConfig(lr=1e-2, max_steps=4, batch_size=batch, grad_accum=2, seed=3, eval_every=2,
                      progress=False, device="cpu")
    method = (SPPMethod(SPPConfig(dropout=0.0, on_dense="ignore")) if sys.argv[3] == "spp"
              else PATMethod(PATConfig(ratio=0.25, lora_r=4, lora_dropout=0.0, rotate=False, mask_init="zero")))
    r = train(model, tok, method, data, cfg, sys.argv[1])
    if r["world_size"] == 1 or torch.distributed.get_rank() == 0:
        keep = r["model"].prunetune_pat.mask.keep_indices().tolist() if sys.argv[3] == "pat" else None
        json.dump({"history": r["history"], "world": r["world_size"], "keep": keep}, open(sys.argv[1] + "/h.json", "w"))
""")


@pytest.mark.parametrize("method", ["spp", "pat"])
def test_two_processes_match_one(tmp_path, method):
    script = tmp_path / "ddp_run.py"
    script.write_text(_DDP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    # `accelerate launch --cpu` starts a single process unless mpirun is configured; torchrun sets the same
    # environment (RANK, WORLD_SIZE, MASTER_ADDR...) that Accelerator(cpu=True) turns into gloo DDP.
    with socket.socket() as sock:  # a free port: other test runs may share this machine
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    p = subprocess.run(launch + [str(script), str(tmp_path / "two"), "2", method], env=env, capture_output=True,
                       text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    p = subprocess.run([sys.executable, str(script), str(tmp_path / "one"), "4", method], env=env, capture_output=True,
                       text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "h.json").read_text())
    one = json.loads((tmp_path / "one" / "h.json").read_text())
    assert two["world"] == 2 and one["world"] == 1
    for a, b in zip(one["history"], two["history"]):
        assert a["step"] == b["step"]
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(a["loss"]), (a, b)
        if "eval_loss" in a:
            assert abs(a["eval_loss"] - b["eval_loss"]) <= 1e-4 * abs(a["eval_loss"])
    assert len(one["history"]) == len(two["history"]) == 4
    assert one["keep"] == two["keep"]  # PAT: the same channels survive


@pytest.mark.parametrize("family", ["gemma3_text", "phi3", "mixtral"])
def test_spp_and_lora_on_families_without_an_adapter_class(family, tok, text_data, tmp_path):
    """Families found from the module tree: SPP and LoRA train their linears (MoE: the attention linears; expert
    banks are 3-D tensors, pruned but not adapted), and the SPP merge computes what the adapted model does."""
    from conftest import float_tol, save_tiny

    src = save_tiny(family, tmp_path / "src")
    base = lambda: AutoModelForCausalLM.from_pretrained(src).eval()  # noqa: E731
    r = train(base(), tok, SPPMethod(SPPConfig(dropout=0.0, on_dense="ignore")), text_data,
              cfg(max_steps=2, eval_every=0), tmp_path / "spp")
    model = r["model"].eval()
    if family != "mixtral":  # its expert kernels (grouped matmul) have no float64: compare in float32 there
        model = model.double()
    x = torch.tensor([[1, 50, 7, 300, 12, 9]])
    with torch.no_grad():
        adapted = model(x).logits
        merged = SPPMethod().export(model, tmp_path / "spp-merged")(x).logits
    assert torch.allclose(merged, adapted, atol=float_tol(adapted), rtol=0)
    r = train(base(), tok, LoRAMethod(r=4), text_data, cfg(max_steps=2, eval_every=0), tmp_path / "lora")
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in r["history"])
