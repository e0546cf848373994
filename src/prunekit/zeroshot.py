"""Zero-shot multiple-choice evaluation, scored the way lm-evaluation-harness scores it.

The pruning papers (SparseGPT, Wanda and their successors) report zero-shot accuracy from
EleutherAI's lm-evaluation-harness. This module reproduces the harness's ``multiple_choice`` and
``loglikelihood`` scoring on the task files of the data directory (``<data-dir>/zeroshot/*.jsonl``,
see ``../shared/data/README.md``), without depending on the harness.

Prompt formats
--------------
Every task turns an item into one *context* per choice and one *continuation* per choice; the
continuation is what gets scored. The formats are the harness's task configs (``lm_eval/tasks/...``);
where a data file already holds a ``query`` the query is completed to the harness's text.

============== ======================= ====================================================== ======================================= ================
task           file                    context                                                continuation(s)                         metrics
============== ======================= ====================================================== ======================================= ================
boolq          boolq.jsonl             ``{passage}\\nQuestion: {question}?\\nAnswer:``           ``" no"``, ``" yes"``                   acc
rte            rte.jsonl               ``{premise}\\nQuestion: {hypothesis} True or False?``    ``" True"`` (entailment), ``" False"``  acc
                                       ``\\nAnswer:``
hellaswag      hellaswag_val1000.jsonl ``pre({activity_label}: {ctx_a} {ctx_b.capitalize()})``  ``" " + pre(ending)`` for each ending   acc, acc_norm
winogrande     winogrande.jsonl        ``{sentence before the blank}{option}`` (one per         ``" " + {sentence after the blank}``    acc
                                       option: the file's ``context_options``)                (shared by both options)
arc_easy       arc_easy.jsonl          ``Question: {question}\\nAnswer:``                        ``" " + choice``                        acc, acc_norm
arc_challenge  arc_challenge.jsonl     ``Question: {question}\\nAnswer:``                        ``" " + choice``                        acc, acc_norm
openbookqa     openbook_qa.jsonl       ``{question_stem}``                                      ``" " + choice``                        acc, acc_norm
piqa           piqa.jsonl              ``Question: {goal}\\nAnswer:``                            ``" " + solution``                      acc, acc_norm
lambada        lambada_openai.jsonl    ``{text without its last word}``                         ``" " + last word``                     acc, ppl
============== ======================= ====================================================== ======================================= ================

``pre`` is the harness's HellaSwag clean-up (``lm_eval/tasks/hellaswag/utils.py``): strip, turn
``" [title]"`` into ``". "``, drop ``[...]`` bracket text (``\\[.*?\\]``), collapse double spaces.
The ``" "`` in front of each continuation is the harness's default ``target_delimiter``.

How the files map onto those prompts (the files come as ``{query, choices, gold}``; see
:func:`_completed_query`): BoolQ's ``query`` is ``"Passage: {passage}\\nQuestion: {question}?"``,
so the ``"Passage: "`` label is dropped and ``"\\nAnswer:"`` appended; ARC's is
``"Question: {question}"`` and PIQA's ``"Question: {goal}\\n"``, both completed with ``"\\nAnswer:"``;
OpenBookQA's is the bare question stem, used as it is. A choice that already starts with a space
is not given a second one.

Scoring
-------
* Log-likelihood of a continuation = sum over its tokens of ``log p(token | everything before)``.
  Tokenization follows the harness's ``HFLM._encode_pair``: trailing whitespace of the context
  moves onto the continuation, then ``context`` and ``context + continuation`` are encoded and the
  continuation's tokens are the tail of the second beyond the length of the first. Encoding uses
  ``add_special_tokens=False`` (the harness's default for causal models); Gemma models get their BOS
  token in front, as the harness forces ``add_bos_token`` for them (Gemma degrades badly without
  it). An empty context is replaced by the BOS (else EOS) token.
* ``acc``: the choice with the highest log-likelihood is the prediction (first one on ties).
* ``acc_norm``: the highest log-likelihood divided by the length of the choice text, where the
  length is ``len(choice)`` of the choice *without* the delimiter space: that is what the harness's
  ``ConfigurableTask.process_results`` divides by (``completion_len = [len(i) for i in choices]``).
  For ASCII text that is the choice's length in bytes; the harness counts characters, so we do too.
  Reported only where the harness reports it (hellaswag, arc_easy, arc_challenge, openbookqa, piqa).
* WinoGrande is *partial* scoring: each option gives its own context and the shared remainder of
  the sentence is scored, so only the continuation's likelihood counts; acc only.
* LAMBADA (OpenAI): ``acc`` is 1 when every continuation token is the model's greedy argmax;
  ``ppl = exp(-sum(loglik) / n_items)`` (the harness's ``perplexity`` aggregation).
* Standard error of an accuracy ``p`` over ``n`` items: ``sqrt(p (1 - p) / (n - 1))``, which is the
  harness's ``mean_stderr`` (sample standard deviation over ``sqrt(n)``) for 0/1 scores.
* Requests are sorted longest first (by total token count, then token ids: the harness's
  ``Collator`` order), batched, right-padded with an attention mask, and left-truncated to the
  model's context: the model sees ``(context + continuation)[-(max_len + 1):][:-1]``.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import blockwalk
from .blockwalk import Batch, WeightSource, choose_walk
from .data import DATA_ENV, data_dir as resolve_data_dir
from .errors import PrunekitError
from .families import Readout
from .models import context_length

log = logging.getLogger(__name__)

TASKS: tuple[str, ...] = (
    "boolq",
    "rte",
    "hellaswag",
    "winogrande",
    "arc_easy",
    "arc_challenge",
    "openbookqa",
    "piqa",
    "lambada",
)
# The seven tasks of the SparseGPT / Wanda zero-shot tables.
PAPER_TASKS: tuple[str, ...] = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")

TASK_FILES: dict[str, str] = {
    "boolq": "boolq.jsonl",
    "rte": "rte.jsonl",
    "hellaswag": "hellaswag_val1000.jsonl",
    "winogrande": "winogrande.jsonl",
    "arc_easy": "arc_easy.jsonl",
    "arc_challenge": "arc_challenge.jsonl",
    "openbookqa": "openbook_qa.jsonl",
    "piqa": "piqa.jsonl",
    "lambada": "lambada_openai.jsonl",
}
# Tasks whose harness config lists acc_norm next to acc.
NORM_TASKS = frozenset({"hellaswag", "arc_easy", "arc_challenge", "openbookqa", "piqa"})

_DELIM = " "  # the harness's default target_delimiter


@dataclass
class Doc:
    """One item: a context and a continuation per choice (the continuation is what is scored).

    ``norm_lengths`` are the acc_norm divisors (length of each choice text without the delimiter).
    """

    contexts: list[str]
    continuations: list[str]
    gold: int
    norm_lengths: list[int] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# Task list


def parse_tasks(text: str) -> list[str]:
    """Validate a comma-separated task list (``"boolq,rte"``); ``all`` and ``paper`` name groups.

    Returns the task names in the order given, without duplicates.
    """
    names = [t.strip().lower() for t in (text or "").split(",") if t.strip()]
    if not names:
        raise PrunekitError(f"no zero-shot task given; name some of {', '.join(TASKS)} (or all, paper)")
    out: list[str] = []
    for name in names:
        group = TASKS if name == "all" else PAPER_TASKS if name == "paper" else (name,)
        for task in group:
            if task not in TASK_FILES:
                raise PrunekitError(
                    f"unknown zero-shot task {name!r}; choose from {', '.join(TASKS)} (or all, paper)"
                )
            if task not in out:
                out.append(task)
    return out


# --------------------------------------------------------------------------------------------------
# Prompt formats


def hellaswag_preprocess(text: str) -> str:
    """The harness's HellaSwag clean-up (WikiHow ``[title]``/``[step]`` artifacts, double spaces)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _with_delim(choice: str) -> str:
    return choice if choice.startswith(_DELIM) else _DELIM + choice


