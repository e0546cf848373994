"""Perplexity as the pruning papers measure it.

The corpus is tokenized once and cut into non-overlapping windows of ``seqlen`` tokens; each window
is scored on its own (no context carried over) and perplexity is ``exp`` of the mean over windows
of the mean next-token loss, as in the SparseGPT and Wanda evaluation scripts. The LM head runs on
chunks of positions so the full ``[batch, seqlen, vocab]`` logits never exist at once.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import blockwalk
from .blockwalk import Batch, WeightSource, choose_walk
from .data import eval_text, eval_windows
from .hostmem import park
from .errors import PrunekitError
from .families import Readout
from .models import context_length

_HEAD_CHUNK = 256  # positions per LM-head chunk


@dataclass
class Perplexity:
    dataset: str
    ppl: float
    seqlen: int
    windows: int
    window_nll: list[float] = field(default_factory=list)  # mean next-token loss of each window
    seconds: float = 0.0

    def ppl_first(self, k: int) -> float:
        """Perplexity over the first ``k`` windows only (same pass, no re-run)."""
        nll = self.window_nll[:k]
        return math.exp(sum(nll) / len(nll))


def effective_seqlen(model: nn.Module, seqlen: int) -> int:
    ctx = context_length(model)
    return min(seqlen, ctx) if ctx else seqlen


def _window_nll(readout: Readout, hidden: torch.Tensor, ids: torch.Tensor) -> list[float]:
    """Mean next-token loss of each row, from the final hidden states (after the final norm)."""
    total = torch.zeros(ids.shape[0], dtype=torch.float64, device=hidden.device)
    for c in range(0, ids.shape[1] - 1, _HEAD_CHUNK):
        h = hidden[:, c : min(c + _HEAD_CHUNK, ids.shape[1] - 1)]
        logits = readout.logits(h)
        target = ids[:, c + 1 : c + 1 + h.shape[1]]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
        total += nll.view(ids.shape[0], -1).sum(1).double()
    return (total / (ids.shape[1] - 1)).tolist()


@torch.no_grad()
def window_losses(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int,
    device: torch.device | str,
    desc: str = "perplexity",
    walk: str = "auto",
    source: WeightSource | None = None,
) -> list[float]:
    """Mean next-token loss of each row of ``windows`` (``[n, seqlen]`` token ids).

    ``walk`` (``auto | whole | blocks``, see :func:`prunekit.blockwalk.choose_walk`) says whether the
    whole model goes to the device or it is walked block by block; a weight ``source`` implies the
    block walk. Both give the same losses.
    """
    device = torch.device(device)
    if source is not None or choose_walk(walk, [model], device) == "blocks":
        batches = [Batch(windows[b : b + batch_size]) for b in range(0, windows.shape[0], batch_size)]
        out: list[float] = []
        blockwalk.walk(
            model, batches, device,
            lambda i, hidden, readout: out.extend(_window_nll(readout, hidden, batches[i].input_ids.to(device))),
            source=source, desc=desc,
        )
        return out
    readout = Readout(model, with_norm=False)
    model.to(device)
    losses: list[float] = []
    try:
        for b in tqdm(range(0, windows.shape[0], batch_size), desc=desc, unit="batch"):
            ids = windows[b : b + batch_size].to(device)
            hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
            losses.extend(_window_nll(readout, hidden, ids))
    finally:
        park(model)
    return losses


def perplexity(
    model: nn.Module,
    tokenizer,
    dataset: str,
    seqlen: int = 2048,
    windows: int = 0,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    data_dir: str | None = None,
    walk: str = "auto",
) -> Perplexity:
    """Perplexity of ``model`` on a named corpus (or a .txt/.jsonl file), first ``windows`` windows (0 = all)."""
    seqlen = effective_seqlen(model, seqlen)
    text = eval_text(dataset, data_dir)
    ids = tokenizer(text)["input_ids"]
    return perplexity_of_ids(model, dataset, eval_windows(ids, seqlen, windows), batch_size, device, walk)


def perplexity_of_ids(
    model: nn.Module,
    name: str,
    windows: torch.Tensor,
    batch_size: int,
    device: torch.device | str,
    walk: str = "auto",
    source: WeightSource | None = None,
) -> Perplexity:
    if windows.numel() == 0:
        raise PrunekitError(f"no evaluation windows for {name}")
    t = time.perf_counter()
    nll = window_losses(model, windows, batch_size, device, desc=f"perplexity {name}", walk=walk, source=source)
    ppl = math.exp(sum(nll) / len(nll))
    return Perplexity(name, ppl, int(windows.shape[1]), int(windows.shape[0]), nll, time.perf_counter() - t)


def block_errors(
    dense: nn.Module, pruned: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device | str,
    walk: str = "auto",
) -> list[float]:
    """Aggregate normalised error ``sum ||h_dense - h_pruned||^2 / sum ||h_dense||^2`` at every block's output."""
    return block_error_detail(dense, pruned, windows, batch_size, device, walk)["aggregate"]


