"""Checkpoints of a pruning run, so that an interrupted run continues where it stopped.

After every finished window the run writes what it cannot cheaply recompute: the weights of every
block it changed (one file per block and window, ``blocks/J.wK.safetensors``), the activation
streams at the next block and the masks of blocks that later windows still touch
(``tensors.wK.safetensors``), and the report so far. ``state.json`` names the files that belong to
it and is replaced atomically last, so a crash at any moment leaves the previous consistent
checkpoint. The calibration windows are saved once (``calibration.safetensors``). Everything else
(block inputs' keyword arguments, dense copies of blocks) is rebuilt from the model on resume. Unit
seeds are derived from the settings and the window, never from global random state, so a resumed
run ends with the same model as an uninterrupted one.

Nothing here is ever unpickled: tensors are safetensors files and everything else is JSON, so a
checkpoint replaced by a hostile file can at worst be refused as damaged, never run code. A file
that cannot be read (truncated, overwritten, missing) raises :class:`CheckpointDamaged`, whose
message says how to start over, because ``--resume`` would fail the same way every time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import PrunekitError

STATE = "state.json"
CALIBRATION = "calibration.safetensors"
FORMAT = 2  # 1 was pickled state.pt (never read: unpickling can run code)


class CheckpointDamaged(PrunekitError):
    """A checkpoint file cannot be read; resuming cannot work, only starting over can."""


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` as safetensors into ``path`` atomically (a temporary file renamed at the end).

    safetensors reports a full disk as its own error type; it is turned into the ``OSError`` it is,
    so that the run reports it like any other failed write.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    flat: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in tensors.items():
        v = v.detach().to("cpu").contiguous()
        ptr = v.untyped_storage().data_ptr()
        if _shares(v) or (ptr and ptr in seen):  # safetensors refuses views and tensors sharing memory
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        flat[k] = v
    try:
        save_file(flat, str(tmp), metadata=metadata)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    except Exception as e:  # SafetensorError wraps the OS error in its text
        tmp.unlink(missing_ok=True)
        text = str(e)
        if "No space left" in text or "os error 28" in text:
            raise OSError(28, "No space left on device", str(path)) from None
        if "os error" in text:
            raise OSError(f"cannot write {path}: {text}") from None
        raise
    os.replace(tmp, path)


def _shares(t: torch.Tensor) -> bool:
    """Views (a slice of a bigger storage) are copied so that safetensors saves only what they show."""
    return t.untyped_storage().nbytes() != t.numel() * t.element_size()


def _load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except FileNotFoundError:
        raise
    except Exception as e:  # SafetensorError, OSError: truncated, overwritten or unreadable
        raise CheckpointDamaged(_damaged(path, e)) from None


def _damaged(path: Path, e: BaseException) -> str:
    run = path.parent.parent if path.parent.name == "checkpoint" else path.parent.parent.parent
    out = run.parent / run.name.removeprefix(".").removesuffix(".partial")
    detail = str(e).splitlines()[0] if str(e) else type(e).__name__
    return (
        f"the checkpoint of {out} is damaged ({path.name}: {detail[:120]}); it cannot be resumed: "
        f"start the run over with --overwrite (or delete {run})"
    )


class Checkpointer:
    def __init__(self, directory: str | Path, fingerprint: str) -> None:
        self.dir = Path(directory)
        self.fingerprint = fingerprint  # the settings that must match on resume
        (self.dir / "blocks").mkdir(parents=True, exist_ok=True)
        self._block_files: dict[int, str] = {}
        self._lr_files: dict[int, str] = {}  # masks-only weights of blocks, for the reconstruction guard
        self._tensor_file: str | None = None

    # ------------------------------------------------------------------ writing

    def save_calibration(self, ids: torch.Tensor) -> None:
        _save_tensors({"input_ids": ids}, self.dir / CALIBRATION, {"fingerprint": self.fingerprint})

    def save(
        self,
        window: int,
        pos: int,
        blocks: dict[int, nn.Module],
        streams: dict[str, torch.Tensor | None],
        masks: dict[int, dict[str, torch.Tensor]],
        report: dict[str, Any],
        lr_states: dict[int, dict[str, torch.Tensor]] | None = None,
    ) -> None:
        """Record that windows up to ``window`` are done; ``blocks`` are the ones this window changed.

        ``lr_states`` are the masks-only weights of this window's blocks (the guard compares the
        reconstructed model with them at the end, so a resumed run must have them too).
        """
        for j, block in blocks.items():
            name = f"blocks/{j}.w{window}.safetensors"
            _save_tensors({k: v for k, v in block.state_dict().items()}, self.dir / name)
            self._block_files[j] = name
        for j, lr_state in (lr_states or {}).items():
            name = f"blocks/{j}.lr.w{window}.safetensors"
            _save_tensors(lr_state, self.dir / name)
            self._lr_files[j] = name
        tensors: dict[str, torch.Tensor] = {f"stream/{k}": v for k, v in streams.items() if v is not None}
        mask_names: dict[str, list[str]] = {}
        for j, ms in masks.items():
            mask_names[str(j)] = list(ms)
            for i, m in enumerate(ms.values()):
                tensors[f"mask/{j}/{i}"] = m
        tensor_file = f"tensors.w{window}.safetensors"
        _save_tensors(tensors, self.dir / tensor_file)
        state = {
            "format": FORMAT,
            "fingerprint": self.fingerprint,
            "window": window,
            "pos": pos,
            "block_files": {str(j): f for j, f in self._block_files.items()},
            "lr_files": {str(j): f for j, f in self._lr_files.items()},
            "tensor_file": tensor_file,
            "streams": [k for k, v in streams.items() if v is not None],
            "masks": mask_names,
            "report": report,
        }
        self._write_json(state, self.dir / STATE)
        self._tensor_file = tensor_file
        keep = set(self._block_files.values()) | set(self._lr_files.values())
        for f in (self.dir / "blocks").glob("*.safetensors"):
            if f"blocks/{f.name}" not in keep:
                f.unlink(missing_ok=True)
        for f in self.dir.glob("tensors.w*.safetensors"):
            if f.name != tensor_file:
                f.unlink(missing_ok=True)

    @staticmethod
    def _write_json(obj: Any, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with tmp.open("w", encoding="utf-8") as fh:
                json.dump(obj, fh)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, path)

    # ------------------------------------------------------------------ reading

    def has_state(self) -> bool:
        return (self.dir / STATE).is_file()

    def size_on_disk(self) -> int:
        """Bytes the checkpoint takes (what deleting it would free)."""
        return sum(f.stat().st_size for f in self.dir.rglob("*") if f.is_file())

    def calibration(self) -> torch.Tensor | None:
        path = self.dir / CALIBRATION
        if not path.is_file():
            return None
        tensors, meta = _load_tensors(path)
        if meta.get("fingerprint") != self.fingerprint or "input_ids" not in tensors:
            return None
        return tensors["input_ids"]

    def load(self) -> dict[str, Any] | None:
        """The last consistent state, or None when there is none for these settings."""
        path = self.dir / STATE
        if not path.is_file():
            if (self.dir / "state.pt").is_file():
                raise CheckpointDamaged(
                    f"the checkpoint in {self.dir} is in the old pickle format, which prunekit no longer reads "
                    "(unpickling can run code); start the run over with --overwrite"
                )
            return None
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(state, dict) or state.get("format") != FORMAT:
                raise ValueError("not a prunekit checkpoint")
            fingerprint = state["fingerprint"]
        except (OSError, ValueError, KeyError, UnicodeDecodeError) as e:
            raise CheckpointDamaged(_damaged(path, e)) from None
        if fingerprint != self.fingerprint:
            raise PrunekitError(
                f"the checkpoint in {self.dir} was made with other settings; resume with the run's own config.yaml"
            )
        try:
            block_files = {int(j): str(f) for j, f in state["block_files"].items()}
            lr_files = {int(j): str(f) for j, f in state.get("lr_files", {}).items()}
            tensor_path = self.dir / state["tensor_file"]
            if not tensor_path.is_file():
                raise FileNotFoundError(f"{state['tensor_file']} is missing")
            for f in [*block_files.values(), *lr_files.values()]:
                if not (self.dir / f).is_file():
                    raise FileNotFoundError(f"{f} is missing")
            tensors, _ = _load_tensors(tensor_path)
            streams = {k: tensors[f"stream/{k}"] for k in state["streams"]}
            masks = {
                int(j): {name: tensors[f"mask/{j}/{i}"] for i, name in enumerate(names)}
                for j, names in state["masks"].items()
            }
            window, pos, report = int(state["window"]), int(state["pos"]), state["report"]
        except CheckpointDamaged:
            raise
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointDamaged(_damaged(path, e)) from None
        self._block_files = block_files
        self._lr_files = lr_files
        self._tensor_file = state["tensor_file"]
        return {
            "fingerprint": fingerprint, "window": window, "pos": pos, "block_files": dict(block_files),
            "lr_files": dict(lr_files),
            "streams": {"sparse": streams.get("sparse"), "dense": streams.get("dense")},
            "masks": masks, "report": report,
        }

    def verify(self) -> None:
        """Open every file of the last state (headers only): a damaged checkpoint is reported at once."""
        state = self.load()
        if state is None:
            return
        for name in set(self._block_files.values()) | set(self._lr_files.values()):
            path = self.dir / name
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    list(f.keys())
            except Exception as e:
                raise CheckpointDamaged(_damaged(path, e)) from None

    def block_state(self, j: int, lr: bool = False) -> dict[str, torch.Tensor]:
        """Block ``j``'s saved weights (``lr``: its masks-only weights, when the guard saved them)."""
        path = self.dir / (self._lr_files if lr else self._block_files)[j]
        try:
            tensors, _ = _load_tensors(path)
        except FileNotFoundError as e:
            raise CheckpointDamaged(_damaged(path, e)) from None
        return tensors
