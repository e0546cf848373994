"""Reconstruction objectives and the per-token error measures that diagnose them.

Why more than plain MSE: in many decoder-only models the first token of a window is an attention
sink that carries a *massive activation* (Sun et al. 2024, "Massive Activations in Large Language
Models"): a few coordinates of its hidden state are hundreds of times larger than any other
token's. A plain MSE on hidden states then spends most of its gradient on that one token. On a
Gemma-3-style model (18 blocks, q/k norms) the first token held 20-48% of a window's squared norm in
the middle blocks, and MSE reconstruction lowered the aggregate error of every block while the
error of every *other* token rose and perplexity got 8-12x worse (issue 10). The objectives here:

- ``mse``: mean squared error over all elements (the Rethinking and Free Lunch papers).
- ``token-mse``: each token's squared error divided by its target's squared norm, averaged over
  tokens, so a massive-activation token weighs like any other (a relative, per-token MSE).
- ``cosine``: ``1 - cos(y_i, t_i)`` averaged over tokens (direction only; RMS-normed models read
  mostly the direction of the residual stream).
- ``kd``: KL divergence between the next-token distributions that the final norm and LM head read
  off the dense and the pruned hidden states (a logit-lens distillation), on a strided subset of at
  most ``KD_POSITIONS`` positions per window to keep the LM head affordable.

``loss_skip`` excludes the first k positions (attention sinks) from any objective.

Each objective has a *held-out criterion* on the same scale for every model: ``mse`` uses the
aggregate normalised error ``sum ||t-y||^2 / sum ||t||^2`` (as before), the others the mean of their
own per-token loss. Units are early-stopped and reverted on that criterion.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch
import torch.nn.functional as F

LOSSES = ("mse", "token-mse", "cosine", "kd")
KD_POSITIONS = 64  # positions per window that the kd objective reads through the LM head
_EPS = 1e-12

Readout = Callable[[torch.Tensor], torch.Tensor]  # hidden states [..., d] -> logits [..., vocab]


def _flat(y: torch.Tensor, t: torch.Tensor, skip: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[tokens, features]`` views of output and target after dropping the first ``skip`` positions."""
    if y.dim() >= 3 and skip:
        y, t = y[:, skip:], t[:, skip:]
    return y.reshape(-1, y.shape[-1]).float(), t.reshape(-1, t.shape[-1]).float()


