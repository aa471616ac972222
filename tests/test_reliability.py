"""Reliability: a catalogue of bad inputs for every command, damaged outputs, disk full, determinism.

Every catalogue case runs ``prunetune ARGS`` through ``cli.main`` in this process (parsed, run and reported
exactly as on the command line, without an interpreter start per case) and asserts: a non-zero exit, exactly
one line on stderr that names the problem, no traceback, and nothing half-written (the files under the case's
folder and under the shared inputs are the same before and after, except a documented ``.<out>.partial``
folder where a case keeps resumable work). Disk full is simulated in-process by making the write function
in question raise ``OSError(ENOSPC)``. A few cases run as real subprocesses; in one of them writes fail for
real (a file-size limit on the process, so the write fails inside safetensors as it would on a full disk).

The SIGKILL + ``--resume`` tests live in test_prune_driver.py and test_tune_cli.py.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_clean_error, run_cli
from gguf_util import write_llama_gguf
from prunetune import cli
from prunetune.io import MANIFEST, partial_dir_for
from prunetune.paths import DEFAULT_MODEL

PRUNE = ["prune", "--method", "wanda", "--sparsity", "0.5", "--calib", "tinystories", "--nsamples", "2",
         "--seqlen", "32", "--device", "cpu"]
TUNE = ["tune", "--method", "spp", "--data", "tinystories", "--seq-len", "32", "--batch-size", "2", "--max-steps",
        "1", "--eval-size", "0", "--no-progress", "--device", "cpu", "--on-dense", "ignore"]
BENCH = ["bench", "--repeats", "1", "--warmup", "0", "--batch-sizes", "1", "--seq-lens", "8", "--decode-tokens", "2",
         "--no-memory-probe", "--device", "cpu", "--threads", "1"]
EVAL = ["eval", "--ppl", "tinystories", "--seqlen", "64", "--max-windows", "1", "--device", "cpu"]
#: the determinism / disk-full-then-resume prune run (SparseGPT 2:4, a small calibration set)
SGPT = ["prune", "--model", DEFAULT_MODEL, "--method", "sparsegpt", "--sparsity", "2:4", "--calib", "tinystories",
        "--nsamples", "4", "--seqlen", "64", "--seed", "3", "--device", "cpu"]
SPP = ["tune", "--method", "spp", "--data", "tinystories", "--seq-len", "64", "--batch-size", "2", "--max-steps", "3",
       "--eval-size", "2", "--seed", "5", "--merge", "--no-progress", "--device", "cpu"]
#: files that legitimately differ between two identical runs: reports hold wall times, peak memory and start
#: times, and the manifest holds the reports' hashes (its weight-file entries are compared separately)
TIMING_FILES = {"prune_report.json", "tune_report.json", "merge_report.json", MANIFEST}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The test machine is shared: one thread keeps these small runs from oversubscribing the cores."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


PROGRESS_BAR = re.compile(r"\d+%\|.*\| *\d+/\d+")


def main(*args) -> int:
    return cli.main([str(a) for a in args])


def one_line(capsys, rc, command, *needles) -> str:
    """The case failed with exactly one clear line naming the problem."""
    out, err = capsys.readouterr()
    assert rc == 2, out + err
    assert "Traceback" not in err, err
    # what a terminal shows of each line, less the progress bars drawn before the failure
    shown = [line.split("\r")[-1] for line in err.split("\n")]
    lines = [line for line in shown if line.strip() and not PROGRESS_BAR.search(line)]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"prunetune {command}: error: "), lines[0]
    for n in needles:
        assert str(n).lower() in lines[0].lower(), (n, lines[0])
    return lines[0]


def tree(*roots) -> set[str]:
    return {str(p) for r in roots if r.exists() for p in r.rglob("*")}


def flip_byte(path: Path) -> None:
    """One bit pattern changed inside the tensor data (the header stays valid, so only the hash can tell)."""
    data = bytearray(path.read_bytes())
    data[len(data) - 100] ^= 0xFF
    path.write_bytes(bytes(data))


def sha256s(d: Path) -> dict[str, str]:
    return {str(f.relative_to(d)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(d.rglob("*")) if f.is_file()}


def copy_model(dst: Path) -> Path:
    shutil.copytree(DEFAULT_MODEL, dst)
    return dst


def edit_tensor(model_dir: Path, name: str, value: float) -> Path:
    sd = load_file(model_dir / "model.safetensors")
    sd[name][0, 0] = value
    save_file(sd, model_dir / "model.safetensors", metadata={"format": "pt"})
    return model_dir


def enospc(*_, **__):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# --- shared bad inputs (built once) ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """Every damaged or unusual input the catalogue feeds the commands."""
    from prunetune.api import prune

    root = tmp_path_factory.mktemp("bad")
    b = SimpleNamespace(root=root)
    # models
    b.model = copy_model(root / "model")  # a clean copy (outputs inside it must be refused)
    b.truncated = copy_model(root / "truncated")
    st = b.truncated / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    b.garbage = copy_model(root / "garbage")
    (b.garbage / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    b.mismatch = copy_model(root / "mismatch")
    cfg = json.loads((b.mismatch / "config.json").read_text())
    cfg["intermediate_size"] = 128  # the weights have 172
    (b.mismatch / "config.json").write_text(json.dumps(cfg))
    b.nan = edit_tensor(copy_model(root / "nan"), "model.layers.2.mlp.down_proj.weight", float("nan"))
    b.inf = edit_tensor(copy_model(root / "inf"), "model.embed_tokens.weight", float("inf"))
    b.gguf = write_llama_gguf(DEFAULT_MODEL, root / "mystery.gguf", arch="mysterynet")
    # a real prune output, and a copy with one byte of one weight file flipped
    b.pruned = root / "pruned"
    prune(DEFAULT_MODEL, method="magnitude", sparsity="0.5", out=b.pruned, calib="tinystories", nsamples=2,
          seqlen=32, device="cpu", progress=False)
    b.damaged = root / "damaged"
    shutil.copytree(b.pruned, b.damaged)
    flip_byte(b.damaged / "model-layer-00001.safetensors")
    b.pruned_cut_report = root / "pruned-cut-report"
    shutil.copytree(b.pruned, b.pruned_cut_report)
    rep = b.pruned_cut_report / "prune_report.json"
    rep.write_text(rep.read_text()[:500])
    # text and data files
    (root / "data").mkdir()
    b.empty = root / "data" / "empty.txt"
    b.empty.write_text("  \n\n")
    b.binary = root / "data" / "garbage.txt"
    b.binary.write_bytes(bytes(range(256)) * 16)
    b.latin1 = root / "data" / "latin1.txt"
    b.latin1.write_bytes("caf\xe9 na\xefve ".encode("latin-1") * 50)
    b.short = root / "data" / "short.txt"
    b.short.write_text("Once upon a time.")
    b.bad_jsonl = root / "data" / "garbage.jsonl"
    b.bad_jsonl.write_bytes(b"\xff\xfe garbage \x80\x81\n" * 8)
    b.empty_jsonl = root / "data" / "empty.jsonl"
    b.empty_jsonl.write_text("\n\n")
    b.bad_json = root / "data" / "result.json"
    b.bad_json.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00garbage")
    # adapter folders that are not what merge needs
    b.adapters_damaged = root / "adapters-damaged"
    (b.adapters_damaged / "adapters").mkdir(parents=True)
    (b.adapters_damaged / "adapters" / "prunetune_adapter.json").write_text('{"method": "spp", "meth')
    b.adapters_nobase = root / "adapters-nobase"
    (b.adapters_nobase / "adapters").mkdir(parents=True)
    (b.adapters_nobase / "adapters" / "prunetune_adapter.json").write_text(json.dumps(
        {"method": "spp", "method_config": {}, "base_model": {"path": str(root / "deleted-base")}}))
    b.adapters_otherbase = root / "adapters-otherbase"
    (b.adapters_otherbase / "adapters").mkdir(parents=True)
    (b.adapters_otherbase / "adapters" / "prunetune_adapter.json").write_text(json.dumps(
        {"method": "spp", "method_config": {}, "base_model": {"path": str(DEFAULT_MODEL), "fingerprint": "0" * 16}}))
    # a folder this process cannot write to (root ignores permission bits: /sys refuses writes even to root)
    ro = root / "readonly"
    ro.mkdir()
    ro.chmod(0o555)
    b.readonly = ro if not os.access(ro, os.W_OK) else Path("/sys")
    yield b
    ro.chmod(0o755)


@pytest.fixture(scope="module")
def spp_base(tmp_path_factory):
    from prunetune.api import prune

    out = tmp_path_factory.mktemp("spp-base") / "stories-2of4"
    prune(DEFAULT_MODEL, method="magnitude", sparsity="2:4", out=out, calib="tinystories", nsamples=2, seqlen=32,
          device="cpu", progress=False)
    return out


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, spp_base):
    """A real `tune --method spp --merge` output (also the first run of the determinism test)."""
    out = tmp_path_factory.mktemp("tuned") / "a"
    assert main(*SPP, "--model", spp_base, "--out", out) == 0
    return out


@pytest.fixture(scope="module")
def sgpt(tmp_path_factory):
    """A real SparseGPT 2:4 prune output (also the first run of the determinism test)."""
    out = tmp_path_factory.mktemp("sgpt") / "a"
    assert main(*SGPT, "--out", out) == 0
    return out


# --- the catalogue -----------------------------------------------------------------------------------------
# (id, command line, fragments the one error line must hold, [setup(monkeypatch, bad, tmp_path), [leftovers allowed
#  in tmp_path]]); "{name}" is filled from the `bad` fixture, "{out}" is tmp_path/out, "{tuned}" a real tune output.
# These add to the bad-input tests of test_prune_driver.py, test_cli_eval.py, test_tune_cli.py, test_gguf.py and
# test_bench_report.py.

def disk_full_on_layer(n):
    """The shard writer runs out of space on layer ``n`` (after writing part of the file)."""

    def setup(mp, b, tmp):
        from prunetune import checkpoint

        real = checkpoint.save_file

        def save_file_(tensors, path, metadata=None):
            if Path(path).name.startswith(f".model-layer-{n:05d}"):
                Path(path).write_bytes(b"\0" * 1000)
                enospc()
            return real(tensors, path, metadata=metadata)

        mp.setattr(checkpoint, "save_file", save_file_)

    return setup


def interrupted_run(state):
    """A ``.out.partial`` folder left by an interrupted prune, with ``state`` as its resume state."""

    def setup(mp, b, tmp):
        f = tmp / ".out.partial" / "resume" / "journal.json"
        f.parent.mkdir(parents=True)
        f.write_bytes(state) if isinstance(state, bytes) else f.write_text(json.dumps(state))

    return setup


def disk_full_safetensors(mp, b, tmp):
    """Any safetensors file written from Python (adapters, merged checkpoints) hits a full disk."""
    import safetensors.torch
    import transformers.modeling_utils as mu

    from prunetune import checkpoint

    mp.setattr(safetensors.torch, "save_file", enospc)
    mp.setattr(checkpoint, "save_file", enospc)  # the streamed merge's shard writer
    mp.setattr(mu, "safe_save_file", enospc, raising=False)


def disk_full_json(mp, b, tmp):
    from prunetune import manifest

    mp.setattr(manifest.json, "dump", enospc)


def disk_full_report(mp, b, tmp):
    from prunetune.evaluation import report

    real = open

    def open_(file, mode="r", *a, **k):
        f = real(file, mode, *a, **k)
        if "w" in mode and Path(file).name.startswith(".report.md"):
            f.close()
            enospc()
        return f

    mp.setattr(report, "open", open_, raising=False)


CASES = [
    # prune ------------------------------------------------------------------------------------------------
    ("prune-model-missing", [*PRUNE, "--model", "{root}/no-such-model", "--out", "{out}"], ["does not exist"]),
    ("prune-model-not-gguf", [*PRUNE, "--model", "{short}", "--out", "{out}"], ["is not a GGUF file"]),
    ("prune-gguf-unsupported-arch", [*PRUNE, "--model", "{gguf}", "--out", "{out}"], ["mysterynet"]),
    ("prune-sparsity-three-parts", [*PRUNE, "--sparsity", "2:4:8", "--out", "{out}"], ["invalid sparsity '2:4:8'"]),
    ("prune-sparsity-nan", [*PRUNE, "--sparsity", "nan", "--out", "{out}"], ["invalid sparsity 'nan'", "[0, 1)"]),
    ("prune-sparsity-percent", [*PRUNE, "--sparsity", "150%", "--out", "{out}"], ["'150%'", "[0, 1)"]),
    ("prune-nm-does-not-fit", [*PRUNE, "--sparsity", "1:3", "--out", "{out}"],
     ["model.layers.0.self_attn.q_proj", "64 input features", "M=3"]),
    ("prune-owl-with-nm", [*PRUNE, "--sparsity", "2:4", "--owl", "--out", "{out}"], ["--owl", "N:M"]),
    ("prune-calib-missing", [*PRUNE, "--calib", "{root}/data/missing.txt", "--out", "{out}"],
     ["missing.txt", "does not exist"]),
    ("prune-calib-empty", [*PRUNE, "--calib", "{empty}", "--out", "{out}"], ["empty.txt", "is empty"]),
    ("prune-calib-binary", [*PRUNE, "--calib", "{binary}", "--out", "{out}"], ["garbage.txt", "binary"]),
    ("prune-calib-not-utf8", [*PRUNE, "--calib", "{latin1}", "--out", "{out}"], ["latin1.txt", "not UTF-8"]),
    ("prune-calib-jsonl-garbage", [*PRUNE, "--calib", "{bad_jsonl}", "--out", "{out}"],
     ["garbage.jsonl", "line 1", "not valid JSON"]),
    ("prune-calib-too-short", [*PRUNE, "--calib", "{short}", "--out", "{out}"], ["fewer than one window of 32"]),
    ("prune-truncated-safetensors", [*PRUNE, "--model", "{truncated}", "--out", "{out}"],
     ["model.safetensors", "damaged or truncated"]),
    ("prune-garbage-safetensors", [*PRUNE, "--model", "{garbage}", "--out", "{out}"],
     ["model.safetensors", "damaged or truncated"]),
    ("prune-config-mismatch", [*PRUNE, "--model", "{mismatch}", "--out", "{out}"],
     ["config does not match the weights", "mlp", "172"]),
    ("prune-inf-weights", [*PRUNE, "--model", "{inf}", "--out", "{out}"], ["model.embed_tokens.weight", "NaN/Inf"]),
    ("prune-damaged-prune-output", [*PRUNE, "--model", "{damaged}", "--out", "{out}"],
     ["model-layer-00001.safetensors", "damaged"]),
    ("prune-out-is-the-input", [*PRUNE, "--model", "{model}", "--out", "{model}"], ["inside the input"]),
    ("prune-out-is-a-file", [*PRUNE, "--out", "{short}", "--overwrite"], ["short.txt", "not a directory"]),
    ("prune-out-under-a-file", [*PRUNE, "--out", "{short}/sub"], ["short.txt", "cannot write"]),
    ("prune-out-unwritable", [*PRUNE, "--out", "{readonly}/prunetune-out"], ["cannot write"]),
    ("prune-bad-dtype", [*PRUNE, "--dtype", "float8", "--out", "{out}"], ["unknown dtype 'float8'"]),
    ("prune-method-opt-unknown", [*PRUNE, "--method", "apt", "--method-opt", "bogus=1", "--out", "{out}"],
     ["'bogus'", "admm_iter"]),
    ("prune-method-opt-zero-iterations", [*PRUNE, "--method", "apt", "--method-opt", "admm_iter=0", "--out", "{out}"],
     ["admm_iter", "positive"]),
    ("prune-method-opt-not-a-number", [*PRUNE, "--method", "apt", "--method-opt", "maxiter=abc", "--out", "{out}"],
     ["maxiter=abc", "abc"]),
    ("prune-mask-scheme-not-for-nm", [*PRUNE, "--method", "sparsegpt", "--sparsity", "2:4", "--method-opt",
                                      "mask_scope=row", "--out", "{out}"], ["mask_scope", "unstructured sparsity only"]),
    ("prune-negative-damp", [*PRUNE, "--damp", "-0.1", "--out", "{out}"], ["--damp", "non-negative"]),
    ("prune-resume-other-settings", [*PRUNE, "--out", "{out}", "--resume"], ["cannot resume", "other settings"],
     interrupted_run({"fingerprint": "another run", "layer": 0, "slot": "b", "results": []})),
    ("prune-resume-damaged-state", [*PRUNE, "--out", "{out}", "--resume"], ["journal.json", "damaged"],
     interrupted_run(b"PK\x03\x04 cut short")),
    ("prune-disk-full", [*PRUNE, "--out", "{out}"], ["model-layer-00002.safetensors", "No space left on device",
                                                     "--resume"], disk_full_on_layer(2), [".out.partial"]),
    # tune -------------------------------------------------------------------------------------------------
    ("tune-data-empty", [*TUNE, "--data", "{empty_jsonl}", "--out", "{out}"], ["empty.jsonl", "empty"]),
    ("tune-data-binary-jsonl", [*TUNE, "--data", "{bad_jsonl}", "--out", "{out}"], ["garbage.jsonl", "UTF-8"]),
    ("tune-data-binary-txt", [*TUNE, "--data", "{binary}", "--out", "{out}"], ["garbage.txt", "binary"]),
    ("tune-truncated-safetensors", [*TUNE, "--model", "{truncated}", "--out", "{out}"],
     ["model.safetensors", "damaged or truncated"]),
    ("tune-config-mismatch", [*TUNE, "--model", "{mismatch}", "--out", "{out}"],
     ["does not match the weights", "mlp", "172"]),
    ("tune-nan-weights", [*TUNE, "--model", "{nan}", "--out", "{out}"],
     ["model.layers.2.mlp.down_proj.weight", "NaN/Inf"]),
    ("tune-gguf-unsupported-arch", [*TUNE, "--model", "{gguf}", "--out", "{out}"], ["mysterynet"]),
    ("tune-damaged-prune-output", [*TUNE, "--model", "{damaged}", "--out", "{out}"],
     ["model-layer-00001.safetensors", "damaged"]),
    ("tune-out-inside-input", [*TUNE, "--model", "{pruned}", "--out", "{pruned}/tuned"], ["inside the input"]),
    ("tune-bad-schedule", [*TUNE, "--schedule", "exponential", "--out", "{out}"], ["exponential"]),
    ("tune-disk-full", [*TUNE, "--out", "{out}"], [".out.partial", "No space left on device"], disk_full_safetensors),
    # merge ------------------------------------------------------------------------------------------------
    ("merge-adapters-missing", ["merge", "{root}/no-such-run", "--out", "{out}"], ["no-such-run", "does not exist"]),
    ("merge-adapter-record-damaged", ["merge", "{adapters_damaged}", "--out", "{out}"],
     ["prunetune_adapter.json", "damaged"]),
    ("merge-base-model-gone", ["merge", "{adapters_nobase}", "--out", "{out}"], ["deleted-base", "does not exist"]),
    ("merge-other-base-model", ["merge", "{adapters_otherbase}", "--out", "{out}", "--device", "cpu"],
     ["is not the base model"]),
    ("merge-unknown-method", ["merge", "{tuned}", "--method", "sparse-magic", "--out", "{out}"],
     ["unknown tuning method 'sparse-magic'"]),
    ("merge-damaged-adapters", ["merge", "{tuned_damaged}", "--out", "{out}", "--device", "cpu"],
     ["spp_adapters.safetensors", "damaged"]),
    ("merge-out-inside-adapters", ["merge", "{tuned}", "--out", "{tuned}/adapters/merged"], ["inside the input"]),
    ("merge-disk-full", ["merge", "{tuned}", "--out", "{out}", "--device", "cpu"], ["'{out}'", "No space left on device"],
     disk_full_safetensors),
    # eval -------------------------------------------------------------------------------------------------
    ("eval-damaged-prune-output", [*EVAL, "--model", "{damaged}"], ["model-layer-00001.safetensors", "damaged"]),
    ("eval-truncated-safetensors", [*EVAL, "--model", "{truncated}"], ["model.safetensors", "damaged or truncated"]),
    ("eval-config-mismatch", [*EVAL, "--model", "{mismatch}"], ["does not match the weights", "mlp", "172"]),
    ("eval-nan-weights", [*EVAL, "--model", "{nan}"], ["model.layers.2.mlp.down_proj.weight", "NaN/Inf"]),
    ("eval-ppl-file-missing", [*EVAL, "--ppl", "{root}/data/missing.txt"], ["missing.txt", "does not exist"]),
    ("eval-out-under-a-file", [*EVAL, "--out", "{short}/r.json"], ["short.txt", "cannot write"]),
    ("eval-disk-full", [*EVAL, "--out", "{out}.json"], ["out.json", "No space left on device"], disk_full_json),
    # bench ------------------------------------------------------------------------------------------------
    ("bench-batch-sizes-garbage", [*BENCH, "--batch-sizes", "1,x"], ["--batch-sizes", "'1,x'"]),
    ("bench-seq-len-zero", [*BENCH, "--seq-lens", "0"], ["sequence lengths", "at least 1"]),
    ("bench-gguf-unsupported-arch", [*BENCH, "--compare", "{gguf}"], ["mysterynet"]),
    ("bench-truncated-safetensors", [*BENCH, "--compare", "{truncated}"], ["model.safetensors", "damaged or truncated"]),
    ("bench-damaged-prune-output", [*BENCH, "--model", "{damaged}"], ["model-layer-00001.safetensors", "damaged"]),
    ("bench-out-under-a-file", [*BENCH, "--out", "{short}/b.json"], ["short.txt", "cannot write"]),
    ("bench-disk-full", [*BENCH, "--out", "{out}.json"], ["out.json", "No space left on device"], disk_full_json),
    # report -----------------------------------------------------------------------------------------------
    ("report-binary-result", ["report", "{bad_json}", "--out", "{out}"], ["result.json", "not valid JSON"]),
    ("report-not-a-prune-output", ["report", "{adapters_damaged}", "--out", "{out}"],
     ["adapters-damaged", "without prune_report.json"]),
    ("report-truncated-prune-report", ["report", "{pruned_cut_report}", "--out", "{out}"],
     ["prune_report.json", "not valid JSON"]),
    ("report-out-is-a-file", ["report", "{pruned}", "--out", "{short}"], ["short.txt", "not a directory"]),
    ("report-out-under-a-file", ["report", "{pruned}", "--out", "{short}/rep"], ["short.txt", "cannot"]),
    ("report-disk-full", ["report", "{pruned}", "--out", "{out}"], ["report.md", "No space left on device"],
     disk_full_report),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(case, bad, tmp_path, capsys, monkeypatch, request):
    cid, argv, needles, *rest = case
    setup = rest[0] if rest else None
    allowed = set(rest[1]) if len(rest) > 1 else set()
    fill = {k: str(v) for k, v in vars(bad).items()}
    fill["out"] = str(tmp_path / "out")
    if any("{tuned" in a for a in argv):
        tuned = request.getfixturevalue("tuned")
        fill["tuned"] = str(tuned)
        if any("{tuned_damaged}" in a for a in argv):
            dmg = tmp_path / "tuned-damaged"
            shutil.copytree(tuned, dmg)
            flip_byte(dmg / "adapters" / "spp_adapters.safetensors")
            fill["tuned_damaged"] = str(dmg)
    args = [a.format(**fill) for a in argv]
    if setup is not None:
        setup(monkeypatch, bad, tmp_path)
    before = tree(tmp_path, bad.root)
    capsys.readouterr()
    rc = main(*args)
    monkeypatch.undo()
    one_line(capsys, rc, args[0], *[n.format(**fill) for n in needles])
    changed = tree(tmp_path, bad.root) ^ before  # written or removed
    changed = {p for p in changed if not any(Path(p).is_relative_to(tmp_path / a) for a in allowed)}
    assert not changed, f"{cid} changed {sorted(changed)}"


# --- the same through a real process ---------------------------------------------------------------------

def limit_file_size():
    """Child process: every file is capped at 64 KiB, so writes fail as on a full disk (Python already
    ignores SIGXFSZ, so the write returns EFBIG instead of killing the process)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))


