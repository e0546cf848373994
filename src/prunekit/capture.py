"""Capture block inputs and run blocks one at a time, without re-implementing the forward pass.

The model's own forward computes everything a decoder block receives (position embeddings, masks,
cache positions). :func:`capture` swaps every block for a pass-through recorder and runs the base
model once per batch: the recorder of block 0 keeps its hidden states, every recorder keeps its
block's keyword arguments (they differ per block in Gemma 2/3, whose sliding-window and global
layers get different masks and rotary tables), and the last one stops the pass so that neither the
blocks nor the LM head are computed. Later, :func:`run_block` calls a block with those arguments;
decoder layers return a tensor in transformers 5 and a tuple before, normalised here in one place.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from . import precision
from .hostmem import park
from .probe import StopAt


class _Recorder(nn.Module):
    """Stands in for a block during capture: records its call and passes hidden states through."""

    def __init__(self, block: nn.Module, index: int, sink: "_Sink") -> None:
        super().__init__()
        self.block = block
        self.index = index
        self.sink = sink

    def __getattr__(self, name: str) -> Any:  # model code may read e.g. block.attention_type
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.block, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) > 1:  # e.g. GPT-2 passes (hidden, cache, mask, encoder states) positionally: name them
            bound = inspect.signature(self.block.forward).bind_partial(*args, **kwargs)
            kwargs = dict(bound.arguments)
            extra = kwargs.pop("kwargs", None)  # a **kwargs parameter binds as one dict
            if isinstance(extra, dict):
                kwargs.update(extra)
            args = ()
        if args:
            hidden = args[0]
        else:
            name = next(iter(inspect.signature(self.block.forward).parameters))
            hidden = kwargs.pop(name)
        self.sink.record(self.index, hidden, kwargs)
        return hidden


class _Sink:
    def __init__(self) -> None:
        self.hidden: torch.Tensor | None = None
        self.kwargs: list[dict[str, Any]] = []

    def record(self, index: int, hidden: torch.Tensor, kwargs: dict[str, Any]) -> None:
        if index == 0:
            self.hidden = hidden.detach()
        self.kwargs.append({k: map_tensors(v, torch.Tensor.detach) for k, v in kwargs.items() if k not in _DROP})


# keyword arguments that must not be replayed: caches belong to one generation pass
_DROP = {"past_key_values", "past_key_value", "layer_past", "use_cache", "output_attentions"}


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``fn`` applied to every tensor inside nested tuples, lists and dicts (the one walker of such nests)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def to_device(obj: Any, device: torch.device | str) -> Any:
    """Move every tensor inside nested tuples, lists and dicts."""
    return map_tensors(obj, lambda t: t.to(device))


def _cut_batch(obj: Any, size: int, rows: int) -> Any:
    """Cut tensors whose first dimension is the captured batch ``size`` to ``rows``."""
    return map_tensors(obj, lambda t: t[:rows] if t.dim() >= 2 and t.shape[0] == size and size > 1 else t)


def _to_cpu_shared(obj: Any) -> Any:
    """:func:`to_device` to the CPU, copying a tensor that several blocks share (one mask, one rotary
    table for every block) once instead of once per block: on a GPU, per-block copies of a
    ``[batch, 1, seq, seq]`` mask would cost the number of blocks times its size in host memory."""
    memo: dict[tuple, torch.Tensor] = {}

    def move(t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "cpu":
            return t
        key = (t.device, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)
        if key not in memo:
            memo[key] = t.to("cpu")
        return memo[key]

    return map_tensors(obj, move)


@dataclass
class Captured:
    """Inputs of block 0 for every calibration window, and each block's keyword arguments per batch."""

    hidden: torch.Tensor  # [n, seqlen, hidden] on CPU
    kwargs: list[list[dict[str, Any]]]  # kwargs[batch][block]
    batch_size: int

    def batches(self) -> list[slice]:
        n = self.hidden.shape[0]
        return [slice(b, min(b + self.batch_size, n)) for b in range(0, n, self.batch_size)]

    def kwargs_for(self, index: int, rows: int) -> dict[str, Any]:
        """Block ``index``'s keyword arguments for a batch of ``rows`` arbitrary windows.

        Calibration windows all have the same length and no padding, so the arguments do not depend
        on which windows form a batch, only on how many: tensors whose first dimension is the
        captured batch size (attention masks) are cut to ``rows``.
        """
        full = self.kwargs[0][index]
        size = min(self.batch_size, self.hidden.shape[0])
        if rows > size:
            raise ValueError(f"a batch of {rows} windows exceeds the captured batch size {size}")
        return _cut_batch(full, size, rows) if rows != size else full


