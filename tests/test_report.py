"""`prunekit report`: one Markdown and HTML page comparing run directories."""

from __future__ import annotations

import json

import pytest

from prunekit.cli import main


def _run(tmp_path, name: str, ppl: float, recon: str | None, zs: float | None):
    d = tmp_path / name
    d.mkdir()
    m = {
        "settings": {"method": "wanda", "sparsity": "0.5", "calib": "c4", "nsamples": 8, "seqlen": 64},
        "perplexity": {"wikitext2": ppl},
        "sparsity": {"overall": 0.5},
        "timing": {"prune_s": 12.5},
        "peak_rss_mb": 900.0,
        "notes": ["block 3: kept the weights from before reconstruction"] if recon else [],
    }
    if recon:
        m["reconstruction"] = {
            "settings": {"recon": recon},
            "error": {"calib_after": 0.0123, "heldout_after": 0.0456},
            "units": [{"loss_curve": [0.5, 0.25, 0.125]}, {"loss_curve": [0.4, 0.2, 0.1]}],
        }
    if zs is not None:
        m["zeroshot"] = {"tasks": {"boolq": {"acc": zs}, "hellaswag": {"acc": 0.3, "acc_norm": 0.35}}, "mean_acc": zs}
    (d / "metrics.json").write_text(json.dumps(m))
    return d


def test_report_compares_runs_in_markdown_and_html(tmp_path, capsys):
    a = _run(tmp_path, "lr", 70.2, None, None)
    b = _run(tmp_path, "br-gp", 55.5, "br-gp", 0.61)
    out = tmp_path / "cmp"
    assert main(["report", str(a), str(b), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    lines = [line for line in md.splitlines() if line.startswith("| lr ") or line.startswith("| br-gp ")]
    assert len(lines) == 2
    assert "70.200" in lines[0] and "55.500" in lines[1]
    assert "0.0456" in lines[1] and "0.6100" in lines[1] and "0.3500" in lines[1]  # held-out error, zero-shot
    assert "kept the weights from before reconstruction" in md
    assert (out / "loss_curves.png").stat().st_size > 1000 and "loss_curves.png" in md
    html = (out / "report.html").read_text()
    assert html.count("<tr>") == 3 and "<img src='loss_curves.png'" in html


def test_report_on_a_directory_without_metrics(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no metrics.json" in capsys.readouterr().err