def test_real_write_failure_during_prune(tmp_path):
    """Nothing is faked here: the first layer shard (about 180 KiB) cannot be written."""
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([sys.executable, "-m", "prunetune", *map(str, PRUNE), "--out", str(out)], capture_output=True,
                       text=True, env=env, preexec_fn=limit_file_size, timeout=300)
    assert p.returncode == 2
    line = assert_clean_error(p, "model-layer-00000.safetensors", "File too large")
    assert "--resume" not in line  # no layer was finished: nothing worth keeping
    assert sorted(os.listdir(tmp_path)) == []


def test_bad_data_through_a_real_process(bad, tmp_path):
    p = run_cli(*TUNE, "--data", bad.binary, "--out", tmp_path / "out", env={"OMP_NUM_THREADS": "1"})
    assert p.returncode == 2
    assert_clean_error(p, "garbage.txt", "binary")
    assert sorted(os.listdir(tmp_path)) == []


# --- manifests: every output carries one, and loading checks it ----------------------------------------------

def test_prune_tune_merge_outputs_carry_a_manifest_of_every_file(sgpt, tuned, tmp_path, capsys):
    from prunetune.io import verify_manifest

    merged = tmp_path / "merged"
    assert main("merge", tuned, "--out", merged, "--device", "cpu") == 0
    for d in (sgpt, tuned, merged):
        man = json.loads((d / MANIFEST).read_text())
        on_disk = {k: v for k, v in sha256s(d).items() if k != MANIFEST}
        assert man["files"] == on_disk, d
        assert any(k.endswith(".safetensors") for k in on_disk)
        verify_manifest(d)
        assert [p.name for p in d.parent.iterdir() if p.name.startswith(f".{d.name}")] == []  # no temp folder left