def _children_deep(module: nn.Module, blocks: nn.ModuleList) -> list[nn.Module]:
    """Submodules of ``module`` outside the block list (embeddings, rotary tables, final norm)."""
    out = []
    for child in module.children():
        if child is blocks:
            continue
        if any(m is blocks for m in child.modules()):
            out.extend(_children_deep(child, blocks))
        else:
            out.append(child)
    return out


@torch.no_grad()
def capture(
    model: nn.Module,
    blocks: nn.ModuleList,
    input_ids: torch.Tensor,
    batch_size: int,
    device: torch.device | str = "cpu",
    progress: bool = True,
    allocate: Callable[[tuple[int, ...], torch.dtype], torch.Tensor] | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    place_stems: bool = True,
) -> Captured:
    """Run the model's embedding stage on ``input_ids`` and record what each block would receive.

    ``allocate(shape, dtype)`` makes the CPU tensor that holds block 0's inputs (RAM by default;
    :class:`prunekit.streams.StreamAllocator` maps it from disk for big runs). ``attention_mask``
    (rows as ``input_ids``) is passed to the model for padded batches, so that the recorded
    keyword arguments hold the padding masks. With ``place_stems`` false the caller has already put
    the modules outside the blocks on ``device`` and keeps them there (a block-by-block evaluation
    embeds many batches between one load and one release of the embeddings).
    """
    device = torch.device(device)
    stems = _children_deep(model.base_model, blocks) if place_stems else []
    for m in stems:
        m.to(device)
    originals = list(blocks)
    sink = _Sink()
    for i, block in enumerate(originals):
        blocks[i] = _Recorder(block, i, sink)
    hidden: torch.Tensor | None = None
    kwargs: list[list[dict[str, Any]]] = []
    try:
        # the pass ends once the last block has recorded its call: no block is computed, nor the LM head
        with StopAt(blocks[len(blocks) - 1], post=True) as stop:
            for b in tqdm(range(0, input_ids.shape[0], batch_size), desc="capturing block inputs", disable=not progress):
                sink.hidden, sink.kwargs = None, []
                batch = input_ids[b : b + batch_size].to(device)
                extra = {} if attention_mask is None else {"attention_mask": attention_mask[b : b + batch_size].to(device)}
                stop.run(model.base_model, input_ids=batch, use_cache=False, **extra)
                if sink.hidden is None or len(sink.kwargs) != len(blocks):
                    raise RuntimeError("capture did not reach every block; the model calls its blocks in an unexpected way")
                if hidden is None:
                    shape = (input_ids.shape[0], *sink.hidden.shape[1:])
                    hidden = (allocate or (lambda sh, dt: torch.empty(sh, dtype=dt)))(shape, sink.hidden.dtype)
                hidden[b : b + batch.shape[0]] = sink.hidden  # copy_: casts, and crosses devices (pinned or GPU stream)
                kwargs.append(_to_cpu_shared(sink.kwargs))
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
        for m in stems:
            park(m)
    return Captured(hidden=hidden, kwargs=kwargs, batch_size=batch_size)


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """Call a decoder block and return its output hidden states (tensor or first tuple element).

    The block reads ``hidden`` in its weights' dtype (a bfloat16 stream comes back as float32) and
    runs in the run's precision (:mod:`prunekit.precision`: autocast for bf16, TF32 when asked).
    """
    with precision.forward(hidden.device):
        out = block(precision.as_input(hidden, block), **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def propagate(
    block: nn.Module,
    index: int,
    captured: Captured,
    stream: torch.Tensor,
    device: torch.device | str,
) -> torch.Tensor:
    """Run ``block`` (already on ``device``) over the whole activation ``stream`` batch by batch.

    The outputs replace ``stream`` in place (each batch is read before it is written).
    """
    for bi, sl in enumerate(captured.batches()):
        x = stream[sl].to(device)
        y = run_block(block, x, to_device(captured.kwargs[bi][index], device))
        stream[sl] = y.to(stream.device, stream.dtype)
    return stream
