"""Host <-> device transfers (prunekit.hostmem) and where activation streams are placed (streams.py).

Pinned memory and GPU streams need CUDA; here the CPU semantics are checked (each helper is the
plain operation it replaces, bit for bit, without aliasing where a copy is promised) and the
placement rule is checked on its inputs (free GPU memory is monkeypatched). The GPU path is
measured by bench/gpu.py on a lent GPU (bench/results/gpu/).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit import hostmem, streams
from prunekit.config import PruneConfig
from prunekit.errors import PrunekitError
from prunekit.streams import StreamAllocator


def test_to_host_on_cpu_is_the_plain_conversion():
    t = torch.randn(3, 4)
    assert hostmem.to_host(t) is t  # no copy where none is needed (as t.to("cpu"))
    b = hostmem.to_host(t, torch.bfloat16)
    assert b.dtype == torch.bfloat16 and torch.equal(b, t.to(torch.bfloat16))


def test_host_copy_never_aliases():
    t = torch.randn(5)
    c = hostmem.host_copy(t)
    t.add_(1.0)
    assert not torch.equal(c, t) and torch.equal(c + 1.0, t)


def test_park_keeps_parameter_identity_on_cpu():
    m = nn.Linear(4, 3)
    w = m.weight
    before = w.detach().clone()
    assert hostmem.park(m) is m and m.weight is w and torch.equal(m.weight, before)


def test_rows_equals_indexing():
    t = torch.randn(6, 2, 3)
    idx = torch.tensor([4, 0, 2])
    assert torch.equal(hostmem.rows(t, idx, "cpu"), t[idx])


def test_stream_placement_rule(monkeypatch):
    """auto: on the GPU while `copies` streams take <= 40% of its free memory; device: always; ram/disk: never."""
    monkeypatch.setattr(streams, "device_free", lambda device: 1000)
    auto = StreamAllocator("auto", copies=4, device="cuda")
    assert auto.on_device(100)  # 4 x 100 <= 0.4 x 1000
    assert not auto.on_device(101)
    assert StreamAllocator("device", copies=4, device="cuda").on_device(10**9)
    assert not StreamAllocator("ram", copies=4, device="cuda").on_device(1)
    assert not StreamAllocator("disk", copies=4, device="cuda").on_device(1)
    # a CPU run never places streams "on the device", whatever the mode
    assert not StreamAllocator("device", device="cpu").on_device(1)


def test_device_offload_on_a_cpu_run_is_ram():
    alloc = StreamAllocator("device", device="cpu")
    t = alloc.empty((2, 3), torch.float32)
    assert t.device.type == "cpu" and not alloc.on_disk(t.numel() * 4)


def test_offload_setting_is_checked():
    PruneConfig(offload="device").validate()
    with pytest.raises(PrunekitError, match="choose auto, device, ram or disk"):
        PruneConfig(offload="gpu").validate()