def _choice_doc(context: str, choices: list[str], gold: int, prepared: bool = True) -> Doc:
    """One context, one continuation per choice.

    The harness always puts the delimiter between context and choice. Choices of the prepared
    ``{query, choices}`` files get it only if they do not already start with a space
    (``prepared=True``); choices the harness's own preprocessing produced (HellaSwag, RTE) get it
    unconditionally, as the harness does.
    """
    if prepared:
        choices = [c[len(_DELIM) :] if c.startswith(_DELIM) else c for c in choices]
    return Doc(
        contexts=[context] * len(choices),
        continuations=[_DELIM + c for c in choices],
        gold=gold,
        norm_lengths=[len(c) for c in choices],
    )


def rte_doc(row: dict) -> Doc:
    """SuperGLUE RTE: ``{premise}\\nQuestion: {hypothesis} True or False?\\nAnswer:`` -> " True"/" False"."""
    label = row["label"]
    gold = {"entailment": 0, "not_entailment": 1}.get(label, label) if isinstance(label, str) else int(label)
    if gold not in (0, 1):
        raise ValueError(f"RTE label {label!r} is neither entailment nor not_entailment")
    context = f"{row['premise']}\nQuestion: {row['hypothesis']} True or False?\nAnswer:"
    return _choice_doc(context, ["True", "False"], gold, prepared=False)


