"""Full retraining after pruning: the whole pruned model trained end to end, masks fixed (issue 13).

The baseline that local reconstruction is measured against (the Free Lunch paper, Wagner et al.
2025: local reconstruction "matches post-pruning retraining while using over an order of magnitude
less data and compute"). ``--recon retrain`` chooses the masks layer-wise exactly as ``--recon lr``
does, then trains the whole model on the calibration windows (the held-out ones excepted) with
the language-modelling loss (``--retrain-loss lm``) or by distillation to the dense model's
next-token distributions (``kd``: KL through the LM head), with the local reconstruction's
optimiser (:func:`prunekit.reconstruct._adamw`, linear decay to 0), epochs, learning rate, batch,
held-out criterion, early stopping and reverts.

What trains: every block's linear weights (or, with ``--lora-rank``, a masked LoRA on each of them,
:class:`prunekit.reconstruct._MaskedLoRA`, the Free Lunch paper's PEFT setting), plus the blocks'
norms and biases and the final norm unless ``--train linear`` (the selection of
:func:`prunekit.reconstruct._trainable`, so "all" means the same as for units). The embeddings and
the LM head stay frozen: pruning never touches them, they are tied in many small models (SmolLM2),
where training them on a few dozen windows would move every token's embedding, and the frozen head
is what ``kd`` reads the dense model's distributions through. Masks are held as in local
reconstruction: the gradient of every pruned weight is zeroed (AdamW without weight decay then never
moves it), or the LoRA merge is multiplied by the mask; pruned weights are exactly zero during and
after training, and the pipeline checks every linear against its mask afterwards.

The ``kd`` teacher: storing the dense logits of every window is unaffordable (SmolLM2: 49,152
logits per token, 51 GB for 128 x 2048 tokens in float32), and a dense copy of the model beside the
trained one doubles device memory. The dense model's *final hidden states* are stored instead (576
values per token for SmolLM2, 85x fewer; in ``--stream-dtype``), computed once before any block is
pruned, and the dense logits are recomputed per batch through the same frozen LM head: exactly the
dense model's distributions, for one extra LM-head forward per step.

Precision follows the run (:mod:`prunekit.precision`): the forward passes autocast in bf16 while the
parameters being trained, the loss and AdamW's state stay float32 (a bfloat16 model is trained in
float32 and cast back at the end). Gradient checkpointing (``--gradient-checkpointing``) recomputes
every block in the backward pass and, for the LM head, chunks of positions, so that the logits of a
whole batch are never held at once.

Under torchrun (data-parallel, :mod:`prunekit.dist`) every rank holds its share of the windows, as
in local reconstruction: each step takes the single-process run's batch (:func:`prunekit.reconstruct.epoch_batches`),
every rank computes its rows of it with its loss weighted by its share, and the gradients are summed
over ranks, so every rank takes the same steps and ends with the same weights; the held-out loss
and the guard's measures are summed over ranks.

Compute is counted as local reconstruction counts it (:func:`prunekit.reconstruct._unit_flops`):
every linear's forward + backward as 3 x 2 x tokens x weights per step (the blocks' linears at
their dense size, and the LM head), forward-only passes as 2 x tokens x weights (the per-epoch
held-out loss; ``kd``'s dense logits; recomputation under gradient checkpointing); the teacher's one
pass over the windows is counted apart (``teacher_flops``). Attention scores and elementwise work are
not counted, as for units.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from . import precision
from .config import ReconConfig
from .dist import Ranks
from .errors import PrunekitError
from .hostmem import park
from .families import Conv1D, Layout, Readout, discover, weight_matrix
from .guard import EndToEnd, GuardReport, restore, snapshot
from .losses import kl_divergence
from .reconstruct import BestSoFar, Point, Unit, _adamw, _decay, _hold_masks, _MaskedLoRA, _oriented, _trainable, epoch_batches, sum_over_ranks
from .streams import peak_rss_mb

log = logging.getLogger(__name__)

_CHUNK = 1024  # positions per LM-head chunk under gradient checkpointing


@dataclass
class RetrainRecord:
    """What end-to-end retraining did: its loss curves, compute and memory, and the verdicts.

    ``heldout_*`` are the mean training loss (next-token NLL for ``lm``, KL to the dense model for
    ``kd``) on the held-out calibration windows, before training, after every epoch and at the end
    (after any early-stopping restore or revert).
    """

    loss: str
    params: str  # all | linear | lora-rank R (+ norms and biases when train=all)
    trainable_params: int
    lr: float
    batch_size: int
    epochs: int  # epochs asked for
    epochs_run: int = 0
    steps: int = 0
    tokens: int = 0  # tokens trained on (steps x windows x seqlen)
    train_windows: int = 0  # windows trained on (all ranks); each epoch passes over them once
    loss_curve: list[float] = field(default_factory=list)  # mean training loss per epoch
    heldout_before: float | None = None
    heldout_curve: list[float] = field(default_factory=list)
    heldout_after: float | None = None
    best_epoch: int | None = None
    seconds: float = 0.0  # the training loop, held-out losses per epoch included
    teacher_seconds: float = 0.0  # the dense model's final hidden states (kd) and the guard's dense reference
    flops: float = 0.0  # training steps and per-epoch held-out losses
    teacher_flops: float = 0.0  # the dense pass that the kd teacher needs (once)
    optimizer_state_mb: float = 0.0  # AdamW's two float32 moments of the trainable parameters
    peak_rss_mb: float = 0.0  # the process's peak host memory at the end of retraining
    peak_gpu_mb: float | None = None  # torch.cuda.max_memory_allocated at the end of retraining
    gradient_checkpointing: bool = False
    reverted: bool = False  # the model ends with its masks-only weights
    note: str | None = None
    guard: GuardReport | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def final_hidden(model: nn.Module, ids: torch.Tensor, batch_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The model's last hidden states (after the final norm) for every window, on the CPU in ``dtype``.

    Run in the model's own dtype, outside the run's precision mode, like the guard's dense reference.
    """
    model.to(device)
    try:
        return torch.cat([
            model.base_model(input_ids=ids[b : b + batch_size].to(device), use_cache=False).last_hidden_state.to("cpu", dtype)
            for b in range(0, ids.shape[0], batch_size)
        ])
    finally:
        park(model)


