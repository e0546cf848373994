"""Zero-shot evaluation: prompt formats, harness-style scoring against a brute-force reference, metrics."""

from __future__ import annotations

import json
import os
import math
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import MAX_POS, make_tiny_model, random_ids

from prunekit import zeroshot as zs
from prunekit.errors import PrunekitError

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "zeroshot"
ITEMS = 4  # real lines copied per task file


class ByteTokenizer:
    """Byte-level tokenizer for the 128-token tiny models: each UTF-8 byte -> ``byte % 128``.

    Like a Hugging Face tokenizer it adds BOS by default, so the code under test must ask for
    ``add_special_tokens=False`` itself.
    """

    bos_token_id = 1
    eos_token_id = 2
    pad_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [b % 128 for b in text.encode("utf-8")]
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": self.encode(text, add_special_tokens)}


@pytest.fixture
def tok() -> ByteTokenizer:
    return ByteTokenizer()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A data directory holding the first few real lines of every task file."""
    if not REAL.is_dir():
        pytest.skip(f"{REAL} is not there")
    root = tmp_path_factory.mktemp("data")
    (root / "zeroshot").mkdir()
    for name in zs.TASK_FILES.values():
        with (REAL / name).open(encoding="utf-8") as fh:
            lines = [next(fh) for _ in range(ITEMS)]
        (root / "zeroshot" / name).write_text("".join(lines), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def llama():
    return make_tiny_model("llama")


def reference_loglik(model, ctx: list[int], cont: list[int], max_length: int = MAX_POS) -> tuple[float, bool]:
    """Brute force: the single unpadded (left-truncated) sequence through the full model."""
    toks = (ctx + cont)[-(max_length + 1) :][:-1]
    cont = cont[-max_length:]  # a continuation longer than the context: its last max_length tokens
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([toks]), use_cache=False).logits[0].float()
    logprobs = F.log_softmax(logits, dim=-1)
    total, greedy = 0.0, True
    for k, target in enumerate(cont):
        pos = len(toks) - len(cont) + k
        total += float(logprobs[pos, target])
        greedy &= int(logprobs[pos].argmax()) == target
    return total, greedy


# --- task names ----------------------------------------------------------------------------------


def test_task_lists():
    assert len(zs.TASKS) == 9 and set(zs.PAPER_TASKS) <= set(zs.TASKS) and len(zs.PAPER_TASKS) == 7
    assert set(zs.TASK_FILES) == set(zs.TASKS)


def test_parse_tasks():
    assert zs.parse_tasks("boolq, rte,boolq") == ["boolq", "rte"]
    assert zs.parse_tasks("paper") == list(zs.PAPER_TASKS)
    assert zs.parse_tasks("all") == list(zs.TASKS)
    with pytest.raises(PrunekitError, match="unknown zero-shot task 'mmlu'.*arc_challenge"):
        zs.parse_tasks("boolq,mmlu")
    with pytest.raises(PrunekitError, match="no zero-shot task"):
        zs.parse_tasks(" , ")


def test_missing_file_and_data_dir(tmp_path, llama, tok, monkeypatch):
    (tmp_path / "zeroshot").mkdir()
    with pytest.raises(PrunekitError, match=r"boolq\.jsonl is missing; set --data-dir"):
        zs.evaluate_tasks(llama, tok, ["boolq"], data_dir=str(tmp_path))
    monkeypatch.delenv("PRUNEKIT_DATA_DIR", raising=False)
    with pytest.raises(PrunekitError, match="no data directory is set; set --data-dir"):
        zs.evaluate_tasks(llama, tok, ["piqa"])
    with pytest.raises(PrunekitError, match="unknown zero-shot task"):
        zs.evaluate_tasks(llama, tok, ["nope"], data_dir=str(tmp_path))
    with pytest.raises(PrunekitError, match="no zero-shot task"):
        zs.evaluate_tasks(llama, tok, [], data_dir=str(tmp_path))


def test_bad_line_is_named(tmp_path):
    (tmp_path / "zeroshot").mkdir()
    (tmp_path / "zeroshot" / "rte.jsonl").write_text('{"premise": "a", "hypothesis": "b", "label": "maybe"}\n')
    with pytest.raises(PrunekitError, match=r"rte\.jsonl line 1 does not fit the rte format"):
        zs.load_docs("rte", str(tmp_path))


# --- prompt formats --------------------------------------------------------------------------------


def test_rte_prompt():
    doc = zs.rte_doc({"premise": "Cats purr.", "hypothesis": "Cats are loud.", "label": "not_entailment", "idx": 3})
    assert doc.contexts == ["Cats purr.\nQuestion: Cats are loud. True or False?\nAnswer:"] * 2
    assert doc.continuations == [" True", " False"]
    assert doc.gold == 1
    assert zs.rte_doc({"premise": "p", "hypothesis": "h", "label": "entailment"}).gold == 0


def test_hellaswag_prompt():
    row = {
        "activity_label": "Making a cake",
        "ctx_a": "A woman mixes flour [title] in a bowl.",
        "ctx_b": "she",
        "endings": [" pours it [step] into a pan. ", "eats  the bowl.", "[header] leaves."],
        "label": "1",
    }
    doc = zs.hellaswag_doc(row)
    assert doc.contexts == ["Making a cake: A woman mixes flour. in a bowl. She"] * 3
    # the harness strips before removing brackets, so "[header] leaves." keeps a leading space and
    # the delimiter comes on top of it
    assert doc.continuations == [" pours it into a pan.", " eats the bowl.", "  leaves."]
    assert doc.norm_lengths == [len("pours it into a pan."), len("eats the bowl."), len(" leaves.")]
    assert doc.gold == 1
    assert zs.hellaswag_preprocess("  a [title] b [x y] c  ") == "a. b c"


def test_query_tasks_get_the_harness_prompt():
    boolq = zs.query_doc("boolq", {"query": "Passage: Sky is blue.\nQuestion: is the sky blue?", "choices": ["no", "yes"], "gold": 1})
    assert boolq.contexts[0] == "Sky is blue.\nQuestion: is the sky blue?\nAnswer:"
    assert boolq.continuations == [" no", " yes"]
    arc = zs.query_doc("arc_easy", {"query": "Question: Why?", "choices": ["a", " b"], "gold": 0})
    assert arc.contexts[0] == "Question: Why?\nAnswer:"
    assert arc.continuations == [" a", " b"]  # a choice that has its space keeps just one
    assert arc.norm_lengths == [1, 1]
    piqa = zs.query_doc("piqa", {"query": "Question: open a jar\n", "choices": ["twist", "pull"], "gold": 0})
    assert piqa.contexts[0] == "Question: open a jar\nAnswer:"
    obqa = zs.query_doc("openbookqa", {"query": "Predators eat", "choices": ["lions", "bunnies"], "gold": 1})
    assert obqa.contexts[0] == "Predators eat" and obqa.continuations == [" lions", " bunnies"]


def test_real_files_parse(data_dir):
    for task in zs.TASKS:
        docs = zs.load_docs(task, str(data_dir))
        assert len(docs) == ITEMS
        for d in docs:
            assert len(d.contexts) == len(d.continuations) and 0 <= d.gold < len(d.contexts)
            assert all(c.startswith(" ") for c in d.continuations)
    assert zs.load_docs("winogrande", str(data_dir))[0].continuations == [" always got the easier cases."] * 2
    assert zs.load_docs("lambada", str(data_dir))[0].continuations == [" signs"]


# --- tokenization and scoring ----------------------------------------------------------------------


def test_encode_pair_moves_trailing_space(tok):
    ctx, cont = zs.encode_pair(tok, "Answer: ", "yes")
    assert ctx == tok.encode("Answer:", False) and cont == tok.encode(" yes", False)
    ctx, cont = zs.encode_pair(tok, "Q\n", "Answer:", bos=True)
    assert ctx == [tok.bos_token_id, *tok.encode("Q", False)] and cont == tok.encode("\nAnswer:", False)
    assert zs.encode_pair(tok, "", " x")[0] == [tok.bos_token_id]  # empty context: the prefix token


def test_bos_only_for_gemma():
    assert zs._wants_bos(make_tiny_model("gemma2"))
    assert not zs._wants_bos(make_tiny_model("llama"))


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gemma2"])
def test_batched_scoring_matches_brute_force(family):
    model = make_tiny_model(family)
    # mixed lengths so that every batch is padded; three requests overflow the 64-token context,
    # one of them with a continuation longer than the context
    lengths = [(5, 3), (20, 1), (2, 7), (40, 4), (70, 2), (11, 11), (60, 10), (1, 1), (3, 70)]
    requests = []
    for seed, (n_ctx, n_cont) in enumerate(lengths):
        ids = random_ids(1, n_ctx + n_cont, seed=seed)[0].tolist()
        requests.append((ids[:n_ctx], ids[n_ctx:]))
    got = zs.score_requests(model, requests, batch_size=3)
    for (ctx, cont), (ll, greedy) in zip(requests, got):
        ref_ll, ref_greedy = reference_loglik(model, ctx, cont)
        assert ll == pytest.approx(ref_ll, abs=1e-4)
        assert greedy == ref_greedy


def test_greedy_flag_is_exercised(llama):
    """A continuation made of the model's own argmax tokens is greedy; a changed one is not."""
    ctx = random_ids(1, 6, seed=9)[0].tolist()
    cont: list[int] = []
    with torch.no_grad():
        for _ in range(3):
            cont.append(int(llama(input_ids=torch.tensor([ctx + cont])).logits[0, -1].argmax()))
    other = cont[:-1] + [(cont[-1] + 1) % 128]
    (_, g1), (_, g2) = zs.score_requests(llama, [(ctx, cont), (ctx, other)], batch_size=2)
    assert g1 and not g2