@torch.no_grad()
def block_error_detail(
    dense: nn.Module,
    pruned: nn.Module,
    windows: torch.Tensor,
    batch_size: int,
    device: torch.device | str,
    walk: str = "auto",
    sources: tuple[WeightSource | None, WeightSource | None] | None = None,
) -> dict[str, list[float]]:
    """Error of every block's output against the dense model's: ``aggregate``, ``token``, ``first_token_share``.

    Each model runs its own full forward pass (global propagation), so block ``i``'s error is what
    the pruned model has accumulated up to there: the Rethinking paper's Figure 3. ``aggregate`` is
    ``sum ||h_dense - h_pruned||^2 / sum ||h_dense||^2``; ``token`` the mean over tokens after the
    first of each token's own normalised error, so that an attention sink with a massive activation
    (which can hold half of a window's squared norm) cannot hide what happens to every other token;
    ``first_token_share`` the first position's share of the dense squared norm.

    ``walk`` chooses between both models on the device at once and a block-by-block walk (see
    :func:`prunekit.blockwalk.choose_walk`; ``sources`` = the dense and pruned weight sources
    imply the walk); the errors are the same.
    """
    from .families import discover
    from .losses import ErrorSums

    device = torch.device(device)
    blocks_d = discover(dense).blocks
    blocks_p = discover(pruned).blocks
    if len(blocks_d) != len(blocks_p):
        raise PrunekitError(f"the pruned model has {len(blocks_p)} blocks and the dense one {len(blocks_d)}; compare matching models")
    whole = [ErrorSums() for _ in blocks_d]  # every position
    rest = [ErrorSums() for _ in blocks_d]  # positions after the first
    store: list[torch.Tensor] = [torch.empty(0)] * len(blocks_d)

    def add(i: int, h: torch.Tensor, ref: torch.Tensor) -> None:
        whole[i].add(h, ref)
        if h.shape[1] > 1:
            rest[i].add(h[:, 1:], ref[:, 1:])

    def result() -> dict[str, list[float]]:
        return {
            "aggregate": [s.aggregate for s in whole],
            "token": [s.token if s.tokens else s_all.token for s, s_all in zip(rest, whole)],
            "first_token_share": [s.first_token_share for s in whole],
        }

    if sources is not None or choose_walk(walk, [dense, pruned], device) == "blocks":
        batches = [Batch(windows[b : b + batch_size]) for b in range(0, windows.shape[0], batch_size)]
        blockwalk.walk_pair(
            dense, pruned, batches, device, lambda i, _b, y, ref: add(i, y.float(), ref),
            sources=sources or (None, None),
        )
        return result()

    def keep(i: int):
        def hook(_m, _i, out):
            store[i] = (out[0] if isinstance(out, (tuple, list)) else out).float()
        return hook

    def compare(i: int):
        def hook(_m, _i, out):
            add(i, (out[0] if isinstance(out, (tuple, list)) else out).float(), store[i])
        return hook

    handles = [b.register_forward_hook(keep(i)) for i, b in enumerate(blocks_d)]
    handles += [b.register_forward_hook(compare(i)) for i, b in enumerate(blocks_p)]
    dense.to(device)
    pruned.to(device)
    try:
        for b in tqdm(range(0, windows.shape[0], batch_size), desc="block errors", unit="batch"):
            ids = windows[b : b + batch_size].to(device)
            dense.base_model(input_ids=ids, use_cache=False)
            pruned.base_model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        park(dense)
        park(pruned)
    return result()
