"""`prunetune tune` / `prunetune merge` end to end (stories260K on CPU, a few steps each).

Real subprocesses for what needs a process (the end-to-end runs, SIGKILL + --resume); the bad-input cases
call the same ``cli.main`` in-process (each one is parsed, run and reported exactly as on the command line;
two of them also through a subprocess), which keeps the file fast on a shared machine.
"""

import json
import subprocess

import pytest
import torch

from conftest import assert_clean_error, run_cli, save_tiny, weights
from prunetune import cli
from prunetune.errors import PrunetuneError
from prunetune.paths import DEFAULT_MODEL

ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
#: the shared Alpaca file; the Alpaca template alone is ~100 stories260K tokens, so 192 leaves room for a response
COMMON = ["--data", "alpaca", "--max-records", "48", "--seq-len", "192", "--batch-size", "4", "--eval-size", "8",
          "--checkpoint-every", "2", "--no-progress"]
SPP_ARGS = ["--method", "spp", "--max-steps", "5", "--merge", *COMMON]
PAT_ARGS = ["--method", "pat", "--ratio", "0.25", "--max-steps", "5", "--lr", "1e-3", *COMMON]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def alpaca():
    from prunetune.tuning.data import resolve_data

    try:
        return resolve_data("alpaca")
    except PrunetuneError:
        pytest.skip("no local data folder with instruct/alpaca_14k.jsonl (set PRUNETUNE_DATA)")


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    from prunetune.api import prune

    d = tmp_path_factory.mktemp("pruned") / "stories-2of4"
    prune(DEFAULT_MODEL, method="wanda", sparsity="2:4", out=d, calib="tinystories", nsamples=4, seqlen=64,
          device="cpu", progress=False)
    return d


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def in_process(*args):
    """``prunetune ARGS`` through ``cli.main`` in this process; a CompletedProcess for assert_clean_error."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main([str(a) for a in args])
    return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())


def leftovers(parent, name):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}") or p.name == name)


# --- end to end -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def spp_run(pruned, runs, alpaca):
    out = runs / "spp"
    p = run_cli("tune", "--model", pruned, *SPP_ARGS, "--out", out, env=ENV)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "zero pattern identical: yes" in p.stdout
    return out


def test_spp_tune_merges_to_the_same_zero_pattern(spp_run, pruned):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.float32).state_dict()
    merged_model = AutoModelForCausalLM.from_pretrained(spp_run, dtype=torch.float32)
    merged = merged_model.state_dict()
    assert base.keys() == merged.keys()
    changed = 0
    for k, w in base.items():
        assert torch.equal(merged[k] == 0, w == 0), k
        changed += int(not torch.equal(merged[k], w))
    assert changed > 0  # training did something
    q = merged["model.layers.0.self_attn.q_proj.weight"]
    assert (q == 0).float().mean().item() == pytest.approx(0.5)
    rep = json.loads((spp_run / "tune_report.json").read_text())
    assert rep["method"] == "spp" and rep["steps"] == 5 and rep["global_batch"] == 4 and rep["seq_len"] == 192
    assert rep["zero_pattern_check"]["identical"] and rep["zero_pattern_check"]["tensors_checked"] > 0
    assert rep["sparsity"]["before"] == rep["sparsity"]["after_merge"] == pytest.approx(0.5)
    assert rep["data"]["records"] == 48 and len(rep["data"]["sha256"]) == 64 and rep["data"]["eval_examples"] == 8
    assert rep["model"]["weights_sha256"] and rep["final_eval_loss"] is not None and len(rep["history"]) == 5
    for key in ("versions", "wall_time_s", "peak_rss_mb", "started"):
        assert key in rep["manifest"]
    assert (spp_run / "adapters" / "prunetune_adapter.json").is_file()
    assert leftovers(spp_run.parent, "spp") == ["spp"]  # no working folder left


def test_merge_command_gives_the_tune_merge_weights(spp_run, runs):
    out = runs / "spp-merged"
    p = in_process("merge", spp_run, "--out", out, "--device", "cpu")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "zero pattern identical: yes" in p.stdout
    assert_same_weights(spp_run, out)
    rep = json.loads((out / "merge_report.json").read_text())
    assert rep["zero_pattern_check"]["identical"] and rep["method"] == "spp"
    # the wrong method for these adapters, and an existing output, are refused
    assert_clean_error(in_process("merge", spp_run, "--out", runs / "x", "--method", "pat"), "trained with 'spp'")
    assert_clean_error(in_process("merge", spp_run, "--out", out), "already exists")


def test_spp_sigkill_then_resume_is_bit_identical(spp_run, pruned, runs):
    out = runs / "spp-killed"
    p = run_cli("tune", "--model", pruned, *SPP_ARGS, "--out", out, env=ENV, kill_at=("step", 3))
    assert p.returncode == -9, p.stderr[-3000:]
    partial = runs / ".spp-killed.partial"
    assert not out.exists() and (partial / "train" / "checkpoints" / "step-000002").is_dir()
    # a resume with other settings is refused and leaves the interrupted run intact
    e = in_process("tune", "--model", pruned, *SPP_ARGS, "--lr", "1e-2", "--out", out, "--resume")
    assert_clean_error(e, "cannot resume", "different run")
    assert not out.exists() and (partial / "train" / "checkpoints" / "step-000002").is_dir()
    p = run_cli("tune", "--model", pruned, *SPP_ARGS, "--out", out, "--resume", env=ENV)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from step 2" in p.stdout
    assert_same_weights(spp_run, out)
    assert_same_weights(spp_run / "adapters", out / "adapters")
    a = json.loads((spp_run / "tune_report.json").read_text())
    b = json.loads((out / "tune_report.json").read_text())
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    assert b["resumed_from_step"] == 2 and not partial.exists()


@pytest.fixture(scope="module")
def pat_run(runs, alpaca):
    out = runs / "pat"
    p = run_cli("tune", *PAT_ARGS, "--out", out, env=ENV)  # the bundled stories260K
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_pat_writes_a_smaller_plain_checkpoint(pat_run, runs):
    from transformers import AutoModelForCausalLM

    from prunetune.api import merge

    m = AutoModelForCausalLM.from_pretrained(pat_run)
    assert m.config.hidden_size == 48 and m.model.embed_tokens.weight.shape == (512, 48)
    with torch.no_grad():
        logits = m(torch.tensor([[1, 5, 9, 13]])).logits
    assert torch.isfinite(logits).all()
    rep = json.loads((pat_run / "tune_report.json").read_text())
    assert rep["pat"]["hidden_size_before"] == 64 and rep["pat"]["hidden_size"] == 48
    assert len(rep["pat"]["kept_channels"]) == 48 and rep["steps"] == 5
    # the defaults: trained on the rotated model, mask warm-started on the first training examples
    assert rep["method_config"]["rotate"] is True and rep["method_config"]["mask_init"] == "activation"
    assert rep["pat"]["rotated"] and rep["setup"]["rotation"]["tokens"] > 0
    # merge --method pat of the adapters gives the same shrunk weights
    res = merge(pat_run, out=runs / "pat-merged", method="pat", device="cpu")
    assert res["pat"]["kept_channels"] == rep["pat"]["kept_channels"]
    assert_same_weights(pat_run, runs / "pat-merged")


def test_pat_sigkill_then_resume_is_bit_identical(pat_run, runs):
    out = runs / "pat-killed"
    p = run_cli("tune", *PAT_ARGS, "--out", out, env=ENV, kill_at=("step", 3))
    assert p.returncode == -9, p.stderr[-3000:]
    assert not out.exists()
    p = run_cli("tune", *PAT_ARGS, "--out", out, "--resume", env=ENV)
    assert p.returncode == 0, p.stderr[-3000:]
    assert_same_weights(pat_run, out)
    assert_same_weights(pat_run / "adapters", out / "adapters")


def test_lora_masked_keeps_the_pattern_and_plain_lora_merge_does_not(pruned, tmp_path, alpaca):
    from prunetune.api import merge, tune

    rep = tune(pruned, method="lora-masked", data="alpaca", out=tmp_path / "lm", seq_len=192, max_records=24,
               batch_size=4, max_steps=2, lr=1e-2, eval_size=0, merge=True, device="cpu", progress=False)
    assert rep["zero_pattern_check"]["identical"] and rep["sparsity"]["after_merge"] == pytest.approx(0.5)
    plain = merge(tmp_path / "lm", out=tmp_path / "plain", method="lora", device="cpu")
    assert not plain["zero_pattern_check"]["identical"] and plain["sparsity"]["after_merge"] < 0.5


def test_dense_model_warns_for_spp(tmp_path, alpaca, caplog):
    from prunetune.api import tune

    with caplog.at_level("WARNING", logger="prunetune"):
        rep = tune(DEFAULT_MODEL, method="spp", data="alpaca", out=tmp_path / "d", seq_len=192, max_records=12,
                   batch_size=4, max_steps=1, eval_size=0, device="cpu", progress=False)
    assert any("dense model" in r.getMessage() for r in caplog.records)
    assert rep["warnings"] and "dense" in rep["warnings"][0]
    assert (tmp_path / "d" / "adapters" / "spp_adapters.safetensors").is_file()
    assert not (tmp_path / "d" / "config.json").exists()  # no --merge: adapters only
    with pytest.raises(PrunetuneError, match="dense model"):
        tune(DEFAULT_MODEL, method="spp", data="alpaca", out=tmp_path / "e", seq_len=192, max_records=12,
             max_steps=1, on_dense="error", device="cpu", progress=False)
    assert not (tmp_path / "e").exists() and not (tmp_path / ".e.partial").exists()


# --- bad input: one line, non-zero exit, nothing written --------------------------------------------------

def test_help_lists_tune_and_merge():
    top = in_process_help()
    assert "tune" in top and "merge" in top
    h = in_process_help("tune")
    for needle in ("spp", "lora-masked", "pat", "--resume", "dense", "--ratio", "--merge"):
        assert needle in h, needle
    assert "--method" in in_process_help("merge")


def in_process_help(*cmd):
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as e:
        cli.main([*cmd, "--help"])
    assert e.value.code == 0
    return buf.getvalue()


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_bad_inputs_are_one_clear_line(tmp_path, alpaca):
    out = tmp_path / "o"
    base = ["tune", "--data", "alpaca", "--seq-len", "192", "--max-records", "8", "--max-steps", "1",
            "--no-progress", "--out", out]

    # two through a real process: exit status and stderr as a user sees them
    p = run_cli(*base, "--method", "sparse-magic", env=ENV)
    assert p.returncode == 2
    assert_clean_error(p, "unknown tuning method", "sparse-magic")
    (tmp_path / "exists").mkdir()
    p = run_cli("tune", "--method", "spp", "--data", "alpaca", "--out", tmp_path / "exists", env=ENV)
    assert_clean_error(p, "already exists", "--overwrite")

    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"question": "q", "answer": "a"}])
    long = write_jsonl(tmp_path / "long.jsonl", [{"instruction": "word " * 200, "input": "", "output": "x"}] * 3)
    opt = save_tiny("opt", tmp_path / "tiny-opt")
    cases = [
        (["--method", "spp", "--data", tmp_path / "missing.jsonl"], ("data file not found", "missing.jsonl")),
        (["--method", "spp", "--data", wrong], ("alpaca fields", "question")),
        (["--method", "spp", "--data", long], ("no usable example",)),
        (["--method", "spp", "--seq-len", "0"], ("seq-len", "positive")),
        (["--method", "pat", "--ratio", "1.5"], ("ratio", "between 0 and 1")),
        (["--method", "pat", "--ratio", "0"], ("ratio", "between 0 and 1")),
        (["--method", "pat", "--ratio", "0.9"], ("keeps 6 of 64", "num_attention_heads")),
        (["--method", "pat", "--model", opt], ("rmsnorm",)),
        (["--method", "pat", "--no-rotate", "--mask-init", "zero", "--mask-init-data", "tinystories"],
         ("--calib is not used by pat",)),
        (["--method", "spp", "--resume"], ("nothing to resume",)),
    ]
    for extra, needles in cases:
        # later flags win, so each case overrides the base settings it needs
        e = in_process(*base, *extra)
        assert e.returncode == 2, (extra, e.stderr)
        assert_clean_error(e, *needles)
        assert leftovers(tmp_path, "o") == [], (extra, leftovers(tmp_path, "o"))
    assert_clean_error(in_process("merge", tmp_path / "exists", "--out", out), "no prunetune adapters")


def test_pat_warm_started_mask_tunes_merges_and_starts_from_the_top_channels(runs, alpaca):
    """--mask-init activation: the W_M of the run starts live on exactly the n_keep most energetic channels;
    the export is the same plain smaller model as with the zero init, and merge reproduces it."""
    from prunetune.api import merge

    out = runs / "pat-warm"
    p = run_cli("tune", *PAT_ARGS, "--no-rotate", "--mask-init", "activation", "--out", out, env=ENV)
    assert p.returncode == 0, p.stderr[-3000:]
    rep = json.loads((out / "tune_report.json").read_text())
    assert rep["method_config"]["mask_init"] == "activation"
    assert rep["pat"]["hidden_size"] == 48 and rep["setup"]["mask_init"]["calibration"]["examples"] > 0
    assert rep["history"][0]["l_active"] == 0.0  # exactly n_keep channels start live
    res = merge(out, out=runs / "pat-warm-merged", method="pat", device="cpu")
    assert res["pat"]["kept_channels"] == rep["pat"]["kept_channels"]
    assert_same_weights(out, runs / "pat-warm-merged")
    assert_clean_error(run_cli("tune", *PAT_ARGS, "--mask-init", "activation", "--frozen-mask", "--out",
                               runs / "x", env=ENV), "frozen mask")


def test_pat_warm_start_on_a_corpus_starts_from_the_channel_pruning_baseline(runs, alpaca):
    """--mask-init-data scores channels exactly like the channel-pruning baseline (same corpus windows, same
    importance), so with a negligible learning rate PAT keeps exactly the baseline's channels."""
    from prunetune.api import tune
    from prunetune.data.calibration import sample_calibration
    from prunetune.io import load_model
    from prunetune.structured.channels import channel_scores, keep_channels

    rep = tune(DEFAULT_MODEL, method="pat", data="alpaca", out=runs / "pat-corpus-init", ratio=0.25, max_steps=3,
               lr=1e-12, seq_len=192, batch_size=4, max_records=48, eval_size=8, checkpoint_every=0,
               mask_init="activation", rotate=False, calib="tinystories", calib_samples=4, calib_seqlen=64,
               device="cpu", progress=False)
    assert rep["setup"]["mask_init"]["calibration"]["nsamples"] == 4 and rep["setup"]["mask_init"]["tokens"] == 256
    model, tok, _ = load_model(str(DEFAULT_MODEL), dtype="float32", device="cpu")
    calib, _ = sample_calibration(tok, "tinystories", 4, 64, seed=0)
    baseline = keep_channels(channel_scores(model, "activation", calib), 0.25, model.config)
    assert rep["pat"]["kept_channels"] == baseline.tolist()


