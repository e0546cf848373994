"""Mask maths: unstructured (per row / per layer), N:M with N kept, and the sparsity check."""

from __future__ import annotations

import pytest
import torch

from prunekit import PrunekitError
from prunekit.config import Sparsity, parse_sparsity
from prunekit.masks import check_layer, check_nm, expected_fraction, make_mask, nm_mask, unstructured_mask

# Row 0 holds all the small scores: per layer they all go, per row each row loses its own two smallest.
SCORES = torch.tensor(
    [
        [1.0, 2.0, 3.0, 4.0],
        [10.0, 20.0, 30.0, 40.0],
    ]
)


def test_unstructured_per_row():
    mask = unstructured_mask(SCORES, 0.5, scope="row")
    expected = torch.tensor([[False, False, True, True], [False, False, True, True]])
    assert torch.equal(mask, expected)
    assert mask.dtype == torch.bool


def test_unstructured_per_layer():
    mask = unstructured_mask(SCORES, 0.5, scope="layer")
    expected = torch.tensor([[False, False, False, False], [True, True, True, True]])
    assert torch.equal(mask, expected)


def test_unstructured_prunes_the_floor_of_count_times_fraction():
    scores = torch.arange(14.0).view(2, 7)  # 7 columns * 0.5 = 3.5 -> 3 pruned per row
    mask = unstructured_mask(scores, 0.5, "row")
    assert mask.sum(1).tolist() == [4, 4]
    assert torch.equal(mask[:, :3], torch.zeros(2, 3, dtype=torch.bool))
    layer = unstructured_mask(scores, 0.5, "layer")  # 14 * 0.5 = 7 pruned: the 7 smallest
    assert torch.equal(layer.flatten(), torch.arange(14) >= 7)
    assert unstructured_mask(scores, 0.0, "row").all()
    assert unstructured_mask(scores, 0.0, "layer").all()
    # 0.3 of 7 columns -> 2 pruned per row (int(2.1))
    assert unstructured_mask(scores, 0.3, "row").sum().item() == 2 * 5


def test_unstructured_unknown_scope():
    with pytest.raises(ValueError):
        unstructured_mask(SCORES, 0.5, scope="column")


def test_nm_keeps_n_of_every_m():
    scores = torch.tensor([[5.0, 1.0, 3.0, 2.0, 0.5, 8.0, 7.0, 6.0]])
    keep1 = nm_mask(scores, 1, 4)
    keep3 = nm_mask(scores, 3, 4)
    keep2 = nm_mask(scores, 2, 4)
    assert keep1.sum().item() == 2  # 1 kept of each 4, not 1 pruned
    assert keep3.sum().item() == 6
    assert torch.equal(keep1, torch.tensor([[True, False, False, False, False, True, False, False]]))
    assert torch.equal(keep3, torch.tensor([[True, False, True, True, False, True, True, True]]))
    assert torch.equal(keep2, torch.tensor([[True, False, True, False, False, True, True, False]]))


def test_nm_groups_are_consecutive_inputs_of_a_row():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(6, 16, generator=g)
    mask = nm_mask(scores, 2, 4)
    assert mask.shape == scores.shape
    assert (mask.view(6, 4, 4).sum(-1) == 2).all()
    # the kept ones are the two largest of their group
    groups = scores.view(6, 4, 4)
    kept_min = torch.where(mask.view(6, 4, 4), groups, torch.inf).amin(-1)
    pruned_max = torch.where(mask.view(6, 4, 4), -torch.inf, groups).amax(-1)
    assert (kept_min > pruned_max).all()
    assert check_nm(mask, 2, 4)
    assert not check_nm(torch.ones_like(mask), 2, 4)


def test_nm_needs_m_dividing_the_columns():
    with pytest.raises(PrunekitError, match="6 inputs"):
        nm_mask(torch.rand(2, 6), 2, 4)


def test_make_mask_dispatches():
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0, 1.0, 2.0, 3.0, 4.0]])
    assert torch.equal(make_mask(scores, parse_sparsity("1:4")), nm_mask(scores, 1, 4))
    assert torch.equal(make_mask(scores, parse_sparsity("0.25"), "layer"), unstructured_mask(scores, 0.25, "layer"))
    assert make_mask(scores, parse_sparsity("0.75"), "row").sum().item() == 2


def test_expected_fraction():
    half = parse_sparsity("0.5")
    assert expected_fraction((3, 7), half, "row") == pytest.approx(3 / 7)
    assert expected_fraction((3, 7), half, "layer") == pytest.approx(10 / 21)
    assert expected_fraction((4, 8), parse_sparsity("1:4"), "row") == pytest.approx(0.75)
    assert expected_fraction((4, 8), parse_sparsity("3:4"), "layer") == pytest.approx(0.25)


def _pruned(weight, mask):
    return weight * mask


def test_check_layer_accepts_a_correct_layer():
    w = torch.randn(4, 8) + 3.0  # no accidental zeros
    mask = unstructured_mask(w.abs(), 0.5, "row")
    assert check_layer("l", _pruned(w, mask), mask, parse_sparsity("0.5"), 0.5) == pytest.approx(0.5)
    nm = nm_mask(w.abs(), 2, 4)
    assert check_layer("l", _pruned(w, nm), nm, parse_sparsity("2:4"), 0.5) == pytest.approx(0.5)


def test_check_layer_rejects_off_target():
    w = torch.randn(4, 8) + 3.0
    mask = unstructured_mask(w.abs(), 0.25, "row")  # 25% pruned, 50% asked
    with pytest.raises(RuntimeError, match="off its target"):
        check_layer("l", _pruned(w, mask), mask, parse_sparsity("0.5"), 0.5)
    dense = torch.ones_like(mask)
    with pytest.raises(RuntimeError, match="off its target"):
        check_layer("l", w, dense, parse_sparsity("0.5"), 0.5)


def test_check_layer_rejects_nonzero_pruned_weight():
    w = torch.randn(4, 8) + 3.0
    mask = unstructured_mask(w.abs(), 0.5, "row")
    pruned = _pruned(w, mask)
    r, c = (~mask).nonzero()[0].tolist()
    pruned[r, c] = 1e-6
    with pytest.raises(RuntimeError, match="not zero"):
        check_layer("l", pruned, mask, parse_sparsity("0.5"), 0.5)


def test_check_layer_rejects_broken_nm_pattern():
    w = torch.randn(2, 8) + 3.0
    # right total (half pruned) but groups hold 3 and 1 kept
    row = torch.tensor([True, True, True, False, True, False, False, False])
    mask = torch.stack([row, row])
    with pytest.raises(RuntimeError, match="2:4"):
        check_layer("l", _pruned(w, mask), mask, parse_sparsity("2:4"), 0.5)
    # the same mask is fine as unstructured 50%
    assert check_layer("l", _pruned(w, mask), mask, parse_sparsity("0.5"), 0.5) == pytest.approx(0.5)


def test_check_layer_rejects_shape_mismatch():
    w = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="shape"):
        check_layer("l", w, torch.ones(8, 4, dtype=torch.bool), Sparsity(0.5), 0.5)
