"""Weights streamed from disk: a model whose blocks are read from, and written to, safetensors shards one at a time.

A 70B model is 280 GB in float32, more than a 128 GB host holds, yet pruning only ever works on a
window of blocks. This module keeps the model as a *skeleton*: every parameter on the meta device
(no memory), every buffer real (rotary ``inv_freq``, Gemma's ``embed_scale``: they are not in the
checkpoint, and building them for real in ``__init__`` is what makes them right for every family).
A part of the model (a block, the input embeddings, the final norm and LM head) is *materialised*
from the shards when a step needs it and *released* back to the meta device afterwards; finished
parts go to a :class:`ShardWriter`, which appends them to output shards as they come and ends with
an ordinary ``save_pretrained`` directory (shards, index, config, tokenizer).

How the driver uses it (peak host memory = embeddings + a window of blocks + the activation streams)::

    if weights == "stream" or (weights == "auto" and stream_weights(directory, torch.float32)):
        sm = StreamedModel(directory, dtype=torch.float32)     # checks the files, builds the skeleton
        layout = sm.layout                                      # families.discover(skeleton)
        norm = layout.family.final_norm
        sm.materialize("input"); sm.materialize(norm)           # capture() moves every non-block module
        captured = capture(sm.model, layout.blocks, ids, ...)   # of the base model (a meta one raises)
        writer = ShardWriter(rundir.tmp, max_shard_size="5GB", in_place=True)
        writer.add(sm.save_state("input")); sm.release("input"); sm.release(norm)  # never changed
        for each window:
            block = sm.materialize(j, device)                   # real weights of block j, pruned in place
            dense = sm.dense_block(j, device)                   # the original block, owned by the caller
            ...                                                 # prune, reconstruct, verify; materialise
                                                                # "head" only for the steps that read logits
            writer.add(sm.save_state(j)); sm.release(j)         # as soon as block j is final
            writer.commit()                                     # at a checkpoint: finished blocks are durable
        sm.materialize("head"); writer.add(sm.save_state("head")); sm.release("head")
        config.use_cache = True                                 # as models.save_model does
        writer.finish(config=config, copy_from=directory, expected=sm.saved_names())

Parts are named by a block index, ``"input"`` (every parameter before the blocks: token and position
embeddings), ``"head"`` (the final norm and the LM head) or any module path (``"model.norm"``).
Materialising counts references per parameter, so a tied LM head and embedding table is one tensor,
read once, released when neither part needs it. Releasing drops the part's weights, *including
changes made to them*: write a finished part before releasing it. A resumed run reopens its writer
with ``resume=True`` and finds the blocks committed before the interruption in ``writer.names``.

Tensors are read with plain positioned reads into fresh tensors, not through ``safe_open``'s memory
map, so a read part costs exactly its size and nothing stays mapped (memory-mapped pages would count
as resident memory until the file is closed). Only local directories of safetensors are streamed;
GGUF files and hub ids keep the in-memory path (or are converted once with ``save_pretrained``).
"""

from __future__ import annotations

import copy
import json
import mmap
import os
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from .errors import PrunekitError
from .families import Layout, discover
from .streams import available_ram

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_MAX_HEADER = 100_000_000  # safetensors refuses bigger headers
_CONVERT = (
    "convert it once: load it with AutoModelForCausalLM.from_pretrained and call "
    "save_pretrained(DIR, safe_serialization=True), or use --weights memory"
)
_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    **{k: getattr(torch, v) for k, v in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                                         ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")) if hasattr(torch, v)},
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
# files of a model directory that belong to its tokenizer (copied verbatim into the output)
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "vocab.txt",
    "merges.txt", "chat_template.jinja", "chat_template.json",
)  # fmt: skip


# ----------------------------------------------------------------------------- reading the files


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor of a checkpoint lies: file, absolute byte offset, dtype and shape."""

    file: Path
    start: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def _read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check one safetensors file's header without reading its data.

    The data size the header describes must equal what follows it in the file: a shorter file is a
    truncated download or an interrupted save, found here rather than halfway through a run.
    """
    redo = "download it again or save the model again"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise PrunekitError(f"{path} is truncated ({size} bytes, not even a safetensors header); {redo}")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise PrunekitError(
                    f"{path} is truncated or not a safetensors file (its header claims {n} bytes, the file has {size}); {redo}"
                )
            raw = f.read(n)
    except OSError as e:
        raise PrunekitError(f"{path} cannot be read ({e.strerror or e}); check the file's permissions or {redo}") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
        out: dict[str, TensorInfo] = {}
        end = 0
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype = _ST_DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            start, stop = (int(x) for x in entry["data_offsets"])
            numel = 1
            for s in shape:
                numel *= s
            if stop - start != numel * torch.empty(0, dtype=dtype).element_size() or start < 0:
                raise ValueError(f"tensor {name} has {stop - start} bytes for shape {list(shape)}")
            out[name] = TensorInfo(path, 8 + n + start, stop - start, dtype, shape)
            end = max(end, stop)
    except (ValueError, KeyError, TypeError) as e:
        raise PrunekitError(f"{path} has a damaged safetensors header ({type(e).__name__}: {e}); {redo}") from None
    if 8 + n + end > size:
        raise PrunekitError(f"{path} is truncated: its header describes {8 + n + end} bytes, the file has {size}; {redo}")
    if 8 + n + end < size:
        raise PrunekitError(f"{path} is damaged: {size - 8 - n - end} bytes follow the data its header describes; {redo}")
    return out