# --- distillation, rotation, PEFT adapters, the registry -------------------------------------------------

def test_distilled_spp_follows_the_source_record_to_the_dense_teacher(pruned, runs, alpaca):
    """--teacher auto of a pruned model is the model it was pruned from (its manifest's source_model); the KD
    term is logged, the task loss still is, and the zero pattern is kept."""
    from prunetune.api import tune

    rep = tune(pruned, method="spp", data="alpaca", out=runs / "spp-kd", seq_len=192, max_records=24, batch_size=4,
               max_steps=2, eval_size=4, merge=True, teacher="auto", kd_temperature=2.0, kd_weight=0.5,
               checkpoint_every=0, device="cpu", progress=False)
    kd = rep["distillation"]
    assert kd["teacher"] == str(DEFAULT_MODEL.resolve()) and kd["temperature"] == 2.0 and kd["weight"] == 0.5
    assert all(h["kd"] > 0 and h["loss"] > 0 for h in rep["history"])
    assert rep["zero_pattern_check"]["identical"]
    # the same run without a teacher has another fingerprint (a checkpoint of one cannot resume the other)
    plain = tune(pruned, method="spp", data="alpaca", out=runs / "spp-nokd", seq_len=192, max_records=24,
                 batch_size=4, max_steps=2, eval_size=4, checkpoint_every=0, device="cpu", progress=False)
    assert plain["distillation"] is None and "kd" not in plain["history"][0]
    assert plain["manifest"]["run_fingerprint"] != rep["manifest"]["run_fingerprint"]
    assert plain["history"][0]["loss"] == pytest.approx(rep["history"][0]["loss"], rel=1e-6)


