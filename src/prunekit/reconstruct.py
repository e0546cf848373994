"""Reconstruction units and their training loop (REFERENCE §3).

A *unit* is what one reconstruction step adapts: a linear (``matrix``), the attention or the MLP
part of a block (``attn-mlp``), a block, or a window of blocks. Each unit has an input point and an
output point inside the current window (the input of a block, the residual stream between
attention and MLP, the input or output of a linear), so its inputs and targets are read off the
sparse or the dense forward pass of the window at those points, by hooks, without re-implementing
any modeling code. The attention part runs the block up to the mid norm; the MLP part is
``h + branch(h)`` with the branch modules named in the family table.

Masks are held fixed by zeroing the gradient of every pruned weight (AdamW without weight decay then
never moves it; see ``_hold_masks``), or, with LoRA, by the parametrisation
``(original + s * B @ A) * mask`` merged at the end, so pruned weights are exactly zero during and
after training.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import precision
from .capture import Captured, run_block, to_device
from .config import ReconConfig
from .families import Conv1D, Layout, is_linear, weight_matrix
from .hostmem import host_copy, rows as rows_on
from .losses import ErrorSums, Objective
from .dist import Ranks
from .probe import value_at

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- points and probing


@dataclass(frozen=True)
class Point:
    """A place in the forward pass: the input (``post=False``) or output of ``module``; None = window input."""

    module: nn.Module | None
    post: bool = False


def _like(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Restore ``[batch, seq, dim]`` where the model flattened tokens (OPT's MLP reads ``[batch*seq, dim]``)."""
    if value.dim() == 2 and x.dim() == 3:
        return value.view(x.shape[0], x.shape[1], -1)
    return value