def hellaswag_doc(row: dict) -> Doc:
    """HellaSwag in its original schema, preprocessed as the harness's ``process_docs`` does."""
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    query = hellaswag_preprocess(row["activity_label"] + ": " + ctx)
    endings = [hellaswag_preprocess(e) for e in row["endings"]]
    return _choice_doc(query, endings, int(row["label"]), prepared=False)


def _completed_query(task: str, query: str) -> str:
    """Complete a prepared ``query`` to the harness's ``doc_to_text`` (see the module docstring)."""
    if task == "boolq":
        if query.startswith("Passage: "):
            query = query[len("Passage: ") :]
        return query if query.rstrip().endswith("Answer:") else query + "\nAnswer:"
    if task in ("arc_easy", "arc_challenge", "piqa"):
        if query.rstrip().endswith("Answer:"):
            return query
        return query.rstrip("\n") + "\nAnswer:"
    return query


def query_doc(task: str, row: dict) -> Doc:
    """A ``{query, choices, gold}`` row (BoolQ, ARC, OpenBookQA, PIQA)."""
    choices = list(row["choices"])
    gold = int(row["gold"])
    if not choices or not all(isinstance(c, str) for c in choices) or not 0 <= gold < len(choices):
        raise ValueError("needs a non-empty list of string choices and a gold index into it")
    return _choice_doc(_completed_query(task, row["query"]), choices, gold)


def winogrande_doc(row: dict) -> Doc:
    """Partial scoring: one context per option, the shared rest of the sentence is the continuation."""
    options = list(row["context_options"])
    gold = int(row["gold"])
    if len(options) < 2 or not 0 <= gold < len(options):
        raise ValueError("needs context_options (two or more) and a gold index into them")
    cont = _with_delim(row["continuation"].strip())
    return Doc(contexts=options, continuations=[cont] * len(options), gold=gold)


def lambada_doc(row: dict) -> Doc:
    """LAMBADA (OpenAI): the text without its last word, then ``" " + last word``."""
    return Doc(contexts=[row["context"]], continuations=[_with_delim(row["continuation"])], gold=0)


def _doc_for(task: str, row: dict) -> Doc:
    if task == "rte":
        return rte_doc(row)
    if task == "hellaswag":
        return hellaswag_doc(row)
    if task == "winogrande":
        return winogrande_doc(row)
    if task == "lambada":
        return lambada_doc(row)
    return query_doc(task, row)


