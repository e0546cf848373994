"""Interrupted runs continue from their checkpoint and end with the same model; same seed, same model."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model, random_ids

import prunekit
from prunekit.checkpoint import Checkpointer
from prunekit.config import PruneConfig

CALIB = random_ids(6, 16, seed=11)


class Killed(Exception):
    pass


def _cfg(recon: str, method: str) -> PruneConfig:
    cfg = PruneConfig(batch_size=2, device="cpu")
    cfg.sparsity.method = method
    cfg.recon.recon = recon
    if recon != "lr":
        cfg.recon.epochs = 2
        cfg.recon.lr = 1e-2
    return cfg


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("recon", "method"), [("lr", "sparsegpt"), ("br-gp", "wanda"), ("br-gp-cr", "magnitude")])
def test_killed_run_resumes_to_the_same_model(tmp_path, recon, method):
    reference, ref_report = prunekit.prune(make_tiny_model("llama", layers=3), None, _cfg(recon, method), calib_ids=CALIB, progress=False)

    def kill_after_second_window(k: int) -> None:
        if k == 1:
            raise Killed

    ckpt = Checkpointer(tmp_path, fingerprint="x")
    with pytest.raises(Killed):
        prunekit.prune(make_tiny_model("llama", layers=3), None, _cfg(recon, method), calib_ids=CALIB,
                       progress=False, checkpoint=ckpt, on_window=kill_after_second_window)
    finished = []
    resumed, report = prunekit.prune(make_tiny_model("llama", layers=3), None, _cfg(recon, method), progress=False,
                                     checkpoint=Checkpointer(tmp_path, fingerprint="x"), on_window=finished.append)
    assert finished[0] == 2  # windows 0 and 1 were not run again
    a, b = _state(reference), _state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert report.per_layer == ref_report.per_layer
    assert len(report.units) == len(ref_report.units)
    if recon != "lr":  # the guard's masks-only weights come back from the checkpoint: same verdicts
        assert report.guard.end_to_end == ref_report.guard.end_to_end and report.guard.end_to_end["compared"]
        assert report.guard.windows == ref_report.guard.windows


def test_a_resumed_run_whose_guard_reverts_the_whole_run_ends_the_same(tmp_path, monkeypatch):
    """The end-to-end revert needs every block's masks-only weights, also those saved before the stop."""
    import prunekit.pipeline as pipeline

    def worse_end_to_end(model, blocks, lr_states, e2e, g, mode):  # as if reconstruction were worse end to end
        assert sorted(lr_states) == list(range(len(blocks)))
        for j, state in lr_states.items():
            pipeline.restore(blocks[j], state)
        g.conclude(None, None, True, "forced by the test")

    monkeypatch.setattr(pipeline, "_end_to_end", worse_end_to_end)
    reference, _ = prunekit.prune(make_tiny_model("llama", layers=3), None, _cfg("br-gp", "wanda"), calib_ids=CALIB, progress=False)

    def kill(k: int) -> None:
        if k == 1:
            raise Killed

    with pytest.raises(Killed):
        prunekit.prune(make_tiny_model("llama", layers=3), None, _cfg("br-gp", "wanda"), calib_ids=CALIB,
                       progress=False, checkpoint=Checkpointer(tmp_path, fingerprint="x"), on_window=kill)
    resumed, _ = prunekit.prune(make_tiny_model("llama", layers=3), None, _cfg("br-gp", "wanda"), progress=False,
                                checkpoint=Checkpointer(tmp_path, fingerprint="x"))
    a, b = _state(reference), _state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    monkeypatch.undo()
    kept, _ = prunekit.prune(make_tiny_model("llama", layers=3), None, _cfg("br-gp", "wanda"), calib_ids=CALIB, progress=False)
    assert not all(torch.equal(a[k], v) for k, v in _state(kept).items())  # the revert did change the model


def test_checkpoint_with_other_settings_is_refused(tmp_path):
    Checkpointer(tmp_path, "a").save(0, 0, {}, {}, {}, {"per_layer": {}, "notes": [], "units": [], "recon_s": 0.0})
    with pytest.raises(prunekit.PrunekitError, match="other settings"):
        Checkpointer(tmp_path, "b").load()


def test_same_seed_same_settings_same_model():
    runs = [
        _state(prunekit.prune(make_tiny_model("qwen3"), None, _cfg("attn-mlp-gp", "sparsegpt"), calib_ids=CALIB, progress=False)[0])
        for _ in range(2)
    ]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