def test_eval_names_the_damaged_weight_file(sgpt, tmp_path):
    out = tmp_path / "pruned"
    shutil.copytree(sgpt, out)
    flip_byte(out / "model-layer-00002.safetensors")
    p = run_cli("eval", "--model", out, "--ppl", "tinystories", "--max-windows", "1", env={"OMP_NUM_THREADS": "1"})
    assert p.returncode == 2
    assert_clean_error(p, str(out / "model-layer-00002.safetensors"), "damaged", "sha256")


# --- determinism and a full disk in the middle of a run ------------------------------------------------------

def weights_and_settings(d: Path) -> dict[str, str]:
    """sha256 of every file but the ones that hold wall times (see TIMING_FILES)."""
    return {k: v for k, v in sha256s(d).items() if Path(k).name not in TIMING_FILES}


def test_prune_twice_gives_identical_files(sgpt, tmp_path, capsys):
    assert main(*SGPT, "--out", tmp_path / "b") == 0
    a, b = weights_and_settings(sgpt), weights_and_settings(tmp_path / "b")
    assert a == b and sum(k.endswith(".safetensors") for k in a) == 6  # five layers + the rest
    ma = json.loads((sgpt / MANIFEST).read_text())["files"]
    mb = json.loads((tmp_path / "b" / MANIFEST).read_text())["files"]
    assert {k: v for k, v in ma.items() if k not in TIMING_FILES} == {k: v for k, v in mb.items() if k not in TIMING_FILES}