def task_path(task: str, data_dir: str | None = None) -> Path:
    """The task's file under ``<data-dir>/zeroshot/``; a clear error when it is not there."""
    if task not in TASK_FILES:
        raise PrunekitError(f"unknown zero-shot task {task!r}; choose from {', '.join(TASKS)}")
    rel = f"zeroshot/{TASK_FILES[task]}"
    root = resolve_data_dir(data_dir)
    if root is None:
        raise PrunekitError(
            f"zero-shot task {task} needs {rel} and no data directory is set; "
            f"set --data-dir (or ${DATA_ENV}) to a folder holding {rel}"
        )
    path = root / rel
    if not path.is_file():
        raise PrunekitError(
            f"zero-shot file {path} is missing; set --data-dir (or ${DATA_ENV}) to a folder holding {rel}"
        )
    return path


def load_docs(task: str, data_dir: str | None = None, limit: int | None = None) -> list[Doc]:
    """The first ``limit`` items (all when ``None``) of a task, formatted into :class:`Doc` s."""
    if limit is not None and limit < 1:
        raise PrunekitError(f"--limit must be a positive number of items, not {limit}")
    path = task_path(task, data_dir)
    docs: list[Doc] = []
    with path.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if limit is not None and len(docs) >= limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                docs.append(_doc_for(task, row))
            except json.JSONDecodeError:
                raise PrunekitError(f"{path} line {i + 1} is not JSON; give one JSON object per line") from None
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise PrunekitError(
                    f"{path} line {i + 1} does not fit the {task} format ({type(e).__name__}: {e}); "
                    f"see the data README for the expected fields"
                ) from None
    if not docs:
        raise PrunekitError(f"{path} holds no items; give a file with one JSON item per line")
    return docs


# --------------------------------------------------------------------------------------------------
# Tokenization and scoring


def _wants_bos(model: nn.Module | None) -> bool:
    """The harness sets ``add_bos_token=True`` for Gemma models and leaves it off for the others."""
    model_type = str(getattr(getattr(model, "config", None), "model_type", "") or "")
    return model_type.startswith("gemma")


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_pair(tokenizer, context: str, continuation: str, bos: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation), split as the harness's ``HFLM._encode_pair`` splits them."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    prefix: list[int] = []
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos and bos_id is not None:
        prefix = [bos_id]
    ctx = prefix + _encode(tokenizer, context) if context else prefix
    whole = prefix + _encode(tokenizer, context + continuation)
    cont = whole[len(ctx) :]
    if not ctx:  # the harness scores an empty context after its prefix token
        start = bos_id if bos_id is not None else getattr(tokenizer, "eos_token_id", None)
        if start is None:
            raise PrunekitError("an item has an empty context and the tokenizer has no BOS or EOS token to start it")
        ctx = [start]
    return ctx, cont


@dataclass
class _ScoreBatch:
    """One padded batch of requests and where its continuation tokens sit."""

    members: list[int]  # request indices, in batch order
    ids: torch.Tensor  # [rows, width], right-padded
    mask: torch.Tensor  # [rows, width]
    rows: list[int]  # (row, col) of every position whose logits predict a continuation token
    cols: list[int]
    targets: list[int]
    counts: list[int]  # scored continuation tokens of each member


