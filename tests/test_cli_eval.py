"""The eval command end to end, and its bad inputs (one clear line, non-zero exit, no traceback)."""

import json

from conftest import assert_clean_error, run_cli


def test_eval_default_model(tmp_path):
    out = tmp_path / "r.json"
    p = run_cli("eval", "--ppl", "tinystories", "--max-windows", "4", "--out", out)
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())
    man = res["manifest"]
    assert man["model"]["weights_sha256"]["model.safetensors"]
    for key in ("versions", "wall_time_s", "peak_rss_mb"):
        assert key in man
    assert res["perplexity"]["tinystories"]["windows"] == 4
    assert "ppl tinystories" in p.stdout


def test_eval_help():
    p = run_cli("eval", "--help")
    assert p.returncode == 0 and "--ppl" in p.stdout and "--seqlen" in p.stdout


def test_eval_bad_inputs(tmp_path):
    assert_clean_error(run_cli("eval", "--model", tmp_path / "missing"), "does not exist")
    unreadable = tmp_path / "bin.txt"
    unreadable.write_bytes(b"\x00\x00\x00")
    assert_clean_error(run_cli("eval", "--ppl", unreadable), "binary")
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    assert_clean_error(run_cli("eval", "--ppl", empty), "empty")
    assert_clean_error(run_cli("eval", "--seqlen", "4096"), "larger than the model allows")
    assert_clean_error(run_cli("eval", "--ppl", "nosuchset"), "unknown dataset")
    notmodel = tmp_path / "notmodel"
    notmodel.mkdir()
    assert_clean_error(run_cli("eval", "--model", notmodel), "not a model directory")