def test_item_scores_match_unpadded_text(llama, tok, data_dir, monkeypatch):
    """For real OpenBookQA items (short enough to fit), every choice's score equals the brute-force
    log-likelihood of the continuation's bytes after the context's bytes."""
    seen = []
    real = zs.score_requests

    def spy(model, requests, *a, **k):
        out = real(model, requests, *a, **k)
        seen.extend(zip(requests, out))
        return out

    monkeypatch.setattr(zs, "score_requests", spy)
    docs = zs.load_docs("openbookqa", str(data_dir))
    short = [d for d in docs if all(len((c + x).encode()) <= MAX_POS for c, x in zip(d.contexts, d.continuations))]
    assert short
    zs.evaluate_docs(llama, tok, "openbookqa", short, batch_size=3)
    pairs = [(c, x) for d in short for c, x in zip(d.contexts, d.continuations)]
    assert len(seen) == len(pairs)
    for (context, cont), ((ctx_ids, cont_ids), (ll, _)) in zip(pairs, seen):
        assert ctx_ids == tok.encode(context, False) and cont_ids == tok.encode(cont, False)
        full = tok.encode(context + cont, False)
        with torch.no_grad():
            logprobs = F.log_softmax(llama(input_ids=torch.tensor([full])).logits[0].float(), -1)
        n = len(cont_ids)
        ref = sum(float(logprobs[len(full) - n - 1 + k, full[len(full) - n + k]]) for k in range(n))
        assert ll == pytest.approx(ref, abs=1e-4)