def test_tune_spp_twice_gives_identical_files(tuned, spp_base, tmp_path, capsys):
    assert main(*SPP, "--model", spp_base, "--out", tmp_path / "b") == 0
    a, b = weights_and_settings(tuned), weights_and_settings(tmp_path / "b")
    assert a == b
    assert "model.safetensors" in a and "adapters/spp_adapters.safetensors" in a


def test_prune_disk_full_then_resume_gives_the_same_files(sgpt, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    disk_full_on_layer(3)(monkeypatch, None, tmp_path)
    rc = main(*SGPT, "--out", out)
    monkeypatch.undo()
    one_line(capsys, rc, "prune", "model-layer-00003.safetensors", "No space left on device", "--resume")
    assert not out.exists() and (partial_dir_for(out) / "resume" / "journal.json").is_file()
    assert not list(partial_dir_for(out).glob(".model-layer-*"))  # the cut-off file is gone
    assert main(*SGPT, "--out", out, "--resume") == 0  # room again
    assert weights_and_settings(out) == weights_and_settings(sgpt)
    assert json.loads((out / "prune_report.json").read_text())["manifest"]["resumed_from_layer"] == 3
    assert not partial_dir_for(out).exists()


@pytest.mark.parametrize("command", ["prune", "tune"])
def test_a_second_run_into_the_same_output_refuses_and_keeps_the_first_runs_work(command, tmp_path, capsys):
    """While a run holds ``--out`` (its lock), another prune or tune into it stops with one line and leaves the
    first run's working folder as it was (it used to remove it as the leftovers of an interrupted run)."""
    from prunetune.io import run_lock

    out = tmp_path / "out"
    work = partial_dir_for(out) / "resume"
    work.mkdir(parents=True)
    (work / "journal.json").write_text("{}")
    args = (*PRUNE, "--model", DEFAULT_MODEL) if command == "prune" else (*TUNE, "--model", DEFAULT_MODEL)
    with run_lock(out) as lock:
        before = tree(tmp_path)
        one_line(capsys, main(*args, "--out", out), command, "another prunetune run", str(out))
        assert tree(tmp_path) == before
    assert not lock.exists()  # released and removed when the holder ends
    assert main(*args, "--out", out) == 0  # free again: the leftovers are removed, the run is done
    assert out.is_dir() and not partial_dir_for(out).exists() and not lock.exists()
