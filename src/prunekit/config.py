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
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import PrunekitError
from .losses import LOSSES
from .precision import check as check_precision

METHODS = ("magnitude", "wanda", "sparsegpt")
# auto | cpu | cuda | cuda:N | mps; anything else is a typo (`tpu9`), refused before the model loads
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def check_device(device: str) -> None:
    """Refuse a device name torch would not understand, before any work (availability is checked later)."""
    if not _DEVICE.fullmatch(str(device)):
        raise PrunekitError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
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
    allow_pickle: bool = False  # read pickle weights (pytorch_model.bin); pickle can run code, so only on request
    # auto | memory | stream: load the whole model into RAM, or read each block from a local safetensors
    # directory when it is needed and write it out when final (auto: stream when the model would not fit)
    weights: str = "auto"
    max_shard_size: str = "5GB"  # shard size of a model written while streaming

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise PrunekitError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.weights not in ("auto", "memory", "stream"):
            raise PrunekitError(f"unknown weights {self.weights!r}; choose auto, memory or stream")
        check_device(self.device)


@dataclass
class CalibConfig:
    """Calibration data: ``nsamples`` windows of ``seqlen`` tokens (SparseGPT's sampling).

    The defaults are the main job's, sized for its 10-minute budget on a 2-core CPU (writing the
    windows and reconstructing on them both scale with nsamples x seqlen). The papers use 128
    windows of 2048 tokens (SparseGPT, Wanda) or 256 of 1024 (Rethinking): pass them on a GPU.
    """

    calib: str = "self"  # self | wikitext2 | ptb | c4 | path/to/file.txt|.jsonl
    nsamples: int = 32
    seqlen: int = 256
    seed: int = 0
    data_dir: str | None = None  # default: $PRUNEKIT_DATA_DIR
    gen_batch_size: int = 32  # batch size when the dense model writes its own calibration text (larger is faster on CPU: decoding is skinny matmuls)
    cache_dir: str | None = None  # where self-generated text is cached; default: $PRUNEKIT_CACHE_DIR or ~/.cache/prunekit
    calib_mix: float = 0.0  # with a corpus in `calib`: this fraction of the windows is self-generated instead

    def validate(self) -> None:
        if not (0.0 <= self.calib_mix <= 1.0):
            raise PrunekitError(f"calib-mix {self.calib_mix} is outside [0, 1]; give the self-generated fraction")
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
    owl: bool = False  # non-uniform block sparsity from activation outliers (OWL, Yin et al. 2023)
    owl_m: float = 5.0  # OWL outlier threshold: scores above M x their block's mean (the paper's M)
    owl_lambda: float = 0.08  # OWL range: block sparsities within target +- lambda (the paper's lambda)

    def validate(self) -> Sparsity:
        if self.method not in METHODS:
            raise PrunekitError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.scope not in SCOPES:
            raise PrunekitError(f"unknown scope {self.scope!r}; choose one of {', '.join(SCOPES)}")
        if self.blocksize < 1:
            raise PrunekitError("blocksize must be at least 1")
        if self.percdamp <= 0:
            raise PrunekitError(f"percdamp is {self.percdamp}; SparseGPT needs a positive dampening such as 0.01")
        sp = parse_sparsity(self.sparsity)
        if self.owl:
            if sp.is_nm:
                raise PrunekitError("--owl needs unstructured sparsity (N:M fixes every row's share); drop --owl or use e.g. --sparsity 0.7")
            if self.owl_m <= 0:
                raise PrunekitError(f"owl-m is {self.owl_m}; the outlier threshold must be positive (the paper's 5)")
            if not (0 <= self.owl_lambda < min(sp.fraction, 1 - sp.fraction) or self.owl_lambda == 0):
                raise PrunekitError(
                    f"owl-lambda {self.owl_lambda} must be at least 0 and below {min(sp.fraction, 1 - sp.fraction):g} "
                    f"at sparsity {sp.fraction:g}, so every block's sparsity stays in [0, 1)"
                )
        return sp

    def resolved_scope(self) -> str:
        """Magnitude compares weights per layer (the baseline in the Wanda and SparseGPT papers);
        Wanda compares per output row (Sun et al. 2023, §3)."""
        if self.scope != "auto":
            return self.scope
        return "layer" if self.method == "magnitude" else "row"


