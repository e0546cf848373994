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
import tempfile
from pathlib import Path
from typing import Any

from .errors import PrunekitError


_SUFFIX = 13  # the longest sibling name added to NAME: `.NAME.old-PID` (PID up to 7 digits); `.NAME.partial` is 9
_INSIDE = 64  # room for the longest path a run writes inside its directory (checkpoint/blocks/.J.wK.safetensors.tmp)


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _limit(path: Path, name: str, default: int) -> int:
    try:
        return os.pathconf(_existing_ancestor(path), name)
    except (OSError, ValueError):
        return default


def check_path_length(final: Path, flag: str = "--out") -> None:
    """Refuse an output whose temporary sibling or inner files would exceed the file system's limits.

    A 250-byte name is legal, but ``.NAME.partial`` is 259 bytes: checked here, before any work.
    """
    name_max = _limit(final.parent, "PC_NAME_MAX", 255)
    name_len = len(os.fsencode(final.name))
    if name_len + _SUFFIX > name_max:
        raise PrunekitError(
            f"output name {final.name[:40]}... is {name_len} bytes; its temporary sibling needs {_SUFFIX} more "
            f"and the file system allows {name_max}: choose a shorter {flag}"
        )
    path_max = _limit(final.parent, "PC_PATH_MAX", 4096)
    path_len = len(os.fsencode(str(final.absolute())))
    if path_len + _SUFFIX + _INSIDE > path_max:
        raise PrunekitError(
            f"output path is {path_len} bytes; with the files written inside it it would exceed the system's "
            f"limit of {path_max}: choose a shorter {flag}"
        )
    for part in final.absolute().parts:
        if len(os.fsencode(part)) > name_max:
            raise PrunekitError(f"a folder name in {flag} is longer than {name_max} bytes; choose a shorter path")


def probe_writable(directory: Path, what: str) -> None:
    """Create (and remove) a file in ``directory``: the only test that holds for root and read-only mounts.

    ``os.access`` says yes to root everywhere, so a read-only mount or a full disk would otherwise
    show up only at the first real write, after the work.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".prunekit-probe-", dir=directory)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise PrunekitError(f"cannot write to {what} {directory} ({e.strerror}); choose a writable directory") from None


class RunDir:
    def __init__(self, out: str | Path, overwrite: bool = False, resume: bool = False, resumable: bool = False) -> None:
        self.final = Path(out).expanduser()
        self.tmp = self.partial_of(self.final)
        if not self.final.name or self.final.name in (".", ".."):
            raise PrunekitError(f"output {out!r} names no directory; give --out a new directory name")
        check_path_length(self.final)
        try:
            self._open(overwrite, resume, resumable)
        except OSError as e:
            raise PrunekitError(f"cannot write to {self.final.parent} ({e.strerror}); choose a writable --out") from None

    def _open(self, overwrite: bool, resume: bool, resumable: bool) -> None:
        if resume:
            if not (self.tmp / "config.yaml").is_file():
                raise PrunekitError(f"no interrupted run at {self.final}; start it without --resume")
        elif resumable and self.tmp.exists() and not overwrite:
            raise PrunekitError(
                f"an interrupted run is at {self.tmp}; continue it with --resume {self.final}, "
                "pass --overwrite to start afresh, or delete that directory"
            )
        if not resume and self.final.exists() and (not self.final.is_dir() or any(self.final.iterdir())) and not overwrite:
            raise PrunekitError(f"output {self.final} already exists; choose another --out or pass --overwrite")
        self.final.parent.mkdir(parents=True, exist_ok=True)
        if self.tmp.exists() and not resume:
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(exist_ok=True)
        probe = self.tmp / ".write-test"
        probe.write_text("ok")
        probe.unlink()

    @staticmethod
    def partial_of(out: str | Path) -> Path:
        """Where the run for ``out`` keeps its work until it is committed (read by other ranks on resume)."""
        final = Path(out).expanduser()
        return final.parent / f".{final.name}.partial"

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.tmp).free

    def check_space(self, need_bytes: int, what: str = "the run") -> None:
        """Fail now, not after the work, when the output's disk cannot hold ``need_bytes``."""
        free = self.free_bytes()
        if free < need_bytes:
            raise PrunekitError(
                f"{self.final.parent} has {free / 2**20:.0f} MiB free but {what} needs about "
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
