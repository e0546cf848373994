"""Configuration parsing and the data layer (corpora, calibration windows, evaluation windows)."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch

from prunekit import PrunekitError
from prunekit import data as pdata
from prunekit.config import (
    CalibConfig,
    EvalConfig,
    PruneConfig,
    RunConfig,
    SparsityConfig,
    apply_mapping,
    dump_yaml,
    load_yaml,
    parse_sparsity,
    set_leaf,
)
from prunekit.data import documents, eval_text, eval_windows, sample_windows

# ----------------------------------------------------------------------------- sparsity


@pytest.mark.parametrize(
    "text,fraction,n,m",
    [
        ("0.5", 0.5, None, None),
        (" 0.7 ", 0.7, None, None),
        (0.25, 0.25, None, None),
        ("0", 0.0, None, None),
        ("2:4", 0.5, 2, 4),
        ("1:4", 0.75, 1, 4),
        ("3:4", 0.25, 3, 4),
        ("4:8", 0.5, 4, 8),
    ],
)
def test_parse_sparsity(text, fraction, n, m):
    sp = parse_sparsity(text)
    assert sp.fraction == pytest.approx(fraction)
    assert (sp.n, sp.m) == (n, m)
    assert sp.is_nm == (n is not None)


def test_sparsity_str():
    assert str(parse_sparsity("2:4")) == "2:4"
    assert str(parse_sparsity("0.5")) == "0.5"


@pytest.mark.parametrize("text", ["1.0", "1", "-0.1", "4:2", "4:4", "0:4", "-1:4", "abc", "2:4:8", "a:b", "", "50%"])
def test_parse_sparsity_errors(text):
    with pytest.raises(PrunekitError):
        parse_sparsity(text)


# ----------------------------------------------------------------------------- config objects


def test_sparsity_config_validate():
    assert SparsityConfig(sparsity="2:4").validate().n == 2
    for bad in (
        SparsityConfig(method="obs"),
        SparsityConfig(scope="column"),
        SparsityConfig(blocksize=0),
        SparsityConfig(percdamp=0.0),
        SparsityConfig(percdamp=-0.01),
        SparsityConfig(sparsity="1.2"),
    ):
        with pytest.raises(PrunekitError):
            bad.validate()


def test_other_sections_validate():
    for bad in (CalibConfig(nsamples=0), CalibConfig(seqlen=1), CalibConfig(gen_batch_size=0)):
        with pytest.raises(PrunekitError):
            bad.validate()
    for bad in (EvalConfig(eval_seqlen=1), EvalConfig(eval_windows=-1), EvalConfig(eval_batch_size=0)):
        with pytest.raises(PrunekitError):
            bad.validate()
    with pytest.raises(PrunekitError):
        PruneConfig(batch_size=0).validate()
    run = RunConfig()
    run.model.device = "cpu"
    assert run.validate() == parse_sparsity("0.5")
    assert run.prune.device == "cpu"  # the model's device setting reaches the pruning pass
    run.model.dtype = "int8"
    with pytest.raises(PrunekitError):
        run.validate()


def test_eval_datasets():
    assert EvalConfig(eval="wikitext2, c4").datasets() == ["wikitext2", "c4"]
    assert EvalConfig(eval="none").datasets() == []
    assert EvalConfig(eval="").datasets() == []


def test_mapping_nested_and_flat(tmp_path):
    cfg = RunConfig()
    apply_mapping(cfg, {"prune": {"calib": {"nsamples": 7}, "sparsity": {"method": "sparsegpt"}}, "seqlen": 64})
    apply_mapping(cfg, {"eval-windows": 3, "percdamp": 0.05})
    assert cfg.prune.calib.nsamples == 7
    assert cfg.prune.calib.seqlen == 64
    assert cfg.prune.sparsity.method == "sparsegpt"
    assert cfg.prune.sparsity.percdamp == 0.05
    assert cfg.eval.eval_windows == 3
    with pytest.raises(PrunekitError, match="unknown setting"):
        set_leaf(cfg, "nsample", 3)
    # a dumped configuration loads back to the same values
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(cfg))
    again = RunConfig()
    load_yaml(path, again)
    assert again == cfg


def test_load_yaml_errors(tmp_path):
    with pytest.raises(PrunekitError, match="does not exist"):
        load_yaml(tmp_path / "nope.yaml", RunConfig())
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(PrunekitError, match="not valid YAML"):
        load_yaml(bad, RunConfig())
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(PrunekitError, match="mapping"):
        load_yaml(listy, RunConfig())


# ----------------------------------------------------------------------------- calibration windows


class NumberTokenizer:
    """Each whitespace-separated word is an integer, which is its token id."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, text: str) -> dict:
        self.calls += 1
        return {"input_ids": [int(w) for w in text.split()]}


