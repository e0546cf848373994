"""The reconstruction guard: reconstruction must never make a model worse unnoticed (issue 10).

A unit's own held-out error measures the loss being minimised, on the same kind of text, so it
cannot see a reconstruction that fits the calibration objective while hurting what the user cares
about (on a Gemma-3-style model, MSE reconstruction lowered every unit's error and made perplexity
8-12x worse). The guard therefore compares reconstruction with the masks-only weights ("LR", what
SparseGPT and Wanda alone give) on measures the loss does not define, on held-out calibration
windows, at two levels:

1. **After every window** (cheap: the window's blocks on the held-out windows only): the mean
   *per-token* normalised error of the window's output against the dense model's activations at the
   same point, with the reconstructed weights and with the window's LR weights, on the same sparse
   inputs. A window that ends worse is reverted to its LR weights (``revert``) or reported
   (``warn``). Every token weighs the same here, so an attention sink with a massive activation
   cannot hide damage to all the other tokens.
2. **At the end** (one forward pass of the held-out windows per model): the KL divergence between
   the dense model's next-token distribution and the pruned model's, through the final norm and LM
   head, and the held-out perplexity, for the reconstructed model and for the same masks with LR
   weights. When reconstruction is worse end to end, the whole run is reverted to its LR weights
   (``revert``) or a warning is raised (``warn``). Either way the summary says it in one line.

The dense reference is taken before any block is pruned; the LR weights are kept on the CPU (one
copy of the pruned blocks' state).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .blockwalk import Batch, WeightSource, walk
from .dist import Ranks
from .families import Readout
from .hostmem import host_copy, park, to_host
from .losses import ErrorSums, kl_divergence

log = logging.getLogger(__name__)

_CHUNK = 256  # positions per LM-head chunk


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of ``module``'s state (parameters and buffers); pinned when it comes from a GPU."""
    return {k: host_copy(v) for k, v in module.state_dict().items()}


def restore(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        module.load_state_dict(state)


@torch.no_grad()
def token_error(outputs: torch.Tensor, reference: torch.Tensor, ranks: Ranks = Ranks()) -> float:
    """Mean per-token normalised error of ``outputs`` against ``reference`` (``[n, seq, d]``), over
    every rank's windows in a data-parallel run."""
    sums = ErrorSums()
    sums.add(outputs, reference)
    return sums.reduced(ranks).token


@dataclass
class EndToEndResult:
    kl: float  # mean over positions of KL(p_dense || p_model)
    nll: float  # mean next-token loss on the held-out windows
    dense_nll: float

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)

    def to_dict(self) -> dict[str, float]:
        return {"kl": self.kl, "nll": self.nll, "ppl": self.ppl, "dense_ppl": math.exp(self.dense_nll)}


