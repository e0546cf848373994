"""Corpora and token windows.

Corpora are looked up by name in a data directory (``--data-dir`` or ``$PRUNEKIT_DATA_DIR``), laid
out as ``../shared/data`` is; a missing file falls back to the Hugging Face ``datasets`` hub (a
real path for users; tests never take it). Any local ``.txt`` or ``.jsonl`` (``{"text": ...}`` per
line) file works too.

Calibration windows are drawn exactly as SparseGPT and Wanda draw them, so a seed gives the same
windows as their scripts: ``random.seed(seed)``, then per window pick a document with
``random.randint(0, n_docs - 1)``, tokenize it, skip it unless it has more than ``seqlen`` tokens,
and take ``random.randint(0, n_tokens - seqlen - 1)`` as the start.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import PrunekitError

log = logging.getLogger(__name__)

DATA_ENV = "PRUNEKIT_DATA_DIR"


@dataclass(frozen=True)
class Corpus:
    """A named corpus: its file under the data directory and how the papers join it into text."""

    name: str
    file: str
    hub: tuple[str, ...]  # load_dataset arguments for the fallback
    split: str


CORPORA = {
    "wikitext2": Corpus("wikitext2", "wikitext2/wiki.test.raw", ("wikitext", "wikitext-2-raw-v1"), "test"),
    "ptb": Corpus("ptb", "ptb/ptb.test.txt", ("ptb_text_only", "penn_treebank"), "test"),
    "c4": Corpus(
        "c4",
        "c4/c4-train.00000-of-01024.first1000.jsonl",
        ("allenai/c4",),
        "train",
    ),
}


def data_dir(setting: str | None = None) -> Path | None:
    value = setting or os.environ.get(DATA_ENV)
    return Path(value).expanduser() if value else None


def _wikitext_rows(raw: str) -> list[str]:
    """Rows of the HF ``wikitext-2-raw-v1`` test split from the raw file: a blank line (one space)
    is the row ``""``, any other line is ``line + "\\n"`` (see the data README)."""
    lines = raw.split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    return ["" if line.strip() == "" else line + "\n" for line in lines]


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    with path.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise PrunekitError(f"{path} line {i + 1} is not JSON; give one JSON object per line") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise PrunekitError(f'{path} line {i + 1} has no "text" string; each line needs {{"text": ...}}')
            docs.append(row["text"])
    return docs


def _from_hub(corpus: Corpus, root: Path | None = None) -> list[str]:
    where = "is not in the data directory" if root is not None else "needs a data directory (none is set)"
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise PrunekitError(
            f"corpus {corpus.name!r} {where} and the `datasets` package is missing; "
            f"set --data-dir (or ${DATA_ENV}) to a folder holding {corpus.file}"
        ) from None
    try:
        if corpus.name == "c4":
            ds = datasets.load_dataset(
                "allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train"
            )
        else:
            ds = datasets.load_dataset(*corpus.hub, split=corpus.split)
    except Exception as e:  # network errors come in many types
        raise PrunekitError(
            f"corpus {corpus.name!r} {where} and the hub failed ({type(e).__name__}); "
            f"set --data-dir (or ${DATA_ENV}) to a folder holding {corpus.file}"
        ) from None
    column = "sentence" if corpus.name == "ptb" else "text"
    return list(ds[column])


def documents(name: str, data_dir_setting: str | None = None) -> list[str]:
    """The documents of a corpus, for calibration sampling.

    WikiText-2 and PTB are one running text each (SparseGPT samples windows from the joined stream),
    so they come back as a single document; C4 and ``.jsonl`` files are lists of documents.
    """
    if name in CORPORA:
        corpus = CORPORA[name]
        root = data_dir(data_dir_setting)
        path = root / corpus.file if root else None
        if path is not None and path.is_file():
            if name == "c4":
                return _read_jsonl(path)
            raw = path.read_text(encoding="utf-8")
            if name == "wikitext2":
                return ["\n\n".join(_wikitext_rows(raw))]
            return [" ".join(line.strip() for line in raw.split("\n") if line.strip())]
        if root is None:
            log.info("no data directory is set (--data-dir or $%s); trying the Hugging Face hub for %s", DATA_ENV, name)
        else:
            log.info("%s not found under %s; trying the Hugging Face hub", corpus.file, root)
        rows = _from_hub(corpus, root)
        if name == "c4":
            return rows
        return ["\n\n".join(rows)] if name == "wikitext2" else [" ".join(rows)]
    path = Path(name).expanduser()
    if path.suffix in (".txt", ".jsonl"):
        if not path.is_file():
            raise PrunekitError(f"data file {path} does not exist; give an existing .txt or .jsonl file")
        if path.suffix == ".jsonl":
            docs = _read_jsonl(path)
        else:
            docs = [path.read_text(encoding="utf-8")]
        if not any(d.strip() for d in docs):
            raise PrunekitError(f"data file {path} holds no text")
        return docs
    raise PrunekitError(
        f"unknown corpus {name!r}; use one of {', '.join(CORPORA)}, self, or a path to a .txt or .jsonl file"
    )


def eval_text(name: str, data_dir_setting: str | None = None) -> str:
    """The evaluation text of a corpus, joined as the papers join it (C4: documents joined with spaces)."""
    docs = documents(name, data_dir_setting)
    return docs[0] if len(docs) == 1 else " ".join(docs)


def sample_windows(docs: list[str], tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens, SparseGPT's way; returns ``[nsamples, seqlen]``.

    For a single running text no document is drawn, as in SparseGPT's WikiText-2/PTB loaders.
    """
    random.seed(seed)
    cache: dict[int, list[int]] = {}
    out = []
    longest = 0
    attempts = 0
    while len(out) < nsamples:
        # one running text (WikiText-2, PTB): SparseGPT draws only the window start
        i = 0 if len(docs) == 1 else random.randint(0, len(docs) - 1)
        if i not in cache:
            cache[i] = tokenizer(docs[i])["input_ids"]
        ids = cache[i]
        longest = max(longest, len(ids))
        attempts += 1
        if len(ids) <= seqlen:
            if attempts > 1000 and longest <= seqlen:
                raise PrunekitError(
                    f"no document of the calibration corpus has more than {seqlen} tokens; lower --seqlen"
                )
            continue
        start = random.randint(0, len(ids) - seqlen - 1)
        out.append(ids[start : start + seqlen])
    return torch.tensor(out, dtype=torch.long)


def eval_windows(ids: list[int] | torch.Tensor, seqlen: int, limit: int = 0) -> torch.Tensor:
    """Non-overlapping windows of ``seqlen`` tokens over a token stream (the tail is dropped)."""
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    n = ids.numel() // seqlen
    if n == 0:
        raise PrunekitError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    if limit:
        n = min(n, limit)
    return ids[: n * seqlen].view(n, seqlen)