def _doc(k: int, length: int) -> str:
    return " ".join(str(k * 1000 + j) for j in range(length))


SEQLEN = 8
# documents of 3, 8 (== seqlen: must be skipped), 9 (one more: usable, start 0 only), 20, 40 tokens
DOC_LENGTHS = [3, 8, 9, 20, 40]
DOCS = [_doc(k, n) for k, n in enumerate(DOC_LENGTHS)]


def _sparsegpt_c4_windows(docs, tokenizer, nsamples, seqlen, seed):
    """SparseGPT's get_c4 calibration loop (Frantar & Alistarh 2023), verbatim in structure."""
    random.seed(seed)
    out = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(docs) - 1)
            ids = tokenizer(docs[i])["input_ids"]
            if len(ids) > seqlen:
                break
        i = random.randint(0, len(ids) - seqlen - 1)
        out.append(ids[i : i + seqlen])
    return torch.tensor(out)


def test_sample_windows_follows_sparsegpt():
    tok = NumberTokenizer()
    got = sample_windows(DOCS, tok, nsamples=25, seqlen=SEQLEN, seed=3)
    assert got.shape == (25, SEQLEN) and got.dtype == torch.long
    assert torch.equal(got, _sparsegpt_c4_windows(DOCS, NumberTokenizer(), 25, SEQLEN, 3))
    assert tok.calls <= len(DOCS)  # each document is tokenized once
    used = set()
    for row in got.tolist():
        k, start = divmod(row[0], 1000)
        used.add(k)
        assert row == [k * 1000 + start + j for j in range(SEQLEN)]  # a contiguous run of one document
        assert DOC_LENGTHS[k] > SEQLEN
        assert start + SEQLEN <= DOC_LENGTHS[k] - 1  # randint(0, n - seqlen - 1): the last token is never included
    assert used <= {2, 3, 4}
    assert 4 in used and 3 in used


def test_sample_windows_is_deterministic_per_seed():
    a = sample_windows(DOCS, NumberTokenizer(), 10, SEQLEN, seed=0)
    b = sample_windows(DOCS, NumberTokenizer(), 10, SEQLEN, seed=0)
    c = sample_windows(DOCS, NumberTokenizer(), 10, SEQLEN, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # random.seed is part of the recipe: state left over from elsewhere does not matter
    random.seed(12345)
    random.random()
    assert torch.equal(sample_windows(DOCS, NumberTokenizer(), 10, SEQLEN, seed=0), a)


def test_sample_windows_with_the_whitespace_tokenizer(ws_tokenizer):
    docs = ["a b c", "the quick brown fox jumps over the lazy dog again and again and again"]
    got = sample_windows(docs, ws_tokenizer, 4, 5, seed=0)
    assert got.shape == (4, 5)
    ids = ws_tokenizer(docs[1])["input_ids"]
    for row in got.tolist():
        assert any(ids[s : s + 5] == row for s in range(len(ids) - 5))


def test_sample_windows_without_long_enough_documents():
    with pytest.raises(PrunekitError, match="lower --seqlen"):
        sample_windows([_doc(0, 8), _doc(1, 3)], NumberTokenizer(), 2, SEQLEN, seed=0)


def test_sample_windows_single_text_matches_sparsegpt_wikitext_loader():
    text = _doc(0, 200)
    got = sample_windows([text], NumberTokenizer(), 5, SEQLEN, seed=0)
    random.seed(0)
    want = []
    for _ in range(5):
        i = random.randint(0, 200 - SEQLEN - 1)
        want.append(list(range(i, i + SEQLEN)))
    assert got.tolist() == want


# ----------------------------------------------------------------------------- corpora


WIKI_RAW = " \n = Title = \n \n Body one , with @-@ marks . \n \n = = Section = = \n \n Body two . \n"
# the Hugging Face rows of that file: blank line -> "", other line -> line + "\n"
WIKI_ROWS = ["", " = Title = \n", "", " Body one , with @-@ marks . \n", "", " = = Section = = \n", "", " Body two . \n"]


def _write(root: Path, rel: str, text: str) -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text, encoding="utf-8")
    return p


def test_wikitext2_from_data_dir(tmp_path):
    _write(tmp_path, "wikitext2/wiki.test.raw", WIKI_RAW)
    docs = documents("wikitext2", str(tmp_path))
    assert docs == ["\n\n".join(WIKI_ROWS)]
    assert docs[0].startswith("\n\n = Title = \n\n\n\n\n Body one")
    assert eval_text("wikitext2", str(tmp_path)) == "\n\n".join(WIKI_ROWS)


