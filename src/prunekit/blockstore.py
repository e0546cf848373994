"""Where the pruning driver's blocks live: in the model in RAM, or streamed from safetensors shards.

The driver (:mod:`prunekit.pipeline`) asks for a block when a window needs it, parks it between
windows, asks for a dense copy of its original weights (global propagation, recomputed masks), and
says when the streams have passed it for good. :class:`InMemoryBlocks` (the default) keeps every
block in the model in RAM, as before; :class:`StreamedBlocks` keeps the model as a meta-device
skeleton (:class:`prunekit.shards.StreamedModel`), reads a block from the input shards when its
first window opens, writes it to the output shards (:class:`prunekit.shards.ShardWriter`) and
drops it as soon as it is final, so peak host memory is the embeddings + a window of blocks + the
activation streams, whatever the number of blocks. :class:`ShardWeights` is the same skeleton as a
source for the block-by-block evaluation (:mod:`prunekit.blockwalk`).
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import weakref
from collections.abc import MutableMapping
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from safetensors.torch import load_file, save_file

import torch
from torch import nn

from .checkpoint import Checkpointer
from .families import Readout, discover
from .hostmem import park, return_freed_memory, trim_heap
from .shards import ShardReader, ShardWriter, StreamedModel


class InMemoryBlocks:
    """Every block stays in the model, in RAM; a block visits the device for the passes that use it."""

    streamed = False

    def __init__(self, model: nn.Module) -> None:
        self.blocks = discover(model).blocks

    def open(self, j: int, device: torch.device) -> nn.Module:
        """Block ``j`` on ``device``, for a window that prunes or reconstructs it."""
        return self.blocks[j].to(device)

    def park(self, j: int) -> None:
        """Between windows: block ``j`` back in host memory."""
        park(self.blocks[j])

    def dense_copy(self, j: int) -> nn.Module:
        """A copy of block ``j`` with its original weights (call before the block is changed)."""
        return copy.deepcopy(self.blocks[j])

    def visit(self, j: int, device: torch.device) -> nn.Module:
        """Block ``j`` on ``device`` for a read-only pass (OWL's dense pre-pass); :meth:`leave` after."""
        return self.blocks[j].to(device)

    def leave(self, j: int) -> None:
        park(self.blocks[j])

    def finish(self, j: int) -> None:
        """Block ``j`` is final and the streams have passed it."""

    def persist(self, j: int) -> bool:
        """Make final block ``j`` durable for a checkpoint; False: the checkpoint must write it itself."""
        return False

    def final_state(self, j: int, checkpoint: Checkpointer) -> dict[str, torch.Tensor]:
        """Block ``j``'s final weights as a resumed run reads them back."""
        return checkpoint.block_state(j)

    def resumed(self, written: list[int]) -> None:
        """On resume: the blocks that :meth:`persist` made durable before the interruption."""

    def keep_lr(self, j: int, state: dict[str, torch.Tensor]) -> bool:
        """Block ``j``'s masks-only weights for the guard's end-to-end check; False: the caller keeps them."""
        return False

    def held(self) -> MutableMapping[int, dict[str, torch.Tensor]]:
        """Where the driver keeps block states it may need again (the guard's masks-only snapshots): here in RAM."""
        return {}

    def evict_dense(self, j: int, dense: nn.Module) -> None:
        """While a unit trains, block ``j``'s dense copy may leave host memory: here it stays."""

    def reload_dense(self, j: int, dense: nn.Module) -> None:
        """Block ``j``'s dense copy back after :meth:`evict_dense` (here it never left)."""

    @contextmanager
    def stems(self) -> Iterator[None]:
        """The modules before the blocks, for capturing block 0's inputs (here they are always loaded)."""
        yield

    def head(self) -> None:
        """Load the final norm and LM head for the run (the kd objective reads through them)."""

    def close(self) -> None:
        """The run is over: nothing to write, the model holds every block."""


class StreamedBlocks:
    """Blocks read from the input shards when first needed and written to the output shards when final."""

    streamed = True

    def __init__(self, model: StreamedModel, writer: ShardWriter | None, lr_dir: str | Path | None = None,
                 resume: bool = False, output: str | Path | None = None) -> None:
        """``lr_dir``: where the masks-only weights of finished blocks go (shards), for the guard's
        end-to-end check; without it the check is not made.

        Without a ``writer`` the store *follows* (a data-parallel rank other than 0, prunekit.dist):
        it reads blocks as rank 0 does, writes nothing, and reads what rank 0 committed to
        ``output`` (and ``lr_dir``) when it needs the written blocks.
        """
        self.sm = model
        self.writer = writer
        self.blocks = model.layout.blocks
        self.keeps_lr = lr_dir is not None  # the guard's end-to-end check can be made
        self.lr_dir = Path(lr_dir) if lr_dir else None
        self.output = Path(output) if output else None
        self.lr_writer = (ShardWriter(lr_dir, writer.max_shard_size, in_place=True, resume=resume)
                          if lr_dir and writer is not None else None)
        self._lr: dict[int, dict[str, torch.Tensor]] = {}  # masks-only weights of live blocks
        self.revert = False  # set by the guard: the output gets the masks-only weights
        self._live: set[int] = set()  # materialised blocks
        self.written: set[int] = set()  # blocks in the output shards
        self._head = False
        return_freed_memory()  # streaming is chosen to bound host memory: freed buffers go back to the OS

    def open(self, j: int, device: torch.device) -> nn.Module:
        if j not in self._live:
            self.sm.materialize(j, "cpu")
            self._live.add(j)
        return self.blocks[j].to(device)

    def park(self, j: int) -> None:
        park(self.blocks[j])

    def dense_copy(self, j: int) -> nn.Module:
        return self.sm.dense_block(j, "cpu")  # re-read from the shards, never kept beside the block

    def visit(self, j: int, device: torch.device) -> nn.Module:
        return self.sm.materialize(j, device)

    def leave(self, j: int) -> None:
        self.sm.release(j)

    def finish(self, j: int) -> None:
        if j in self._live:
            park(self.blocks[j])
            self._write(j)
            self.sm.release(j)
            self._live.discard(j)
            trim_heap()  # host memory must not grow with the number of blocks (hostmem.trim_heap)

    def _write(self, j: int) -> None:
        if j in self.written:
            return
        if self.writer is None:  # following: rank 0 writes it
            self.written.add(j)
            return
        state = self.sm.save_state(j)
        if not set(state) <= self.writer.names:  # else a rerun window made it again, bit for bit: written already
            self.writer.add(state)
        lr = self._lr.pop(j, None)
        if self.lr_writer is not None and lr is not None:
            saved = {name: lr[local] for local, name in self.sm.saved_names_of(j).items()}
            if not set(saved) <= self.lr_writer.names:
                self.lr_writer.add(saved)
        self.written.add(j)

    def keep_lr(self, j: int, state: dict[str, torch.Tensor]) -> bool:
        if self.lr_writer is not None:  # written beside the block when it is final; else not kept (no check)
            self._lr[j] = state
        return True

    def held(self) -> MutableMapping[int, dict[str, torch.Tensor]]:
        """Block states on disk, read back on each access: the guard's snapshot of a window costs no
        RAM while the window trains (one block's worth less at the peak)."""
        # beside the checkpoint; a following rank (data-parallel) leaves rank 0's directory alone: system temp
        return SpilledStates(self.lr_dir.parent if self.lr_dir and self.lr_writer is not None else None)

    def evict_dense(self, j: int, dense: nn.Module) -> None:
        """Block ``j``'s dense copy leaves memory while a unit trains (its outputs were taken); it is
        re-read from the input shards by :meth:`reload_dense`, as issue 12 asks of dense copies."""
        for m in dense.modules():  # parameters only: buffers (rotary tables) are not in the shards
            for name, p in m._parameters.items():
                if p is not None:
                    m._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                       requires_grad=p.requires_grad)

    def reload_dense(self, j: int, dense: nn.Module) -> None:
        if any(p.is_meta for p in dense.parameters()):
            dense.load_state_dict(self.sm.read(j, "cpu"), strict=False, assign=True)

    def persist(self, j: int) -> bool:
        """Final block ``j`` goes to the output shards now (the output is the checkpoint of finished
        blocks), and stays in memory until the streams have passed it."""
        self._write(j)
        self.commit()
        return True

    def commit(self) -> None:
        """Make what was written durable (and readable by the other ranks)."""
        if self.writer is not None:
            self.writer.commit()
        if self.lr_writer is not None:
            self.lr_writer.commit()

    def _written(self, lr: bool = False) -> ShardWriter | ShardReader:
        if self.writer is not None:
            return self.lr_writer if lr else self.writer  # type: ignore[return-value]
        return ShardReader(self.lr_dir if lr else self.output)  # type: ignore[arg-type]

    def final_state(self, j: int, checkpoint: Checkpointer) -> dict[str, torch.Tensor]:
        names = self.sm.saved_names_of(j)
        saved = self._written().read(names.values())
        return {local: saved[name] for local, name in names.items()}

    def resumed(self, written: list[int]) -> None:
        self.written = set(written)

    @contextmanager
    def stems(self) -> Iterator[None]:
        # capture() runs the skeleton's own forward up to block 0 and moves every module outside the
        # blocks, the final norm included, so both must hold real weights meanwhile
        norm = self.sm.layout.family.final_norm
        self.sm.materialize("input")
        self.sm.materialize(norm)
        try:
            yield
        finally:
            self.sm.release(norm)
            self.sm.release("input")

    def head(self) -> None:
        if not self._head:
            self.sm.materialize("head")
            self._head = True

    def written_source(self, device: torch.device, lr: bool = False) -> "ShardWeights":
        """The blocks as written (``lr``: their masks-only weights) as a source for a block-by-block walk."""
        return ShardWeights(self._skeleton(), device, self._written(lr))

    def dense_source(self, device: torch.device) -> "ShardWeights":
        """The original model, read from the input shards, as a source for a block-by-block walk."""
        return ShardWeights(self._skeleton(), device)

    def _skeleton(self) -> StreamedModel:
        """Another skeleton of the same model (its parts are materialised independently of the run's)."""
        return StreamedModel(self.sm.checkpoint, self.sm.dtype, self.sm.model.config._attn_implementation)

    def close(self) -> None:
        """Write the blocks still held, then the parts the run never changes (embeddings, norm, head).

        When the guard reverted the run, the output is written again from the masks-only weights.
        """
        for j in sorted(self._live):
            self.finish(j)
        if self.writer is None:  # following: rank 0 writes the output
            return
        if self.revert and self.lr_writer is not None:  # the same writer, emptied (its owner finishes it)
            self.writer.restart()
            for j in range(self.sm.num_blocks):
                self.writer.add(self.lr_writer.read(self.sm.saved_names_of(j).values()))
        if self.lr_writer is not None:
            self.lr_writer.abort()
        self.sm.materialize("input")
        self.writer.add(self.sm.save_state("input"))
        self.sm.release("input")
        self.head()  # materialised already for the kd objective, or now
        self.writer.add(self.sm.save_state("head"))
        self.sm.release("head")
        self._head = False