def test_winogrande_scores_only_the_continuation(llama, tok, monkeypatch):
    row = {"context_options": ["Sam beat Alex so Sam", "Sam beat Alex so Alex"], "continuation": "was happy.", "gold": 0}
    changed = dict(row, context_options=["Sam beat Alex so Samantha", "Sam beat Alex so Al"])
    seen = []
    real = zs.score_requests
    monkeypatch.setattr(zs, "score_requests", lambda m, r, *a, **k: seen.extend(r) or real(m, r, *a, **k))
    zs.evaluate_docs(llama, tok, "winogrande", [zs.winogrande_doc(row), zs.winogrande_doc(changed)])
    assert len(seen) == 4
    scored = tok.encode(" was happy.", False)
    assert all(cont == scored for _, cont in seen)  # every option scores the same tokens ...
    contexts = [ctx for ctx, _ in seen]
    assert contexts == [tok.encode(o, False) for o in row["context_options"] + changed["context_options"]]
    # ... and its score is the continuation's log-likelihood only (the option text is context)
    ll = real(llama, seen[:2])
    for (ctx, cont), (got, _) in zip(seen[:2], ll):
        assert got == pytest.approx(reference_loglik(llama, ctx, cont)[0], abs=1e-4)
    metrics = zs.evaluate_docs(llama, tok, "winogrande", [zs.winogrande_doc(row)])
    assert "acc_norm" not in metrics and metrics["n"] == 1


