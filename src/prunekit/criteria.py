"""Pruning criteria: magnitude, Wanda and SparseGPT.

Each criterion is a small object with the life cycle that SparseGPT/GPTQ made standard: statistics
of a linear's calibration inputs are accumulated batch by batch (:class:`InputStats`, shared by the
linears that read the same input), then ``prune(weight, stats)`` returns the new weight and its
mask (True = keep), then the statistics are freed. The maths lives in pure functions.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass

import torch

from . import precision
from .config import Sparsity
from .masks import make_mask

log = logging.getLogger(__name__)


class InputStats:
    """Statistics of one linear input over all calibration tokens.

    ``sq_norms[j] = sum_t x_tj^2`` (Wanda's ``||X_j||_2^2``) and, when asked, the Hessian
    ``H = 2 X^T X / n_tokens`` of the layer-wise squared error (SparseGPT). Both in float32.

    ``X^T X`` is symmetric, so for wide inputs only its upper blocks are accumulated (tiles of
    :attr:`TILE` columns) and the lower ones are mirrored when it is read: with three tiles (an MLP
    down projection of width 1536) that is 6 of 9 tile products, a third of the FLOPs saved in the
    largest product of SparseGPT's statistics pass.
    """

    TILE = 512

    def __init__(self, dim: int, hessian: bool, device: torch.device) -> None:
        self.dim = dim
        self.tokens = 0
        self._sq = torch.zeros(dim, dtype=torch.float32, device=device)
        self._hessian = hessian
        self._device = device
        self._tiles = [(a, min(a + self.TILE, dim)) for a in range(0, dim, self.TILE)] if dim >= 2 * self.TILE else []
        self._tile_xtx = (
            {(i, j): torch.zeros(self._tiles[i][1] - self._tiles[i][0], self._tiles[j][1] - self._tiles[j][0],
                                 dtype=torch.float32, device=device)
             for i in range(len(self._tiles)) for j in range(i, len(self._tiles))}
            if hessian and self._tiles else {}
        )
        # the full matrix; for tiled inputs made at the first read, so the two never coexist while accumulating
        self._xtx = torch.zeros(dim, dim, dtype=torch.float32, device=device) if hessian and not self._tiles else None

    def add_batch(self, x: torch.Tensor) -> None:
        """Accumulate a batch in float32, also when the forward pass around it runs under autocast or TF32."""
        with precision.exact(x.device):
            self._add(x.detach().reshape(-1, x.shape[-1]).float())

    def _add(self, x: torch.Tensor) -> None:
        self.tokens += x.shape[0]
        if self._tile_xtx:  # until the first read
            parts = [x[:, a:b] for a, b in self._tiles]
            for (i, j), acc in self._tile_xtx.items():
                acc.addmm_(parts[i].t(), parts[j])
        elif self._hessian:  # the squared norms are its diagonal: no second pass over x
            self._gram().addmm_(x.t(), x)
        else:
            self._sq += (x * x).sum(0)

    def all_reduce(self, ranks) -> None:
        """Sum the statistics over the ranks of a data-parallel run (each saw its own windows), so every
        rank reads the single-process statistics and chooses the same masks (:mod:`prunekit.dist`)."""
        if not ranks.active:
            return
        tokens = torch.tensor([float(self.tokens)], dtype=torch.float64, device=self._device)
        parts = [tokens] + ([self._sq] if not self._hessian else [])
        parts += [acc for _key, acc in sorted(self._tile_xtx.items())]
        if self._xtx is not None:
            parts.append(self._xtx)
        ranks.all_reduce_many_(parts)  # one set of concurrent reductions
        self.tokens = round(float(tokens))

    def _gram(self) -> torch.Tensor:
        """``X^T X``; the first read moves the tile sums into the full matrix and frees the tiles."""
        if self._xtx is None:
            self._xtx = torch.zeros(self.dim, self.dim, dtype=torch.float32, device=self._device)
        if self._tile_xtx:
            for (i, j), acc in self._tile_xtx.items():
                (a, b), (c, d) = self._tiles[i], self._tiles[j]
                self._xtx[a:b, c:d] += acc
                if i != j:
                    self._xtx[c:d, a:b] += acc.t()
            self._tile_xtx = {}  # later batches (if any) accumulate into the full matrix
        return self._xtx

    @property
    def sq_norms(self) -> torch.Tensor:
        """``sum_t x_tj^2`` per input feature (Wanda's ``||X_j||_2^2``)."""
        return torch.diagonal(self._gram()).clone() if self._hessian else self._sq

    @property
    def hessian(self) -> torch.Tensor:
        if not self._hessian:
            raise RuntimeError("these statistics were collected without the Hessian")
        return self._gram() * (2.0 / max(self.tokens, 1))

    def free(self) -> None:
        self._hessian = False
        self._xtx = None
        self._tile_xtx = {}
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
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: Sparsity,
    blocksize: int = 128,
    percdamp: float = 0.01,
    segments: list[int] | None = None,
) -> SparseGPTResult:
    """SparseGPT (Frantar & Alistarh 2023, Algorithm 1): choose the mask and update the kept weights.

    Columns are walked in blocks of ``blocksize``; each block's mask is chosen by the saliency
    ``w^2 / [H^-1]_jj^2`` (adaptive mask selection; for N:M per group of M columns), then columns are
    pruned one by one with the OBS update that moves each pruned weight's error onto the columns not
    yet processed. Returns the new float32 weight and the mask.

    ``segments`` (row counts summing to the number of rows) lets linears that read the same input,
    and so share ``H`` (q/k/v, gate/up), be stacked and pruned in one column walk: rows never interact
    in the OBS update, and the unstructured selection is made per segment, so each linear gets the
    result it would get alone (the same up to floating-point rounding of the stacked products). The
    walk runs on the transposed weight so every column is one contiguous vector and each step is two
    tensor operations; its cost is Python overhead per column, which stacking divides among the
    linears.
    """
    # [cols, rows], always a new tensor: for GPT-2's Conv1D (a transposed view) .t().contiguous()
    # alone would return the parameter itself, and the walk below works in place
    wt = weight.detach().t().float().clone(memory_format=torch.contiguous_format)
    h = hessian.detach().float().clone()
    cols, rows = wt.shape
    segments = segments or [rows]
    if sum(segments) != rows:
        raise ValueError(f"segments {segments} do not add up to the {rows} rows of the weight")
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    wt[dead, :] = 0.0
    hinv, damp = _inverse_cholesky(h, percdamp)
    keep = torch.ones_like(wt, dtype=torch.bool)
    nm = sparsity.is_nm
    m = sparsity.m or 1
    pruned_per_group = (sparsity.m - sparsity.n) if nm else 0  # type: ignore[operator]
    if nm and blocksize % m:
        raise ValueError(f"blocksize {blocksize} must be a multiple of M={m}")
    bounds = [0, *itertools.accumulate(segments)]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = wt[i1:i2]  # a view: updated in place
        hinv1 = hinv[i1:i2, i1:i2]
        d = torch.diag(hinv1).unsqueeze(1)
        keep1 = keep[i1:i2]
        err1 = torch.empty_like(w1)
        if not nm:
            saliency = w1**2 / d**2
            for r0, r1 in zip(bounds[:-1], bounds[1:]):
                k = int(saliency[:, r0:r1].numel() * sparsity.fraction)
                if k:
                    sub = torch.ones(i2 - i1, r1 - r0, dtype=torch.bool, device=wt.device)
                    sub.view(-1)[torch.topk(saliency[:, r0:r1].flatten(), k, largest=False).indices] = False
                    keep1[:, r0:r1] = sub
        # 1/[H^-1]_jj where pruned, 0 where kept (all of an N:M block until its groups are chosen): error = w * scale
        scale = (~keep1) / d
        for i in range(i2 - i1):
            if nm and i % m == 0:
                saliency = w1[i : i + m] ** 2 / d[i : i + m] ** 2
                idx = torch.topk(saliency, pruned_per_group, dim=0, largest=False).indices
                keep1[i : i + m].scatter_(0, idx, False)
                scale[i : i + m] = (~keep1[i : i + m]) / d[i : i + m]
            torch.mul(w1[i], scale[i], out=err1[i])
            w1[i:].addr_(hinv1[i, i:], err1[i], alpha=-1.0)  # column i becomes its masked value
        wt[i2:] -= hinv[i1:i2, i2:].t() @ err1
    wt.mul_(keep)
    return SparseGPTResult(weight=wt.t().contiguous(), mask=keep.t().contiguous(), damping=damp)


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

    def prune_group(
        self, weights: list[torch.Tensor], stats: InputStats | None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Prune linears that read the same input (so share ``stats``); each result is what ``prune`` gives."""
        return [self.prune(w, stats) for w in weights]

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
        return self.prune_group([weight], stats)[0]

    def prune_group(
        self, weights: list[torch.Tensor], stats: InputStats | None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Stack the linears' rows and walk the columns once (see :func:`sparsegpt_prune`)."""
        assert stats is not None
        blocksize = self.blocksize
        if self.sparsity.is_nm and blocksize % self.sparsity.m:  # type: ignore[operator]
            blocksize = math.lcm(blocksize, self.sparsity.m)  # type: ignore[arg-type]
        rows = [w.shape[0] for w in weights]
        stacked = torch.cat([w.detach() for w in weights]) if len(weights) > 1 else weights[0]
        res = sparsegpt_prune(stacked, stats.hessian, self.sparsity, blocksize, self.percdamp, segments=rows)
        del stacked
        self.dampings.append(res.damping)
        # copies: views would keep (and checkpoint) the whole stack alive
        return [
            (w_new.to(w.dtype, copy=True), m.clone())
            for w, w_new, m in zip(weights, res.weight.split(rows), res.mask.split(rows))
        ]

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
