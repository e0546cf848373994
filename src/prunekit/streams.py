"""Activation streams: ``[windows, seq, hidden]`` tensors on CPU, in RAM or memory-mapped from disk.

A 70B model calibrated on 256 windows of 1024 tokens has 8 GiB per float32 stream, and
reconstruction with global propagation keeps two streams plus a unit's inputs and targets. When
they would not fit comfortably in RAM, streams are backed by a file (``torch.from_file``) in a
temporary directory and paged in batch by batch; the rest of prunekit sees ordinary tensors.

Streams may be stored narrower than they are computed (``--stream-dtype bfloat16``): half the
memory, disk and checkpoint bytes. Writes round to the storage dtype (slice assignment casts); every
block and unit reads its input back in its weights' dtype (:func:`prunekit.precision.as_input`), so
computation stays in float32 (or under autocast).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_RAM_FRACTION = 0.5  # streams may use at most this share of the available memory before going to disk


def available_ram() -> int:
    """MemAvailable from /proc/meminfo (bytes); a large number where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 50


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (``ru_maxrss``)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StreamAllocator:
    """Allocates streams in RAM or on disk, following ``mode``: ``auto`` | ``ram`` | ``disk``.

    ``auto`` goes to disk once ``copies`` streams of the requested size would take more than half
    of the available memory (``copies`` counts the streams a run keeps at once). A floating-point
    stream wider than ``dtype`` is stored as ``dtype`` (float32 -> bfloat16); a narrower one (a
    bfloat16 model's) keeps its own, so the default ``float32`` changes nothing.
    """

    def __init__(
        self, mode: str = "auto", directory: str | None = None, copies: int = 4, dtype: torch.dtype = torch.float32,
    ) -> None:
        if mode not in ("auto", "ram", "disk"):
            raise ValueError(f"unknown offload mode {mode!r}")
        self.mode = mode
        self.copies = copies
        self.dtype = dtype
        self._dir: tempfile.TemporaryDirectory | None = None
        self._root = directory
        self._count = 0

    def on_disk(self, nbytes: int) -> bool:
        if self.mode != "auto":
            return self.mode == "disk"
        return nbytes * self.copies > _RAM_FRACTION * available_ram()

    def storage(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype a stream of ``dtype`` is stored in."""
        if dtype.is_floating_point and dtype.itemsize > self.dtype.itemsize:
            return self.dtype
        return dtype

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        dtype = self.storage(dtype)
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * torch.empty(0, dtype=dtype).element_size()
        if not self.on_disk(nbytes):
            return torch.empty(shape, dtype=dtype)
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="prunekit-streams-", dir=self._root)
            log.info("activation streams are memory-mapped under %s", self._dir.name)
        path = os.path.join(self._dir.name, f"stream{self._count}.bin")
        self._count += 1
        return torch.from_file(path, shared=True, size=numel, dtype=dtype).view(shape)

    def like(self, t: torch.Tensor) -> torch.Tensor:
        out = self.empty(tuple(t.shape), t.dtype)
        out.copy_(t)
        return out

    def close(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
