"""Zero-shot multiple choice through lm-evaluation-harness, offline, on the bundled stories260K (CPU)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prunetune.errors import PrunetuneError
from prunetune.evaluation.zeroshot import evaluate_zeroshot, local_tasks, paired_difference
from prunetune.paths import DEFAULT_MODEL, data_dir

pytest.importorskip("lm_eval")

ALL_TASKS = ["arc_easy", "arc_challenge", "boolq", "copa", "openbookqa", "piqa", "winogrande", "rte", "siqa"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the test machine's cores are shared
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(str(DEFAULT_MODEL)).eval()


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(DEFAULT_MODEL))


@pytest.fixture(scope="module")
def tasks_dir():
    d = data_dir()
    if d is None or not (d / "tasks").is_dir():
        pytest.skip("no local data folder with task files (set PRUNETUNE_DATA)")
    return d / "tasks"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_local_task_names():
    assert sorted(local_tasks()) == sorted(ALL_TASKS)


def test_every_task_runs(model, tok, tasks_dir):
    limit = 8
    res = evaluate_zeroshot(model, tok, ALL_TASKS, limit=limit, batch_size=8)
    assert set(res["tasks"]) == set(ALL_TASKS)
    for name, r in res["tasks"].items():
        assert 0.0 <= r["acc"] <= 1.0, (name, r)
        assert 0.0 <= r["acc_norm"] <= 1.0, (name, r)
        assert r["n"] == limit, (name, r)
        assert r["acc_stderr"] is not None and r["acc_stderr"] >= 0.0, (name, r)
        # accuracy over `limit` documents is a multiple of 1/limit
        assert abs(r["acc"] * limit - round(r["acc"] * limit)) < 1e-9, (name, r)
    wg = res["tasks"]["winogrande"]
    assert wg["acc_norm"] == wg["acc"]
    assert res["average_metric"] == "acc"
    assert res["average"]["acc"] == pytest.approx(sum(r["acc"] for r in res["tasks"].values()) / len(ALL_TASKS))
    assert res["average"]["acc_norm"] == pytest.approx(
        sum(r["acc_norm"] for r in res["tasks"].values()) / len(ALL_TASKS))

    proto = res["protocol"]
    assert proto["num_fewshot"] == 0 and proto["limit"] == limit
    assert proto["lm_eval_version"].startswith("0.4")
    for name in ALL_TASKS:
        info = proto["tasks"][name]
        assert info["source"] == "local" and info["prompt"]
        assert info["sha256"] == hashlib.sha256(open(info["file"], "rb").read()).hexdigest()
    assert proto["tasks"]["openbookqa"]["file"].endswith("openbook_qa.jsonl")


def _direct_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context), tokenised as lm-eval's HFLM does by default (the
    tokenizer's own special tokens, here a BOS; the continuation's tokens are those after the context's)."""
    whole = tok(context + continuation)["input_ids"]
    ctx = tok(context)["input_ids"]
    cont = whole[len(ctx):]
    assert cont, (context, continuation)
    ids = torch.tensor([whole[:-1]])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    positions = range(len(whole) - 1 - len(cont), len(whole) - 1)
    return float(sum(logprobs[p, t] for p, t in zip(positions, cont)))


def test_scores_match_direct_loglikelihoods(model, tok, tasks_dir):
    """acc / acc_norm equal the arg-max of log-likelihoods computed here with the model itself."""
    limit = 12
    docs = [json.loads(l) for l in open(tasks_dir / "arc_easy.jsonl", encoding="utf-8")][:limit]
    hits, hits_norm = [], []
    for doc in docs:
        context = doc["query"] + "\nAnswer:"
        lls = [_direct_loglikelihood(model, tok, context, " " + c) for c in doc["choices"]]
        norm = [ll / len(c) for ll, c in zip(lls, doc["choices"])]
        hits.append(max(range(len(lls)), key=lls.__getitem__) == doc["gold"])
        hits_norm.append(max(range(len(norm)), key=norm.__getitem__) == doc["gold"])
    res = evaluate_zeroshot(model, tok, ["arc_easy"], limit=limit, tasks_dir=tasks_dir, batch_size=4)
    r = res["tasks"]["arc_easy"]
    assert r["n"] == limit
    assert r["acc"] == pytest.approx(sum(hits) / limit)
    assert r["acc_norm"] == pytest.approx(sum(hits_norm) / limit)
    # each document's outcome, in file order (what paired comparisons between models read)
    assert r["correct"] == "".join("1" if h else "0" for h in hits)
    assert r["correct_norm"] == "".join("1" if h else "0" for h in hits_norm)


