"""Evaluate a model that does not fit on the device: one block at a time over batches of inputs.

The whole-model path moves every weight to the device and runs each batch through the model. A
model bigger than the device's memory cannot go that way; SparseGPT's own evaluation turns the
loops around instead, and so does this walker: embed every batch (the model's own forward up to
block 0, recorded by :func:`prunekit.capture.capture` with each block's keyword arguments: masks,
rotary tables), then for each block put it on the device, run every batch through it and take it
off again, and last read the final hidden states out through the final norm and LM head
(:class:`prunekit.families.Readout`). Between blocks the hidden states wait in host memory. Only
one block's weights (or the embeddings, or the head) are on the device at any time, and the
arithmetic is the model's own, so the results equal the whole-model path up to the order of float
reductions.

Where the weights come from is pluggable (:class:`WeightSource`): by default the model's own
modules are moved to the device for the step that uses them and back (:class:`ModelWeights`); a
source that reads a block from safetensors shards into a meta-device skeleton on ``load`` and
drops it on ``release`` plugs in the same way.

:func:`choose_walk` decides between the two paths (``auto``: block by block when the weights would
not fit in the device's free memory).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .capture import _children_deep, capture, run_block, to_device
from .errors import PrunekitError
from .families import Readout, discover
from .hostmem import park
from .streams import available_ram

log = logging.getLogger(__name__)

WALKS = ("auto", "whole", "blocks")
_GIB = 1 << 30
# Room left on the device beside the weights in ``auto``: activations of an evaluation batch
# (eager attention scores of 4 x 2048 tokens and 32 heads alone take 2 GiB in float32), the LM
# head's logits, the allocator's fragmentation. A tenth of the device, at least 2 GiB.
_MARGIN_FRACTION = 0.1
_MARGIN_MIN = 2 * _GIB
# Share of the available host memory that the hidden states of one walk may take; more inputs
# than that are walked in several passes over the blocks.
_RAM_SHARE = 0.25


# ----------------------------------------------------------------------------- choosing the path


def _on(t: torch.Tensor, device: torch.device) -> bool:
    return t.device.type == device.type and (device.index is None or t.device.index == device.index)


def device_free_bytes(device: torch.device) -> tuple[int, int]:
    """``(free, total)`` bytes of a CUDA device; memory PyTorch's allocator caches but does not use counts as free."""
    free, total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + max(cached, 0)), int(total)


def weight_bytes(models: Sequence[nn.Module], device: torch.device) -> int:
    """Bytes of parameters and buffers that the whole-model path would have to move to ``device``."""
    seen: set[int] = set()
    need = 0
    for m in models:
        for t in itertools.chain(m.parameters(), m.buffers()):
            if id(t) in seen or _on(t, device):
                continue
            seen.add(id(t))
            need += t.numel() * t.element_size()
    return need


def choose_walk(mode: str, models: Sequence[nn.Module], device: torch.device | str) -> str:
    """``whole`` or ``blocks`` for evaluating ``models`` (all of them on the device at once) on ``device``.

    ``auto`` walks block by block when the weights not yet on a CUDA device would not fit in its
    free memory with a margin; on the CPU the model is already in RAM, so the whole model runs.
    Models whose weights are not loaded (meta device, a streamed skeleton) always walk.
    """
    if mode not in WALKS:
        raise PrunekitError(f"unknown eval-walk {mode!r}; choose auto, whole or blocks")
    device = torch.device(device)
    if any(p.is_meta for m in models for p in m.parameters()):
        if mode == "whole":
            raise PrunekitError("the model's weights are not loaded (meta device), so it cannot run whole; use --eval-walk auto or blocks")
        if mode == "auto":
            log.info("evaluating block by block: the model's weights are loaded block by block")
        return "blocks"
    if mode != "auto":
        return mode
    if device.type != "cuda":
        return "whole"
    need = weight_bytes(models, device)
    if need == 0:
        return "whole"
    free, total = device_free_bytes(device)
    margin = max(_MARGIN_MIN, int(_MARGIN_FRACTION * total))
    if need + margin <= free:
        return "whole"
    log.info(
        "evaluating block by block: %.1f GiB of weights do not fit in the %.1f GiB free on %s (keeping %.1f GiB spare)",
        need / _GIB, free / _GIB, device, margin / _GIB,
    )
    return "blocks"