def test_teacher_errors_are_one_clear_line(pruned, tmp_path, alpaca):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    big_vocab = tmp_path / "tiny-600"  # the stories260K tokenizer, but 600 logits instead of 512
    AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=600, hidden_size=32, num_hidden_layers=1,
                                                 num_attention_heads=4, intermediate_size=64)).save_pretrained(big_vocab)
    AutoTokenizer.from_pretrained(DEFAULT_MODEL).save_pretrained(big_vocab)
    base = ["tune", "--method", "spp", "--model", pruned, *COMMON, "--max-steps", "1", "--out", tmp_path / "o"]
    cases = [
        (["--teacher", tmp_path / "nowhere"], ("cannot load the teacher", "nowhere")),
        (["--teacher", big_vocab], ("predicts", "same vocabulary")),
        (["--teacher", "auto", "--model", DEFAULT_MODEL], ("records no model", "--teacher MODEL")),
        (["--teacher", DEFAULT_MODEL, "--kd-weight", "1.5"], ("weight", "[0, 1]")),
    ]
    for extra, needles in cases:
        e = in_process(*base, *extra)
        assert e.returncode == 2, (extra, e.stderr)
        assert_clean_error(e, *needles)
        assert leftovers(tmp_path, "o") == [], (extra, leftovers(tmp_path, "o"))