def _score_batches(
    requests: list[tuple[list[int], list[int]]], batch_size: int, max_length: int
) -> list[_ScoreBatch]:
    """The requests in the harness's order (longest first), truncated, padded and batched."""
    prepared = []  # (index, input ids, scored continuation ids, all ids)
    too_long = 0
    for i, (ctx, cont) in enumerate(requests):
        toks = list(ctx) + list(cont)
        too_long += len(cont) > max_length
        # only the last max_length continuation tokens can have a context in the window
        prepared.append((i, toks[-(max_length + 1) :][:-1], list(cont)[-max_length:], toks))
    if too_long:
        log.warning(
            "%d continuation(s) are longer than the model's context of %d tokens; only their last %d tokens are scored",
            too_long, max_length, max_length,
        )
    order = sorted(prepared, key=lambda r: (-len(r[3]), r[3]))
    out: list[_ScoreBatch] = []
    for b in range(0, len(order), batch_size):
        batch = order[b : b + batch_size]
        width = max(len(r[1]) for r in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        sb = _ScoreBatch([r[0] for r in batch], ids, mask, [], [], [], [])
        for j, (_, inp, cont, _) in enumerate(batch):
            ids[j, : len(inp)] = torch.tensor(inp, dtype=torch.long)
            mask[j, : len(inp)] = 1
            # logits at position t predict token t + 1: the continuation's predictors are the last
            # len(cont) input positions
            start = len(inp) - len(cont)
            sb.rows += [j] * len(cont)
            sb.cols += range(start, len(inp))
            sb.targets += cont
            sb.counts.append(len(cont))
        out.append(sb)
    return out


def _score(
    batch: _ScoreBatch, hidden: torch.Tensor, readout: Readout, out: list[tuple[float, bool]]
) -> None:
    """Log-likelihood and greediness of every member of ``batch`` from its final hidden states."""
    device = hidden.device
    logits = readout.logits(hidden[torch.tensor(batch.rows, device=device), torch.tensor(batch.cols, device=device)])
    logprobs = F.log_softmax(logits, dim=-1)
    target = torch.tensor(batch.targets, device=device)
    token_ll = logprobs.gather(1, target[:, None]).squeeze(1).double().cpu()
    greedy = (logprobs.argmax(dim=-1) == target).cpu()
    pos = 0
    for index, n in zip(batch.members, batch.counts):
        out[index] = (float(token_ll[pos : pos + n].sum()), bool(greedy[pos : pos + n].all()))
        pos += n


@torch.no_grad()
def score_requests(
    model: nn.Module,
    requests: list[tuple[list[int], list[int]]],
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    max_length: int | None = None,
    desc: str = "zero-shot",
    walk: str = "whole",
    source: WeightSource | None = None,
) -> list[tuple[float, bool]]:
    """``(log-likelihood, is_greedy)`` of each ``(context_ids, continuation_ids)`` request.

    With ``walk="whole"`` the model must already be on ``device``; with ``"blocks"`` (or a weight
    ``source``) it is walked there block by block over all batches (:mod:`prunekit.blockwalk`),
    with the same results. Requests run longest first in batches of ``batch_size``, right-padded
    with an attention mask; each is left-truncated to ``max_length`` tokens of input (default: the
    model's context length); a continuation longer than that has only its last ``max_length``
    tokens scored (with a warning). ``is_greedy`` is whether every scored continuation token is
    the argmax of its position's logits.
    """
    if batch_size < 1:
        raise PrunekitError(f"--batch-size must be at least 1, not {batch_size}")
    device = torch.device(device)
    max_length = max_length or context_length(model) or 2048
    # only empty continuations: log-likelihood 0, trivially greedy, and no need to run the model
    batches = [b for b in _score_batches(requests, batch_size, max_length) if b.targets]
    out: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
    if source is not None or choose_walk(walk, [model], device) == "blocks":
        walked = [Batch(b.ids, b.mask) for b in batches]
        blockwalk.walk(
            model, walked, device, lambda i, hidden, readout: _score(batches[i], hidden, readout, out),
            source=source, desc=desc,
        )
        return out
    readout = Readout(model, with_norm=False)
    for batch in tqdm(batches, desc=desc, unit="batch", leave=False):
        hidden = model.base_model(
            input_ids=batch.ids.to(device), attention_mask=batch.mask.to(device), use_cache=False
        ).last_hidden_state
        _score(batch, hidden, readout, out)
    return out


# --------------------------------------------------------------------------------------------------
# Metrics


def accuracy_stderr(p: float, n: int) -> float | None:
    """``sqrt(p (1 - p) / (n - 1))``: the harness's sample stderr of a mean of 0/1 scores (None for n < 2)."""
    if n < 2:
        return None
    return math.sqrt(p * (1.0 - p) / (n - 1))


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])  # first maximum, as np.argmax