# ----------------------------------------------------------------------------- where weights come from


class WeightSource(Protocol):
    """Puts the parts of a model on the device for the step that needs them, and takes them off after.

    A walk calls ``load_stem``/``release_stem`` around the embedding of its inputs (everything the
    base model runs before block 0: token and position embeddings, rotary tables), ``load(j)`` and
    ``release(j)`` around block ``j``, and ``load_head``/``release_head`` around the readout. The
    modules must be the ones inside the model the walk was given (capture runs the model's forward
    with its blocks swapped out, so the stems must be in place there).
    """

    def load_stem(self) -> None: ...

    def release_stem(self) -> None: ...

    def load(self, index: int) -> nn.Module: ...

    def release(self, index: int) -> None: ...

    def load_head(self) -> Readout: ...

    def release_head(self) -> None: ...


class ModelWeights:
    """The default source: the model's own modules, moved to the device and back to where they were."""

    def __init__(self, model: nn.Module, device: torch.device | str) -> None:
        self.model = model
        self.device = torch.device(device)
        self.blocks = discover(model).blocks
        self._homes: dict[Any, list[tuple[nn.Module, torch.device]]] = {}

    def _move(self, key: Any, modules: list[nn.Module]) -> None:
        homes = []
        for m in modules:
            first = next(itertools.chain(m.parameters(), m.buffers()), None)
            homes.append((m, first.device if first is not None else torch.device("cpu")))
            m.to(self.device)
        self._homes[key] = homes

    def _back(self, key: Any) -> None:
        for m, home in self._homes.pop(key, []):
            if home.type == "cpu":
                park(m)  # pinned: the next visit's copy to the GPU is one DMA
            else:
                m.to(home)

    def load_stem(self) -> None:
        self._move("stem", _children_deep(self.model.base_model, self.blocks))

    def release_stem(self) -> None:
        self._back("stem")

    def load(self, index: int) -> nn.Module:
        self._move(index, [self.blocks[index]])
        return self.blocks[index]

    def release(self, index: int) -> None:
        self._back(index)

    def load_head(self) -> Readout:
        readout = Readout(self.model)
        self._move("head", [m for m in (readout.norm, readout.head) if m is not None])
        return readout

    def release_head(self) -> None:
        self._back("head")


# ----------------------------------------------------------------------------- the walk


@dataclass
class Batch:
    """One batch of inputs, as the model's forward takes them (right-padded rows need the mask)."""

    input_ids: torch.Tensor  # [rows, width]
    attention_mask: torch.Tensor | None = None


@dataclass
class _State:
    hidden: torch.Tensor  # [rows, width, hidden] on the CPU: block j's input, then its output
    kwargs: list[dict[str, Any]]  # every block's keyword arguments for this batch (on the CPU)


def hidden_bytes(model: nn.Module, batch: Batch) -> int:
    """Host memory that one batch's hidden states take between blocks."""
    emb = model.get_input_embeddings()
    width = getattr(model.config, "hidden_size", None) or emb.weight.shape[1]
    return int(batch.input_ids.numel()) * int(width) * emb.weight.element_size()


def chunks(model: nn.Module, batches: Sequence[Batch], max_bytes: int | None, copies: int = 1) -> list[range]:
    """Consecutive batches whose hidden states (``copies`` streams) fit in ``max_bytes`` (default: a
    quarter of the available memory); each range is one pass over the blocks, at least one batch."""
    budget = int(_RAM_SHARE * available_ram()) if max_bytes is None else max_bytes
    out: list[range] = []
    start, used = 0, 0
    for i, b in enumerate(batches):
        size = copies * hidden_bytes(model, b)
        if i > start and used + size > budget:
            out.append(range(start, i))
            start, used = i, 0
        used += size
    if start < len(batches):
        out.append(range(start, len(batches)))
    return out