@dataclass
class SafetensorsDir:
    """A checked local Hugging Face model directory whose weights are safetensors (one file or shards)."""

    directory: Path
    files: list[Path]  # weight files, in the index's order
    tensors: dict[str, TensorInfo]  # checkpoint key -> where it lies
    index: Path | None = None

    def nbytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of all weights as stored, or with floating tensors in ``dtype``."""
        if dtype is None:
            return sum(t.nbytes for t in self.tensors.values())
        size = torch.empty(0, dtype=dtype).element_size()
        total = 0
        for t in self.tensors.values():
            numel = t.nbytes // torch.empty(0, dtype=t.dtype).element_size()
            total += numel * size if t.dtype.is_floating_point else t.nbytes
        return total

    def read(
        self, keys: Iterable[str], device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ) -> dict[str, torch.Tensor]:
        """Read ``keys`` into fresh tensors on ``device`` (floating ones cast to ``dtype``), one file at a time."""
        wanted = [(self.tensors[k], k) for k in keys]
        wanted.sort(key=lambda x: (str(x[0].file), x[0].start))
        out: dict[str, torch.Tensor] = {}
        f = None
        try:
            for info, key in wanted:
                if f is None or f.name != str(info.file):
                    if f is not None:
                        f.close()
                    f = open(info.file, "rb", buffering=0)
                buf = _host_empty(info.nbytes)
                view = memoryview(buf.numpy())
                f.seek(info.start)
                got = 0
                while got < info.nbytes:  # one read() returns at most ~2 GiB
                    n = f.readinto(view[got:])
                    if not n:
                        raise PrunekitError(f"{info.file} became shorter while it was read; download it again or save the model again")
                    got += n
                t = buf.view(info.dtype).reshape(info.shape)
                cast = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
                if torch.device(device).type == "cpu" and cast != t.dtype:
                    size = t.numel() * torch.empty(0, dtype=cast).element_size()
                    t = _host_empty(size).view(cast).reshape(info.shape).copy_(t)
                out[key] = t.to(device=device, dtype=cast)
        finally:
            if f is not None:
                f.close()
        return out


_MMAP_MIN = 1 << 20


def _host_empty(nbytes: int) -> torch.Tensor:
    """A CPU byte buffer; from 1 MiB up an anonymous memory map, given back to the system when the tensor dies.

    glibc serves freed blocks below 32 MiB again from its heap (its mmap threshold rises with every
    freed block), so released blocks of a 1B model would stay in the process's resident memory,
    a little more with every block. A memory map is unmapped as soon as the last tensor using it goes.
    """
    if nbytes < _MMAP_MIN:
        return torch.empty(nbytes, dtype=torch.uint8)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8)


def open_sharded(directory: str | Path) -> SafetensorsDir:
    """Check a local model directory and index its safetensors weights (headers only, no data read).

    Accepts ``model.safetensors`` or ``model.safetensors.index.json`` with its shards, as
    ``save_pretrained`` writes them. Everything that would fail later (no safetensors, a shard
    missing or truncated, an index naming a file that is not there or a tensor that its file does
    not hold) is one :class:`PrunekitError` naming the file and the fix.
    """
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise PrunekitError(f"model directory {d} does not exist; give a directory written by save_pretrained")
    if not (d / "config.json").is_file():
        raise PrunekitError(f"{d} has no config.json; give a directory written by save_pretrained")
    if (d / SINGLE).is_file():
        return SafetensorsDir(d, [d / SINGLE], _read_header(d / SINGLE))
    index = d / INDEX
    if not index.is_file():
        names = sorted(p.name for p in d.iterdir() if p.is_file())
        pickles = [n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt", ".bin.index.json"))]
        others = [n for n in names if n.endswith(".safetensors")]
        if pickles:
            raise PrunekitError(f"{d} has no safetensors weights, only {pickles[0]}; {_CONVERT.replace('DIR', str(d))}")
        if others:
            raise PrunekitError(f"{d} has {others[0]} but neither {SINGLE} nor {INDEX}; save the model with save_pretrained")
        raise PrunekitError(f"{d} has no weights ({SINGLE} or {INDEX}); give a directory written by save_pretrained")
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError("weight_map is not a mapping of tensor names to file names")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PrunekitError(f"{index} cannot be read ({type(e).__name__}: {e}); download it again or save the model again") from None
    files: list[str] = list(dict.fromkeys(weight_map.values()))
    headers: dict[str, dict[str, TensorInfo]] = {}
    for name in files:
        path = d / name
        if Path(name).name != name:
            raise PrunekitError(f"{index} names {name!r}, which is not a file of {d}; download the index again or save the model again")
        if not path.is_file():
            raise PrunekitError(
                f"{path} is missing (the index {INDEX} names it); download the missing shard or save the model again"
            )
        headers[name] = _read_header(path)
    tensors: dict[str, TensorInfo] = {}
    for name in files:  # tensors the index does not list are still in their file: transformers loads them too
        tensors.update(headers[name])
    for key, name in weight_map.items():
        if key not in headers[name]:
            raise PrunekitError(
                f"{d / name} does not hold {key}, which the index {INDEX} places there; download the model again or save it again"
            )
        tensors[key] = headers[name][key]
    return SafetensorsDir(d, [d / n for n in files], tensors, index)


def weight_bytes(directory: str | Path, dtype: torch.dtype | None = None) -> int:
    """The model's weight bytes from the shards' headers (floating tensors counted in ``dtype`` if given)."""
    return open_sharded(directory).nbytes(dtype)


def stream_weights(directory: str | Path, dtype: torch.dtype | None = None, share: float = 0.5) -> bool:
    """``--weights auto``: whether the model should be streamed because it would not fit in RAM.

    The in-memory path holds the whole model plus dense copies, statistics and activation streams,
    so the model alone may take at most ``share`` of the memory available now.
    """
    return weight_bytes(directory, dtype) > share * available_ram()


# ----------------------------------------------------------------------------- the skeleton


class _ParametersOnMeta:
    """While active, every parameter a module registers is put on the meta device; buffers stay real.

    Built this way, a model's non-persistent buffers (computed in ``__init__``: rotary tables,
    embedding scales) are exactly what ``from_pretrained`` gives, for any family, without knowing
    how each one is computed; the parameters cost nothing. Already-meta parameters pass through
    unchanged, so ``tie_weights`` keeps one shared parameter.
    """

    def __enter__(self) -> None:
        self._original = original = nn.Module.register_parameter

        def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
            if param is not None and param.device.type != "meta":
                param = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
            original(module, name, param)

        nn.Module.register_parameter = register  # type: ignore[method-assign]

    def __exit__(self, *exc: object) -> None:
        nn.Module.register_parameter = self._original  # type: ignore[method-assign]


def build_skeleton(
    directory: str | Path,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """The causal LM of ``directory``'s config.json with parameters on the meta device and real buffers."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    d = Path(directory)
    try:
        config = AutoConfig.from_pretrained(str(d), trust_remote_code=trust_remote_code)
    except Exception as e:
        text = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise PrunekitError(f"{d / 'config.json'} cannot be read as a model config ({text}); save the model again") from None
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        with _ParametersOnMeta():
            model = AutoModelForCausalLM.from_config(config, **kwargs)
    except ValueError as e:
        raise PrunekitError(
            f"{d / 'config.json'} describes a model type ({config.model_type!r}) that transformers cannot build as a "
            f"causal LM ({str(e).splitlines()[0][:120]}); give a decoder-only language model"
        ) from None
    if (d / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(str(d))
        except Exception:  # a damaged generation config does not stop pruning; the default one stays
            pass
    model.eval()
    model.config.use_cache = False
    return model


def _saved_names(model: nn.Module) -> dict[str, str]:
    """Model state-dict name -> the name ``save_pretrained`` writes, for every tensor it writes.

    Tied weights are written once (transformers keeps the tie's source, e.g. the embedding table,
    and omits ``lm_head.weight``), and a family whose tensors transformers converts on save
    (renamed, fused or split) is refused: such tensors cannot be written block by block.
    """
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = dict(model.state_dict())  # parameters are meta tensors here: cheap
    kept = remove_tied_weights_from_state_dict(state, model)
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        kept.pop(key, None)
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # pragma: no cover - transformers without save-time conversions
        return {k: k for k in kept}
    converted = revert_weight_conversion(model, dict(kept))
    if set(converted) != set(kept):
        raise PrunekitError(
            f"transformers saves {type(model).__name__} weights in a converted layout (e.g. {sorted(set(converted) - set(kept))[:1]}); "
            "streaming cannot write such a model block by block: use --weights memory"
        )
    return {k: k for k in kept}


def _checkpoint_names(keys: Iterable[str], model: nn.Module) -> dict[str, str]:
    """Model state-dict name -> checkpoint key, as ``from_pretrained`` would match them.

    Covers a checkpoint saved from the base model (GPT-2's ``h.0...`` for ``transformer.h.0...``)
    and transformers' load-time renamings; keys that match no model tensor are ignored, like the
    unexpected keys ``from_pretrained`` ignores.
    """
    state = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "") or ""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, apply_converters, rename_source_key

        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
    except ImportError:  # pragma: no cover - older transformers: base-model prefix only
        renamings, converters = [], []
        apply_converters = rename_source_key = None  # type: ignore[assignment]
    out: dict[str, str] = {}
    for key in keys:
        if converters and apply_converters(key, converters)[1] is not None:
            raise PrunekitError(
                f"the checkpoint stores {key} in a layout transformers converts on load; streaming cannot read it "
                "block by block: use --weights memory"
            )
        if rename_source_key is not None:
            name, _ = rename_source_key(key, renamings, [], prefix or None, state)
        else:
            name = key
            if prefix and name not in state and f"{prefix}.{name}" in state:
                name = f"{prefix}.{name}"
        if name in state:
            out.setdefault(name, key)
    return out