GRANULARITIES = ("matrix", "attn-mlp", "block")
SOLVERS = ("adam", "lstsq")
INPUTS = ("sparse", "dense")
TARGETS = ("local", "global")
GUARDS = ("revert", "warn", "off")
OFFLOAD = ("auto", "device", "ram", "disk")  # where activation streams live (prunekit.streams)
PARALLEL = ("auto", "data", "block")  # under torchrun (prunekit.dist)
DP_BATCHES = ("global", "local")


def units_are_independent(inputs: str | None, targets: str | None, window: int | None, trains: bool) -> bool:
    """Units read the dense model's inputs and fit local targets, one block per window: no block's
    reconstruction changes another's data, so blocks can be reconstructed in any order, or on
    different ranks (block-parallel, prunekit.dist)."""
    return trains and inputs == "dense" and targets == "local" and window == 1

# The papers' configurations by name (REFERENCE §3). `None` leaves the field as it is.
PRESETS: dict[str, dict[str, Any]] = {
    # layer-wise baseline: masks (and SparseGPT's own update) only, no gradient step
    "lr": {"granularity": "block", "inputs": "sparse", "targets": "local", "window": 1, "stride": 1, "epochs": 0},
    # block-wise reconstruction (Rethinking paper, BR)
    "br": {"granularity": "block", "inputs": "sparse", "targets": "local", "window": 1, "stride": 1, "epochs": 10},
    # + global propagation: sparse inputs, the dense model's own activations as targets (BR+GP)
    "br-gp": {"granularity": "block", "inputs": "sparse", "targets": "global", "window": 1, "stride": 1, "epochs": 10},
    # + cross-block: windows of 2 blocks, stride 1 (BR+GP+CR)
    "br-gp-cr": {"granularity": "block", "inputs": "sparse", "targets": "global", "window": 2, "stride": 1, "epochs": 10},
    # attention and MLP parts reconstructed on their own, with global propagation
    "attn-mlp-gp": {"granularity": "attn-mlp", "inputs": "sparse", "targets": "global", "window": 1, "stride": 1, "epochs": 10},
    # Free Lunch paper default: attention/MLP units on the dense model's inputs (local = global there)
    "free-lunch": {"granularity": "attn-mlp", "inputs": "dense", "targets": "local", "window": 1, "stride": 1, "epochs": 10},
    # the main job's default on a CPU: BR+GP+CR (windows of 2 blocks, stride 1) with one epoch at
    # batch 1 and lr 1e-3. With ~30 windows that is ~30 Adam steps per unit instead of the paper's
    # 320; in the cpu-recon-v1 grid (28 steps per block) lr 1e-3 closed nearly twice the share of the
    # LR-to-dense gap that 2e-4 did, and in cpu-recon-v2 BR+GP+CR was the best preset for Wanda and
    # SparseGPT. The main job with it takes 7 min 20 s, with BR+GP 4 min 50 s (BENCHMARKS.md).
    "quick": {
        "granularity": "block", "inputs": "sparse", "targets": "global", "window": 2, "stride": 1, "epochs": 1,
        "lr": 1e-3, "recon_batch_size": 1,
    },
    # full retraining baseline (Free Lunch paper): masks chosen layer-wise exactly as "lr" does,
    # then the whole pruned model trained end to end on the calibration windows, masks fixed
    # (prunekit.retrain); --retrain-loss lm | kd, --lora-rank for the masked-LoRA (PEFT) setting
    "retrain": {"granularity": "block", "inputs": "sparse", "targets": "local", "window": 1, "stride": 1, "epochs": 1},
}
RETRAIN_LOSSES = ("lm", "kd")
DEFAULT_LR = 2e-4  # Rethinking paper, Appendix A


