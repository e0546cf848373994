"""Atomic run directories.

A run writes into a hidden sibling ``.NAME.partial`` created before any work starts (so an
unwritable location or a full disk is reported at once, not after the pruning), and renames it to
``NAME`` only when everything is written. An interrupted run leaves no half-written ``NAME``; its
partial directory holds the checkpoint that ``prunekit prune --resume NAME`` continues from.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from .errors import PrunekitError


class RunDir:
    def __init__(self, out: str | Path, overwrite: bool = False, resume: bool = False, resumable: bool = False) -> None:
        self.final = Path(out).expanduser()
        self.tmp = self.final.parent / f".{self.final.name}.partial"
        if resume:
            if not (self.tmp / "config.yaml").is_file():
                raise PrunekitError(f"no interrupted run to resume at {self.final} (no {self.tmp.name}); start it without --resume")
        elif resumable and self.tmp.exists() and not overwrite:
            raise PrunekitError(
                f"an interrupted run is at {self.tmp}; continue it with --resume {self.final}, "
                "pass --overwrite to start afresh, or delete that directory"
            )
        if not resume and self.final.exists() and (not self.final.is_dir() or any(self.final.iterdir())) and not overwrite:
            raise PrunekitError(f"output {self.final} already exists; choose another --out or pass --overwrite")
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            if self.tmp.exists() and not resume:
                shutil.rmtree(self.tmp)
            self.tmp.mkdir(exist_ok=True)
            probe = self.tmp / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise PrunekitError(f"cannot write to {self.final.parent} ({e.strerror}); choose a writable --out") from None

    def check_space(self, need_bytes: int) -> None:
        """Fail now, not after the work, when the output's disk cannot hold ``need_bytes``."""
        free = shutil.disk_usage(self.tmp).free
        if free < need_bytes:
            self.discard()
            raise PrunekitError(
                f"{self.final.parent} has {free / 2**20:.0f} MiB free but the run needs about "
                f"{need_bytes / 2**20:.0f} MiB; free some space or choose another --out"
            )

    def path(self, name: str) -> Path:
        return self.tmp / name

    def write_text(self, name: str, text: str) -> None:
        self.path(name).write_text(text, encoding="utf-8")

    def write_json(self, name: str, data: Any) -> None:
        self.write_text(name, json.dumps(data, indent=2, sort_keys=False) + "\n")

    def commit(self) -> Path:
        """Move the finished run into place (replacing an old one only now, when asked to overwrite)."""
        old = None
        shutil.rmtree(self.tmp / "checkpoint", ignore_errors=True)
        if self.final.exists():
            old = self.final.parent / f".{self.final.name}.old-{os.getpid()}"
            os.replace(self.final, old)
        os.replace(self.tmp, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        return self.final

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
