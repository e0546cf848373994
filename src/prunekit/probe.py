"""End a forward pass early at a module, keeping the value seen there.

prunekit reads values off the model's own forward pass instead of re-implementing modeling code:
a block's inputs during capture, a linear's inputs for the pruning statistics, a unit's input or
output inside a window. Each of those passes is useless beyond the point of interest, and the work
after it is often the largest part (an MLP's down projection, the blocks after block 0), so the
pass is ended there by an exception raised from a hook. :class:`StopAt` is the one place that does
it: it registers the hook, raises its own exception (so a stop meant for another point is never
swallowed) and catches it around the call it runs.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn


class _Stopped(Exception):
    def __init__(self, owner: "StopAt", value: Any) -> None:
        self.owner = owner
        self.value = value


def _first(value: Any) -> Any:
    """A module's input arrives as a tuple and some outputs are tuples: the hidden states come first."""
    return value[0] if isinstance(value, (tuple, list)) else value


class StopAt:
    """A hook on ``module`` that ends the forward pass at its input (``post=False``) or its output.

    ``observe(value)`` is called with the value there before the pass ends (e.g. to accumulate
    statistics). Use as a context manager, which owns the hook, and call :meth:`run`::

        with StopAt(linear, observe=stats.add_batch) as stop:
            for x in batches:
                stop.run(block, x)
    """

    def __init__(self, module: nn.Module, post: bool = False, observe: Callable[[Any], None] | None = None) -> None:
        self.module = module
        self.post = post
        self.observe = observe
        self.value: Any = None
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def _stop(self, value: Any) -> None:
        value = _first(value)
        if self.observe is not None:
            self.observe(value)
        raise _Stopped(self, value)

    def __enter__(self) -> "StopAt":
        if self.post:
            self._handle = self.module.register_forward_hook(lambda _m, _i, out: self._stop(out))
        else:
            self._handle = self.module.register_forward_pre_hook(lambda _m, inp: self._stop(inp))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
        """Call ``fn``; True when the pass reached the point (the value is then in ``self.value``)."""
        self.value = None
        try:
            fn(*args, **kwargs)
        except _Stopped as s:
            if s.owner is not self:
                raise
            self.value = s.value
            return True
        return False


def value_at(module: nn.Module, post: bool, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """The value at ``module``'s input or output during ``fn(*args, **kwargs)``; an error if never reached."""
    with StopAt(module, post) as stop:
        if stop.run(fn, *args, **kwargs):
            return stop.value
    raise RuntimeError(f"the forward pass never reached the {'output' if post else 'input'} of {type(module).__name__}")
