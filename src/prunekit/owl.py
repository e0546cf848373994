"""OWL: non-uniform block sparsity from the blocks' activation outliers (Yin et al. 2023).

"Outlier Weighed Layerwise sparsity" observes that blocks whose Wanda scores ``|W_ij| * ||X_j||``
have more outliers are hurt more by pruning, and gives them a lower sparsity. A block's *outlier
ratio* is the share of its scores (over all its linears) above ``M`` times their mean (M = 5 in the
paper). Block densities are spread linearly over ``[-lambda, +lambda]`` (lambda = 0.08 in the paper)
by outlier ratio, the most outlier-heavy block getting the highest density, then shifted so that the
*parameter-weighted* mean sparsity is exactly the target (the paper shifts the plain mean; the two
are the same when every block has the same size). The ratios are measured on the dense model with
its own activations, one pass over the calibration windows, before anything is pruned, as the
paper's code does. It helps most at 60-70% sparsity (REFERENCE §2: LLaMA-7B at 70%, Wanda 85.77 ->
24.55 WikiText-2). Unstructured sparsity only: N:M fixes every row's sparsity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .criteria import wanda_scores

OWL_M = 5.0  # outlier threshold: scores above M x their block's mean (Yin et al. 2023)
OWL_LAMBDA = 0.08  # range of block sparsities around the target (Yin et al. 2023)


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """Share of all ``scores`` (the block's linears together) above ``m`` times their mean."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    return float((flat > m * flat.mean()).float().mean())


def block_outlier_ratio(weights: list[torch.Tensor], sq_norms: list[torch.Tensor], m: float) -> float:
    """The outlier ratio of a block from its linears' weights and input column norms (squared)."""
    return outlier_ratio([wanda_scores(w, n) for w, n in zip(weights, sq_norms)], m)


def owl_sparsities(ratios: list[float], sizes: list[int], target: float, lam: float) -> list[float]:
    """Block sparsities within ``target ± lam`` whose ``sizes``-weighted mean is ``target``.

    Densities are ``lam * (2 * (r - r_min) / (r_max - r_min) - 1)`` around the target density (the
    paper's linear map), so the block with the most outliers keeps the most weights; the shift that
    makes the weighted mean exact moves every block by the same amount.
    """
    if len(ratios) != len(sizes) or not ratios:
        raise ValueError("one outlier ratio and one size per block")
    lo, hi = min(ratios), max(ratios)
    spread = [0.0 if hi == lo else lam * (2 * (r - lo) / (hi - lo) - 1) for r in ratios]
    total = float(sum(sizes))
    shift = sum(s * n for s, n in zip(spread, sizes)) / total
    out = [target - (s - shift) for s in spread]  # more outliers -> more density -> less sparsity
    if min(out) < 0 or max(out) >= 1:
        raise ValueError(f"OWL sparsities {min(out):.3f}..{max(out):.3f} leave [0, 1); lower --owl-lambda")
    return out


@dataclass
class OwlResult:
    """What OWL measured and chose, for the report."""

    m: float
    lam: float
    ratios: list[float]
    sparsities: list[float]