class SpilledStates(MutableMapping):
    """Block states (``{index: state_dict}``) written to a safetensors file each when stored and read
    back on each access, so they take no RAM in between. The files live in a temporary directory
    (under ``base``, the run's checkpoint directory) removed by :meth:`clear` or when the object goes."""

    def __init__(self, base: str | Path | None = None) -> None:
        if base is not None:
            Path(base).mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="spill-", dir=base))
        self._keys: set[int] = set()
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.dir, True)

    def _path(self, j: int) -> Path:
        return self.dir / f"{j}.safetensors"

    def __setitem__(self, j: int, state: dict[str, torch.Tensor]) -> None:
        save_file({k: v.contiguous() for k, v in state.items()}, str(self._path(j)))
        self._keys.add(j)

    def __getitem__(self, j: int) -> dict[str, torch.Tensor]:
        if j not in self._keys:
            raise KeyError(j)
        return load_file(str(self._path(j)))

    def __delitem__(self, j: int) -> None:
        self._keys.remove(j)
        self._path(j).unlink()

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self._keys))

    def __len__(self) -> int:
        return len(self._keys)

    def clear(self) -> None:
        self._keys.clear()
        self._cleanup()


class ShardWeights:
    """A :class:`prunekit.blockwalk.WeightSource` over a streamed skeleton: parts read onto the device when used.

    With ``blocks_from`` (a :class:`ShardWriter`), blocks take the weights written there instead of
    the skeleton's own shards (a run's output before it is finished).
    """

    def __init__(self, model: StreamedModel, device: torch.device | str, blocks_from: ShardWriter | ShardReader | None = None) -> None:
        self.sm = model
        self.device = torch.device(device)
        self.blocks_from = blocks_from

    def load_stem(self) -> None:
        self.sm.materialize("input", self.device)

    def release_stem(self) -> None:
        self.sm.release("input")

    def load(self, index: int) -> nn.Module:
        block = self.sm.materialize(index, self.device)
        if self.blocks_from is not None:
            names = self.sm.saved_names_of(index)
            saved = self.blocks_from.read(names.values())
            block.load_state_dict({local: saved[name] for local, name in names.items()}, strict=False)
        return block

    def release(self, index: int) -> None:
        self.sm.release(index)

    def load_head(self) -> Readout:
        self.sm.materialize("head", self.device)
        return Readout(self.sm.model)

    def release_head(self) -> None:
        self.sm.release("head")