def kd_positions(seq: int, skip: int) -> torch.Tensor:
    """The positions the kd objective reads: a stride over ``skip..seq-1`` giving at most KD_POSITIONS."""
    span = max(seq - skip, 1)
    stride = max(1, -(-span // KD_POSITIONS))
    return torch.arange(min(skip, seq - 1), seq, stride)


def kl_divergence(dense_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``KL(p_dense || p)`` per position (last dimension = vocabulary), in float32."""
    logp_d = F.log_softmax(dense_logits.float(), dim=-1)
    logp = F.log_softmax(logits.float(), dim=-1)
    return (logp_d.exp() * (logp_d - logp)).sum(-1)


@dataclass(frozen=True)
class Objective:
    """A reconstruction loss: ``loss(y, t)`` to minimise, ``criterion`` pieces to measure on held-out rows."""

    kind: str = "mse"
    skip: int = 0
    readout: Readout | None = None  # final norm + LM head, for kd

    def __post_init__(self) -> None:
        if self.kind not in LOSSES:
            raise ValueError(f"unknown loss {self.kind!r}")
        if self.kind == "kd" and self.readout is None:
            raise ValueError("the kd loss needs the model's final norm and LM head")

    def per_token(self, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The loss of each token (``[tokens]``); for mse, the squared error summed over features."""
        if self.kind == "kd":
            pos = kd_positions(y.shape[1], self.skip).to(y.device)
            yd, td = y[:, pos], t[:, pos]
            # The readout shares the model's final norm and LM head, which other phases (the guard,
            # evaluation) park in host memory between windows on a GPU run: bring them back first.
            # On the device already, this is a walk over two modules that copies nothing.
            readout = self.readout.to(y.device)
            return kl_divergence(readout(td), readout(yd)).reshape(-1)
        yf, tf = _flat(y, t, self.skip)
        if self.kind == "token-mse":
            return ((yf - tf) ** 2).sum(-1) / (tf**2).sum(-1).clamp_min(_EPS)
        if self.kind == "cosine":
            return 1.0 - F.cosine_similarity(yf, tf, dim=-1, eps=1e-8)
        return ((yf - tf) ** 2).sum(-1)

    def loss(self, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The training loss of a batch (a mean, so the learning rate does not depend on batch size)."""
        if self.kind == "mse":
            yf, tf = _flat(y, t, self.skip)
            return F.mse_loss(yf, tf)
        return self.per_token(y, t).mean()


@dataclass
class ErrorSums:
    """Running sums for the error measures of a set of windows (see :func:`ErrorSums.add`)."""

    sq_err: float = 0.0  # sum ||t - y||^2 (after the skipped positions)
    sq_target: float = 0.0  # sum ||t||^2
    token_err: float = 0.0  # sum over tokens of ||t_i - y_i||^2 / ||t_i||^2
    tokens: int = 0
    first_err: float = 0.0  # the first position's ||t - y||^2
    first_target: float = 0.0  # the first position's ||t||^2
    objective: float = 0.0  # sum of the objective's per-token values
    objective_tokens: int = 0

    @torch.no_grad()
    def add(self, y: torch.Tensor, t: torch.Tensor, objective: Objective | None = None, score: bool = True) -> None:
        """Add a batch; ``objective`` sets the skipped positions and, with ``score``, is evaluated too."""
        yf, tf = _flat(y, t, objective.skip if objective else 0)
        e = ((yf - tf) ** 2).sum(-1)
        n = (tf**2).sum(-1)
        self.sq_err += float(e.sum())
        self.sq_target += float(n.sum())
        self.token_err += float((e / n.clamp_min(_EPS)).sum())
        self.tokens += int(e.numel())
        if y.dim() >= 3:
            self.first_err += float(((y[:, 0].float() - t[:, 0].float()) ** 2).sum())
            self.first_target += float((t[:, 0].float() ** 2).sum())
        if score and objective is not None and objective.kind != "mse":
            per = objective.per_token(y, t)
            self.objective += float(per.sum())
            self.objective_tokens += int(per.numel())

    def reduced(self, ranks) -> "ErrorSums":
        """These sums added over the ranks of a data-parallel run (:mod:`prunekit.dist`); itself on one process."""
        if not ranks.active:
            return self
        names = [f.name for f in fields(self)]
        totals = ranks.sum_floats([float(getattr(self, k)) for k in names])
        return ErrorSums(**{k: (round(v) if isinstance(getattr(self, k), int) else v) for k, v in zip(names, totals)})

    @property
    def aggregate(self) -> float:
        """``sum ||t - y||^2 / sum ||t||^2``: what the papers plot, dominated by the largest tokens."""
        return self.sq_err / max(self.sq_target, 1e-30)

    @property
    def token(self) -> float:
        """The mean over tokens of each token's normalised error: every token weighs the same."""
        return self.token_err / max(self.tokens, 1)

    @property
    def first_token_share(self) -> float:
        """The first position's share of the targets' squared norm (an attention sink's weight in MSE)."""
        return self.first_target / max(self.sq_target, 1e-30)

    @property
    def first_token_error_share(self) -> float:
        return self.first_err / max(self.sq_err, 1e-30)

    def criterion(self, objective: Objective) -> float:
        """The held-out criterion of ``objective`` (see the module docstring)."""
        if objective.kind == "mse":
            return self.aggregate
        return self.objective / max(self.objective_tokens, 1)