def test_lora_adapters_are_a_peft_folder_with_the_same_logits(runs, alpaca):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from prunetune.api import tune
    from prunetune.tuning.api import load_adapted

    out = runs / "lora-peft"
    tune(DEFAULT_MODEL, method="lora", data="alpaca", out=out, seq_len=192, max_records=24, batch_size=4,
         max_steps=2, lr=5e-2, eval_size=0, checkpoint_every=0, device="cpu", progress=False)
    base = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL).eval()
    peft_model = PeftModel.from_pretrained(base, out / "adapters").eval()
    ours, _, tm, _ = load_adapted(out, device="cpu")
    ids = torch.tensor([[1, 42, 7, 300, 12, 9]])
    with torch.no_grad():
        a, b = peft_model(input_ids=ids).logits, ours(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL)(input_ids=ids).logits
    assert tm.name == "lora" and torch.equal(a, b)
    assert not torch.allclose(a, plain)  # the adapters did train


def test_pat_on_the_rotated_model_exports_and_merges_the_same_smaller_model(runs, alpaca):
    """--rotate: PAT trains on the rotated model (same function) and writes the smaller plain model; merge
    re-applies the saved rotation and gives the same weights."""
    from prunetune.api import merge, tune

    out = runs / "pat-rot"
    rep = tune(DEFAULT_MODEL, method="pat", data="alpaca", out=out, ratio=0.25, rotate=True, mask_init="activation",
               calib="tinystories", calib_samples=4, calib_seqlen=64, teacher="auto", max_steps=3, lr=1e-3,
               seq_len=192, batch_size=4, max_records=32, eval_size=4, checkpoint_every=0, device="cpu",
               progress=False)
    assert rep["setup"]["rotation"]["tokens"] == 256 and rep["pat"]["rotated"] and rep["pat"]["hidden_size"] == 48
    assert rep["distillation"]["teacher"] == str(DEFAULT_MODEL)  # pat: the input itself
    assert (out / "adapters" / "rotation.safetensors").is_file()
    res = merge(out, out=runs / "pat-rot-merged", device="cpu")
    assert res["pat"]["kept_channels"] == rep["pat"]["kept_channels"]
    assert_same_weights(out, runs / "pat-rot-merged")


