"""Pruning criteria: input statistics, Wanda's score, and SparseGPT's mask choice and weight update."""

from __future__ import annotations

import logging

import pytest
import torch


from prunekit.config import parse_sparsity
from prunekit.criteria import (
    InputStats,
    Magnitude,
    SparseGPT,
    Wanda,
    make_criterion,
    magnitude_scores,
    sparsegpt_prune,
    wanda_scores,
)
from prunekit.masks import check_nm, unstructured_mask

CPU = torch.device("cpu")
HALF = parse_sparsity("0.5")
TWO_FOUR = parse_sparsity("2:4")


def _stats(x: torch.Tensor, hessian: bool = True, splits: int = 1) -> InputStats:
    st = InputStats(x.shape[-1], hessian, CPU)
    for part in x.chunk(splits):
        st.add_batch(part)
    return st


# ----------------------------------------------------------------------------- input statistics


def test_input_stats_hessian_and_norms():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 5, 8, generator=g)  # [batch, seq, dim] as a linear sees it
    b = torch.randn(3, 8, generator=g)
    st = InputStats(8, hessian=True, device=CPU)
    st.add_batch(a)
    st.add_batch(b)
    x = torch.cat([a.reshape(-1, 8), b])
    assert st.tokens == 13
    torch.testing.assert_close(st.hessian, 2 * x.t() @ x / 13, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.sq_norms, (x * x).sum(0), rtol=1e-5, atol=1e-5)
    assert st.hessian.dtype == torch.float32


@pytest.mark.parametrize("dim", [9, 11])
def test_input_stats_tiled_hessian_matches_the_full_product(monkeypatch, dim):
    """Wide inputs accumulate only the upper tiles of X^T X; reads may come between batches."""
    monkeypatch.setattr(InputStats, "TILE", 4)  # 9 -> tiles of 4, 4, 1; 11 -> 4, 4, 3
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, dim, generator=g) + torch.arange(dim) / 3  # not centred: off-diagonal terms matter
    st = InputStats(dim, hessian=True, device=CPU)
    assert len(st._tiles) == 3
    st.add_batch(x[:15])
    torch.testing.assert_close(st.sq_norms, (x[:15] ** 2).sum(0), rtol=1e-5, atol=1e-5)
    st.add_batch(x[15:])
    full = 2 * x.t() @ x / 40
    torch.testing.assert_close(st.hessian, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.hessian, full, rtol=1e-5, atol=1e-5)  # a second read adds nothing
    torch.testing.assert_close(st.hessian, st.hessian.t())
    assert st._tile_xtx == {}  # the first read freed the tile buffers


def test_sparsegpt_leaves_its_input_alone(layer):
    """GPT-2's Conv1D hands in a transposed view of the parameter; the walk must not write into it."""
    w, _, st = layer
    stored = w.t().contiguous()  # [in, out], as Conv1D stores it
    before = stored.clone()
    new, _ = SparseGPT(HALF).prune(stored.t(), st)
    assert torch.equal(stored, before)
    assert new.data_ptr() != stored.data_ptr()


def test_input_stats_without_hessian():
    st = InputStats(4, hessian=False, device=CPU)
    st.add_batch(torch.ones(3, 4, dtype=torch.bfloat16))
    assert st.sq_norms.tolist() == [3.0, 3.0, 3.0, 3.0]
    with pytest.raises(RuntimeError):
        st.hessian  # noqa: B018
    st.free()
    assert st.sq_norms.numel() == 0


# ----------------------------------------------------------------------------- Wanda

