"""Mask maths: pure functions from scores to boolean masks (True = keep), and the sparsity check.

Scores are "higher = more important". Unstructured masks prune exactly ``int(count * fraction)``
weights per comparison group (a row, or the whole layer); N:M masks keep the N highest scores in
every group of M consecutive inputs of a row (Mishra et al. 2021; REFERENCE §2).
"""

from __future__ import annotations

import torch

from .config import Sparsity
from .errors import PrunekitError


def unstructured_mask(scores: torch.Tensor, fraction: float, scope: str = "row") -> torch.Tensor:
    """Prune the ``fraction`` lowest scores per output row (``scope="row"``) or per layer."""
    if scope == "row":
        k = int(scores.shape[1] * fraction)
        mask = torch.ones_like(scores, dtype=torch.bool)
        if k:
            idx = torch.topk(scores, k, dim=1, largest=False).indices
            mask.scatter_(1, idx, False)
        return mask
    if scope == "layer":
        flat = scores.flatten()
        k = int(flat.numel() * fraction)
        mask = torch.ones_like(flat, dtype=torch.bool)
        if k:
            mask[torch.topk(flat, k, largest=False).indices] = False
        return mask.view_as(scores)
    raise ValueError(f"unknown scope {scope!r}")


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores in every group of ``m`` consecutive inputs of each row."""
    rows, cols = scores.shape
    if cols % m:
        raise PrunekitError(f"a layer with {cols} inputs cannot hold {n}:{m} sparsity; choose M dividing {cols}")
    groups = scores.reshape(rows, cols // m, m)
    idx = torch.topk(groups, n, dim=2).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True)
    return mask.view(rows, cols)


def make_mask(scores: torch.Tensor, sparsity: Sparsity, scope: str = "row") -> torch.Tensor:
    if sparsity.is_nm:
        return nm_mask(scores, sparsity.n, sparsity.m)  # type: ignore[arg-type]
    return unstructured_mask(scores, sparsity.fraction, scope)


def expected_fraction(shape: tuple[int, int], sparsity: Sparsity, scope: str) -> float:
    """The exact fraction pruned that the mask functions give for a layer of ``shape``."""
    rows, cols = shape
    if sparsity.is_nm:
        return 1.0 - sparsity.n / sparsity.m  # type: ignore[operator]
    if scope == "layer":
        return int(rows * cols * sparsity.fraction) / (rows * cols)
    if scope == "block":  # SparseGPT: per column block of `block` columns, handled by the caller
        return sparsity.fraction
    return int(cols * sparsity.fraction) / cols


def check_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    rows, cols = mask.shape
    return bool((mask.reshape(rows, cols // m, m).sum(-1) == n).all())


def check_layer(name: str, weight: torch.Tensor, mask: torch.Tensor, sparsity: Sparsity, expected: float) -> float:
    """Verify a pruned linear and return its measured sparsity (fraction of zero weights under the mask).

    Raises if a pruned weight is non-zero, if the mask's sparsity is off its target by more than one
    weight per row, or if an N:M mask breaks its pattern. A layer off target is an error, not a warning.
    """
    if weight.shape != mask.shape:
        raise RuntimeError(f"{name}: mask shape {tuple(mask.shape)} differs from weight {tuple(weight.shape)}")
    if bool((weight[~mask] != 0).any()):
        raise RuntimeError(f"{name}: weights outside the mask are not zero")
    measured = 1.0 - mask.float().mean().item()
    tolerance = 1.0 / weight.shape[1] + 1e-9
    if abs(measured - expected) > tolerance:
        raise RuntimeError(f"{name}: sparsity {measured:.4f} is off its target {expected:.4f}")
    if sparsity.is_nm and not check_nm(mask, sparsity.n, sparsity.m):  # type: ignore[arg-type]
        raise RuntimeError(f"{name}: mask is not {sparsity} in every group")
    return measured
