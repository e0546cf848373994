"""Run configuration as plain dataclasses.

Every leaf field is a command-line flag of the same name (``nsamples`` -> ``--nsamples``) and a key
of the YAML file given with ``--config``; the resolved configuration is written to each run
directory as ``config.yaml``. Field names are unique across the sections so that the flat flag
namespace and the nested YAML map onto each other without ambiguity.

Defaults are sized so that the main job (prune the default model with no flags) runs in a few
minutes on a 2-core CPU. The papers' settings are one flag away: SparseGPT and Wanda calibrate on
128 C4 windows of 2048 tokens (Frantar & Alistarh 2023; Sun et al. 2023), the Rethinking paper on
256 windows of 1024 tokens, and all of them report perplexity on the full WikiText-2 test set at
2048 tokens (``--eval-windows 0``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import PrunekitError

METHODS = ("magnitude", "wanda", "sparsegpt")
DTYPES = ("float32", "bfloat16", "float16")
SCOPES = ("auto", "row", "layer")


@dataclass(frozen=True)
class Sparsity:
    """A parsed sparsity target: unstructured ``fraction`` pruned, or N:M with N *kept* of every M."""

    fraction: float
    n: int | None = None
    m: int | None = None

    @property
    def is_nm(self) -> bool:
        return self.n is not None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.fraction:g}"


def parse_sparsity(text: str | float) -> Sparsity:
    """Parse ``"0.5"`` (fraction of weights pruned) or ``"2:4"`` (N kept of every M consecutive inputs).

    N:M is "N kept of M" everywhere in prunekit (REFERENCE §2); Wanda's code counts pruned weights
    instead, which is the same thing only for 2:4.
    """
    s = str(text).strip()
    if ":" in s:
        try:
            n, m = (int(p) for p in s.split(":"))
        except ValueError:
            raise PrunekitError(f"sparsity {s!r} is not N:M with integers; write e.g. --sparsity 2:4") from None
        if not (0 < n < m):
            raise PrunekitError(
                f"sparsity {s!r} needs 0 < N < M (N weights kept of every M); write e.g. --sparsity 2:4"
            )
        return Sparsity(fraction=1.0 - n / m, n=n, m=m)
    try:
        f = float(s)
    except ValueError:
        raise PrunekitError(f"sparsity {s!r} is neither a fraction nor N:M; write e.g. --sparsity 0.5 or 2:4") from None
    if not (0.0 <= f < 1.0):
        raise PrunekitError(f"sparsity {f} is outside [0, 1); give the fraction of weights to prune, e.g. 0.5")
    return Sparsity(fraction=f)


@dataclass
class ModelConfig:
    """Which model to load and how."""

    model: str = "smollm2-135m"  # hub id, local HF directory, .gguf file, or the alias smollm2-135m
    dtype: str = "float32"  # float32 | bfloat16 | float16
    trust_remote_code: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N; the model stays on CPU, one block at a time moves here

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise PrunekitError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")


@dataclass
class CalibConfig:
    """Calibration data: ``nsamples`` windows of ``seqlen`` tokens (SparseGPT's sampling)."""

    calib: str = "self"  # self | wikitext2 | ptb | c4 | path/to/file.txt|.jsonl
    nsamples: int = 32
    seqlen: int = 512
    seed: int = 0
    data_dir: str | None = None  # default: $PRUNEKIT_DATA_DIR
    gen_batch_size: int = 16  # batch size when the dense model writes its own calibration text
    cache_dir: str | None = None  # where self-generated text is cached; default: $PRUNEKIT_CACHE_DIR or ~/.cache/prunekit

    def validate(self) -> None:
        if self.nsamples < 1:
            raise PrunekitError(f"nsamples is {self.nsamples}; use at least 1 calibration window")
        if self.seqlen < 2:
            raise PrunekitError(f"seqlen is {self.seqlen}; calibration windows need at least 2 tokens")
        if self.gen_batch_size < 1:
            raise PrunekitError("gen-batch-size must be at least 1")


@dataclass
class SparsityConfig:
    """What to prune and with which criterion."""

    method: str = "wanda"  # magnitude | wanda | sparsegpt
    sparsity: str = "0.5"  # fraction pruned (unstructured) or N:M with N kept
    scope: str = "auto"  # comparison group for magnitude/wanda: row | layer; auto = each method's published choice
    blocksize: int = 128  # SparseGPT column block (Frantar & Alistarh 2023)
    percdamp: float = 0.01  # SparseGPT dampening, fraction of mean(diag H) (Frantar & Alistarh 2023)

    def validate(self) -> Sparsity:
        if self.method not in METHODS:
            raise PrunekitError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.scope not in SCOPES:
            raise PrunekitError(f"unknown scope {self.scope!r}; choose one of {', '.join(SCOPES)}")
        if self.blocksize < 1:
            raise PrunekitError("blocksize must be at least 1")
        if self.percdamp <= 0:
            raise PrunekitError(f"percdamp is {self.percdamp}; SparseGPT needs a positive dampening such as 0.01")
        return parse_sparsity(self.sparsity)

    def resolved_scope(self) -> str:
        """Magnitude compares weights per layer (the baseline in the Wanda and SparseGPT papers);
        Wanda compares per output row (Sun et al. 2023, §3)."""
        if self.scope != "auto":
            return self.scope
        return "layer" if self.method == "magnitude" else "row"


@dataclass
class PruneConfig:
    """Everything :func:`prunekit.prune` needs besides the model and tokenizer."""

    calib: CalibConfig = field(default_factory=CalibConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    batch_size: int = 8  # sequences per forward pass through a block
    device: str = "auto"

    def validate(self) -> Sparsity:
        self.calib.validate()
        if self.batch_size < 1:
            raise PrunekitError("batch-size must be at least 1")
        return self.sparsity.validate()


@dataclass
class EvalConfig:
    """Perplexity evaluation after pruning."""

    eval: str = "wikitext2"  # comma-separated corpora; "none" to skip
    eval_seqlen: int = 2048  # capped at the model's context length
    eval_windows: int = 16  # first K non-overlapping windows; 0 = the whole corpus (the papers' protocol)
    eval_batch_size: int = 4

    def datasets(self) -> list[str]:
        names = [d.strip() for d in self.eval.split(",") if d.strip()]
        return [] if names in ([], ["none"]) else names

    def validate(self) -> None:
        if self.eval_seqlen < 2:
            raise PrunekitError("eval-seqlen must be at least 2 tokens")
        if self.eval_windows < 0:
            raise PrunekitError("eval-windows must be 0 (all windows) or a positive count")
        if self.eval_batch_size < 1:
            raise PrunekitError("eval-batch-size must be at least 1")


@dataclass
class RunConfig:
    """A whole ``prunekit prune`` run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    out: str | None = None
    overwrite: bool = False  # replace an existing output directory

    def validate(self) -> Sparsity:
        self.model.validate()
        self.eval.validate()
        self.prune.device = self.model.device
        return self.prune.validate()


# ----------------------------------------------------------------------------- flat <-> nested


def leaf_fields(cfg: Any, prefix: tuple[str, ...] = ()) -> dict[str, tuple[tuple[str, ...], dataclasses.Field]]:
    """Map each leaf field name to its path inside the nested dataclass, e.g. ``nsamples -> (prune, calib)``."""
    out: dict[str, tuple[tuple[str, ...], dataclasses.Field]] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(leaf_fields(value, prefix + (f.name,)))
        elif f.name not in out:  # PruneConfig.device mirrors ModelConfig.device; the first one wins
            out[f.name] = (prefix, f)
    return out


def set_leaf(cfg: Any, name: str, value: Any) -> None:
    fields = leaf_fields(cfg)
    if name not in fields:
        raise PrunekitError(f"unknown setting {name!r}; see `prunekit prune --help` for the list")
    obj = cfg
    for part in fields[name][0]:
        obj = getattr(obj, part)
    setattr(obj, name, value)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def apply_mapping(cfg: Any, data: dict[str, Any]) -> None:
    """Apply a YAML mapping, nested by section (as ``config.yaml`` is written) or flat."""
    for key, value in data.items():
        key = key.replace("-", "_")
        sub = getattr(cfg, key, None)
        if dataclasses.is_dataclass(sub) and isinstance(value, dict):
            apply_mapping(sub, value)
        else:
            set_leaf(cfg, key, value)


def load_yaml(path: str | Path, cfg: Any) -> None:
    p = Path(path)
    if not p.is_file():
        raise PrunekitError(f"config file {p} does not exist; give an existing YAML file to --config")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise PrunekitError(f"config file {p} is not valid YAML ({str(e).splitlines()[0]}); fix the file") from None
    if not isinstance(data, dict):
        raise PrunekitError(f"config file {p} must hold a mapping of settings; see a run's config.yaml for the form")
    apply_mapping(cfg, data)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