# --- metrics ---------------------------------------------------------------------------------------


def test_acc_and_acc_norm_can_disagree(llama, tok, monkeypatch):
    # the short choice has the higher total log-likelihood, the long one the higher per-character one
    doc = zs.query_doc("arc_easy", {"query": "Question: q", "choices": ["no", "a much longer answer here"], "gold": 1})
    lls = [[-3.0, -6.0]]
    m = zs.choice_metrics("arc_easy", [doc], lls)
    assert m["acc"] == 0.0 and m["acc_norm"] == 1.0
    # the same through evaluate_docs, with the scores injected
    monkeypatch.setattr(zs, "score_requests", lambda model, reqs, *a, **k: [(-3.0, False), (-6.0, False)])
    m2 = zs.evaluate_docs(llama, tok, "arc_easy", [doc])
    assert (m2["acc"], m2["acc_norm"]) == (0.0, 1.0)
    # acc_norm is not reported where the harness does not report it
    assert "acc_norm" not in zs.evaluate_docs(llama, tok, "boolq", [doc])


def test_lambada_metrics(llama, tok, monkeypatch):
    docs = [zs.lambada_doc({"context": "a b", "continuation": "c"}), zs.lambada_doc({"context": "d", "continuation": "e"})]
    monkeypatch.setattr(zs, "score_requests", lambda model, reqs, *a, **k: [(-1.0, True), (-3.0, False)])
    m = zs.evaluate_docs(llama, tok, "lambada", docs)
    assert m["acc"] == 0.5 and m["n"] == 2
    assert m["ppl"] == pytest.approx(math.exp(2.0))


def test_stderr_is_the_harness_sample_stderr():
    scores = [1, 0, 1, 1, 0, 1, 1]
    p, n = sum(scores) / len(scores), len(scores)
    assert zs.accuracy_stderr(p, n) == pytest.approx(statistics.stdev(scores) / math.sqrt(n))
    assert zs.accuracy_stderr(p, n) == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))
    assert zs.accuracy_stderr(1.0, 1) is None


def test_limit(llama, tok, data_dir):
    res = zs.evaluate_tasks(llama, tok, ["boolq", "lambada"], data_dir=str(data_dir), limit=2, batch_size=4)
    assert res.metrics["boolq"]["n"] == 2 and res.metrics["lambada"]["n"] == 2
    assert "first 2 items" in res.to_markdown()
    with pytest.raises(PrunekitError, match="--limit"):
        zs.evaluate_tasks(llama, tok, ["boolq"], data_dir=str(data_dir), limit=0)


