"""Checkpoints of a pruning run, so that an interrupted run continues where it stopped.

What is written, and how often, is chosen so that a checkpoint costs about the model's own size,
not a multiple of it growing with every block (a 7B model's two activation streams at 256 x 1024
tokens are 8.6 GB, and writing them after each of 32 blocks was most of a run's I/O):

- a block's weights once, when it is *final* (no later window changes it): ``blocks/J.safetensors``,
  and, with the reconstruction guard, its masks-only weights ``blocks/J.lr.safetensors``; with
  end-to-end retraining (which needs every block's masks at the end), its masks ``blocks/J.masks.safetensors``;
- after every window, the blocks that later windows still change (the overlap of cross-block
  windows) and their masks, ``blocks/J.wK.safetensors`` and ``tensors.wK.safetensors`` (small);
- the activation streams at most every ``checkpoint_every`` minutes (``streams.wK.safetensors``).
  On resume the streams are replayed from the last saved ones (or from block 0's inputs, captured
  again) through the finished blocks, which gives the very tensors the interrupted run had: the same
  blocks on the same batches, so a resumed run ends with the same model bit for bit.

Block weights and masks are stored packed (:func:`pack`): a pruned weight's zeros are left out and
masks are bits, exactly reversible, so at 50% sparsity a block costs a little over half its bytes.

``state.json`` names the files that belong to the state and is replaced atomically last, so a crash
at any moment leaves the previous consistent checkpoint. The calibration windows are saved once
(``calibration.safetensors``). Block inputs' keyword arguments and dense copies of blocks are
rebuilt from the model on resume. Unit seeds are derived from the settings and the window, never
from global random state. The bytes written are counted (``bytes_written``, kept across resumes).

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
FORMAT = 4  # 1 was pickled state.pt (never read: unpickling can run code); 2 saved streams after every window; 3 dense blocks
PACKED = "prunekit_packed"  # safetensors metadata key: the tensors stored as bits (+ stored values), see pack()
_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def _to_bits(flags: torch.Tensor) -> torch.Tensor:
    """A bool tensor as bytes, eight flags each (the last byte padded with False)."""
    flat = flags.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8).to(torch.uint8) * _BITS).sum(-1, dtype=torch.uint8)


def _from_bits(bits: torch.Tensor, numel: int) -> torch.Tensor:
    return ((bits.unsqueeze(-1) & _BITS) != 0).reshape(-1)[:numel]


def pack(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Pruned blocks and masks in fewer bytes, exactly: what :func:`unpack` restores bit for bit.

    A bool tensor (a mask) is stored as bits (an eighth of its bytes). A float tensor with enough
    zeros (a pruned weight: half or more at 50% sparsity) is stored as the bits that say where its
    nonzero values are, plus those values, plus (when there are any) the bits that say which zeros
    are -0.0 (masking a negative weight by multiplication gives -0.0; NaN counts as nonzero).
    At 50% unstructured a float32 weight then takes 53-56% of its bytes: with the checkpoint writing a
    block's weights, its masks-only copy for the guard and (cross-block windows) the overlap block,
    this is what keeps a run's checkpoint bytes below twice the model (issue 12).
    """
    out: dict[str, torch.Tensor] = {}
    packed: dict[str, dict[str, Any]] = {}
    for name, t in tensors.items():
        t = t.detach().to("cpu")
        if t.dtype == torch.bool and t.numel() >= 64:
            out[f"{name}::bits"] = _to_bits(t)
            packed[name] = {"shape": list(t.shape), "dtype": "bool"}
            continue
        if t.is_floating_point() and t.numel() >= 64:
            stored = t != 0
            negzero = ~stored & torch.signbit(t)
            kept, bitmaps = int(stored.sum()), 1 + bool(negzero.any())
            if kept * t.element_size() + bitmaps * ((t.numel() + 7) // 8) < t.numel() * t.element_size():
                out[f"{name}::bits"] = _to_bits(stored)
                out[f"{name}::values"] = t.reshape(-1)[stored.reshape(-1)]
                if bitmaps == 2:
                    out[f"{name}::negzero"] = _to_bits(negzero)
                packed[name] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                continue
        out[name] = t
    return out, ({PACKED: json.dumps(packed)} if packed else {})


def unpack(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, torch.Tensor]:
    """The tensors :func:`pack` was given, from what it stored (its metadata names the packed ones)."""
    packed = json.loads(metadata.get(PACKED, "{}"))
    if not packed:
        return tensors
    out = {k: v for k, v in tensors.items() if not k.endswith(("::bits", "::values", "::negzero"))}
    for name, info in packed.items():
        shape = torch.Size(info["shape"])
        flags = _from_bits(tensors[f"{name}::bits"], shape.numel())
        if info["dtype"] == "bool":
            out[name] = flags.reshape(shape)
            continue
        values = tensors[f"{name}::values"]
        full = torch.zeros(shape.numel(), dtype=getattr(torch, info["dtype"]))
        full[flags] = values
        if f"{name}::negzero" in tensors:
            full[_from_bits(tensors[f"{name}::negzero"], shape.numel())] = -0.0
        out[name] = full.reshape(shape)
    return out


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
            meta = dict(f.metadata() or {})
            return unpack({k: f.get_tensor(k) for k in f.keys()}, meta), meta
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
    def __init__(self, directory: str | Path, fingerprint: str, world: int = 1) -> None:
        self.dir = Path(directory)
        self.fingerprint = fingerprint  # the settings that must match on resume
        self.world = world  # ranks of the run (prunekit.dist): a resume must have as many
        (self.dir / "blocks").mkdir(parents=True, exist_ok=True)
        self._final: dict[int, str] = {}  # block -> file of its final weights
        self._final_lr: dict[int, str] = {}  # block -> its masks-only weights (reconstruction guard)
        self._final_masks: dict[int, dict[str, Any]] = {}  # block -> {"file", "names"}: masks kept for retraining
        self._streams: dict[str, Any] | None = None  # {"file", "pos", "names"} of the last saved streams
        self._pending: dict[int, str] = {}  # blocks later windows still change (as loaded)
        self.bytes_written = 0

    # ------------------------------------------------------------------ writing

    def _write(self, tensors: dict[str, torch.Tensor], name: str, metadata: dict[str, str] | None = None,
               packed: bool = True) -> str:
        """Write ``tensors`` (blocks and masks :func:`pack`-ed; streams, which have no zeros, with ``packed=False``)."""
        if packed:
            tensors, extra = pack(tensors)
            metadata = {**(metadata or {}), **extra} or None
        _save_tensors(tensors, self.dir / name, metadata)
        self.bytes_written += (self.dir / name).stat().st_size
        return name

    def save_calibration(self, ids: torch.Tensor) -> None:
        self._write({"input_ids": ids}, CALIBRATION, {"fingerprint": self.fingerprint})

    def save(
        self,
        window: int,
        pos: int,
        final: dict[int, nn.Module],
        pending: dict[int, nn.Module],
        masks: dict[int, dict[str, torch.Tensor]],
        report: dict[str, Any],
        lr_states: dict[int, dict[str, torch.Tensor]] | None = None,
        streams: dict[str, torch.Tensor | None] | None = None,
        final_elsewhere: list[int] | None = None,
        final_masks: dict[int, dict[str, torch.Tensor]] | None = None,
    ) -> None:
        """Record that windows up to ``window`` are done, the streams being at the input of block ``pos``.

        ``final`` are blocks no later window changes (written once each, with their masks-only
        weights ``lr_states`` for the guard); ``pending`` are blocks later windows still change,
        with ``masks`` (the masks of pending blocks). ``streams`` (sparse and dense, at ``pos``)
        are written when given; otherwise the state keeps the last saved ones. ``final_elsewhere``
        are final blocks made durable elsewhere (the output shards of a streamed run). ``final_masks``
        are the masks of final blocks that the run still needs (end-to-end retraining), written once each.
        """
        for j, block in final.items():
            if j not in self._final:
                self._final[j] = self._write(dict(block.state_dict()), f"blocks/{j}.safetensors")
        for j, lr_state in (lr_states or {}).items():
            if j not in self._final_lr:
                self._final_lr[j] = self._write(lr_state, f"blocks/{j}.lr.safetensors")
        for j, ms in (final_masks or {}).items():
            if j not in self._final_masks:
                name = self._write({f"mask/{i}": m for i, m in enumerate(ms.values())}, f"blocks/{j}.masks.safetensors")
                self._final_masks[j] = {"file": name, "names": list(ms)}
        pending_files = {j: self._write(dict(b.state_dict()), f"blocks/{j}.w{window}.safetensors") for j, b in pending.items()}
        tensors: dict[str, torch.Tensor] = {}
        mask_names: dict[str, list[str]] = {}
        for j, ms in masks.items():
            mask_names[str(j)] = list(ms)
            for i, m in enumerate(ms.values()):
                tensors[f"mask/{j}/{i}"] = m
        tensor_file = self._write(tensors, f"tensors.w{window}.safetensors")
        if streams is not None:
            kept = {k: v for k, v in streams.items() if v is not None}
            self._streams = {"file": self._write({f"stream/{k}": v for k, v in kept.items()}, f"streams.w{window}.safetensors",
                                                 packed=False),
                             "pos": pos, "names": list(kept)}
        state = {
            "format": FORMAT,
            "fingerprint": self.fingerprint,
            "world": self.world,
            "window": window,
            "pos": pos,
            "final": {str(j): f for j, f in self._final.items()},
            "final_lr": {str(j): f for j, f in self._final_lr.items()},
            "final_masks": {str(j): m for j, m in self._final_masks.items()},
            "final_elsewhere": sorted(final_elsewhere or []),
            "pending": {str(j): f for j, f in pending_files.items()},
            "tensor_file": tensor_file,
            "streams": self._streams,
            "masks": mask_names,
            "report": report,
        }
        self._write_json(state, self.dir / STATE)
        self.bytes_written += (self.dir / STATE).stat().st_size
        keep = {*self._final.values(), *self._final_lr.values(), *pending_files.values(),
                *(m["file"] for m in self._final_masks.values())}
        for f in (self.dir / "blocks").glob("*.safetensors"):
            if f"blocks/{f.name}" not in keep:
                f.unlink(missing_ok=True)
        for pattern, current in (("tensors.w*.safetensors", tensor_file), ("streams.w*.safetensors", (self._streams or {}).get("file"))):
            for f in self.dir.glob(pattern):
                if f.name != current:
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
        """The last consistent state, or None when there is none for these settings.

        ``final``/``final_lr``/``pending`` name block files (read them with :meth:`block_state`);
        ``streams`` is ``{"pos": P, "sparse": ..., "dense": ...}`` or None when none were saved.
        """
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
                raise ValueError("not a checkpoint of this prunekit version")
            fingerprint = state["fingerprint"]
        except (OSError, ValueError, KeyError, UnicodeDecodeError) as e:
            raise CheckpointDamaged(_damaged(path, e)) from None
        if fingerprint != self.fingerprint:
            raise PrunekitError(
                f"the checkpoint in {self.dir} was made with other settings; resume with the run's own config.yaml"
            )
        world = state.get("world", 1)
        if world != self.world:
            raise PrunekitError(
                f"the interrupted run ran on {world} rank{'s' if world != 1 else ''} and this one has {self.world}; "
                + (f"resume it with torchrun --nproc-per-node {world} (in all, {world} processes)" if world > 1
                   else "resume it as one process, without torchrun")
            )
        try:
            final = {int(j): str(f) for j, f in state["final"].items()}
            final_lr = {int(j): str(f) for j, f in state["final_lr"].items()}
            pending = {int(j): str(f) for j, f in state["pending"].items()}
            elsewhere = [int(j) for j in state["final_elsewhere"]]
            saved_streams = state["streams"]
            final_masks = {int(j): {"file": str(m["file"]), "names": list(m["names"])}
                           for j, m in state.get("final_masks", {}).items()}
            files = [state["tensor_file"], *final.values(), *final_lr.values(), *pending.values(),
                     *(m["file"] for m in final_masks.values())]
            if saved_streams is not None:
                files.append(saved_streams["file"])
            for f in files:
                if not (self.dir / f).is_file():
                    raise FileNotFoundError(f"{f} is missing")
            tensors, _ = _load_tensors(self.dir / state["tensor_file"])
            masks = {
                int(j): {name: tensors[f"mask/{j}/{i}"] for i, name in enumerate(names)}
                for j, names in state["masks"].items()
            }
            for j, m in final_masks.items():
                saved, _ = _load_tensors(self.dir / m["file"])
                masks[j] = {name: saved[f"mask/{i}"] for i, name in enumerate(m["names"])}
            streams = None
            if saved_streams is not None:
                st, _ = _load_tensors(self.dir / saved_streams["file"])
                streams = {"pos": int(saved_streams["pos"]), "sparse": None, "dense": None,
                           **{k: st[f"stream/{k}"] for k in saved_streams["names"]}}
            window, pos, report = int(state["window"]), int(state["pos"]), state["report"]
            self.bytes_written = int(report.get("checkpoint_bytes", 0))
        except CheckpointDamaged:
            raise
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointDamaged(_damaged(path, e)) from None
        self._final, self._final_lr, self._streams = final, final_lr, saved_streams
        self._final_masks = final_masks
        self._pending = pending
        return {
            "fingerprint": fingerprint, "window": window, "pos": pos, "final": dict(final), "final_lr": dict(final_lr),
            "final_elsewhere": elsewhere,
            "pending": dict(pending), "streams": streams, "masks": masks, "report": report,
        }

    def verify(self) -> None:
        """Open every file of the last state (headers only): a damaged checkpoint is reported at once."""
        state = self.load()
        if state is None:
            return
        for name in {*self._final.values(), *self._final_lr.values(), *self._pending.values()}:
            path = self.dir / name
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    list(f.keys())
            except Exception as e:
                raise CheckpointDamaged(_damaged(path, e)) from None

    def block_state(self, j: int, kind: str = "final") -> dict[str, torch.Tensor]:
        """Block ``j``'s saved weights: ``final``, ``pending`` (changed by later windows) or ``lr``
        (its masks-only weights, saved for the reconstruction guard)."""
        files = {"final": self._final, "pending": self._pending, "lr": self._final_lr}[kind]
        path = self.dir / files[j]
        try:
            tensors, _ = _load_tensors(path)
        except FileNotFoundError as e:
            raise CheckpointDamaged(_damaged(path, e)) from None
        return tensors
