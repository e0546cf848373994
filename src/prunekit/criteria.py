"""Pruning criteria: magnitude, Wanda and SparseGPT.

Each criterion is a small object with the life cycle that SparseGPT/GPTQ made standard: statistics
of a linear's calibration inputs are accumulated batch by batch (:class:`InputStats`, shared by the
linears that read the same input), then ``prune(weight, stats)`` returns the new weight and its
mask (True = keep), then the statistics are freed. The maths lives in pure functions.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from .config import Sparsity
from .masks import make_mask

log = logging.getLogger(__name__)


class InputStats:
    """Statistics of one linear input over all calibration tokens.

    ``sq_norms[j] = sum_t x_tj^2`` (Wanda's ``||X_j||_2^2``) and, when asked, the Hessian
    ``H = 2 X^T X / n_tokens`` of the layer-wise squared error (SparseGPT). Both in float32.
    """

    def __init__(self, dim: int, hessian: bool, device: torch.device) -> None:
        self.dim = dim
        self.tokens = 0
        self._sq = torch.zeros(dim, dtype=torch.float32, device=device)
        self._xtx = torch.zeros(dim, dim, dtype=torch.float32, device=device) if hessian else None

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.tokens += x.shape[0]
        if self._xtx is not None:  # the squared norms are its diagonal: no second pass over x
            self._xtx.addmm_(x.t(), x)
        else:
            self._sq += (x * x).sum(0)

    @property
    def sq_norms(self) -> torch.Tensor:
        """``sum_t x_tj^2`` per input feature (Wanda's ``||X_j||_2^2``)."""
        return torch.diagonal(self._xtx).clone() if self._xtx is not None else self._sq

    @property
    def hessian(self) -> torch.Tensor:
        if self._xtx is None:
            raise RuntimeError("these statistics were collected without the Hessian")
        return self._xtx * (2.0 / max(self.tokens, 1))

    def free(self) -> None:
        self._xtx = None
        self._sq = torch.empty(0)


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.abs().float()


def wanda_scores(weight: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||_2`` (Sun et al. 2023, eq. 1): the norm, not the squared norm."""
    return weight.abs().float() * torch.sqrt(sq_norms.to(weight.device)).unsqueeze(0)


@dataclass
class SparseGPTResult:
    weight: torch.Tensor
    mask: torch.Tensor
    damping: float  # the dampening fraction that made H positive definite


def _inverse_cholesky(h: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + λI)^-1`` with ``λ = percdamp * mean(diag H)``.

    When the factorisation fails (H singular in floating point), retry with ten times the damping
    and warn: the original scripts crash there instead.
    """
    mean_diag = torch.mean(torch.diag(h)).item()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    damp = percdamp
    while damp <= 100.0:
        try:
            lower = torch.linalg.cholesky(h + (damp * mean_diag) * eye)
            hinv = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(hinv, upper=True), damp
        except torch.linalg.LinAlgError:
            log.warning("SparseGPT: Cholesky failed with damping %.3g; retrying with %.3g", damp, damp * 10)
            damp *= 10
    raise RuntimeError("SparseGPT: the Hessian stays singular even with heavy damping")


def sparsegpt_prune(
    weight: torch.Tensor, hessian: torch.Tensor, sparsity: Sparsity, blocksize: int = 128, percdamp: float = 0.01
) -> SparseGPTResult:
    """SparseGPT (Frantar & Alistarh 2023, Algorithm 1): choose the mask and update the kept weights.

    Columns are walked in blocks of ``blocksize``; each block's mask is chosen by the saliency
    ``w^2 / [H^-1]_jj^2`` (adaptive mask selection; for N:M per group of M columns), then columns are
    pruned one by one with the OBS update that moves each pruned weight's error onto the columns not
    yet processed. Returns the new float32 weight and the mask.
    """
    w = weight.detach().float().contiguous().clone()  # GPT-2's Conv1D hands in a transposed view
    h = hessian.detach().float().clone()
    rows, cols = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hinv, damp = _inverse_cholesky(h, percdamp)
    mask = torch.ones_like(w, dtype=torch.bool)
    nm = sparsity.is_nm
    m = sparsity.m or 1
    pruned_per_group = (sparsity.m - sparsity.n) if nm else 0  # type: ignore[operator]
    if nm and blocksize % m:
        raise ValueError(f"blocksize {blocksize} must be a multiple of M={m}")
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d = torch.diag(hinv1)
        keep1 = torch.ones_like(w1, dtype=torch.bool)
        if not nm:
            saliency = w1**2 / d.unsqueeze(0) ** 2
            k = int(saliency.numel() * sparsity.fraction)
            if k:
                keep1.view(-1)[torch.topk(saliency.flatten(), k, largest=False).indices] = False
        for i in range(count):
            col = w1[:, i]
            if nm and i % m == 0:
                saliency = w1[:, i : i + m] ** 2 / d[i : i + m].unsqueeze(0) ** 2
                idx = torch.topk(saliency, pruned_per_group, dim=1, largest=False).indices
                keep1[:, i : i + m].scatter_(1, idx, False)
            q = col * keep1[:, i]
            q1[:, i] = q
            e = (col - q) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i1:i2] = q1
        mask[:, i1:i2] = keep1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return SparseGPTResult(weight=w * mask, mask=mask, damping=damp)


class Criterion:
    """Chooses the mask of one linear (and, for SparseGPT, new values for its kept weights)."""

    name = "base"
    needs_inputs = True
    needs_hessian = False

    def __init__(self, sparsity: Sparsity, scope: str = "row") -> None:
        self.sparsity = sparsity
        self.scope = scope

    def prune(self, weight: torch.Tensor, stats: InputStats | None) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def expected_scope(self) -> str:
        return self.scope


class Magnitude(Criterion):
    name = "magnitude"
    needs_inputs = False

    def prune(self, weight: torch.Tensor, stats: InputStats | None) -> tuple[torch.Tensor, torch.Tensor]:
        mask = make_mask(magnitude_scores(weight), self.sparsity, self.scope)
        return weight * mask, mask


class Wanda(Criterion):
    name = "wanda"

    def prune(self, weight: torch.Tensor, stats: InputStats | None) -> tuple[torch.Tensor, torch.Tensor]:
        assert stats is not None
        mask = make_mask(wanda_scores(weight, stats.sq_norms), self.sparsity, self.scope)
        return weight * mask, mask


class SparseGPT(Criterion):
    name = "sparsegpt"
    needs_hessian = True

    def __init__(self, sparsity: Sparsity, scope: str = "row", blocksize: int = 128, percdamp: float = 0.01) -> None:
        super().__init__(sparsity, scope)
        self.blocksize = blocksize
        self.percdamp = percdamp
        self.dampings: list[float] = []

    def prune(self, weight: torch.Tensor, stats: InputStats | None) -> tuple[torch.Tensor, torch.Tensor]:
        assert stats is not None
        blocksize = self.blocksize
        if self.sparsity.is_nm and blocksize % self.sparsity.m:  # type: ignore[operator]
            blocksize = math.lcm(blocksize, self.sparsity.m)  # type: ignore[arg-type]
        res = sparsegpt_prune(weight, stats.hessian, self.sparsity, blocksize, self.percdamp)
        self.dampings.append(res.damping)
        return res.weight.to(weight.dtype), res.mask

    def expected_scope(self) -> str:
        return "block"


def make_criterion(method: str, sparsity: Sparsity, scope: str, blocksize: int = 128, percdamp: float = 0.01) -> Criterion:
    if method == "magnitude":
        return Magnitude(sparsity, scope)
    if method == "wanda":
        return Wanda(sparsity, scope)
    if method == "sparsegpt":
        return SparseGPT(sparsity, scope, blocksize, percdamp)
    raise ValueError(f"unknown method {method!r}")