def test_all_tasks_end_to_end(llama, tok, data_dir, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_DATA_DIR", str(data_dir))  # the default data directory
    res = zs.evaluate_tasks(llama, tok, list(zs.TASKS), limit=3, batch_size=5)
    assert list(res.metrics) == list(zs.TASKS)
    for task, m in res.metrics.items():
        assert m["n"] == 3 and 0.0 <= m["acc"] <= 1.0
        assert ("acc_norm" in m) == (task in zs.NORM_TASKS)
        assert ("ppl" in m) == (task == "lambada")
    assert math.isfinite(res.metrics["lambada"]["ppl"])
    expected = [res.metrics[t]["acc_norm" if t in ("hellaswag", "arc_easy", "arc_challenge", "openbookqa") else "acc"] for t in zs.PAPER_TASKS]
    assert res.mean_acc == pytest.approx(sum(expected) / 7)
    assert res.mean_plain_acc == pytest.approx(sum(res.metrics[t]["acc"] for t in zs.PAPER_TASKS) / 7)
    d = json.loads(json.dumps(res.to_dict()))
    assert d["mean_acc"] == pytest.approx(res.mean_acc) and d["mean_acc_tasks"] == list(zs.PAPER_TASKS)
    md = res.to_markdown()
    assert md.count("\n| ") >= 9 + 2 and "**mean**" in md and " ± " in md
    # deterministic: the same run gives the same numbers
    again = zs.evaluate_tasks(llama, tok, ["hellaswag"], data_dir=str(data_dir), limit=3, batch_size=2)
    assert again.metrics["hellaswag"] == res.metrics["hellaswag"]


def test_mean_only_over_paper_tasks_run():
    res = zs.ZeroShotResult({"piqa": {"acc": 0.5, "acc_stderr": 0.1, "acc_norm": 0.6, "acc_norm_stderr": 0.1, "n": 10}})
    assert res.mean_acc is None and "mean" not in res.to_markdown()
    res = zs.ZeroShotResult(
        {
            "boolq": {"acc": 0.6, "acc_stderr": 0.1, "n": 10},
            "hellaswag": {"acc": 0.3, "acc_stderr": 0.1, "acc_norm": 0.4, "acc_norm_stderr": 0.1, "n": 10},
        }
    )
    assert res.mean_acc == pytest.approx(0.5) and res.mean_plain_acc == pytest.approx(0.45)


def test_lm_eval_task_configs_point_at_the_local_files(tmp_path):
    """The lm-eval backend's task YAMLs: RTE includes the harness's own config, others use our prompts."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is an optional extra (pip install 'prunekit[lmeval]')")
    import yaml as _yaml

    from prunekit.lmeval_backend import _task_yaml

    data = Path("/work/shared/data") if Path("/work/shared/data/zeroshot").is_dir() else None
    data_dir = os.environ.get("PRUNEKIT_DATA_DIR", str(data) if data else None)
    if not data_dir or not (Path(data_dir) / "zeroshot" / "rte.jsonl").is_file():
        pytest.skip("no zero-shot data")
    rte = _yaml.safe_load(_task_yaml("rte", tmp_path, data_dir, None))
    assert Path(rte["include"]).is_file() and rte["include"].endswith("super_glue/rte/default.yaml")
    assert rte["dataset_kwargs"]["data_files"]["validation"].endswith("zeroshot/rte.jsonl")
    assert "entailment" in rte["doc_to_target"]  # the file's label names map to the harness's 0/1
    arc = _yaml.safe_load(_task_yaml("arc_easy", tmp_path, data_dir, 3))
    rows = [json.loads(line) for line in (tmp_path / "arc_easy.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and rows[0]["ctx"].endswith("\nAnswer:") and not rows[0]["choices"][0].startswith(" ")
    assert [m["metric"] for m in arc["metric_list"]] == ["acc", "acc_norm"]
    wino = _task_yaml("winogrande", tmp_path, data_dir, None)
    assert "!function prunekit_wino.doc_to_choice" in wino and (tmp_path / "prunekit_wino.py").is_file()
    lam = _yaml.safe_load(_task_yaml("lambada", tmp_path, data_dir, None))
    assert lam["output_type"] == "loglikelihood" and lam["target_delimiter"] == ""
    with pytest.raises(PrunekitError, match="not available with --backend lm-eval"):
        _task_yaml("copa", tmp_path, data_dir, None)