# Input columns with norms [3, 1, 2, 1] (squared norms [9, 1, 4, 1]), from two tokens.
X_WANDA = torch.tensor([[3.0, 0.0, 0.0, 1.0], [0.0, 1.0, 2.0, 0.0]])
W_WANDA = torch.tensor([[1.0, -1.0, 8.0, -6.0], [-7.0, 5.0, 4.0, 7.0]])
# |W| * ||X||   = [[3, 1, 16, 6], [21, 5, 8, 7]]
# |W| * ||X||^2 = [[9, 1, 32, 6], [63, 5, 16, 7]]
WANDA_ROW = torch.tensor([[False, False, True, True], [True, False, True, False]])
SQUARED_ROW = torch.tensor([[True, False, True, False], [True, False, True, False]])
WANDA_LAYER = torch.tensor([[False, False, True, False], [True, False, True, True]])


def test_wanda_scores_use_the_l2_norm():
    st = _stats(X_WANDA)
    assert st.sq_norms.tolist() == [9.0, 1.0, 4.0, 1.0]
    expected = torch.tensor([[3.0, 1.0, 16.0, 6.0], [21.0, 5.0, 8.0, 7.0]])
    torch.testing.assert_close(wanda_scores(W_WANDA, st.sq_norms), expected)


def test_wanda_mask_per_row_with_the_norm():
    # the three candidate answers differ, so the assertion below pins down the criterion
    assert not torch.equal(WANDA_ROW, SQUARED_ROW)
    assert not torch.equal(WANDA_ROW, WANDA_LAYER)
    assert not torch.equal(WANDA_ROW, unstructured_mask(W_WANDA.abs(), 0.5, "row"))
    st = _stats(X_WANDA, hessian=False)
    weight, mask = Wanda(HALF, "row").prune(W_WANDA, st)
    assert torch.equal(mask, WANDA_ROW)
    torch.testing.assert_close(weight, W_WANDA * WANDA_ROW)


def test_wanda_per_layer_scope():
    st = _stats(X_WANDA, hessian=False)
    _, mask = Wanda(HALF, "layer").prune(W_WANDA, st)
    assert torch.equal(mask, WANDA_LAYER)


def test_wanda_default_scope_is_row_and_magnitude_is_layer():
    from prunekit.config import SparsityConfig

    assert SparsityConfig(method="wanda").resolved_scope() == "row"
    assert SparsityConfig(method="sparsegpt").resolved_scope() == "row"
    assert SparsityConfig(method="magnitude").resolved_scope() == "layer"
    assert SparsityConfig(method="magnitude", scope="row").resolved_scope() == "row"


def test_magnitude_ignores_sign_and_inputs():
    w = torch.tensor([[-4.0, 1.0, -2.0, 3.0], [0.5, -0.25, 8.0, -9.0]])
    torch.testing.assert_close(magnitude_scores(w), w.abs())
    new, mask = Magnitude(HALF, "layer").prune(w, None)
    assert torch.equal(mask, torch.tensor([[True, False, False, True], [False, False, True, True]]))
    assert torch.equal(new, w * mask)
    new, mask = Magnitude(HALF, "row").prune(w, None)
    assert torch.equal(mask, torch.tensor([[True, False, False, True], [False, False, True, True]]))
    _, mask = Magnitude(TWO_FOUR, "layer").prune(w, None)
    assert torch.equal(mask, torch.tensor([[True, False, False, True], [False, False, True, True]]))


def test_wanda_nm():
    st = _stats(X_WANDA, hessian=False)
    _, mask = Wanda(parse_sparsity("1:4"), "row").prune(W_WANDA, st)
    assert torch.equal(mask, torch.tensor([[False, False, True, False], [True, False, False, False]]))


# ----------------------------------------------------------------------------- SparseGPT


