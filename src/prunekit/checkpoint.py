"""Checkpoints of a pruning run, so that an interrupted run continues where it stopped.

After every finished window the run writes what it cannot cheaply recompute: the weights of every
block it changed (one file per block and window, ``blocks/J.wK.pt``), the activation streams at the
next block, the masks of blocks that later windows still touch, and the report so far. ``state.pt``
names the block files that belong to it and is replaced atomically last, so a crash at any moment
leaves the previous consistent checkpoint. The calibration windows are saved once. Everything
else (block inputs' keyword arguments, dense copies of blocks) is rebuilt from the model on resume.
Unit seeds are derived from the settings and the window, never from global random state, so a
resumed run ends with the same model as an uninterrupted one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

STATE = "state.pt"


class Checkpointer:
    def __init__(self, directory: str | Path, fingerprint: str) -> None:
        self.dir = Path(directory)
        self.fingerprint = fingerprint  # the settings that must match on resume
        (self.dir / "blocks").mkdir(parents=True, exist_ok=True)
        self._block_files: dict[int, str] = {}

    # ------------------------------------------------------------------ writing

    def save_calibration(self, ids: torch.Tensor) -> None:
        self._atomic_save({"input_ids": ids, "fingerprint": self.fingerprint}, self.dir / "calibration.pt")

    def save(
        self,
        window: int,
        pos: int,
        blocks: dict[int, nn.Module],
        streams: dict[str, torch.Tensor | None],
        masks: dict[int, dict[str, torch.Tensor]],
        report: dict[str, Any],
    ) -> None:
        """Record that windows up to ``window`` are done; ``blocks`` are the ones this window changed."""
        for j, block in blocks.items():
            name = f"blocks/{j}.w{window}.pt"
            self._atomic_save({k: v.detach().to("cpu") for k, v in block.state_dict().items()}, self.dir / name)
            self._block_files[j] = name
        state = {
            "fingerprint": self.fingerprint,
            "window": window,
            "pos": pos,
            "block_files": dict(self._block_files),
            "streams": streams,
            "masks": {j: {k: m.cpu() for k, m in ms.items()} for j, ms in masks.items()},
            "report": report,
        }
        self._atomic_save(state, self.dir / STATE)
        keep = set(self._block_files.values())
        for f in (self.dir / "blocks").glob("*.pt"):
            if f"blocks/{f.name}" not in keep:
                f.unlink(missing_ok=True)

    @staticmethod
    def _atomic_save(obj: Any, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(obj, tmp)
        os.replace(tmp, path)

    # ------------------------------------------------------------------ reading

    def has_state(self) -> bool:
        return (self.dir / STATE).is_file()

    def calibration(self) -> torch.Tensor | None:
        path = self.dir / "calibration.pt"
        if not path.is_file():
            return None
        data = torch.load(path, weights_only=False)
        return data["input_ids"] if data.get("fingerprint") == self.fingerprint else None

    def load(self) -> dict[str, Any] | None:
        """The last consistent state, or None when there is none for these settings."""
        path = self.dir / STATE
        if not path.is_file():
            return None
        state = torch.load(path, weights_only=False)
        if state.get("fingerprint") != self.fingerprint:
            from .errors import PrunekitError

            raise PrunekitError(
                f"the checkpoint in {self.dir} was made with other settings; resume with the run's own config.yaml"
            )
        self._block_files = dict(state["block_files"])
        return state

    def block_state(self, j: int) -> dict[str, torch.Tensor]:
        return torch.load(self.dir / self._block_files[j], weights_only=True)