def test_paired_difference_algebra():
    """The mean and standard error of per-document differences; equal outcomes are no difference at all."""
    d = paired_difference("1100", "1000")
    assert d["diff"] == pytest.approx(0.25) and d["stderr"] == pytest.approx(0.25) and d["within_noise"]
    d = paired_difference("1" * 40, "0" * 30 + "1" * 10)
    assert d["diff"] == pytest.approx(0.75) and not d["within_noise"]
    assert paired_difference("0101", "0101") == {"diff": 0.0, "stderr": 0.0, "n": 4, "within_noise": True}
    with pytest.raises(PrunetuneError, match="same documents"):
        paired_difference("01", "011")


def _greedy(model, tok, prompt: str, n: int = 8) -> str:
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_greedy_continuation_always_wins(model, tok, tmp_path):
    """A hand-made task whose right answer is the model's own greedy continuation: acc must be 1.0,
    and 0.0 once the answer key points at the nonsense choice."""
    prompts = ["Once upon a time, there was a little", "Tom and his mom went to the", "The sun was shining and the",
               "Lily wanted to play with her"]
    nonsense = ["quartz xylem zygote vortex", "jqx pfft zzk wvvb", "xylophone quasar kumquat zeal",
                "vexed zq jib wrx"]
    rows = []
    for i, (p, bad) in enumerate(zip(prompts, nonsense)):
        good = _greedy(model, tok, p)
        assert good
        rows.append({"query": p, "choices": [bad, good] if i % 2 else [good, bad], "gold": 1 if i % 2 else 0})
    write_jsonl(tmp_path / "copa.jsonl", rows)
    model.train()
    try:
        res = evaluate_zeroshot(model, tok, ["copa"], tasks_dir=tmp_path, batch_size=2)
        assert model.training  # the caller's mode is left as it was
    finally:
        model.eval()
    r = res["tasks"]["copa"]
    assert r["n"] == len(rows)
    assert r["acc"] == 1.0 and r["acc_norm"] == 1.0

    for row in rows:
        row["gold"] = 1 - row["gold"]
    write_jsonl(tmp_path / "copa.jsonl", rows)
    res = evaluate_zeroshot(model, tok, ["copa"], tasks_dir=tmp_path, batch_size=2)
    assert res["tasks"]["copa"]["acc"] == 0.0


# ---------------------------------------------------------------------------------------- bad input


@pytest.fixture
def small_registry(tmp_path, monkeypatch):
    """lm-eval's TaskManager over one extra task of its own (offline), standing in for the built-in registry
    (indexing all of lm-eval's tasks takes ~20 s)."""
    from lm_eval.tasks import TaskManager

    from prunetune.evaluation import zeroshot

    data = write_jsonl(tmp_path / "hub_like.jsonl", [
        {"q": "Once upon a time, there was a little", "options": ["girl", "zq"], "label": 0},
        {"q": "Tom and his mom went to the", "options": ["jqx", "park"], "label": 1},
    ])
    reg = tmp_path / "registry"
    reg.mkdir()
    (reg / "hub_like.yaml").write_text(
        "task: hub_like_task\n"
        "dataset_path: json\n"
        f"dataset_kwargs: {{data_files: '{data}'}}\n"
        "test_split: train\n"
        "output_type: multiple_choice\n"
        "doc_to_text: q\n"
        "doc_to_target: label\n"
        "doc_to_choice: options\n"
        "metric_list:\n  - metric: acc\n", encoding="utf-8")
    manager = TaskManager(include_path=str(reg), include_defaults=False)
    monkeypatch.setattr(zeroshot, "_builtin_task_manager", lambda: manager)
    return manager