@pytest.fixture(scope="module")
def layer():
    """A 16x64 linear and 512 correlated input tokens with uneven scales."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g)
    mix = torch.randn(64, 64, generator=g) / 4 + torch.eye(64)
    scale = torch.exp(0.5 * torch.randn(64, generator=g))
    x = (torch.randn(512, 64, generator=g) @ mix) * scale
    return w, x, _stats(x, splits=3)


def _err(x, w, w2):
    return ((x @ w.t() - x @ w2.t()) ** 2).sum().item()


@pytest.mark.parametrize("sparsity", ["0.5", "2:4"])
@pytest.mark.parametrize("blocksize", [128, 16])
def test_sparsegpt_beats_magnitude_and_wanda(layer, sparsity, blocksize):
    w, x, st = layer
    sp = parse_sparsity(sparsity)
    sg = SparseGPT(sp, blocksize=blocksize)
    new, mask = sg.prune(w, st)
    e_sgpt = _err(x, w, new)
    others = [_err(x, w, Magnitude(sp, s).prune(w, None)[0]) for s in ("row", "layer")]
    others += [_err(x, w, Wanda(sp, s).prune(w, st)[0]) for s in ("row", "layer")]
    assert e_sgpt < min(others)
    if sparsity == "2:4" or blocksize == 16:
        assert e_sgpt < 0.8 * min(others)
    # the weight update helps: the same mask without it is worse
    assert e_sgpt < 0.8 * _err(x, w, w * mask)
    assert torch.equal(new == 0, ~mask)  # exactly the pruned weights are zero
    assert (1 - mask.float().mean()).item() == pytest.approx(0.5)
    if sp.is_nm:
        assert check_nm(mask, 2, 4)
    else:  # adaptive mask selection: each column block loses exactly half its weights
        for c in range(0, 64, blocksize):
            assert (~mask[:, c : c + blocksize]).sum().item() == mask[:, c : c + blocksize].numel() // 2
    assert sg.dampings == [0.01]


def test_sparsegpt_nm_masks_valid_for_other_patterns(layer):
    w, _, st = layer
    for text, n in (("1:4", 1), ("3:4", 3), ("2:8", 2)):
        sp = parse_sparsity(text)
        new, mask = SparseGPT(sp, blocksize=12).prune(w, st)  # 12 is no multiple of 8: lcm is used
        assert check_nm(mask, n, sp.m)
        assert bool((new[~mask] == 0).all())


@pytest.mark.parametrize("sparsity", ["0.5", "0.3", "2:4"])
def test_sparsegpt_group_of_linears_equals_each_alone(layer, sparsity):
    """q/k/v (or gate/up) are stacked into one column walk; each must get exactly its own result.

    The second linear's weights are 10x larger, so a selection pooled over the stack would prune
    the first linear far more than its target: per-segment selection is what makes these equal.
    """
    w, _, st = layer
    sp = parse_sparsity(sparsity)
    g = torch.Generator().manual_seed(5)
    ws = [w[:10], 10 * torch.randn(6, w.shape[1], generator=g), w[10:13]]
    sg = SparseGPT(sp, blocksize=16)
    together = sg.prune_group(ws, st)
    for one, (new, mask) in zip(ws, together):
        want_new, want_mask = SparseGPT(sp, blocksize=16).prune(one, st)
        assert torch.equal(mask, want_mask)
        torch.testing.assert_close(new, want_new, rtol=1e-5, atol=1e-5)
        assert (1 - mask.float().mean()).item() == pytest.approx(sp.fraction, abs=0.02)
    with pytest.raises(ValueError):
        sparsegpt_prune(torch.cat(ws), st.hessian, sp, segments=[10, 6])


def test_sparsegpt_prune_rejects_blocksize_not_multiple_of_m(layer):
    w, _, st = layer
    with pytest.raises(ValueError):
        sparsegpt_prune(w, st.hessian, TWO_FOUR, blocksize=6)


def test_sparsegpt_obs_update_on_two_columns():
    """Pruning column 0 moves its error onto column 1: w1' = w1 + w0 * H01 / H11."""
    h = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    res = sparsegpt_prune(torch.tensor([[0.1, 1.0]]), h, HALF, blocksize=128, percdamp=1e-7)
    assert res.mask.tolist() == [[False, True]]
    torch.testing.assert_close(res.weight, torch.tensor([[0.0, 1.05]]), atol=1e-5, rtol=0)
    # a pruned later column has nowhere to go: earlier columns are final
    res = sparsegpt_prune(torch.tensor([[1.0, 0.1]]), h, HALF, blocksize=128, percdamp=1e-7)
    assert res.mask.tolist() == [[True, False]]
    torch.testing.assert_close(res.weight, torch.tensor([[1.0, 0.0]]), atol=1e-6, rtol=0)