def test_a_tune_method_is_one_registered_class():
    """tune() and merge() find methods in the registry; options are checked against each method's Config."""
    from prunetune.tuning.api import split_options
    from prunetune.tuning.base import available, get_method

    assert {"spp", "lora", "lora-masked", "dora", "pat"} <= set(available())
    train, mine = split_options(get_method("pat"), {"ratio": 0.3, "lr": 1e-3, "rotate": True, "max_steps": 4})
    assert train == {"lr": 1e-3, "max_steps": 4} and mine == {"ratio": 0.3, "rotate": True}
    with pytest.raises(PrunetuneError, match="does not take option.*'groups'"):
        split_options(get_method("lora"), {"groups": 4})
    assert_clean_error(in_process("tune", "--method", "lora", "--spp-groups", "4", *COMMON, "--out", "x"),
                       "--spp-groups does not apply to method lora")
    assert_clean_error(in_process("tune", "--method", "lora", "--method-opt", "r", *COMMON, "--out", "x"),
                       "KEY=VALUE")


def test_dora_the_method_in_one_file_tunes_and_merges(runs, alpaca):
    """The method added as one small module (tuning/methods/dora.py) works end to end with no other change."""
    import inspect

    from prunetune.api import merge, tune
    from prunetune.tuning.methods import dora

    assert len(inspect.getsource(dora).splitlines()) < 25
    out = runs / "dora"
    rep = tune(DEFAULT_MODEL, method="dora", data="alpaca", out=out, seq_len=192, max_records=24, batch_size=4,
               max_steps=2, lr=1e-2, eval_size=0, merge=True, checkpoint_every=0, device="cpu", progress=False)
    assert rep["method"] == "dora" and json.loads((out / "adapters" / "adapter_config.json").read_text())["use_dora"]
    merge(out, out=runs / "dora-merged", device="cpu")
    assert_same_weights(out, runs / "dora-merged")