class EndToEnd:
    """The dense model's final hidden states on held-out windows, and a model's distance from them.

    With a ``source`` (:mod:`prunekit.blockwalk`: weights read from shards into a skeleton) the
    model is walked block by block instead of run whole, for models that are not in memory.
    """

    def __init__(
        self, model: nn.Module, ids: torch.Tensor, batch_size: int, device: torch.device, source: WeightSource | None = None,
        ranks: Ranks = Ranks(),
    ) -> None:
        self.ids = ids  # this rank's held-out windows (a data-parallel run sums the measures over ranks)
        self.ranks = ranks
        self.batch_size = batch_size
        self.device = device
        self.dense_hidden = self._hidden(model, source).to(torch.float32)
        self.dense_nll = self._score(model, self.dense_hidden, source)[1]

    @torch.no_grad()
    def _hidden(self, model: nn.Module, source: WeightSource | None) -> torch.Tensor:
        batches = [self.ids[b : b + self.batch_size] for b in range(0, self.ids.shape[0], self.batch_size)]
        if source is not None:
            out: list[torch.Tensor] = []
            walk(model, [Batch(ids) for ids in batches], self.device,
                 lambda _i, h, _r: out.append(to_host(h, torch.float32)), source=source, desc="guard")
            return torch.cat(out)
        model.to(self.device)
        try:
            return torch.cat([
                to_host(model.base_model(input_ids=ids.to(self.device), use_cache=False).last_hidden_state, torch.float32)
                for ids in batches
            ])
        finally:
            park(model)

    @torch.no_grad()
    def _score(self, model: nn.Module, hidden: torch.Tensor, source: WeightSource | None) -> tuple[float, float]:
        """(mean KL to the dense distribution, mean next-token loss) of final hidden states ``hidden``."""
        readout = source.load_head() if source is not None else Readout(model, with_norm=False).to(self.device)
        logits = lambda h: readout.logits(h.to(self.device))  # noqa: E731

        kl = nll = 0.0
        count = 0
        try:
            for i in range(hidden.shape[0]):
                ids = self.ids[i].to(self.device)
                for c in range(0, hidden.shape[1] - 1, _CHUNK):
                    sl = slice(c, min(c + _CHUNK, hidden.shape[1] - 1))
                    z = logits(hidden[i, sl])
                    kl += float(kl_divergence(logits(self.dense_hidden[i, sl]), z).sum())
                    nll += float(F.cross_entropy(z, ids[sl.start + 1 : sl.stop + 1], reduction="sum"))
                    count += sl.stop - sl.start
        finally:
            if source is not None:
                source.release_head()
            else:
                park(readout)
        kl, nll, count = self.ranks.sum_floats([kl, nll, float(count)])
        return kl / max(count, 1), nll / max(count, 1)

    def measure(self, model: nn.Module, source: WeightSource | None = None) -> EndToEndResult:
        kl, nll = self._score(model, self._hidden(model, source), source)
        return EndToEndResult(kl, nll, self.dense_nll)


@dataclass
class GuardReport:
    """What the guard measured and decided; ``summary`` is the one line the run's summary prints."""

    mode: str
    windows: list[dict[str, Any]] = field(default_factory=list)  # per window: blocks, lr, recon, worse, reverted
    end_to_end: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    summary: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def windows_worse(self) -> list[dict[str, Any]]:
        return [w for w in self.windows if w["worse"]]

    def conclude(self, final: EndToEndResult | None, lr: EndToEndResult | None, reverted_run: bool, why_not: str | None) -> None:
        """Write ``end_to_end`` and the one-line ``summary`` from the measurements."""
        worse_windows = self.windows_worse
        acted = "reverted to their masks-only weights" if self.mode == "revert" else "kept (--guard warn)"
        win = (
            f"{len(worse_windows)} of {len(self.windows)} windows were worse than masks-only on held-out "
            f"per-token error and were {acted}" if worse_windows else f"all {len(self.windows)} windows improved on masks-only"
        ) if self.windows else "no per-window checks (end-to-end retraining)"
        if final is None or lr is None:
            self.end_to_end = {"compared": False, "why": why_not}
            if final is not None:
                self.end_to_end["reconstructed"] = final.to_dict()
            self.summary = f"guard ({self.mode}): {win}; end-to-end check not made ({why_not})"
            return
        worse = not final.kl <= lr.kl
        self.end_to_end = {
            "compared": True, "reconstructed": final.to_dict(), "masks_only": lr.to_dict(),
            "worse": worse, "reverted": reverted_run,
        }
        figures = f"held-out KL to dense {final.kl:.4g} vs {lr.kl:.4g} masks-only, ppl {final.ppl:.4g} vs {lr.ppl:.4g}"
        if not worse:
            self.summary = f"guard ({self.mode}): reconstruction kept ({figures}); {win}"
        elif reverted_run:
            self.summary = (
                f"guard (revert): RECONSTRUCTION MADE THE MODEL WORSE end to end ({figures}); "
                "the whole run was reverted to its masks-only weights"
            )
        else:
            self.summary = (
                f"guard ({self.mode}): WARNING: RECONSTRUCTION MADE THE MODEL WORSE end to end ({figures}); "
                "kept as asked (--guard warn); use --guard revert or --recon lr"
            )