@contextlib.contextmanager
def _checkpointed(blocks: nn.ModuleList) -> Iterator[None]:
    """Every block's forward recomputed in the backward pass (``torch.utils.checkpoint``, non-reentrant).

    Why not ``model.gradient_checkpointing_enable()``: in transformers 5 (a deprecated alias of
    ``activation_checkpointing_enable``) a layer checkpoints only in training mode, and
    ``model.train()`` also turns on the dropout that OPT and GPT-2 layers apply (p = 0.1 in their
    released configs), so the flag would change the result, not only memory and time. Here the model
    stays in eval mode, and the same steps give the same losses with and without the flag.
    """
    wrapped = []
    for block in blocks:
        if "forward" in vars(block):  # someone else's instance-level forward: leave that block alone
            continue
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
        wrapped.append(block)
    try:
        yield
    finally:
        for block in wrapped:
            del block.forward


class Retrain:
    """End-to-end retraining of a pruned model, prepared before pruning and run after the layer-wise pass.

    Preparing reads the dense model: the kd teacher's final hidden states (every window) and the
    guard's dense reference on the held-out windows (:class:`prunekit.guard.EndToEnd`); so the
    object must be built while ``model`` is still dense.
    """

    def __init__(
        self, model: nn.Module, ids: torch.Tensor, train_rows: torch.Tensor, held_rows: torch.Tensor, cfg: ReconConfig,
        batch_size: int, device: torch.device, teacher_dtype: torch.dtype = torch.float32, ranks: Ranks = Ranks(),
        train_offset: int = 0, train_total: int | None = None, local_batches: bool = False,
    ) -> None:
        """``ids`` are this rank's windows (all of them on one process) and ``train_rows`` index them;
        data-parallel, they are the global training windows ``train_offset`` to ``train_offset +
        len(train_rows)`` of ``train_total`` (as in :class:`prunekit.reconstruct.FitData`)."""
        if ids.shape[1] - 1 - cfg.loss_skip < 1:
            raise PrunekitError(
                f"--loss-skip {cfg.loss_skip} leaves no position to retrain on in windows of {ids.shape[1]} tokens; lower it or raise --seqlen"
            )
        self.ids = ids
        self.train_rows = train_rows
        self.held_rows = held_rows
        self.cfg = cfg
        self.batch_size = cfg.recon_batch_size or batch_size  # windows per gradient step
        self.eval_batch_size = batch_size
        self.device = device
        self.ranks, self.train_offset, self.train_total, self.local_batches = ranks, train_offset, train_total, local_batches
        t = time.perf_counter()
        self.teacher = final_hidden(model, ids, batch_size, device, teacher_dtype) if cfg.retrain_loss == "kd" else None
        self.teacher_flops = 0.0
        if self.teacher is not None:  # one forward pass of the blocks' linears over every window
            layout = discover(model)
            weights = sum(weight_matrix(m).numel() for j in range(len(layout.blocks)) for m in layout.block_linears(j).values())
            self.teacher_flops = 2.0 * ids.numel() * weights
        self.e2e = None
        if cfg.guard != "off" and len(held_rows):
            self.e2e = EndToEnd(model, ids[held_rows], batch_size, device, ranks=ranks)
        self.prepare_s = time.perf_counter() - t

    @property
    def train_windows(self) -> int:
        """Windows trained on per epoch, over all ranks."""
        return len(self.train_rows) if self.train_total is None else self.train_total

    # ------------------------------------------------------------------ losses

    def _head_loss(self, readout: Readout, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The summed loss of final hidden states ``h`` (``[tokens, d]``) against next tokens (lm) or
        the dense model's final hidden states (kd), in float32."""
        device = h.device

        def piece(hc: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:
            with precision.forward(device):
                z = readout.logits(hc)
            if self.cfg.retrain_loss == "lm":
                return F.cross_entropy(z, tc, reduction="sum")
            with torch.no_grad(), precision.forward(device):
                zd = readout.logits(tc)
            return kl_divergence(zd, z).sum()

        if not (self.cfg.gradient_checkpointing and torch.is_grad_enabled()):
            return piece(h, target)
        total = h.new_zeros((), dtype=torch.float32)
        for c in range(0, h.shape[0], _CHUNK):  # each chunk's logits recomputed in the backward pass
            total = total + checkpoint(piece, h[c : c + _CHUNK], target[c : c + _CHUNK], use_reentrant=False)
        return total

    def _batch_loss(self, model: nn.Module, readout: Readout, rows: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(summed loss, positions) of the windows ``rows``; positions skip..seq-2 predict the next token."""
        skip = self.cfg.loss_skip
        ids = self.ids[rows].to(self.device)
        with precision.forward(self.device):
            hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
        h = hidden[:, skip:-1].float()
        if self.cfg.retrain_loss == "lm":
            target = ids[:, skip + 1 :].reshape(-1)
        else:
            target = self.teacher[rows][:, skip:-1].to(self.device, torch.float32).reshape(-1, h.shape[-1])
        return self._head_loss(readout, h.reshape(-1, h.shape[-1]), target), h.shape[0] * h.shape[1]

    @torch.no_grad()
    def _heldout(self, model: nn.Module, readout: Readout) -> float | None:
        """The mean loss per position on the held-out windows (None without held-out windows)."""
        total, count = 0.0, 0
        for b in range(0, len(self.held_rows), self.eval_batch_size):
            loss, n = self._batch_loss(model, readout, self.held_rows[b : b + self.eval_batch_size])
            total += float(loss)
            count += n
        total, count = self.ranks.sum_floats([total, float(count)])
        return total / count if count else None

    # ------------------------------------------------------------------ training

    def run(self, model: nn.Module, layout: Layout, masks: dict[str, torch.Tensor], seed: int) -> RetrainRecord:
        """Train ``model`` (pruned, on the CPU) end to end with ``masks`` (full linear name -> bool mask) fixed.

        A non-finite loss, a held-out loss that ends worse than before training, or (``--guard
        revert``) a held-out KL to the dense model that ends worse than the masks-only weights'
        restores the masks-only weights, and the record says so. The model ends on the CPU.
        """
        cfg, device = self.cfg, self.device
        prefix = layout.family.blocks
        readout = Readout(model, with_norm=False)
        final_norm = Readout(model).norm
        linears = {f"{prefix}.{j}.{n}": lin for j in range(len(layout.blocks)) for n, lin in layout.block_linears(j).items()}
        modules: list[nn.Module] = [*layout.blocks, *([final_norm] if final_norm is not None else [])]
        unit = Unit("model", modules, linears, Point(None), Point(None), lambda x: x)
        head_weights = readout.head.weight.numel()
        block_weights = sum(weight_matrix(m).numel() for m in linears.values())
        params_label = f"lora-rank {cfg.lora_rank}" if cfg.lora_rank else "linear weights"
        if cfg.train == "all":
            params_label += ", norms and biases"
        record = RetrainRecord(
            loss=cfg.retrain_loss, params=params_label, trainable_params=0, lr=cfg.lr, batch_size=self.batch_size,
            epochs=cfg.epochs or 0, teacher_seconds=self.prepare_s, teacher_flops=self.teacher_flops,
            gradient_checkpointing=cfg.gradient_checkpointing,
            train_windows=self.train_windows,
        )
        masks_only = [snapshot(m) for m in modules]  # on the CPU: the weights every revert goes back to
        guard = GuardReport(cfg.guard) if self.e2e is not None else None
        lr_result = None
        if guard is not None:
            tg = time.perf_counter()
            lr_result = self.e2e.measure(model)
            guard.seconds += time.perf_counter() - tg

        seq = int(self.ids.shape[1])
        head_tokens = max(seq - 1 - cfg.loss_skip, 0)
        kd = cfg.retrain_loss == "kd"

        def step_flops(windows: int, train: bool) -> float:
            blocks, head = windows * seq * block_weights, windows * head_tokens * head_weights
            f = 2.0 * (blocks + head) * (3 if train else 1) + (2.0 * head if kd else 0.0)
            if train and cfg.gradient_checkpointing:  # the recomputed forward passes
                f += 2.0 * (blocks + head) + (2.0 * head if kd else 0.0)
            return f

        t0 = time.perf_counter()
        diverged = False
        float_state: dict[int, torch.dtype] = {}
        params: list[nn.Parameter] = []
        requires = {id(p): p.requires_grad for p in model.parameters()}
        grad_masks: list[tuple[nn.Parameter, torch.Tensor]] = []
        hooks: list = []
        lora_linears: list[nn.Module] = []
        model.to(device)
        try:
            for p in model.parameters():  # float32 master weights (and a float32 model, so dtypes agree)
                if p.dtype != torch.float32:
                    float_state[id(p)] = p.dtype
                    p.data = p.data.float()
            for i, (name, lin) in enumerate(linears.items()):
                mask = _oriented(lin, masks[name].to(device))  # bool: a quarter of a float32 mask's memory
                if cfg.lora_rank:
                    torch.manual_seed(seed * 1_000_003 + i)
                    lora = _MaskedLoRA(mask, cfg.lora_rank, cfg.lora_alpha, transposed=bool(Conv1D) and isinstance(lin, Conv1D))
                    parametrize.register_parametrization(lin, "weight", lora)
                    lora_linears.append(lin)
                else:
                    grad_masks.append((lin.weight, mask))
            params = _trainable(unit, cfg)
            chosen = {id(p) for p in params}
            for p in model.parameters():
                p.requires_grad_(id(p) in chosen)
            record.trainable_params = sum(p.numel() for p in params)
            record.optimizer_state_mb = 2 * 4 * record.trainable_params / 2**20
            hooks = _hold_masks(grad_masks)
            record.heldout_before = self._heldout(model, readout)
            with contextlib.ExitStack() as stack:
                if cfg.gradient_checkpointing:
                    stack.enter_context(_checkpointed(layout.blocks))
                diverged = self._train(model, readout, params, record, seed, step_flops)
        finally:
            for h in hooks:
                h.remove()
            with torch.no_grad():
                for w, mask in grad_masks:  # exact already (see _hold_masks); this makes it unconditional
                    w.mul_(mask)
            for lin in lora_linears:  # merge: (W + s B A) * mask
                parametrize.remove_parametrizations(lin, "weight", leave_parametrized=True)
            for p in model.parameters():
                p.requires_grad_(requires.get(id(p), False))
                if id(p) in float_state:
                    p.data = p.data.to(float_state[id(p)])
        record.seconds = time.perf_counter() - t0
        try:
            if not diverged:
                record.heldout_after = self._heldout(model, readout)
        finally:
            park(model)
        record.peak_rss_mb = peak_rss_mb()
        if device.type == "cuda":
            record.peak_gpu_mb = torch.cuda.max_memory_allocated(device) / 2**20
        before, after = record.heldout_before, record.heldout_after
        worse = before is not None and after is not None and not after <= before
        if diverged or worse or (after is not None and not math.isfinite(after)):
            for m, state in zip(modules, masks_only):
                restore(m, state)
            why = "the loss became NaN or inf" if diverged or not math.isfinite(after or 0.0) else (
                f"the held-out {cfg.retrain_loss} loss rose from {before:.4g} to {after:.4g}"
            )
            record.note = f"retraining: {why}; kept the masks-only weights"
            record.reverted = True
            record.heldout_after = before
            log.warning("%s", record.note)
        if guard is not None:
            tg = time.perf_counter()
            if record.reverted:
                guard.conclude(lr_result, None, False, "retraining itself went back to the masks-only weights")
            else:
                final = self.e2e.measure(model)
                worse_e2e = not final.kl <= lr_result.kl
                if worse_e2e and cfg.guard == "revert":
                    for m, state in zip(modules, masks_only):
                        restore(m, state)
                    record.reverted = True
                    record.heldout_after = before
                guard.conclude(final, lr_result, worse_e2e and cfg.guard == "revert", None)
            guard.seconds += time.perf_counter() - tg
            record.guard = guard
        elif cfg.guard != "off":
            record.note = (record.note + "; " if record.note else "") + (
                "the guard's end-to-end check needs held-out calibration windows (--holdout > 0): not made"
            )
        return record

    def _step(self, model: nn.Module, readout: Readout, params: list[nn.Parameter], idx: torch.Tensor, count: int) -> torch.Tensor:
        """The mean loss of one batch of ``count`` positions over all ranks, after its backward pass.

        On one process this is the batch's mean loss. Data-parallel, this rank holds ``idx``, some
        (possibly none) of the batch's windows: its summed loss over ``count`` is its share of the
        mean, and summing gradients and losses over ranks gives the single-process step (up to the
        order of float sums)."""
        loss = torch.zeros((), device=self.device)
        if len(idx):
            total_loss, _ = self._batch_loss(model, readout, idx)
            loss = total_loss / count  # a mean: the learning rate does not depend on the batch
            if torch.isfinite(loss) or self.ranks.active:  # data-parallel, every rank joins the sum below
                loss.backward()
        return sum_over_ranks(loss.detach(), params, self.ranks)

    def _train(
        self, model: nn.Module, readout: Readout, params: list[nn.Parameter], record: RetrainRecord, seed: int,
        step_flops,
    ) -> bool:
        """The epochs of AdamW steps (linear decay to 0); True when the loss stopped being finite."""
        cfg, device = self.cfg, self.device
        steps_per_epoch = math.ceil(self.train_windows / self.batch_size)
        total = max(steps_per_epoch * (cfg.epochs or 0), 1)
        opt = _adamw(params, cfg.lr)
        sched = _decay(opt, total)
        gen = torch.Generator().manual_seed(seed)
        best = BestSoFar(record.heldout_before, params, cfg.early_stop, cfg.patience, copy_to="cpu")  # the whole model: on the host
        seq = int(self.ids.shape[1])
        positions = max(seq - 1 - cfg.loss_skip, 1)
        # the whole model's steps take minutes to hours on a CPU: one bar over all of them (rank 0's; see run.py)
        with tqdm(total=total, desc=f"retraining ({cfg.retrain_loss})", unit="step", leave=False) as bar:
            for epoch in range(cfg.epochs or 0):
                losses = []
                with torch.enable_grad():
                    for idx, global_size in epoch_batches(self.train_rows, self.batch_size, gen, self.ranks,
                                                          self.train_offset, self.train_total, self.local_batches):
                        with precision.step(device):  # TF32 for the whole step; bf16 autocasts the forward only
                            opt.zero_grad(set_to_none=True)
                            loss = self._step(model, readout, params, idx, global_size * positions)
                            if not torch.isfinite(loss):  # the same on every rank: the loss is summed over them
                                log.warning("retraining: non-finite loss at epoch %d", epoch)
                                return True
                            opt.step()
                        sched.step()
                        losses.append(float(loss))
                        record.steps += 1
                        record.tokens += global_size * seq
                        record.flops += step_flops(global_size, True)
                        bar.update(1)
                        bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.4g}", refresh=False)
                record.epochs_run = epoch + 1
                record.loss_curve.append(sum(losses) / len(losses))
                if len(self.held_rows):
                    h = self._heldout(model, readout)
                    record.flops += step_flops(len(self.held_rows), False)
                    record.heldout_curve.append(h)
                    if not math.isfinite(h):
                        return True
                    if best.update(h, epoch):
                        break
        epoch_kept = best.restore()
        if epoch_kept is not None:
            record.best_epoch = epoch_kept
        return False