def test_data_dir_from_environment(tmp_path, monkeypatch):
    _write(tmp_path, "wikitext2/wiki.test.raw", WIKI_RAW)
    monkeypatch.setenv(pdata.DATA_ENV, str(tmp_path))
    assert documents("wikitext2") == ["\n\n".join(WIKI_ROWS)]


def test_real_wikitext2_has_the_published_row_count():
    raw_path = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2" / "wiki.test.raw"
    if not raw_path.is_file():
        pytest.skip("shared data not present")
    rows = pdata._wikitext_rows(raw_path.read_text(encoding="utf-8"))
    assert len(rows) == 4358
    assert rows[0] == "" and rows[1] == " = Robert Boulter = \n"


def test_ptb_and_c4_from_data_dir(tmp_path):
    _write(tmp_path, "ptb/ptb.test.txt", " no it was n't black monday \n but while the new york \n\n")
    assert documents("ptb", str(tmp_path)) == ["no it was n't black monday but while the new york"]
    rows = [{"text": "first doc", "url": "u"}, {"text": "second\ndoc", "timestamp": "t"}]
    _write(tmp_path, "c4/c4-train.00000-of-01024.first1000.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert documents("c4", str(tmp_path)) == ["first doc", "second\ndoc"]
    assert eval_text("c4", str(tmp_path)) == "first doc second\ndoc"


def test_missing_corpus_without_hub_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # no hub, whatever is installed
    with pytest.raises(PrunekitError, match="wikitext2/wiki.test.raw"):
        documents("wikitext2", str(tmp_path))
    monkeypatch.delenv(pdata.DATA_ENV, raising=False)
    with pytest.raises(PrunekitError):
        documents("c4", None)


def test_local_files(tmp_path):
    txt = _write(tmp_path, "notes.txt", "one two\nthree\n")
    assert documents(str(txt)) == ["one two\nthree\n"]
    jl = _write(tmp_path, "docs.jsonl", '{"text": "a b"}\n\n{"text": "c", "meta": 1}\n')
    assert documents(str(jl)) == ["a b", "c"]
    assert eval_text(str(jl)) == "a b c"


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("missing.txt", None, "does not exist"),
        ("missing.jsonl", None, "does not exist"),
        ("empty.txt", "  \n\n", "no text"),
        ("bad.jsonl", '{"text": "ok"}\nnot json\n', "line 2 is not JSON"),
        ("notext.jsonl", '{"body": "x"}\n', 'no "text"'),
        ("list.jsonl", '["text"]\n', 'no "text"'),
        ("blank.jsonl", '{"text": " "}\n', "no text"),
    ],
)
def test_local_file_errors(tmp_path, name, content, match):
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(PrunekitError, match=match):
        documents(str(path))


@pytest.mark.parametrize("name", ["wikitext103", "data.csv", "self"])
def test_unknown_corpus(name):
    with pytest.raises(PrunekitError, match="unknown corpus"):
        documents(name)


# ----------------------------------------------------------------------------- evaluation windows


def test_eval_windows_cut_non_overlapping_windows():
    got = eval_windows(list(range(11)), 3)
    assert got.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]  # the tail (9, 10) is dropped
    assert got.dtype == torch.long
    assert eval_windows(torch.arange(11), 3, limit=2).tolist() == [[0, 1, 2], [3, 4, 5]]
    assert eval_windows(list(range(11)), 3, limit=10).shape == (3, 3)
    assert eval_windows(torch.arange(12).view(1, 12), 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


def test_eval_windows_too_short():
    with pytest.raises(PrunekitError, match="fewer than one window"):
        eval_windows([1, 2, 3], 4)


def test_yaml_numbers_written_without_a_dot_are_numbers(tmp_path):
    """PyYAML reads `lr: 1e-3` as a string; settings coerce it to the field's type."""
    from prunekit.config import RunConfig, load_yaml

    f = tmp_path / "c.yaml"
    f.write_text("lr: 1e-3\nnsamples: '16'\n")
    cfg = RunConfig()
    load_yaml(f, cfg)
    assert cfg.prune.recon.lr == 1e-3 and cfg.prune.calib.nsamples == 16
    f.write_text("lr: fast\n")
    with pytest.raises(PrunekitError, match="lr needs a number"):
        load_yaml(f, RunConfig())


def test_unquoted_nm_sparsity_in_yaml_stays_nm(tmp_path):
    """YAML 1.1 reads `2:4` as the base-60 integer 124; prunekit's loader keeps it as N:M."""
    from prunekit.config import RunConfig, load_yaml

    p = tmp_path / "c.yaml"
    p.write_text("sparsity: 2:4\nnsamples: 8\n")
    cfg = RunConfig()
    load_yaml(p, cfg)
    assert cfg.prune.sparsity.sparsity == "2:4" and cfg.prune.calib.nsamples == 8