def test_summary_of_a_streamed_pat_merge():
    """A streamed PAT merge reports no parameter count; the CLI's summary must still print (it raised KeyError)."""
    from prunetune.tuning.api import summary

    rep = {"method": "pat", "adapters": "a", "pat": {"hidden_size_before": 64, "hidden_size": 48, "ratio": 0.25,
                                                     "kept_channels": list(range(48)), "rotated": True},
           "manifest": {"wall_time_s": 1.0, "peak_rss_mb": 10.0}}
    assert "hidden size 64 -> 48 (48 channels kept)\n" in summary(rep)
    rep["pat"]["parameters"] = 1234
    assert "(48 channels kept), 1,234 parameters" in summary(rep)


def test_a_token_budget_becomes_the_fewest_steps_that_read_it(tmp_path, monkeypatch):
    from prunetune.api import tune
    from prunetune.tuning.api import steps_from_token_budget

    assert steps_from_token_budget({"max_tokens": 120 * 8 * 256, "batch_size": 8}, 256)["max_steps"] == 120
    assert steps_from_token_budget({"max_tokens": 120 * 8 * 256 + 1, "batch_size": 8}, 256)["max_steps"] == 121
    assert steps_from_token_budget({"max_tokens": 1000, "batch_size": 2, "grad_accum": 2}, 100)["max_steps"] == 3
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert steps_from_token_budget({"max_tokens": 1000, "batch_size": 2, "grad_accum": 2}, 100)["max_steps"] == 2
    monkeypatch.delenv("WORLD_SIZE")
    assert steps_from_token_budget({"lr": 1e-3}, 256) == {"lr": 1e-3}
    rep = tune(DEFAULT_MODEL, method="lora", data="tinystories", out=tmp_path / "t", seq_len=64, max_records=64,
               batch_size=4, max_tokens=600, eval_size=0, checkpoint_every=0, device="cpu", progress=False)
    assert rep["total_steps"] == rep["steps"] == 3 and rep["token_budget"] == 3 * 4 * 64
    for extra, needle in ((["--max-tokens", "0"], "--max-tokens must be a positive"),
                          (["--max-tokens", "600", "--max-steps", "2"], "not both")):
        out = tmp_path / "bad"
        assert_clean_error(in_process("tune", "--method", "lora", *COMMON, *extra, "--out", out), needle)
        assert not out.exists()
