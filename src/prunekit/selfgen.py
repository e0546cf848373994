"""Self-generated calibration text: the dense model writes its own calibration data.

The recipe is the Rethinking paper's (REFERENCE §5): start from a uniformly random token id,
continue greedily for 4 tokens, keep the start only if it reads as English (else draw again), then
sample with the model's default generation settings up to the sequence length. Each window here is
generated to exactly ``seqlen`` tokens (the end-of-text token is suppressed until then) so that no
padding enters the calibration batches; the paper instead generated longer texts and cut windows.

Generated windows are cached on disk under a key made of everything that determines them (model
identity, count, length, seed, the recipe's version) and reused by later runs with the same settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import PrunekitError
from .hostmem import park

log = logging.getLogger(__name__)

CACHE_ENV = "PRUNEKIT_CACHE_DIR"
RECIPE_VERSION = 1
GREEDY_PREFIX = 4  # greedy tokens after the random start (REFERENCE §5)
_ENGLISH = re.compile(r"^[A-Za-z0-9 ,.;:!?'\"()\-\n]*[A-Za-z]{2}[A-Za-z0-9 ,.;:!?'\"()\-\n]*$")


def cache_root(setting: str | None = None) -> Path:
    value = setting or os.environ.get(CACHE_ENV)
    return Path(value).expanduser() if value else Path.home() / ".cache" / "prunekit"


def is_english(text: str) -> bool:
    """ASCII letters, digits and ordinary punctuation only, with at least one two-letter run."""
    return bool(_ENGLISH.match(text))


def model_fingerprint(model: nn.Module) -> str:
    """Identity of the model's weights and config, cheap enough to compute on every run."""
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name, p in list(model.named_parameters())[:4] + list(model.named_parameters())[-2:]:
        h.update(name.encode())
        h.update(p.detach().float().flatten()[:4096].numpy().tobytes())
    return h.hexdigest()[:16]


def _random_starts(model: nn.Module, tokenizer, count: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """``count`` English-looking starts of 1 random + 4 greedy tokens, drawn in batches."""
    vocab = model.get_input_embeddings().weight.shape[0]
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    starts: list[torch.Tensor] = []
    tries = 0
    while len(starts) < count:
        tries += 1
        if tries > 200:
            raise PrunekitError(
                "could not draw English-looking starts for self-generated calibration text with this tokenizer; "
                "calibrate on a corpus instead (e.g. --calib c4) or give a .txt/.jsonl file to --calib"
            )
        first = torch.randint(0, vocab, (max(64, 2 * (count - len(starts))), 1), generator=gen)
        keep = torch.tensor([int(t) not in special for t in first[:, 0]], dtype=torch.bool)
        first = first[keep].to(device)
        seq = first
        for _ in range(GREEDY_PREFIX):
            logits = model(input_ids=seq, use_cache=False).logits[:, -1, :]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
        for row in seq.cpu():
            if len(starts) < count and is_english(tokenizer.decode(row)):
                starts.append(row)
    return torch.stack(starts)


@torch.no_grad()
def generate_windows(
    model: nn.Module,
    tokenizer,
    nsamples: int,
    seqlen: int,
    seed: int,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Generate ``[nsamples, seqlen]`` token windows with the dense model (not cached on disk)."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    model.to(device)
    try:
        starts = _random_starts(model, tokenizer, nsamples, gen, device)
        new = seqlen - starts.shape[1]
        out = []
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        for b in tqdm(range(0, nsamples, batch_size), desc="self-generating calibration", unit="batch"):
            torch.manual_seed(seed * 1_000_003 + b)  # sampling draws from the global generator
            chunk = starts[b : b + batch_size].to(device)
            if new <= 0:
                out.append(chunk[:, :seqlen].cpu())
                continue
            seqs = model.generate(
                input_ids=chunk,
                attention_mask=torch.ones_like(chunk),
                do_sample=True,
                max_new_tokens=new,
                min_new_tokens=new,
                pad_token_id=pad,
                use_cache=True,
            )
            out.append(seqs[:, :seqlen].cpu())
    finally:
        park(model)
    return torch.cat(out)


def self_calibration(
    model: nn.Module,
    tokenizer,
    nsamples: int,
    seqlen: int,
    seed: int,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    cache_dir: str | None = None,
) -> torch.Tensor:
    """Self-generated calibration windows, from the cache when the same settings made them before."""
    key = {
        "model": model_fingerprint(model),
        "nsamples": nsamples,
        "seqlen": seqlen,
        "seed": seed,
        "batch_size": batch_size,  # the sampling seed is set per batch, so batching changes the text
        "recipe": RECIPE_VERSION,
        "dtype": str(next(model.parameters()).dtype),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = cache_root(cache_dir) / "selfgen" / f"{digest}.pt"
    if path.is_file():
        try:
            saved = torch.load(path, weights_only=True)
            if saved["key"] == key:
                log.info("self-generated calibration: reusing %s", path)
                return saved["input_ids"]
        except Exception:  # a damaged cache file is regenerated
            log.warning("ignoring unreadable cache file %s", path)
    ids = generate_windows(model, tokenizer, nsamples, seqlen, seed, batch_size, device)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"key": key, "input_ids": ids}, tmp)
        os.replace(tmp, path)
        log.info("self-generated calibration cached at %s", path)
    except OSError as e:
        log.warning("could not cache self-generated calibration (%s); it will be generated again next time", e)
    return ids