@dataclass
class ReconConfig:
    """Reconstruction of the kept weights after the masks are chosen (REFERENCE §3).

    The paper presets (br, br-gp, br-gp-cr, attn-mlp-gp) train as the Rethinking paper does
    (Appendix A): AdamW, lr 2e-4, betas (0.9, 0.95), no weight decay, linear decay to 0 without
    warm-up, batch 8, 10 epochs. The default preset, ``quick``, is BR+GP+CR at the main job's CPU
    budget: one epoch at batch 1 and lr 1e-3. Every non-mask parameter of the unit is trained (norm
    weights and biases too) unless ``train`` is ``linear``.
    """

    # preset (see PRESETS); the flags below override it. The default is the main job's: "quick" fits
    # its 10-minute CPU budget (7 min 20 s measured) and is the best preset that does: WikiText-2
    # 40.99, against 43.06 with BR+GP at one epoch and 46.97 with "lr" (BENCHMARKS.md).
    recon: str = "quick"
    granularity: str | None = None  # matrix | attn-mlp | block
    inputs: str | None = None  # sparse | dense: where a unit's inputs come from
    targets: str | None = None  # local | global: what a unit's outputs must match
    window: int | None = None  # blocks per window (unit = the window when > 1)
    stride: int | None = None  # blocks the window advances by
    recompute_masks: bool = True  # re-choose masks of a block seen in the previous window (Rethinking CR)
    epochs: int | None = None
    lr: float | None = None  # default: the preset's, else 2e-4 (Rethinking paper)
    recon_batch_size: int | None = None  # windows per gradient step; default: the preset's, else --batch-size
    solver: str = "adam"  # adam | lstsq (matrix granularity only: exact least squares with the mask fixed)
    train: str = "all"  # all (norms and biases too) | linear (linear weights only)
    lora_rank: int = 0  # > 0: train a masked LoRA of this rank instead of the weights, merged at the end
    lora_alpha: float = 32.0  # Free Lunch paper: r 16, alpha 32
    holdout: float = 0.1  # fraction of calibration windows held out to measure reconstruction error
    early_stop: bool = False  # stop a unit when its held-out error stops improving, keep its best weights
    patience: int = 1  # epochs without held-out improvement before stopping
    measure_error: bool | None = None  # record calibration/held-out error per unit; default: when training
    loss: str = "token-mse"  # mse | token-mse | cosine | kd (see prunekit.losses; issue 10)
    loss_skip: int = 0  # leave the first k positions of every window (attention sinks) out of the loss
    guard: str = "revert"  # revert | warn | off: end-to-end check against the masks-only (LR) weights
    retrain_loss: str = "lm"  # --recon retrain: lm (next-token loss) | kd (KL to the dense model through the LM head)
    gradient_checkpointing: bool = False  # --recon retrain: recompute each block's activations in the backward pass
    # --recon retrain: train end to end on this many fresh windows (sampled as the calibration windows
    # are, with another seed) instead of the calibration's training windows; 0: the calibration's.
    # Free Lunch (arXiv 2510.14444) compares retraining at 10x the data of local reconstruction: masks
    # and held-out windows stay the calibration's, so only the retraining data grows.
    retrain_nsamples: int = 0

    def resolved(self) -> "ReconConfig":
        """A copy with the preset's values filled in where no flag set them."""
        if self.recon not in PRESETS:
            raise PrunekitError(f"unknown reconstruction preset {self.recon!r}; choose one of {', '.join(PRESETS)}")
        out = dataclasses.replace(self)
        for key, value in PRESETS[self.recon].items():
            if getattr(out, key) is None:
                setattr(out, key, value)
        if out.lr is None:
            out.lr = DEFAULT_LR
        return out

    def validate(self) -> "ReconConfig":
        r = self.resolved()
        checks = [
            (r.granularity in GRANULARITIES, f"unknown granularity {r.granularity!r}; choose one of {', '.join(GRANULARITIES)}"),
            (r.inputs in INPUTS, f"unknown inputs {r.inputs!r}; choose sparse or dense"),
            (r.targets in TARGETS, f"unknown targets {r.targets!r}; choose local or global"),
            (r.solver in SOLVERS, f"unknown solver {r.solver!r}; choose adam or lstsq"),
            (r.train in ("all", "linear"), f"unknown train {r.train!r}; choose all or linear"),
            ((r.window or 0) >= 1 and (r.stride or 0) >= 1, "window and stride must be at least 1"),
            ((r.stride or 1) <= (r.window or 1), f"stride {r.stride} exceeds window {r.window}; blocks would be skipped"),
            (r.window == 1 or r.granularity == "block", "windows of several blocks need --granularity block"),
            (r.solver == "adam" or r.granularity == "matrix", "--solver lstsq needs --granularity matrix"),
            ((r.epochs or 0) >= 0, "epochs must be 0 or more"),
            (r.lr > 0, "lr must be positive"),
            (r.recon_batch_size is None or r.recon_batch_size >= 1, "recon-batch-size must be at least 1"),
            (0.0 <= r.holdout < 1.0, f"holdout {r.holdout} is outside [0, 1)"),
            (r.lora_rank >= 0, "lora-rank must be 0 (off) or positive"),
            (r.patience >= 1, "patience must be at least 1"),
            (r.loss in LOSSES, f"unknown loss {r.loss!r}; choose one of {', '.join(LOSSES)}"),
            (r.loss != "kd" or r.granularity != "matrix", "--loss kd reads hidden states through the LM head; use it with --granularity block or attn-mlp"),
            (r.loss_skip >= 0, "loss-skip must be 0 or more positions"),
            (r.guard in GUARDS, f"unknown guard {r.guard!r}; choose one of {', '.join(GUARDS)}"),
            (r.retrain_loss in RETRAIN_LOSSES, f"unknown retrain-loss {r.retrain_loss!r}; choose lm or kd"),
            (not r.retrains or (r.epochs or 0) >= 1, "--recon retrain needs --epochs 1 or more (0 would be --recon lr)"),
            (not r.retrains or r.solver == "adam", "--solver lstsq reconstructs single linears; --recon retrain trains with AdamW"),
            (not r.retrains or r.loss == "token-mse",
             f"--loss {r.loss} is the local reconstruction objective; with --recon retrain use --retrain-loss lm or kd"),
            (r.retrains or not r.gradient_checkpointing, "--gradient-checkpointing applies to --recon retrain only"),
            (r.retrain_nsamples >= 0, "retrain-nsamples must be 0 (the calibration windows) or positive"),
            (r.retrains or not r.retrain_nsamples, "--retrain-nsamples applies to --recon retrain only"),
        ]
        for ok, message in checks:
            if not ok:
                raise PrunekitError(message)
        return r

    @property
    def retrains(self) -> bool:
        """The whole model is trained end to end after the layer-wise pass (prunekit.retrain)."""
        return self.recon == "retrain"

    @property
    def trains(self) -> bool:
        """Units are trained locally, window by window (with ``retrain``, ``epochs`` is the end-to-end training's)."""
        return (bool(self.epochs) and not self.retrains) or self.solver == "lstsq"

    @property
    def independent_units(self) -> bool:
        """See :func:`units_are_independent` (on resolved settings)."""
        return units_are_independent(self.inputs, self.targets, self.window, self.trains)

    @property
    def measures(self) -> bool:
        return self.trains if self.measure_error is None else self.measure_error