def test_sparsegpt_without_pruning_keeps_the_weight(layer):
    w, _, st = layer
    res = sparsegpt_prune(w, st.hessian, parse_sparsity("0"), blocksize=16)
    assert res.mask.all()
    torch.testing.assert_close(res.weight, w)


@pytest.mark.parametrize("sparsity", ["0.5", "2:4"])
def test_sparsegpt_on_a_transposed_weight_view(layer, sparsity):
    """GPT-2's Conv1D gives SparseGPT its [out, in] weight as a transposed (non-contiguous) view."""
    w, _, st = layer
    stored = w.t().contiguous()  # [in, out], as Conv1D stores it
    sp = parse_sparsity(sparsity)
    got = SparseGPT(sp).prune(stored.t(), st)
    want = SparseGPT(sp).prune(w.contiguous(), st)
    torch.testing.assert_close(got[0], want[0])
    assert torch.equal(got[1], want[1])


def test_sparsegpt_keeps_dtype():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, 16, generator=g).to(torch.bfloat16)
    st = _stats(torch.randn(64, 16, generator=g))
    new, mask = SparseGPT(TWO_FOUR).prune(w, st)
    assert new.dtype == torch.bfloat16
    assert check_nm(mask, 2, 4)


def test_sparsegpt_dead_inputs_and_singular_hessian(layer, caplog):
    w, x, _ = layer
    x = x.clone()
    x[:, :5] = 0.0  # inputs that are always zero: a zero row and column in H
    x[:, 10] = x[:, 11]  # two identical inputs: H singular even without the dead ones
    st = _stats(x)
    sg = SparseGPT(HALF, percdamp=1e-9)
    with caplog.at_level(logging.WARNING, logger="prunekit.criteria"):
        new, mask = sg.prune(w, st)
    assert torch.isfinite(new).all()
    assert (new[:, :5] == 0).all()  # weights of dead inputs carry nothing
    assert torch.equal(new == 0, ~mask)
    assert (~mask).sum().item() == w.numel() // 2
    assert sg.dampings[0] > 1e-9  # it had to retry with more damping
    assert "retrying" in caplog.text


def test_sparsegpt_rank_deficient_inputs(layer):
    w, _, _ = layer
    g = torch.Generator().manual_seed(5)
    st = _stats(torch.randn(8, 64, generator=g))  # 8 tokens in 64 dimensions: rank 8
    for text in ("0.5", "2:4"):
        new, mask = SparseGPT(parse_sparsity(text), percdamp=1e-9).prune(w, st)
        assert torch.isfinite(new).all()
        assert (~mask).sum().item() == w.numel() // 2


def test_sparsegpt_tiny_percdamp_on_rank_one_hessian_does_not_crash(layer):
    w, _, _ = layer
    st = _stats(torch.randn(1, 64, generator=torch.Generator().manual_seed(6)))
    new, _ = SparseGPT(HALF, percdamp=1e-15).prune(w, st)
    assert torch.isfinite(new).all()


def test_make_criterion():
    assert isinstance(make_criterion("magnitude", HALF, "layer"), Magnitude)
    assert isinstance(make_criterion("wanda", HALF, "row"), Wanda)
    sg = make_criterion("sparsegpt", HALF, "row", blocksize=32, percdamp=0.05)
    assert isinstance(sg, SparseGPT) and sg.blocksize == 32 and sg.percdamp == 0.05
    assert sg.expected_scope() == "block" and sg.needs_hessian
    assert not make_criterion("magnitude", HALF, "layer").needs_inputs
    with pytest.raises(ValueError):
        make_criterion("obs", HALF, "row")