def choice_metrics(task: str, docs: list[Doc], lls: list[list[float]]) -> dict[str, float | int | None]:
    """acc (and acc_norm where the harness reports it) from each doc's per-choice log-likelihoods."""
    n = len(docs)
    acc = sum(_argmax(ll) == d.gold for d, ll in zip(docs, lls)) / n
    out: dict[str, float | int | None] = {"acc": acc, "acc_stderr": accuracy_stderr(acc, n)}
    if task in NORM_TASKS:
        norm = sum(
            _argmax([v / max(length, 1) for v, length in zip(ll, d.norm_lengths)]) == d.gold
            for d, ll in zip(docs, lls)
        ) / n
        out.update(acc_norm=norm, acc_norm_stderr=accuracy_stderr(norm, n))
    out["n"] = n
    return out


def evaluate_docs(
    model: nn.Module,
    tokenizer,
    task: str,
    docs: list[Doc],
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    walk: str = "whole",
    source: WeightSource | None = None,
) -> dict[str, float | int | None]:
    """Score one task's docs; the model must already be on ``device`` unless it is walked (``walk``,
    ``source``: see :func:`score_requests`)."""
    bos = _wants_bos(model)
    requests = [
        encode_pair(tokenizer, context, cont, bos)
        for d in docs
        for context, cont in zip(d.contexts, d.continuations)
    ]
    results = score_requests(model, requests, batch_size, device, desc=f"zero-shot {task}", walk=walk, source=source)
    if task == "lambada":
        n = len(docs)
        acc = sum(greedy for _, greedy in results) / n
        ppl = math.exp(-sum(ll for ll, _ in results) / n)
        return {"acc": acc, "acc_stderr": accuracy_stderr(acc, n), "ppl": ppl, "n": n}
    lls: list[list[float]] = []
    pos = 0
    for d in docs:
        k = len(d.continuations)
        lls.append([ll for ll, _ in results[pos : pos + k]])
        pos += k
    return choice_metrics(task, docs, lls)


def headline_metric(task: str) -> str:
    """The metric a task contributes to ``mean_acc``: acc_norm where the harness reports it, else acc."""
    return "acc_norm" if task in NORM_TASKS else "acc"