class Window:
    """Blocks ``lo..hi-1`` of a model (the pruned ones, or their dense copies) run as one function."""

    def __init__(self, blocks: list[nn.Module], indices: list[int], captured: Captured, device: torch.device) -> None:
        self.blocks = blocks
        self.indices = indices
        self.captured = captured
        self.device = device

    def kwargs(self, pos: int, rows: int) -> dict[str, Any]:
        return to_device(self.captured.kwargs_for(self.indices[pos], rows), self.device)

    def run(self, x: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        for pos, block in enumerate(self.blocks[:upto]):
            x = run_block(block, x, self.kwargs(pos, x.shape[0]))
        return x

    def value_at(self, x: torch.Tensor, point: Point) -> torch.Tensor:
        """Run the window on ``x`` until ``point`` and return the value there."""
        if point.module is None:
            return x
        return _like(value_at(point.module, point.post, self.run, x), x)


@torch.no_grad()
def collect(
    window: Window, stream: torch.Tensor, point: Point, rows: torch.Tensor, batch_size: int,
    allocate: Callable[[tuple[int, ...], torch.dtype], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The value at ``point`` for every row of ``stream`` (``[n, seq, hidden]``), in a new stream
    (``allocate``'s placement: the GPU, RAM or disk; without it, RAM) of ``stream``'s dtype."""
    out: torch.Tensor | None = None
    for b in range(0, len(rows), batch_size):
        idx = rows[b : b + batch_size]
        v = window.value_at(rows_on(stream, idx, window.device), point)
        if out is None:
            shape = (len(rows), *v.shape[1:])
            out = allocate(shape, stream.dtype) if allocate else torch.empty(shape, dtype=stream.dtype)
        out[b : b + len(idx)] = v  # copy_: casts to the stream's dtype, crosses devices
    assert out is not None
    return out


# ----------------------------------------------------------------------------- units


@dataclass
class Unit:
    """One reconstruction unit within a window."""

    name: str
    modules: list[nn.Module]  # their parameters are the unit's parameters
    linears: dict[str, nn.Module]  # full name -> linear
    input: Point
    output: Point
    forward: Callable[[torch.Tensor], torch.Tensor]  # input value -> output value (uses the batch's kwargs)


def _attn_forward(window: Window, pos: int, mid_norm: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def f(x: torch.Tensor) -> torch.Tensor:  # the residual stream is the mid norm's input
        return _like(value_at(mid_norm, False, run_block, window.blocks[pos], x, window.kwargs(pos, x.shape[0])), x)

    return f


def _mlp_forward(branch: list[nn.Module]) -> Callable[[torch.Tensor], torch.Tensor]:
    def f(h: torch.Tensor) -> torch.Tensor:
        y = h
        for m in branch:
            y = m(y)
        return h + y

    return f


def build_units(layout: Layout, window: Window, granularity: str, prefix: str) -> list[Unit]:
    """The units of a window in forward order; the same call on dense copies gives the matching dense units.

    Every unit's forward reads its input in its weights' dtype and runs in the run's precision
    (blocks through :func:`run_block`, the MLP part and single linears through
    :func:`prunekit.precision.computed`).
    """
    fam = layout.family
    units: list[Unit] = []
    if granularity == "block":
        linears = {}
        for pos, j in enumerate(window.indices):
            linears.update(_linears(window.blocks[pos], f"{prefix}.{j}", layout, j))
        name = f"blocks {window.indices[0]}-{window.indices[-1]}" if len(window.indices) > 1 else f"block {window.indices[0]}"
        return [Unit(name, list(window.blocks), linears, Point(None), Point(window.blocks[-1], True), window.run)]
    for pos, j in enumerate(window.indices):
        block = window.blocks[pos]
        entry = Point(None) if pos == 0 else Point(block)
        all_linears = _linears(block, f"{prefix}.{j}", layout, j)
        if granularity == "attn-mlp":
            mid = block.get_submodule(fam.mid_norm)
            branch = [block.get_submodule(n) for n in fam.mlp_branch]
            branch_ids = {id(p) for m in branch for p in m.parameters()}
            attn_modules = [m for m in block.children() if not any(id(p) in branch_ids for p in m.parameters())]
            attn_lin = {k: v for k, v in all_linears.items() if not any(id(p) in branch_ids for p in v.parameters())}
            mlp_lin = {k: v for k, v in all_linears.items() if k not in attn_lin}
            units.append(Unit(f"block {j} attention", attn_modules, attn_lin, entry, Point(mid), _attn_forward(window, pos, mid)))
            mlp = precision.computed(_mlp_forward(branch), branch[0])
            units.append(Unit(f"block {j} mlp", branch, mlp_lin, Point(mid), Point(block, True), mlp))
        elif granularity == "matrix":
            for full, lin in all_linears.items():
                units.append(Unit(full, [lin], {full: lin}, Point(lin), Point(lin, True), precision.computed(lin, lin)))
        else:
            raise ValueError(f"unknown granularity {granularity!r}")
    return units


def _linears(block: nn.Module, prefix: str, layout: Layout, index: int) -> dict[str, nn.Module]:
    names = list(layout.block_linears(index))
    found = {name: m for name, m in block.named_modules() if is_linear(m)}
    return {f"{prefix}.{n}": found[n] for n in names if n in found}


# ----------------------------------------------------------------------------- holding masks fixed


def _hold_masks(pairs: list[tuple[nn.Parameter, torch.Tensor]]) -> list[Any]:
    """Zero the pruned weights and every gradient that reaches them, so AdamW never moves them.

    With weight decay 0, a coordinate whose gradient is always exactly 0 keeps both Adam moments at
    0, so its update is ``lr * 0 / (0 + eps) = 0`` and the weight stays exactly 0 at every step.
    This is the same arithmetic as training ``W * M`` through a parametrisation, without recomputing
    ``W * M`` (and converting the boolean mask) in every forward pass: at batch 1 on a CPU that
    product cost about as much as the matmuls of the MLP weights it multiplies.
    """
    hooks = []
    buf = _ChunkBuffer()
    with torch.no_grad():
        for w, mask in pairs:
            mask_(w, mask, buf)
            hooks.append(w.register_post_accumulate_grad_hook(_grad_masker(mask, buf)))
    return hooks


def _hold_dtype(device: torch.device | str, lean: bool = False) -> torch.dtype:
    """The dtype of the masks that hold pruned weights at zero (the products are the same either way).

    On a GPU bool, a quarter of the memory (0.6 GB less for a LLaMA-7B block, whose BR+GP peaked at
    6.8 GiB in bf16 on an H100). On a CPU float32, whose multiply is about 8x faster than a
    bool-to-float one, unless host memory is what limits the run (``lean``: weights streamed from
    disk): then bool, the boolean masks the run holds anyway (no copy), multiplied in chunks."""
    return torch.bool if lean or torch.device(device).type == "cuda" else torch.float32


class _ChunkBuffer:
    """One scratch buffer of at least ``_CHUNK`` elements (and one row), shared by a unit's mask multiplies."""

    def __init__(self) -> None:
        self.t: torch.Tensor | None = None

    def get(self, dtype: torch.dtype, row: int) -> torch.Tensor:
        if self.t is None or self.t.dtype != dtype or self.t.numel() < row:
            self.t = torch.empty(max(_CHUNK, row), dtype=dtype)
        return self.t


_CHUNK = 1 << 20  # elements per bool-to-float chunk (4 MiB of float32)


def mask_(t: torch.Tensor, mask: torch.Tensor, buf: _ChunkBuffer | None = None) -> None:
    """``t.mul_(mask)``. A bool mask on a CPU is converted to ``t``'s dtype a few rows at a time in a
    scratch buffer (a mixed bool-float multiply there is ~8x slower than a float one; converting the
    whole mask would cost the memory a bool mask saves). The products are the same either way."""
    if mask.dtype != torch.bool or t.device.type != "cpu" or t.dim() != 2:
        t.mul_(mask)
        return
    scratch = (buf or _ChunkBuffer()).get(t.dtype, t.shape[1])
    rows = max(1, scratch.numel() // max(1, t.shape[1]))
    for r in range(0, t.shape[0], rows):
        part = t[r : r + rows]
        m = scratch[: part.numel()].view(part.shape)
        m.copy_(mask[r : r + rows])
        part.mul_(m)


def _grad_masker(mask: torch.Tensor, buf: _ChunkBuffer | None = None) -> Callable[[torch.Tensor], None]:
    def hook(p: torch.Tensor) -> None:
        mask_(p.grad, mask, buf)

    return hook


class _StepInBackward:
    """AdamW applied to each parameter as soon as its gradient is complete, then the gradient freed
    (PyTorch's "optimizer step in backward" recipe, ``register_post_accumulate_grad_hook``).

    Only one parameter's gradient exists at a time instead of the whole unit's: a block's worth of
    memory less at the peak (0.19 GiB for a 1B model's block on the host, 0.8 GB for a LLaMA-7B
    block in float32 on a GPU). AdamW is elementwise and each parameter has its own state, so this
    is the same arithmetic as one step over all parameters: the weights are identical to the bit.
    One optimizer and one linear-decay schedule per parameter, all at the same step. Where it is
    used: :func:`_steps_in_backward`.
    """

    def __init__(self, params: list[nn.Parameter], lr: float, total: int) -> None:
        self.opts = [_adamw([p], lr) for p in params]
        self.scheds = [_decay(o, total) for o in self.opts]
        self.hooks = [p.register_post_accumulate_grad_hook(self._stepper(o)) for p, o in zip(params, self.opts)]

    @staticmethod
    def _stepper(opt: torch.optim.Optimizer) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            opt.step()
            p.grad = None

        return hook

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to clear: each gradient is freed by its own step."""

    def step(self) -> None:
        """Every parameter was stepped during the backward pass."""

    def sched_step(self) -> None:
        for s in self.scheds:
            s.step()

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def _steps_in_backward(data: FitData) -> bool:
    """Step in the backward pass where memory is the limit: on an accelerator, and on a CPU when the
    weights are streamed (``data.lean``). On a CPU with the model in RAM the per-parameter optimizer
    calls cost about 2 ms a step for a SmolLM2 block (9.4 vs 7.9 ms; ~5% of a batch-1 step there),
    for memory that is not short. Never data-parallel (gradients are summed over ranks first)."""
    return not data.ranks.active and (data.lean or torch.device(data.device).type != "cpu")


class _StepAfterBackward:
    """The plain loop: one AdamW over all parameters, stepped after the backward pass."""

    def __init__(self, params: list[nn.Parameter], lr: float, total: int) -> None:
        self.opt = _adamw(params, lr)
        self.sched = _decay(self.opt, total)
        self.zero_grad, self.step = self.opt.zero_grad, self.opt.step

    def sched_step(self) -> None:
        self.sched.step()

    def remove(self) -> None:
        pass


def _decay(opt: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear decay of the learning rate to zero over ``total`` steps (Rethinking paper, Appendix A)."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, 1.0 - step / total))


class _MaskedLoRA(nn.Module):
    """``(W + (alpha / r) * B @ A) * mask``: a LoRA whose merge keeps the sparsity (Free Lunch paper)."""

    def __init__(self, mask: torch.Tensor, rank: int, alpha: float, transposed: bool) -> None:
        super().__init__()
        out_f, in_f = mask.shape if not transposed else mask.t().shape
        self.register_buffer("mask", mask, persistent=False)
        self.transposed = transposed
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.randn(rank, in_f, device=mask.device) / math.sqrt(in_f))
        self.lora_b = nn.Parameter(torch.zeros(out_f, rank, device=mask.device))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        delta = self.scale * (self.lora_b @ self.lora_a)
        return (w + (delta.t() if self.transposed else delta)) * self.mask


def _oriented(linear: nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """The mask ([out, in]) in the layout of ``linear.weight`` (GPT-2's Conv1D stores [in, out])."""
    return mask.t().contiguous() if (bool(Conv1D) and isinstance(linear, Conv1D)) else mask


# ----------------------------------------------------------------------------- training


@dataclass
class UnitRecord:
    """What reconstruction did to one unit: errors before/after, the loss curve.

    ``*_before``/``*_after`` are the aggregate normalised error ``sum ||t-y||^2 / sum ||t||^2``;
    ``*_token_*`` the mean per-token normalised error, where every token weighs the same (see
    :mod:`prunekit.losses`); ``first_token_share`` the first position's share of the targets'
    squared norm on the held-out windows (an attention sink that dominates plain MSE).
    """

    unit: str
    calib_before: float
    calib_after: float
    heldout_before: float | None
    heldout_after: float | None
    loss_curve: list[float] = field(default_factory=list)  # mean training loss per epoch
    heldout_curve: list[float] = field(default_factory=list)  # held-out criterion after each epoch
    steps: int = 0
    seconds: float = 0.0
    flops: float = 0.0
    best_epoch: int | None = None
    note: str | None = None
    loss: str = "mse"
    calib_token_before: float | None = None
    calib_token_after: float | None = None
    heldout_token_before: float | None = None
    heldout_token_after: float | None = None
    first_token_share: float | None = None

    def keep_before(self) -> None:
        """The unit ends with its weights from before reconstruction: its errors are the ones before."""
        self.calib_after, self.heldout_after = self.calib_before, self.heldout_before
        self.calib_token_after, self.heldout_token_after = self.calib_token_before, self.heldout_token_before


def measure(
    forward: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, targets: torch.Tensor,
    rows: torch.Tensor, batch_size: int, device: torch.device, objective: Objective | None = None, score: bool = True,
) -> ErrorSums | None:
    """The error measures of ``forward`` against ``targets`` over ``rows`` (None when there are none).

    ``score=False`` skips evaluating the objective itself (only its skipped positions apply): the
    training windows need only the error measures, and kd's LM head is not free. The forward runs
    in the run's precision; output and targets are compared in float32, as in training.
    """
    if len(rows) == 0:
        return None
    sums = ErrorSums()
    with torch.no_grad():
        for b in range(0, len(rows), batch_size):
            idx = rows[b : b + batch_size]
            y = forward(rows_on(inputs, idx, device)).float()
            sums.add(y, rows_on(targets, idx, device).float(), objective, score)
    return sums


def normalised_error(
    forward: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, targets: torch.Tensor,
    rows: torch.Tensor, batch_size: int, device: torch.device,
) -> float | None:
    """``sum ||t - f(x)||^2 / sum ||t||^2`` over ``rows``."""
    sums = measure(forward, inputs, targets, rows, batch_size, device)
    return None if sums is None else sums.aggregate


def _unit_flops(unit: Unit, tokens: int) -> float:
    """Forward + backward FLOPs of the unit's linears for ``tokens`` tokens (backward = 2x forward).

    Attention scores and elementwise work are not counted, so throughput figures built on this
    understate the work done (by about 8% for a SmolLM2 block at 256 tokens).
    """
    return 3.0 * sum(2.0 * tokens * w.numel() for w in (weight_matrix(m) for m in unit.linears.values()))


@dataclass
class FitData:
    """What one unit's reconstruction reads: its inputs and targets (``[n, ...]`` on CPU, in RAM or
    memory-mapped), which rows it trains on and which it holds out, and where and in what batches
    it computes."""

    inputs: torch.Tensor
    targets: torch.Tensor
    train_rows: torch.Tensor
    heldout_rows: torch.Tensor
    batch_size: int
    device: torch.device
    ranks: Ranks = field(default_factory=Ranks)  # data-parallel: this rank holds only some windows
    train_offset: int = 0  # data-parallel: global index of this rank's first training window
    train_total: int | None = None  # data-parallel: training windows over all ranks (default: this rank's)
    local_batches: bool = False  # data-parallel: each rank draws its share of every batch from its own windows
    heldout_total: int | None = None  # data-parallel: held-out windows over all ranks
    lean: bool = False  # host memory limits the run (weights streamed): bool hold masks on a CPU too

    def measure(
        self, forward: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor, objective: Objective | None = None,
        score: bool = True,
    ) -> ErrorSums | None:
        """The error sums over ``rows`` (over every rank's rows in a data-parallel run)."""
        sums = measure(forward, self.inputs, self.targets, rows, self.batch_size, self.device, objective, score)
        if not self.ranks.active:
            return sums
        sums = (sums or ErrorSums()).reduced(self.ranks)
        return sums if sums.tokens else None

    def batches(self, batch_size: int, gen: torch.Generator) -> list[tuple[torch.Tensor, int]]:
        """One epoch's shuffled batches: this rank's rows of each and the batch's size over all ranks."""
        return epoch_batches(self.train_rows, batch_size, gen, self.ranks, self.train_offset, self.train_total,
                             self.local_batches)


def epoch_batches(
    train_rows: torch.Tensor, batch_size: int, gen: torch.Generator, ranks: Ranks = Ranks(), train_offset: int = 0,
    train_total: int | None = None, local_batches: bool = False,
) -> list[tuple[torch.Tensor, int]]:
    """One epoch's shuffled batches: this rank's rows of each and the batch's size over all ranks.

    The permutation is drawn over all training windows with ``gen`` (the same on every rank), so
    a data-parallel run takes the very batches of the single-process run; each rank computes the
    part it holds (possibly none) and the gradients are summed. ``train_rows`` are this rank's
    windows, the global ones ``train_offset`` to ``train_offset + len(train_rows)`` of ``train_total``.
    Used by local reconstruction (:class:`FitData`) and end-to-end retraining (:mod:`prunekit.retrain`).
    """
    total = len(train_rows) if train_total is None else train_total
    if ranks.active and local_batches:
        return _local_batches(train_rows, batch_size, gen, total, ranks)
    order = torch.randperm(total, generator=gen)
    out = []
    lo, hi = train_offset, train_offset + len(train_rows)
    for b in range(0, total, batch_size):
        chunk = order[b : b + batch_size]
        mine = chunk[(chunk >= lo) & (chunk < hi)] - lo
        out.append((train_rows[mine], len(chunk)))
    return out


def _local_batches(
    train_rows: torch.Tensor, batch_size: int, gen: torch.Generator, total: int, ranks: Ranks,
) -> list[tuple[torch.Tensor, int]]:
    """``--dp-batches local``: as many steps as the global batches give, each rank taking an even
    share of every step from a shuffle of its own windows. Ranks stay balanced (a global batch
    of 8 on 8 ranks is one window each, not up to three on one of them); the batches differ from
    the single-process run's as another shuffle would."""
    world = ranks.world
    seed = int(torch.randint(2**62, (1,), generator=gen))  # the same on every rank, new every epoch
    mine = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(seed + ranks.rank))
    # the owners of the global sequence of windows, dealt round robin while each rank has some left:
    # the single-process steps cut this sequence, so every step has the single-process size and
    # each rank holds an even share of it
    left = [hi - lo for lo, hi in (Ranks(r, world).split(total) for r in range(world))]
    owners: list[int] = []
    while len(owners) < total:
        for r in range(world):
            if left[r]:
                owners.append(r)
                left[r] -= 1
    out, used = [], 0
    for b in range(0, total, batch_size):
        step = owners[b : b + batch_size]
        share = step.count(ranks.rank)
        out.append((train_rows[mine[used : used + share]], len(step)))
        used += share
    return out


def fit(
    unit: Unit,
    masks: dict[str, torch.Tensor],
    data: FitData,
    cfg: ReconConfig,
    seed: int,
    objective: Objective | None = None,
    restore_before: Callable[[], None] | None = None,
) -> UnitRecord:
    """Adapt the unit's kept weights so ``unit(data.inputs) ≈ data.targets``; masks stay fixed.

    AdamW (betas 0.9/0.95, no weight decay), linear decay to zero, shuffled batches drawn with
    ``seed`` (Rethinking paper, Appendix A), minimising ``objective`` (default: plain MSE). A
    non-finite loss, or a held-out criterion that ends worse than before, restores the weights the
    unit had before reconstruction and says so in the record.

    Training and measurements run in the run's precision (:mod:`prunekit.precision`): with bf16 the
    forward passes are autocast while the weights being trained, the loss and AdamW's state stay
    float32, so a masked weight's gradient is still exactly zero and masks stay exact.

    The weights from before are kept as a CPU copy (never in device memory), or not at all when the
    caller gives ``restore_before``, which puts them back from a copy it holds anyway (the guard's
    snapshot of the window, when the unit is the whole window).
    """
    objective = objective or Objective("mse")
    m = lambda rows, score=True: data.measure(unit.forward, rows, objective, score)  # noqa: E731
    train_rows, heldout_rows = data.train_rows, data.heldout_rows
    train0, held0 = m(train_rows, False), m(heldout_rows)
    record = UnitRecord(
        unit.name, train0.aggregate if train0 else 0.0, 0.0, held0.aggregate if held0 else None, None, loss=objective.kind,
        calib_token_before=train0.token if train0 else None, heldout_token_before=held0.token if held0 else None,
        first_token_share=held0.first_token_share if held0 else None,
    )
    if not cfg.trains:  # nothing to fit (LR): the errors are measured once
        record.keep_before()
        return record
    crit_before = held0.criterion(objective) if held0 else None
    before = None if restore_before is not None else {
        id(mod): {k: host_copy(v) for k, v in mod.state_dict().items()} for mod in unit.modules
    }
    t0 = time.perf_counter()
    diverged = False

    def criterion(rows: torch.Tensor) -> float | None:
        sums = m(rows)
        return None if sums is None else sums.criterion(objective)

    if cfg.solver == "lstsq":
        _lstsq(unit, masks, data)
    elif cfg.epochs:
        diverged = _adam(unit, masks, data, cfg, seed, objective, record, criterion, crit_before)
    record.seconds = time.perf_counter() - t0
    train1, held1 = m(train_rows, False), m(heldout_rows)
    record.calib_after = train1.aggregate if train1 else 0.0
    record.calib_token_after = train1.token if train1 else None
    record.heldout_after = held1.aggregate if held1 else None
    record.heldout_token_after = held1.token if held1 else None
    crit_after = held1.criterion(objective) if held1 else None
    worse = crit_after is not None and crit_before is not None and not crit_after <= crit_before
    if diverged or worse or not math.isfinite(record.calib_after):
        if before is None:
            restore_before()  # type: ignore[misc]
        else:
            with torch.no_grad():
                for mod in unit.modules:
                    mod.load_state_dict(before[id(mod)])
        why = "the loss became NaN or inf" if diverged or not math.isfinite(record.calib_after) else (
            f"the held-out {objective.kind} criterion rose from {crit_before:.4g} to {crit_after:.4g}"
        )
        record.note = f"{unit.name}: {why}; kept the weights from before reconstruction"
        log.warning("%s", record.note)
        record.keep_before()
    return record


def _trainable(unit: Unit, cfg: ReconConfig) -> list[nn.Parameter]:
    """Linear weights (or their LoRA factors), plus norm weights and biases unless ``train=linear``."""
    linear_ids = {id(m) for m in unit.linears.values()}
    internals = {id(sub) for lin in unit.linears.values() for sub in lin.modules() if sub is not lin}
    params: dict[int, nn.Parameter] = {}
    for module in unit.modules:
        for m in module.modules():
            if id(m) in internals:
                continue
            if id(m) in linear_ids:
                if cfg.lora_rank:
                    lora = m.parametrizations.weight[0]
                    ps = [lora.lora_a, lora.lora_b]
                else:
                    ps = [m.weight]
                if cfg.train == "all" and getattr(m, "bias", None) is not None:
                    ps.append(m.bias)
            else:
                ps = list(m.parameters(recurse=False)) if cfg.train == "all" else []
            params.update({id(p): p for p in ps})
    return list(params.values())


class BestSoFar:
    """The held-out criterion's best value so far, its epoch, and when to stop (early stopping).

    A copy of the weights at the best epoch is kept only with ``early_stop`` (the only case that goes
    back to them), on ``copy_to`` (None: where the weights are) to spare device memory.
    """

    def __init__(self, start: float | None, params: list[nn.Parameter], early_stop: bool, patience: int,
                 copy_to: torch.device | str | None = None) -> None:
        self.value, self.epoch, self.weights = start, None, None
        self.params, self.early_stop, self.patience, self.copy_to = params, early_stop, patience, copy_to
        self.stale = 0

    def update(self, value: float, epoch: int) -> bool:
        """Record the held-out ``value`` after ``epoch``; True when early stopping ends training now."""
        if self.value is None or value < self.value:
            self.value, self.epoch, self.stale = value, epoch, 0
            if self.early_stop:
                self.weights = {id(p): p.detach().to(self.copy_to or p.device, copy=True) for p in self.params}
            return False
        self.stale += 1
        return self.early_stop and self.stale >= self.patience

    def restore(self) -> int | None:
        """With early stopping, put the best epoch's weights back and return that epoch (else None)."""
        if not (self.early_stop and self.weights is not None):
            return None
        with torch.no_grad():
            for p in self.params:
                p.copy_(self.weights[id(p)])
        return self.epoch


def _adamw(params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """AdamW (betas 0.9/0.95, no weight decay), the fused kernel where the device has one.

    On a CPU the fused step is about 5x faster than the default multi-tensor one (5 vs 27 ms for a
    SmolLM2 block's parameters), which matters at the small batches of CPU runs, where the
    optimizer step is a large share of each step's time.
    """
    kwargs = dict(lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW(params, **kwargs)


def _adam(
    unit: Unit, masks: dict[str, torch.Tensor], data: FitData, cfg: ReconConfig, seed: int, objective: Objective,
    record: UnitRecord, criterion: Callable[[torch.Tensor], float | None], crit_before: float | None,
) -> bool:
    """Gradient descent on the unit (steps of ``cfg.recon_batch_size`` windows, else the run's batch
    size); returns True when the loss stopped being finite."""
    inputs, targets, train_rows, heldout_rows, device = (
        data.inputs, data.targets, data.train_rows, data.heldout_rows, data.device
    )
    batch_size = cfg.recon_batch_size or data.batch_size
    lin_items = list(unit.linears.items())
    if cfg.lora_rank:
        for name, lin in lin_items:
            mask = _oriented(lin, masks[name].to(device))
            torch.manual_seed(seed)
            p = _MaskedLoRA(mask, cfg.lora_rank, cfg.lora_alpha, transposed=bool(Conv1D) and isinstance(lin, Conv1D))
            parametrize.register_parametrization(lin, "weight", p)
    float_state = {}
    grad_masks: list[tuple[nn.Parameter, torch.Tensor]] = []
    hooks: list[Any] = []
    params: list[nn.Parameter] = []
    opt: _StepInBackward | _StepAfterBackward | None = None
    try:
        for m in unit.modules:  # train in float32 (fp32 master weights, Rethinking paper)
            for p in m.parameters():
                if p.dtype != torch.float32:
                    float_state[id(p)] = p.dtype
                    p.data = p.data.float()
        if not cfg.lora_rank:
            for name, lin in lin_items:
                grad_masks.append((lin.weight, _oriented(lin, masks[name].to(device, _hold_dtype(device, data.lean)))))
        params = _trainable(unit, cfg)
        chosen = {id(p) for p in params}
        for m in unit.modules:
            for p in m.parameters():
                p.requires_grad_(id(p) in chosen)
        hooks = _hold_masks(grad_masks)  # registered first: a gradient is masked before it is stepped
        steps_per_epoch = math.ceil((data.train_total or len(train_rows)) / batch_size)
        total = steps_per_epoch * cfg.epochs
        opt = (_StepInBackward if _steps_in_backward(data) else _StepAfterBackward)(params, cfg.lr, total)
        gen = torch.Generator().manual_seed(seed)
        best = BestSoFar(crit_before, params, cfg.early_stop, cfg.patience)
        tokens = int(inputs.shape[1]) if inputs.dim() > 2 else 1
        ranks = data.ranks
        for epoch in range(cfg.epochs):
            losses = []
            with torch.enable_grad():
                for idx, global_size in data.batches(batch_size, gen):
                    with precision.step(device):  # TF32 for the whole step; bf16 autocasts the forward only
                        opt.zero_grad(set_to_none=True)
                        loss = _step_loss(unit, params, objective, inputs, targets, idx, global_size, device, ranks)
                        if not torch.isfinite(loss):  # data-parallel: the summed loss, the same verdict on every rank
                            raise FloatingPointError(f"{unit.name}: non-finite loss at epoch {epoch}")
                        opt.step()  # stepping in backward: done already
                    opt.sched_step()
                    losses.append(float(loss.detach()))
                    record.steps += 1
                    record.flops += _unit_flops(unit, global_size * tokens)
            record.loss_curve.append(sum(losses) / len(losses))
            if len(heldout_rows):
                h = criterion(heldout_rows)
                held = len(heldout_rows) if data.heldout_total is None else data.heldout_total
                record.flops += _unit_flops(unit, held * tokens) / 3  # forward only
                record.heldout_curve.append(h)  # type: ignore[arg-type]
                if best.update(h, epoch):  # type: ignore[arg-type]
                    break
        epoch_kept = best.restore()
        if epoch_kept is not None:
            record.best_epoch = epoch_kept
    except FloatingPointError:
        return True
    finally:
        for h in hooks:
            h.remove()
        if opt is not None:
            opt.remove()
        with torch.no_grad():
            buf = _ChunkBuffer()
            for w, mask in grad_masks:  # exact already (see _hold_masks); this makes it unconditional
                mask_(w, mask, buf)
            for p in params:  # a step that raised (non-finite loss) may leave gradients behind
                p.grad = None
        if cfg.lora_rank:
            for _name, lin in lin_items:
                parametrize.remove_parametrizations(lin, "weight", leave_parametrized=True)
        for m in unit.modules:
            for p in m.parameters():
                p.requires_grad_(False)
                if id(p) in float_state:
                    p.data = p.data.to(float_state[id(p)])
    return False


def _step_loss(
    unit: Unit, params: list[nn.Parameter], objective: Objective, inputs: torch.Tensor, targets: torch.Tensor,
    idx: torch.Tensor, global_size: int, device: torch.device, ranks: Ranks,
) -> torch.Tensor:
    """The loss of one batch (float32 in every mode), after its backward pass.

    Data-parallel, this rank holds only some rows of the global batch (possibly none): their loss is
    weighted by their share of the batch, then gradients and loss are summed over ranks. The
    objectives are means over windows of equal length, so the sum is the single-process batch's
    loss and gradient (up to summation order)."""
    loss = torch.zeros((), device=device)
    if len(idx):
        x = rows_on(inputs, idx, device).float()
        t = rows_on(targets, idx, device).float()
        loss = objective.loss(unit.forward(x).float(), t)
        if ranks.active:
            loss = loss * (len(idx) / global_size)
        loss.backward()
    return sum_over_ranks(loss, params, ranks)


def sum_over_ranks(loss: torch.Tensor, params: list[nn.Parameter], ranks: Ranks) -> torch.Tensor:
    """After this rank's backward pass of its share of a step: gradients and loss summed over ranks
    (a parameter this rank's rows did not reach counts as a zero share); ``loss`` itself on one process.
    Used by local reconstruction (:func:`_step_loss`) and end-to-end retraining (:mod:`prunekit.retrain`)."""
    if not ranks.active:
        return loss
    for p in params:
        if p.grad is None:  # no rows here this step (or no path to p): a zero share
            p.grad = torch.zeros_like(p)
    total = loss.detach().reshape(1).clone()
    ranks.all_reduce_many_([p.grad for p in params] + [total])
    return total[0]


@torch.no_grad()
def _lstsq(unit: Unit, masks: dict[str, torch.Tensor], data: FitData) -> None:
    """Exact least squares of a linear with its mask fixed: per output row, ``H_SS w_S = b_S``.

    ``H = X^T X`` and ``b = X^T Y`` over the training tokens (with a column of ones when the layer
    has a bias); a 1e-6 relative ridge keeps ``H_SS`` invertible. The convex baseline of the papers.
    """
    inputs, targets, train_rows, batch_size, device = (
        data.inputs, data.targets, data.train_rows, data.batch_size, data.device
    )
    ((name, lin),) = unit.linears.items()
    w = weight_matrix(lin)
    bias = getattr(lin, "bias", None)
    d = w.shape[1] + (1 if bias is not None else 0)
    h = torch.zeros(d, d, dtype=torch.float64, device=device)
    b = torch.zeros(d, w.shape[0], dtype=torch.float64, device=device)
    for s in range(0, len(train_rows), batch_size):
        idx = train_rows[s : s + batch_size]
        x = rows_on(inputs, idx, device).reshape(-1, w.shape[1]).double()
        if bias is not None:
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=device)], 1)
        y = rows_on(targets, idx, device).reshape(-1, w.shape[0]).double()
        h.addmm_(x.t(), x)
        b.addmm_(x.t(), y)
    data.ranks.all_reduce_many_([h, b])  # data-parallel: every rank's windows
    h += 1e-6 * torch.diag(h).mean() * torch.eye(d, dtype=h.dtype, device=device)
    mask = masks[name].to(device)
    if bias is not None:
        mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=torch.bool, device=device)], 1)
    new = torch.zeros(w.shape[0], d, dtype=torch.float64, device=device)
    chunk = max(1, int(2**27 // (d * d)))
    eye = torch.eye(d, dtype=h.dtype, device=device)
    for r in range(0, w.shape[0], chunk):
        m = mask[r : r + chunk].double()  # [c, d]
        # rows restricted to their support: M H M + (I - M) keeps pruned coordinates at zero
        hs = m.unsqueeze(2) * h.unsqueeze(0) * m.unsqueeze(1) + (1 - m).unsqueeze(2) * eye
        rhs = (m * b[:, r : r + chunk].t()).unsqueeze(2)
        new[r : r + chunk] = torch.linalg.solve(hs, rhs).squeeze(2) * m
    w.copy_(new[:, : w.shape[1]].to(w.dtype))
    if bias is not None:
        bias.data.copy_(new[:, -1].to(bias.dtype))