@dataclass
class PruneConfig:
    """Everything :func:`prunekit.prune` needs besides the model and tokenizer."""

    calib: CalibConfig = field(default_factory=CalibConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    recon: ReconConfig = field(default_factory=ReconConfig)
    batch_size: int = 8  # sequences per forward pass, and per gradient step unless the preset or --recon-batch-size sets one (Rethinking paper: 8)
    device: str = "auto"
    offload: str = "auto"  # activation streams: device (GPU memory) | ram | disk (memory-mapped) | auto (see streams.py)
    offload_dir: str | None = None  # where memory-mapped streams go (default: the system temp dir)
    checkpoint_every: float = 10.0  # the streams are checkpointed when a resume would replay them this many minutes (0: every window); finished blocks at once
    # forward/backward passes of blocks and units: auto | fp32 | tf32 | bf16 (prunekit.precision);
    # auto = bf16 on a CUDA GPU that supports it, fp32 on a CPU (where tf32 is fp32 too)
    precision: str = "auto"
    # activation streams (and a unit's inputs/targets) stored as: float32 | bfloat16 (half the
    # memory and I/O); float32 keeps the model's own dtype, as before this setting
    stream_dtype: str = "float32"
    # several processes (torchrun; prunekit.dist): auto | data | block. auto = block-parallel where
    # units are independent (dense inputs, local targets, one block per window), else data-parallel
    parallel: str = "auto"
    dist_timeout: float = 30.0  # minutes a collective may wait for the other ranks before the job ends
    # data-parallel gradient steps: global = the single-process run's batches (same result up to the
    # order of sums; a step waits for the rank that holds most of its windows) | local = each rank an
    # even share of every step from its own windows (balanced; batches as another shuffle would draw)
    dp_batches: str = "global"

    def validate(self) -> Sparsity:
        self.calib.validate()
        self.recon.validate()
        check_precision(self.precision, self.stream_dtype)
        if self.batch_size < 1:
            raise PrunekitError("batch-size must be at least 1")
        if self.offload not in OFFLOAD:
            raise PrunekitError(f"unknown offload {self.offload!r}; choose auto, device, ram or disk")
        if not self.checkpoint_every >= 0:
            raise PrunekitError(f"--checkpoint-every must be 0 or more minutes, not {self.checkpoint_every}")
        if self.parallel not in PARALLEL:
            raise PrunekitError(f"unknown --parallel {self.parallel!r}; choose auto, data or block")
        if self.dp_batches not in DP_BATCHES:
            raise PrunekitError(f"unknown --dp-batches {self.dp_batches!r}; choose global or local")
        if not self.dist_timeout > 0:
            raise PrunekitError(f"--dist-timeout must be a positive number of minutes, not {self.dist_timeout}")
        return self.sparsity.validate()


@dataclass
class EvalConfig:
    """Perplexity evaluation after pruning."""

    eval: str = "wikitext2"  # comma-separated corpora; "none" to skip
    eval_seqlen: int = 2048  # capped at the model's context length
    eval_windows: int = 16  # first K non-overlapping windows; 0 = the whole corpus (the papers' protocol)
    eval_batch_size: int = 4
    eval_tasks: str = ""  # zero-shot tasks, comma-separated (e.g. boolq,rte,hellaswag or `paper`); "" = none
    eval_limit: int = 0  # first N items of each zero-shot task; 0 = all
    backend: str = "prunekit"  # zero-shot scorer: prunekit | lm-eval (lm-evaluation-harness, when installed)
    eval_walk: str = "auto"  # auto | whole | blocks: the whole model on the device, or one block at a time (prunekit.blockwalk)

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
        if self.eval_limit < 0:
            raise PrunekitError("limit must be 0 (all items) or a positive count")
        if self.backend not in ("prunekit", "lm-eval"):
            raise PrunekitError(f"unknown backend {self.backend!r}; choose prunekit or lm-eval")
        if self.eval_walk not in ("auto", "whole", "blocks"):
            raise PrunekitError(f"unknown eval-walk {self.eval_walk!r}; choose auto, whole or blocks")
        if self.eval_walk == "blocks" and self.backend == "lm-eval" and self.eval_tasks:
            raise PrunekitError("--eval-walk blocks needs --backend prunekit (lm-eval runs the whole model on the device)")
        if self.eval_tasks:
            from .zeroshot import parse_tasks

            parse_tasks(self.eval_tasks)


@dataclass
class RunConfig:
    """A whole ``prunekit prune`` run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    out: str | None = None
    overwrite: bool = False  # replace an existing output directory

    def validate(self) -> Sparsity:
        """Check everything a run needs before any work.

        ``--device`` is one setting kept in two places: ``model.device`` (the flag and the CLI's
        source of truth) and ``prune.device`` (what :func:`prunekit.prune` reads). A value set in
        only one of them (a YAML ``prune: {device: cuda}``) is copied to the other; when both are
        set, ``model.device`` wins.
        """
        if self.model.device == "auto" and self.prune.device != "auto":
            self.model.device = self.prune.device
        self.prune.device = self.model.device
        self.model.validate()
        self.eval.validate()
        check_eval_names(self.eval.datasets())
        if self.prune.recon.recon == "retrain" and self.model.weights == "stream":
            raise PrunekitError("--recon retrain trains the whole model at once and needs it in memory; use --weights memory (or auto)")
        recon = self.prune.recon.resolved() if self.prune.recon.recon in PRESETS else None
        if recon is not None and self.prune.recon.recon == "lr" and recon.trains:
            what = f"--epochs {recon.epochs}" if recon.epochs else "--solver lstsq"
            raise PrunekitError(
                f"--recon lr means no reconstruction, but {what} asks for training; "
                f"choose a reconstruction preset instead (e.g. --recon br {what})"
            )
        return self.prune.validate()


def check_eval_names(names: list[str]) -> None:
    """A misspelt corpus (``wikitext3``) is an error before the model loads, not a silent fallback."""
    from .data import CORPORA

    for name in names:
        if name not in CORPORA and Path(name).suffix not in (".txt", ".jsonl"):
            raise PrunekitError(
                f"unknown evaluation corpus {name!r}; use one of {', '.join(CORPORA)}, none, "
                "or a path to a .txt or .jsonl file"
            )
        if name not in CORPORA and not Path(name).expanduser().is_file():
            raise PrunekitError(f"evaluation file {name} does not exist; give an existing .txt or .jsonl file to --eval")


def recon_label(settings: dict[str, Any]) -> str:
    """The name of the reconstruction a run did, from its resolved settings.

    The preset's name when every value the preset fixes still holds; otherwise the name followed by
    what was overridden (``br (epochs 3, targets global)``), so that a label never claims a preset
    whose meaning a flag changed.
    """
    name = settings.get("recon", "lr")
    preset = PRESETS.get(name, {})
    changed = [f"{k.replace('_', '-')} {settings[k]}" for k, v in preset.items() if k in settings and settings[k] != v]
    if name in PRESETS and "lr" not in preset and settings.get("lr") not in (None, DEFAULT_LR):
        changed.append(f"lr {settings['lr']}")
    if settings.get("solver", "adam") != "adam":
        changed.append(f"solver {settings['solver']}")
    if name == "retrain":  # what the end-to-end training optimised, and which parameters
        changed += [f"{settings.get('retrain_loss', 'lm')}"] + ([f"lora-rank {settings['lora_rank']}"] if settings.get("lora_rank") else [])
    return f"{name} ({', '.join(changed)})" if changed else str(name)


# ----------------------------------------------------------------------------- flat <-> nested


def leaf_fields(cfg: Any, prefix: tuple[str, ...] = ()) -> dict[str, tuple[tuple[str, ...], dataclasses.Field]]:
    """Map each leaf field name to its path inside the nested dataclass, e.g. ``nsamples -> (prune, calib)``."""
    out: dict[str, tuple[tuple[str, ...], dataclasses.Field]] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            for name, leaf in leaf_fields(value, prefix + (f.name,)).items():
                out.setdefault(name, leaf)  # PruneConfig.device mirrors ModelConfig.device; the first one wins
        elif f.name not in out:
            out[f.name] = (prefix, f)
    return out


def scalar_type(f: dataclasses.Field) -> type:
    """The scalar type of a leaf field (``float | None`` -> float); annotations are strings here."""
    kind = str(f.type)
    for typ in (bool, int, float):
        if kind.startswith(typ.__name__):
            return typ
    return str


def _describe(typ: type) -> str:
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a text value"}[typ]


def coerce(name: str, f: dataclasses.Field, value: Any) -> Any:
    """``value`` as the type of field ``f``, or a one-line error naming the setting and the type it needs.

    YAML gives any type (``nsamples: 4.7``, ``null``, ``[4]``); refusing them here, at load, means
    no run fails with a TypeError after minutes of loading. Numbers written as text (YAML reads
    ``1e-3`` as a string) are parsed; whole floats (``8.0``) are accepted for integers.
    """
    typ = scalar_type(f)
    optional = "None" in str(f.type)
    if value is None:
        if optional:
            return None
        raise PrunekitError(f"setting {name} needs {_describe(typ)}, not null; give a value or leave it out")
    bad = PrunekitError(f"setting {name} needs {_describe(typ)}, not {value!r}; fix the value")
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise bad
    if isinstance(value, bool) and typ is str:
        raise PrunekitError(
            f"setting {name} needs a text value, not {value!r} (YAML reads yes/no/on/off as true/false); quote it, e.g. '{'on' if value else 'off'}'"
        )
    if isinstance(value, bool) or isinstance(value, (list, dict, tuple, set)):
        raise bad
    if typ is str:
        if isinstance(value, (str, int, float)):
            return str(value)  # `sparsity: 0.5` or `eval: c4` read as numbers/text alike
        raise bad
    if isinstance(value, str):
        try:
            value = float(value) if typ is float else int(value)
        except ValueError:
            try:
                value = float(value)
            except ValueError:
                raise bad from None
    if typ is int:
        if isinstance(value, float):
            if not (math.isfinite(value) and value.is_integer()):
                raise bad
            return int(value)
        if isinstance(value, int):
            return value
        raise bad
    if isinstance(value, (int, float)):
        return float(value)
    raise bad


def set_leaf(cfg: Any, name: str, value: Any) -> None:
    fields = leaf_fields(cfg)
    if name not in fields:
        raise PrunekitError(f"unknown setting {name!r}; see `prunekit prune --help` for the list")
    value = coerce(name, fields[name][1], value)
    obj = cfg
    for part in fields[name][0]:
        obj = getattr(obj, part)
    setattr(obj, name, value)


def get_leaf(cfg: Any, name: str) -> Any:
    """The value of leaf setting ``name`` (the inverse of :func:`set_leaf`)."""
    fields = leaf_fields(cfg)
    obj = cfg
    for part in fields[name][0]:
        obj = getattr(obj, part)
    return getattr(obj, name)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def apply_mapping(cfg: Any, data: dict[str, Any]) -> set[str]:
    """Apply a YAML mapping, nested by section (as ``config.yaml`` is written) or flat; return the names set."""
    names: set[str] = set()
    for key, value in data.items():
        key = str(key).replace("-", "_")
        sub = getattr(cfg, key, None)
        if dataclasses.is_dataclass(sub):
            if not isinstance(value, dict):
                raise PrunekitError(
                    f"section {key!r} must be a mapping of settings (e.g. `{key}: {{name: value}}`), not {value!r}"
                )
            names |= apply_mapping(sub, value)
        else:
            set_leaf(cfg, key, value)
            names.add(key)
    return names


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads an unquoted ``2:4`` as the base-60 integer 124; here ``N:M`` stays text."""


_Loader.yaml_implicit_resolvers = {
    first: [("tag:yaml.org,2002:str", re.compile(r"^[0-9]+:[0-9]+$"))] + list(resolvers)
    if first in "0123456789" else list(resolvers)
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load_yaml(path: str | Path, cfg: Any) -> set[str]:
    """Apply the YAML file at ``path`` to ``cfg`` (every value type-checked); return the names it set."""
    p = Path(path)
    if not p.is_file():
        raise PrunekitError(f"config file {p} does not exist; give an existing YAML file to --config")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_Loader) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise PrunekitError(f"config file {p} is not valid YAML ({str(e).splitlines()[0]}); fix the file") from None
    if not isinstance(data, dict):
        raise PrunekitError(f"config file {p} must hold a mapping of settings; see a run's config.yaml for the form")
    try:
        return apply_mapping(cfg, data)
    except PrunekitError as e:
        raise PrunekitError(f"{p}: {e}") from None


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