@dataclass
class ZeroShotResult:
    """Per-task metrics and their means.

    ``metrics[task]`` holds ``acc``, ``acc_stderr``, ``n``; plus ``acc_norm`` and
    ``acc_norm_stderr`` for hellaswag, arc_easy, arc_challenge, openbookqa and piqa (the tasks the
    harness reports acc_norm for; the key is absent elsewhere) and ``ppl`` for lambada. Accuracies
    are fractions in [0, 1]; a stderr is None when a task has fewer than 2 items.
    """

    metrics: dict[str, dict[str, float | int | None]]
    limit: int | None = None
    seconds: float = 0.0

    @property
    def paper_tasks_run(self) -> list[str]:
        return [t for t in PAPER_TASKS if t in self.metrics]

    @property
    def mean_acc(self) -> float | None:
        """Mean over the PAPER_TASKS that were run of acc_norm where the task reports it, else acc.

        (hellaswag, arc_easy, arc_challenge and openbookqa contribute acc_norm; boolq, rte and
        winogrande contribute acc.) None when no paper task was run.
        """
        tasks = self.paper_tasks_run
        if not tasks:
            return None
        return sum(float(self.metrics[t][headline_metric(t)]) for t in tasks) / len(tasks)  # type: ignore[arg-type]

    @property
    def mean_plain_acc(self) -> float | None:
        """Mean of plain ``acc`` over the PAPER_TASKS that were run (the Wanda paper's tables use acc
        for every task, e.g. LLaMA-7B HellaSwag 56.92 is its acc, not its acc_norm)."""
        tasks = self.paper_tasks_run
        if not tasks:
            return None
        return sum(float(self.metrics[t]["acc"]) for t in tasks) / len(tasks)  # type: ignore[arg-type]

    def to_dict(self) -> dict:
        return {
            "tasks": {t: dict(m) for t, m in self.metrics.items()},
            "mean_acc": self.mean_acc,
            "mean_acc_tasks": self.paper_tasks_run,
            "mean_acc_rule": "acc_norm where reported (hellaswag, arc_easy, arc_challenge, openbookqa), else acc",
            "mean_plain_acc": self.mean_plain_acc,
            "limit": self.limit,
            "seconds": self.seconds,
        }

    def to_markdown(self) -> str:
        """A table: task, n, acc ± stderr, acc_norm ± stderr (percent), lambada's ppl, and the means."""

        def pct(m: dict, key: str) -> str:
            if m.get(key) is None:
                return "—"
            err = m.get(f"{key}_stderr")
            return f"{100 * m[key]:.2f} ± {100 * err:.2f}" if err is not None else f"{100 * m[key]:.2f}"

        has_ppl = any("ppl" in m for m in self.metrics.values())
        head = "| task | n | acc (%) | acc_norm (%) |" + (" ppl |" if has_ppl else "")
        rule = "|---|---:|---:|---:|" + ("---:|" if has_ppl else "")
        lines = [head, rule]
        for task, m in self.metrics.items():
            row = f"| {task} | {m['n']} | {pct(m, 'acc')} | {pct(m, 'acc_norm')} |"
            if has_ppl:
                row += f" {m['ppl']:.2f} |" if "ppl" in m else " — |"
            lines.append(row)
        tasks = self.paper_tasks_run
        if tasks:
            tail = " |" if has_ppl else ""
            lines.append(
                f"| **mean** ({len(tasks)} paper tasks; acc_norm where reported, else acc) | | "
                f"**{100 * self.mean_acc:.2f}** | |{tail}"  # type: ignore[operator]
            )
            lines.append(
                f"| mean of plain acc ({len(tasks)} paper tasks) | | {100 * self.mean_plain_acc:.2f} | |{tail}"  # type: ignore[operator]
            )
        if self.limit is not None:
            lines.append("")
            lines.append(f"Only the first {self.limit} items of each task (--limit).")
        return "\n".join(lines)


def evaluate_tasks(
    model: nn.Module,
    tokenizer,
    tasks: list[str],
    data_dir: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    walk: str = "auto",
    source: WeightSource | None = None,
) -> ZeroShotResult:
    """Zero-shot accuracy of ``model`` on ``tasks`` (names from :data:`TASKS`).

    ``data_dir`` holds ``zeroshot/<file>.jsonl`` (default ``$PRUNEKIT_DATA_DIR``); ``limit`` keeps the
    first N items of each task. All task files are checked before any scoring starts. The model runs
    on ``device`` and goes back to the device it came from afterwards; with ``walk`` ``blocks`` (or
    ``auto`` when it does not fit there, see :func:`prunekit.blockwalk.choose_walk`) or a weight
    ``source`` it is walked there block by block instead.
    """
    if not tasks:
        raise PrunekitError(f"no zero-shot task given; name some of {', '.join(TASKS)}")
    for task in tasks:
        if task not in TASK_FILES:
            raise PrunekitError(f"unknown zero-shot task {task!r}; choose from {', '.join(TASKS)}")
    t0 = time.perf_counter()
    loaded = {task: load_docs(task, data_dir, limit) for task in dict.fromkeys(tasks)}
    mode = "blocks" if source is not None else choose_walk(walk, [model], device)
    first = next(model.parameters(), None)
    home = first.device if first is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    if mode == "whole":
        model.to(device)
    metrics: dict[str, dict[str, float | int | None]] = {}
    try:
        for task, docs in loaded.items():
            metrics[task] = evaluate_docs(model, tokenizer, task, docs, batch_size, device, mode, source)
            log.info("zero-shot %s: %s", task, metrics[task])
    finally:
        if mode == "whole":
            model.to(home)
        model.train(was_training)
    return ZeroShotResult(metrics, limit=limit, seconds=time.perf_counter() - t0)