# ----------------------------------------------------------------------------- the streamed model


@dataclass
class _Param:
    """One distinct parameter and every name it is reachable under (a tied one has several)."""

    names: list[str]
    owners: list[tuple[nn.Module, str]]
    key: str  # checkpoint key holding it
    refs: int = 0


def _under(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


class StreamedModel:
    """A model skeleton whose parts are read from safetensors shards on demand and released afterwards.

    ``model`` is an ordinary transformers model: its forward works wherever the parts it touches
    are materialised; ``layout`` is its :func:`prunekit.families.discover` layout.
    """

    def __init__(
        self,
        source: str | Path | SafetensorsDir,
        dtype: torch.dtype = torch.float32,
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        self.checkpoint = source if isinstance(source, SafetensorsDir) else open_sharded(source)
        self.dtype = dtype
        self.model = build_skeleton(self.checkpoint.directory, dtype, attn_implementation, trust_remote_code)
        self.layout: Layout = discover(self.model)
        fam = self.layout.family
        self._blocks = fam.blocks
        heads = [fam.final_norm]
        out_emb = self.model.get_output_embeddings()
        heads += [n for n, m in self.model.named_modules() if out_emb is not None and m is out_emb]
        self._heads = heads
        found = _checkpoint_names(self.checkpoint.tensors, self.model)
        groups: dict[int, _Param] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            owner, _, attr = name.rpartition(".")
            g = groups.setdefault(id(p), _Param([], [], ""))
            g.names.append(name)
            g.owners.append((self.model.get_submodule(owner), attr))
        self._params: dict[str, _Param] = {}
        for g in groups.values():
            key = next((found[n] for n in g.names if n in found), None)
            if key is None:
                raise PrunekitError(
                    f"no weight file of {self.checkpoint.directory} holds {g.names[0]}, which the model needs; "
                    "the weights do not match config.json: download the model again or save it again"
                )
            info = self.checkpoint.tensors[key]
            shape = tuple(g.owners[0][0]._parameters[g.owners[0][1]].shape)
            if info.shape != shape:
                raise PrunekitError(
                    f"{info.file} holds {key} with shape {list(info.shape)}, but config.json implies {list(shape)}; "
                    "the weights do not match the config: download the model again or save it again"
                )
            g.key = key
            self._params[g.names[0]] = g
        self._buffer_keys = {n: found[n] for n, _ in self.model.named_buffers() if n in found}
        self._load_buffers()
        self._saved = _saved_names(self.model)

    # -- parts

    @property
    def num_blocks(self) -> int:
        return len(self.layout.blocks)

    def block_prefix(self, index: int) -> str:
        if not 0 <= index < self.num_blocks:
            raise IndexError(f"block {index} out of range (the model has {self.num_blocks})")
        return f"{self._blocks}.{index}"

    def _in_part(self, name: str, part: int | str) -> bool:
        if isinstance(part, int):
            return _under(name, self.block_prefix(part))
        if part == "all":
            return True
        if part == "head":
            return any(_under(name, h) for h in self._heads)
        if part == "input":
            return not _under(name, self._blocks) and not any(_under(name, h) for h in self._heads)
        return _under(name, part)

    def _part_params(self, part: int | str) -> list[_Param]:
        if isinstance(part, str) and part not in ("all", "head", "input"):
            try:
                self.model.get_submodule(part)
            except AttributeError:
                raise ValueError(f"{type(self.model).__name__} has no module {part!r}") from None
        return [g for g in self._params.values() if any(self._in_part(n, part) for n in g.names)]

    def _module(self, part: int | str) -> nn.Module:
        if isinstance(part, int):
            return self.layout.blocks[part]
        return self.model if part in ("all", "head", "input") else self.model.get_submodule(part)

    def _part_buffers(self, part: int | str) -> Iterator[tuple[nn.Module, str, torch.Tensor]]:
        for name, buf in self.model.named_buffers():
            if self._in_part(name, part):
                owner, _, attr = name.rpartition(".")
                yield self.model.get_submodule(owner), attr, buf

    # -- materialise and release

    def materialize(self, part: int | str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
        """Read ``part``'s parameters from the shards onto ``device`` (in ``dtype``); returns its module.

        Parameters already materialised by another part (a tied LM head) are shared, not read
        again; they must already be on ``device``. The part's buffers move to ``device`` too.
        """
        device = torch.device(device)
        dtype = dtype or self.dtype
        params = self._part_params(part)
        todo = [g for g in params if g.refs == 0]
        for g in params:
            if g.refs:
                current = g.owners[0][0]._parameters[g.owners[0][1]]
                if current.device.type != device.type:
                    raise RuntimeError(f"{g.names[0]} is already materialised on {current.device}, not {device}")
        tensors = self.checkpoint.read([g.key for g in todo], device, dtype)
        for g in todo:
            old = g.owners[0][0]._parameters[g.owners[0][1]]
            self._set(g, nn.Parameter(tensors.pop(g.key), requires_grad=old.requires_grad))
        for g in params:
            g.refs += 1
        for module, attr, buf in self._part_buffers(part):
            if buf.device != device:
                module._buffers[attr] = buf.to(device)
        return self._module(part)

    def release(self, part: int | str) -> None:
        """Put ``part``'s parameters back on the meta device (those no other materialised part still uses)."""
        for g in self._part_params(part):
            if g.refs == 0:
                continue
            g.refs -= 1
            if g.refs == 0:
                old = g.owners[0][0]._parameters[g.owners[0][1]]
                meta = torch.empty(old.shape, dtype=self.dtype, device="meta")
                self._set(g, nn.Parameter(meta, requires_grad=old.requires_grad))

    @staticmethod
    def _set(g: _Param, param: nn.Parameter) -> None:
        for module, attr in g.owners:
            module._parameters[attr] = param

    def _load_buffers(self) -> None:
        """Persistent buffers the checkpoint holds replace the constructed ones (as from_pretrained does)."""
        if not self._buffer_keys:
            return
        values = self.checkpoint.read(self._buffer_keys.values())
        for name, key in self._buffer_keys.items():
            owner, _, attr = name.rpartition(".")
            module = self.model.get_submodule(owner)
            module._buffers[attr] = values[key].to(module._buffers[attr].dtype)

    def resident_bytes(self) -> int:
        """Bytes of the parameters that are materialised now (each tied tensor once)."""
        total = 0
        for g in self._params.values():
            p = g.owners[0][0]._parameters[g.owners[0][1]]
            if p.device.type != "meta":
                total += p.numel() * p.element_size()
        return total

    # -- dense originals

    def read(self, part: int | str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The original weights of ``part`` from the shards, not kept here.

        Names are local to the block for a block index (as in ``block.state_dict()``), full model
        names otherwise (a tied tensor once, under its first name).
        """
        params = self._part_params(part)
        tensors = self.checkpoint.read([g.key for g in params], device, dtype or self.dtype)
        strip = self.block_prefix(part) + "." if isinstance(part, int) else None
        out: dict[str, torch.Tensor] = {}
        for g in params:
            name = next(n for n in g.names if self._in_part(n, part))
            out[name[len(strip):] if strip else name] = tensors[g.key]
        return out

    def dense_block(self, index: int, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
        """A new module equal to block ``index`` with its original weights; the caller owns (and frees) it."""
        block = self.layout.blocks[index]
        memo: dict[int, Any] = {
            id(p): nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=p.requires_grad)
            for p in block.parameters()
        }
        dense = copy.deepcopy(block, memo)  # no weight is copied: parameters become meta ones
        result = dense.load_state_dict(self.read(index, device, dtype), strict=False, assign=True)
        params = {n for n, _ in dense.named_parameters()}
        if set(result.missing_keys) & params or result.unexpected_keys:
            raise RuntimeError(f"block {index}: dense weights do not match the block ({result})")
        return dense.to(device)

    # -- saving

    def saved_names_of(self, index: int) -> dict[str, str]:
        """Block ``index``'s tensors: name in ``block.state_dict()`` -> name in the saved shards."""
        strip = len(self.block_prefix(index)) + 1
        return {name[strip:]: saved for name, saved in self._saved.items() if self._in_part(name, index)}

    def saved_names(self) -> set[str]:
        """Every tensor name ``save_pretrained`` would write for this model."""
        return set(self._saved.values())

    def save_state(self, part: int | str) -> dict[str, torch.Tensor]:
        """``part``'s current tensors under the names ``save_pretrained`` writes (tied copies omitted).

        Over all blocks, ``"input"`` and ``"head"``, every written name comes exactly once.
        """
        state = self.model.state_dict()
        out: dict[str, torch.Tensor] = {}
        for name, saved in self._saved.items():
            if self._in_part(name, part):
                t = state[name]
                if t.device.type == "meta":
                    raise RuntimeError(f"{name} is not materialised; materialise part {part!r} before saving it")
                out[saved] = t.detach()
        return out


# ----------------------------------------------------------------------------- writing


def parse_size(size: int | str) -> int:
    """``5GB`` (10^9), ``5GiB`` (2^30), ``200MB``, ``12345`` -> bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", size.upper())
    if not m:
        raise PrunekitError(f"shard size {size!r} is not a size; write e.g. 5GB, 500MB or a number of bytes")
    unit = m.group(2).rstrip("B") or ""
    power = " KMGT".index(unit[0]) if unit else 0
    base = 1024 if unit.endswith("I") else 1000
    return int(float(m.group(1)) * base**power)


def _committed_shards(directory: Path) -> list[_Shard]:
    """The shards a :class:`ShardWriter` in ``directory`` last committed (its manifest)."""
    manifest = directory / ShardWriter.MANIFEST
    try:
        state = json.loads(manifest.read_text(encoding="utf-8"))
        return [
            _Shard(directory / s["file"], int(s["reserve"]), dict(s["entries"]), int(s["size"]), int(s["header"]), bool(s["closed"]))
            for s in state["shards"]
        ]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PrunekitError(f"{manifest} is damaged or missing ({type(e).__name__}); start the run again without --resume") from None


def _read_entries(shards: list[_Shard], names: Iterable[str]) -> dict[str, torch.Tensor]:
    where = {name: shard for shard in shards for name in shard.entries}
    out: dict[str, torch.Tensor] = {}
    for name in names:
        shard = where[name]
        entry = shard.entries[name]
        start, end = entry["data_offsets"]
        with open(shard.path, "rb") as f:
            f.seek(8 + shard.reserve + start)
            data = bytearray(f.read(end - start))
        if len(data) != end - start:
            raise PrunekitError(f"{shard.path} is shorter than written; start the run again without --resume")
        dtype = _ST_DTYPES[entry["dtype"]]
        out[name] = (torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)).reshape(entry["shape"])
    return out


class ShardReader:
    """What another process's :class:`ShardWriter` in ``directory`` has committed, read only.

    The ranks of a data-parallel run other than 0 read the blocks rank 0 wrote (to resume, and for
    the guard's end-to-end check) this way; rank 0 commits before they read.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        return _read_entries(_committed_shards(self.directory), names)


@dataclass
class _Shard:
    path: Path
    reserve: int  # bytes kept for the JSON header before the data
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    size: int = 0  # data bytes written
    header: int = 0  # length of the compact JSON header so far
    closed: bool = False


_META = {"format": "pt"}
_EMPTY_HEADER = len(json.dumps({"__metadata__": _META}, separators=(",", ":")))


def _entry_len(name: str, entry: dict[str, Any]) -> int:
    return len(json.dumps({name: entry}, separators=(",", ":"))) - 1  # minus the braces, plus a comma


class ShardWriter:
    """Write a model's tensors as they become final into ``save_pretrained``-style safetensors shards.

    Tensors are appended to the current shard, which is closed when the next tensor would take it
    past ``max_shard_size``. A safetensors header precedes the data, so each shard starts with a
    reserved header area filled at close (JSON padded with spaces, which safetensors allows); a
    shard also closes when its header would outgrow that area, so no data is ever moved.

    Everything is written under temporary names: into the hidden sibling ``.NAME.partial``
    (renamed to ``out_dir`` by :meth:`finish`), or with ``in_place`` into ``out_dir`` itself when
    that is already a temporary directory (a run's partial directory). Until :meth:`finish` no file
    has its final name, so nothing half-written ever looks like a model. :meth:`commit` makes what
    was added durable; ``resume=True`` reopens at the last commit (``names`` says what is there).
    """

    MANIFEST = ".shards.json"

    def __init__(
        self,
        out_dir: str | Path,
        max_shard_size: int | str = "5GB",
        in_place: bool = False,
        resume: bool = False,
        header_reserve: int = 64 * 1024,
    ) -> None:
        self.final = Path(out_dir)
        self.in_place = in_place
        self.staging = self.final if in_place else self.final.parent / f".{self.final.name}.partial"
        self.max_shard_size = parse_size(max_shard_size)
        if self.max_shard_size <= 0:
            raise PrunekitError(f"shard size {max_shard_size!r} must be positive")
        self.header_reserve = -(-header_reserve // 8) * 8
        if not in_place and self.final.exists():
            raise PrunekitError(f"{self.final} already exists; choose another output directory or remove it")
        self._shards: list[_Shard] = []
        self._file: Any = None
        self.names: set[str] = set()
        manifest = self.staging / self.MANIFEST
        if resume and manifest.is_file():
            self._restore(manifest)
        else:
            if not in_place and self.staging.exists():
                shutil.rmtree(self.staging)
            self.staging.mkdir(parents=True, exist_ok=True)
            self._remove_temporaries(keep=0)
            manifest.unlink(missing_ok=True)

    # -- adding

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Append ``tensors`` (name -> tensor, on any device) to the output."""
        for name, tensor in tensors.items():
            self._add(name, tensor)

    def _add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.names:
            raise ValueError(f"{name} was already written")
        t = tensor.detach().to("cpu").contiguous()
        if t.dtype not in _ST_NAMES:
            raise ValueError(f"{name}: dtype {t.dtype} cannot be stored in safetensors")
        nbytes = t.numel() * t.element_size()
        shard = self._shards[-1] if self._shards and not self._shards[-1].closed else None
        entry = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [0, nbytes]}
        grow = _entry_len(name, {**entry, "data_offsets": [10**15, 10**15]})  # offsets at their widest
        if shard is not None and shard.entries and (
            shard.size + nbytes > self.max_shard_size or _EMPTY_HEADER + shard.header + grow > shard.reserve
        ):
            self._close(shard)
            shard = None
        if shard is None:
            shard = self._open(max(self.header_reserve, -(-(_EMPTY_HEADER + grow) // 8) * 8))
        entry["data_offsets"] = [shard.size, shard.size + nbytes]
        if nbytes:
            self._file.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        shard.entries[name] = entry
        shard.size += nbytes
        shard.header += grow
        self.names.add(name)

    def _open(self, reserve: int) -> _Shard:
        shard = _Shard(self.staging / f".shard-{len(self._shards) + 1:05d}.safetensors.tmp", reserve)
        self._file = open(shard.path, "w+b")
        self._file.truncate(8 + reserve)
        self._file.seek(8 + reserve)
        self._shards.append(shard)
        return shard

    def _close(self, shard: _Shard) -> None:
        header = json.dumps({"__metadata__": _META, **shard.entries}, separators=(",", ":")).encode()
        assert len(header) <= shard.reserve, "header estimate too small"
        self._file.seek(0)
        self._file.write(struct.pack("<Q", shard.reserve) + header + b" " * (shard.reserve - len(header)))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        shard.closed = True

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Tensors written earlier (committed or not), read back from the shard files (a resumed run
        replays its streams through blocks that are already in the output)."""
        if self._file is not None:
            self._file.flush()
        return _read_entries(self._shards, names)

    # -- durability and resume

    def commit(self) -> None:
        """Make everything added so far durable; a resumed writer starts from here."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
        state = {
            "format": 1,
            "max_shard_size": self.max_shard_size,
            "shards": [
                {"file": s.path.name, "reserve": s.reserve, "size": s.size, "header": s.header, "closed": s.closed,
                 "entries": s.entries}
                for s in self._shards
            ],
        }  # fmt: skip
        path = self.staging / self.MANIFEST
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(state), encoding="utf-8")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _restore(self, manifest: Path) -> None:
        shards = _committed_shards(self.staging)
        for s in shards:
            if Path(s.path.name).name != s.path.name or not s.path.is_file() or s.path.stat().st_size < 8 + s.reserve + s.size:
                raise PrunekitError(f"{s.path} is missing or shorter than checkpointed; start the run again without --resume")
        self._shards = shards
        self._remove_temporaries(keep=len(shards))
        for s in shards:
            self.names.update(s.entries)
        if shards and not shards[-1].closed:
            last = shards[-1]
            self._file = open(last.path, "r+b")
            self._file.truncate(8 + last.reserve + last.size)  # drop what was written after the commit
            self._file.seek(8 + last.reserve + last.size)

    def _remove_temporaries(self, keep: int) -> None:
        """Delete shard files of an earlier attempt beyond the first ``keep`` (written after its last commit)."""
        for p in self.staging.glob(".shard-*.safetensors.tmp"):
            m = re.fullmatch(r"\.shard-(\d+)\.safetensors\.tmp", p.name)
            if m and int(m.group(1)) > keep:
                p.unlink()

    # -- finishing

    def finish(
        self,
        config: Any = None,
        generation_config: Any = None,
        tokenizer: Any = None,
        copy_from: str | Path | None = None,
        expected: set[str] | None = None,
        total_parameters: int | None = None,
    ) -> Path:
        """Close the last shard, give the files their final names, write the index and the other files.

        ``config`` (a transformers config, saved with ``dtype`` set to the written floating dtype)
        or else ``copy_from``'s config.json; ``generation_config`` and ``tokenizer`` likewise, or
        their files copied from ``copy_from``. ``expected`` (e.g. ``StreamedModel.saved_names()``)
        makes a missing or extra tensor an error instead of a model that loads with random weights.
        """
        if expected is not None and set(expected) != self.names:
            missing, extra = sorted(set(expected) - self.names), sorted(self.names - set(expected))
            raise ValueError(f"written tensors differ from the expected ones: missing {missing[:3]}, unexpected {extra[:3]}")
        if not self._shards:
            raise ValueError("no tensor was written")
        if config is None and copy_from is None:
            raise ValueError("finish() needs a config or a directory to copy config.json from")
        if self._shards and not self._shards[-1].closed:
            self._close(self._shards[-1])
        src = Path(copy_from) if copy_from is not None else None
        n = len(self._shards)
        names = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        if self.in_place:  # shards of an earlier save would be mixed with these ones by a loader
            for p in self.staging.iterdir():
                if (p.name in (SINGLE, INDEX) or re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", p.name)) and p.name not in names:
                    p.unlink()
        for shard, name in zip(self._shards, names):
            os.replace(shard.path, self.staging / name)
        if n > 1:
            total = sum(s.size for s in self._shards)
            if total_parameters is None:
                total_parameters = sum(_numel(e["shape"]) for s in self._shards for e in s.entries.values())
            index = {
                "metadata": {"total_parameters": total_parameters, "total_size": total},
                "weight_map": {k: name for s, name in zip(self._shards, names) for k in s.entries},
            }
            tmp = self.staging / f".{INDEX}.tmp"
            tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            os.replace(tmp, self.staging / INDEX)
        if config is not None:
            cfg = copy.deepcopy(config)
            dtype = self._float_dtype()
            if dtype is not None:
                cfg.dtype = str(dtype).removeprefix("torch.")
            cfg.save_pretrained(str(self.staging))
        else:
            shutil.copy2(src / "config.json", self.staging / "config.json")
        if generation_config is not None:
            generation_config.save_pretrained(str(self.staging))
        elif src is not None and (src / "generation_config.json").is_file():
            shutil.copy2(src / "generation_config.json", self.staging / "generation_config.json")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(self.staging))
        elif src is not None:
            for p in src.iterdir():
                if p.is_file() and (p.name in _TOKENIZER_FILES or p.suffix == ".tiktoken"):
                    shutil.copy2(p, self.staging / p.name)
        (self.staging / self.MANIFEST).unlink(missing_ok=True)
        self._shards = []
        if not self.in_place:
            if self.final.exists():
                raise PrunekitError(f"{self.final} appeared while the model was written; the model is in {self.staging}")
            os.replace(self.staging, self.final)
        return self.final

    def _float_dtype(self) -> torch.dtype | None:
        sizes: dict[str, int] = {}
        for s in self._shards:
            for e in s.entries.values():
                if _ST_DTYPES[e["dtype"]].is_floating_point:
                    sizes[e["dtype"]] = sizes.get(e["dtype"], 0) + e["data_offsets"][1] - e["data_offsets"][0]
        return _ST_DTYPES[max(sizes, key=sizes.__getitem__)] if sizes else None

    def abort(self) -> None:
        """Remove everything written (the staging directory, or this writer's files in place)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.in_place:
            self._remove_temporaries(keep=0)
            (self.staging / self.MANIFEST).unlink(missing_ok=True)
        else:
            shutil.rmtree(self.staging, ignore_errors=True)
        self._shards = []
        self.names = set()

    def restart(self) -> None:
        """Drop everything written so far and write again in the same place (a reverted run's output)."""
        self.abort()
        self.staging.mkdir(parents=True, exist_ok=True)


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
