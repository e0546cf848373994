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
