"""OWL non-uniform block sparsity (issue 13): outlier ratios, block targets, the pipeline's checks."""

from __future__ import annotations

import pytest
import torch

import prunekit
from prunekit.config import PruneConfig
from prunekit.errors import PrunekitError
from prunekit.owl import outlier_ratio, owl_sparsities

from conftest import make_tiny_model, random_ids


def test_outlier_ratio_counts_scores_above_m_times_the_mean():
    scores = torch.ones(100)
    scores[:3] = 1000.0  # mean ~31: three scores above 5x the mean
    assert outlier_ratio([scores[:50], scores[50:]], 5.0) == pytest.approx(0.03)
    assert outlier_ratio([torch.ones(10)], 5.0) == 0.0


def test_owl_sparsities_follow_outliers_and_keep_the_weighted_mean():
    ratios = [0.01, 0.05, 0.03, 0.02]
    sizes = [100, 100, 300, 100]
    s = owl_sparsities(ratios, sizes, 0.7, 0.08)
    assert sum(a * n for a, n in zip(s, sizes)) / sum(sizes) == pytest.approx(0.7, abs=1e-12)
    assert s[1] == min(s) and s[0] == max(s)  # most outliers -> least pruned
    assert max(s) - min(s) == pytest.approx(0.16)  # the paper's range: 2 lambda
    assert owl_sparsities([0.2, 0.2], [5, 7], 0.6, 0.08) == pytest.approx([0.6, 0.6])
    with pytest.raises(ValueError):
        owl_sparsities([0.0, 1.0], [1, 1], 0.05, 0.08)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_owl_prunes_each_block_to_its_own_target(method):
    model = make_tiny_model("llama", layers=4)
    with torch.no_grad():  # block 2 gets activation outliers: three huge input features of q/k/v
        model.model.layers[2].input_layernorm.weight[:3] *= 40
    cfg = PruneConfig()
    cfg.device, cfg.batch_size = "cpu", 4
    cfg.recon.recon = "lr"
    cfg.sparsity.method, cfg.sparsity.sparsity, cfg.sparsity.owl, cfg.sparsity.scope = method, "0.7", True, "row"
    _, report = prunekit.prune(model, None, cfg, calib_ids=random_ids(8, 16, 1), progress=False)
    owl = report.owl
    assert owl is not None and len(owl.sparsities) == 4
    assert owl.sparsities[2] == min(owl.sparsities)  # the outlier block is pruned least
    assert max(owl.sparsities) - min(owl.sparsities) == pytest.approx(0.16)
    for name, measured in report.per_layer.items():  # every layer is checked against its block's target
        j = int(name.split(".")[2])
        cols = model.get_submodule(name).weight.shape[1]
        assert abs(measured - owl.sparsities[j]) <= 1.0 / cols + 1e-9
    sizes = [sum(model.get_submodule(n).weight.numel() for n in report.per_layer if n.split(".")[2] == str(j)) for j in range(4)]
    assert sum(a * n for a, n in zip(owl.sparsities, sizes)) / sum(sizes) == pytest.approx(0.7, abs=1e-9)
    assert report.overall == pytest.approx(0.7, abs=0.02)


def test_owl_refuses_nm_and_bad_settings():
    for sparsity, m, lam, words in (("2:4", 5.0, 0.08, "unstructured"), ("0.7", 0.0, 0.08, "owl-m"), ("0.05", 5.0, 0.08, "owl-lambda")):
        cfg = PruneConfig()
        cfg.sparsity.sparsity, cfg.sparsity.owl, cfg.sparsity.owl_m, cfg.sparsity.owl_lambda = sparsity, True, m, lam
        with pytest.raises(PrunekitError, match=words):
            cfg.validate()