@torch.no_grad()
def embed(model: nn.Module, source: WeightSource, batches: Sequence[Batch], device: torch.device) -> list[_State]:
    """Block 0's inputs and every block's keyword arguments for each batch, with the stems loaded once."""
    blocks = discover(model).blocks
    states: list[_State] = []
    source.load_stem()
    try:
        for b in batches:
            cap = capture(
                model, blocks, b.input_ids, b.input_ids.shape[0], device, progress=False,
                attention_mask=b.attention_mask, place_stems=False,
            )
            states.append(_State(cap.hidden, cap.kwargs[0]))
    finally:
        source.release_stem()
    return states


@torch.no_grad()
def advance(
    source: WeightSource,
    index: int,
    states: Sequence[_State],
    device: torch.device,
    on_output: Callable[[int, torch.Tensor], None] | None = None,
) -> None:
    """Run block ``index`` over every batch; each batch's hidden states become the block's output.

    ``on_output(batch, output)`` sees each output on the device before it goes back to host memory.
    """
    block = source.load(index)
    try:
        for bi, st in enumerate(states):
            y = run_block(block, st.hidden.to(device), to_device(st.kwargs[index], device))
            if on_output is not None:
                on_output(bi, y)
            st.hidden.copy_(y)
    finally:
        source.release(index)


@torch.no_grad()
def read_out(
    source: WeightSource,
    states: Sequence[_State],
    device: torch.device,
    finish: Callable[[int, torch.Tensor, Readout], None],
    first: int = 0,
) -> None:
    """``finish(first + i, last_hidden, readout)`` for every batch: final-normed states and the readout on the device."""
    readout = source.load_head()
    try:
        for i, st in enumerate(states):
            h = st.hidden.to(device)
            finish(first + i, readout.norm(h) if readout.norm is not None else h, readout)
    finally:
        source.release_head()


def walk(
    model: nn.Module,
    batches: Sequence[Batch],
    device: torch.device | str,
    finish: Callable[[int, torch.Tensor, Readout], None],
    source: WeightSource | None = None,
    max_bytes: int | None = None,
    desc: str = "evaluation",
) -> None:
    """Run ``batches`` through ``model`` block by block; ``finish(i, last_hidden, readout)`` gets batch ``i``.

    ``last_hidden`` is what ``model.base_model(...).last_hidden_state`` would be (after the final
    norm), on ``device``, and ``readout.logits`` turns it into logits. Batches are finished in order.
    When their hidden states would take more than ``max_bytes`` of host memory they are walked in
    several passes over the blocks.
    """
    device = torch.device(device)
    source = source or ModelWeights(model, device)
    n_blocks = len(discover(model).blocks)
    for part in chunks(model, batches, max_bytes):
        states = embed(model, source, [batches[i] for i in part], device)
        for j in tqdm(range(n_blocks), desc=f"{desc} (block by block)", unit="block", leave=False):
            advance(source, j, states, device)
        read_out(source, states, device, finish, first=part.start)
        del states


def walk_pair(
    reference: nn.Module,
    other: nn.Module,
    batches: Sequence[Batch],
    device: torch.device | str,
    compare: Callable[[int, int, torch.Tensor, torch.Tensor], None],
    sources: tuple[WeightSource | None, WeightSource | None] = (None, None),
    max_bytes: int | None = None,
    desc: str = "block errors",
) -> None:
    """Walk two models with the same blocks side by side; ``compare(block, batch, y_other, y_reference)``
    sees both outputs of every block for every batch (on the device; ``y_reference`` in float32).

    Each model runs on its own hidden states (global propagation), one block on the device at a
    time: the reference's block ``j`` over every batch, then the other's.
    """
    device = torch.device(device)
    ref_source = sources[0] or ModelWeights(reference, device)
    other_source = sources[1] or ModelWeights(other, device)
    n_blocks = len(discover(reference).blocks)
    for part in chunks(reference, batches, max_bytes, copies=2):
        part_batches = [batches[i] for i in part]
        ref_states = embed(reference, ref_source, part_batches, device)
        other_states = embed(other, other_source, part_batches, device)
        for j in tqdm(range(n_blocks), desc=f"{desc} (block by block)", unit="block", leave=False):
            advance(ref_source, j, ref_states, device)
            advance(
                other_source, j, other_states, device,
                lambda bi, y: compare(j, part.start + bi, y, ref_states[bi].hidden.to(device).float()),
            )
        del ref_states, other_states