def test_unknown_task(model, tok, small_registry):
    with pytest.raises(PrunetuneError, match=r"unknown task 'no_such_task_zz' \(local tasks: .*arc_easy"):
        evaluate_zeroshot(model, tok, ["no_such_task_zz"], limit=2)


def test_other_names_fall_through_to_lm_eval(model, tok, small_registry, tasks_dir):
    res = evaluate_zeroshot(model, tok, ["copa", "hub_like_task"], limit=2)
    assert set(res["tasks"]) == {"copa", "hub_like_task"}
    hub = res["tasks"]["hub_like_task"]
    assert hub["n"] == 2 and 0.0 <= hub["acc"] <= 1.0
    assert hub["acc_norm"] is None  # that task reports acc only
    assert res["protocol"]["tasks"]["hub_like_task"]["source"].startswith("lm-eval built-in")
    assert res["protocol"]["num_fewshot"] == 0
    assert res["average"]["acc"] == pytest.approx((hub["acc"] + res["tasks"]["copa"]["acc"]) / 2)
    assert res["average"]["acc_norm"] == res["tasks"]["copa"]["acc_norm"]


@pytest.mark.slow
def test_unknown_task_real_registry(model, tok):
    with pytest.raises(PrunetuneError, match=r"unknown task 'no_such_task_zz' \(local tasks: .*arc_easy"):
        evaluate_zeroshot(model, tok, ["no_such_task_zz"], limit=2)


@pytest.mark.parametrize("limit", [0, -3, 2.5])
def test_bad_limit(model, tok, limit):
    with pytest.raises(PrunetuneError, match="limit must be a positive integer"):
        evaluate_zeroshot(model, tok, ["arc_easy"], limit=limit)


def test_no_tasks(model, tok):
    with pytest.raises(PrunetuneError, match="no tasks"):
        evaluate_zeroshot(model, tok, [])


def test_tasks_dir_missing(model, tok, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(PrunetuneError, match=r"tasks_dir .*nowhere does not exist"):
        evaluate_zeroshot(model, tok, ["arc_easy"], limit=2, tasks_dir=missing)


def test_task_file_missing(model, tok, tmp_path):
    with pytest.raises(PrunetuneError, match=r"task file .*piqa\.jsonl not found"):
        evaluate_zeroshot(model, tok, ["piqa"], limit=2, tasks_dir=tmp_path)


def test_task_file_missing_field(model, tok, tmp_path):
    write_jsonl(tmp_path / "copa.jsonl", [
        {"query": "The man fell, therefore", "choices": ["he got hurt.", "he flew."], "gold": 0},
        {"query": "The dog barked, because", "choices": ["it saw a cat.", "it slept."]},
    ])
    with pytest.raises(PrunetuneError, match=r"copa\.jsonl, line 2: missing field 'gold'"):
        evaluate_zeroshot(model, tok, ["copa"], limit=2, tasks_dir=tmp_path)


def test_task_file_missing_field_winogrande(model, tok, tmp_path):
    write_jsonl(tmp_path / "winogrande.jsonl", [{"context_options": ["A so B", "A so C"], "gold": 1}])
    with pytest.raises(PrunetuneError, match=r"winogrande\.jsonl, line 1: missing field 'continuation'"):
        evaluate_zeroshot(model, tok, ["winogrande"], tasks_dir=tmp_path)


@pytest.mark.parametrize("line, needle", [
    ('{"sentence1": "a", "sentence2": "b", "label": "0"}', "field 'label' should be an integer"),
    ('{"sentence1": "a", "sentence2": "b", "label": 2}', "field 'label' is 2, out of range for 2 choices"),
    ('{"sentence1": "a", "sentence2": "b", "label": 0', "not valid JSON"),
])
def test_task_file_bad_values(model, tok, tmp_path, line, needle):
    (tmp_path / "rte.jsonl").write_text(line + "\n", encoding="utf-8")
    with pytest.raises(PrunetuneError, match=r"rte\.jsonl, line 1: " + needle.replace("(", r"\(")):
        evaluate_zeroshot(model, tok, ["rte"], tasks_dir=tmp_path)
