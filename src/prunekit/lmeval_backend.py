"""Zero-shot evaluation through lm-evaluation-harness (``--backend lm-eval``), on the in-memory model.

The harness is optional (``pip install lm-eval``). Its built-in tasks read their data from the
Hugging Face hub; here every task is pointed at the files of the data directory instead:

* RTE and HellaSwag, whose files keep the original schema, *include the harness's own task
  configs* (prompt, preprocessing, metrics) and only swap the data source, so both prompt format
  and scoring are the harness's;
* the ``{query, choices, gold}`` tasks (BoolQ, ARC, OpenBookQA, PIQA) get their contexts and
  choices from :mod:`prunekit.zeroshot` (the same completed prompts), scored by the harness.

* WinoGrande uses the harness's partial scoring (one context per option, the shared rest of the
  sentence scored), LAMBADA its ``lambada_openai`` loglikelihood task (accuracy and perplexity).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .errors import PrunekitError
from .zeroshot import load_docs, task_path

_BUILTIN = {"rte": "super_glue/rte/default.yaml", "hellaswag": "hellaswag/hellaswag.yaml"}
_PREPARED = {"boolq": False, "arc_easy": True, "arc_challenge": True, "openbookqa": True, "piqa": True}  # acc_norm?


@dataclass
class LmEvalResult:
    """lm-eval's accuracies in the shape the run report expects of a zero-shot result."""

    metrics: dict[str, dict[str, float]]

    def to_dict(self) -> dict:
        return {"backend": "lm-eval", "tasks": self.metrics}

    def to_markdown(self) -> str:
        rows = ["| task | acc (%) | acc_norm (%) |", "|---|---:|---:|"]
        for task, m in self.metrics.items():
            norm = f"{100 * m['acc_norm']:.2f}" if "acc_norm" in m else "—"
            rows.append(f"| {task} | {100 * m['acc']:.2f} | {norm} |")
        return "\n".join(rows + ["", "Scored by lm-evaluation-harness (`--backend lm-eval`)."])


def available() -> bool:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


def _task_yaml(task: str, root: Path, data_dir: str | None, limit: int | None) -> str:
    import lm_eval

    name = f"prunekit_{task}"
    if task in _BUILTIN:
        include = Path(lm_eval.__file__).parent / "tasks" / _BUILTIN[task]
        text = (
            f"include: {include}\ntask: {name}\ntag: []\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    validation: {task_path(task, data_dir)}\n"
            "training_split: null\nvalidation_split: validation\ntest_split: null\n"
        )
        if task == "rte":  # the file keeps SuperGLUE's label *names*; the harness's config wants 0/1
            text += "doc_to_target: \"{{ 0 if label in ('entailment', 0) else 1 }}\"\n"
        return text
    if task == "winogrande":  # partial scoring, the harness's way: one context per option, the rest is scored
        (root / "prunekit_wino.py").write_text(
            "def doc_to_text(doc):\n    return int(doc['gold'])\n\n"
            "def doc_to_choice(doc):\n    return list(doc['context_options'])\n\n"
            "def doc_to_target(doc):\n    return doc['continuation'].strip()\n"
        )
        return (
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    validation: {task_path(task, data_dir)}\n"
            "output_type: multiple_choice\nvalidation_split: validation\n"
            "doc_to_text: !function prunekit_wino.doc_to_text\ndoc_to_choice: !function prunekit_wino.doc_to_choice\n"
            "doc_to_target: !function prunekit_wino.doc_to_target\nmetric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n"
        )
    if task == "lambada":  # the harness's lambada_openai: last word (with its space) after the context
        return (
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    validation: {task_path(task, data_dir)}\n"
            "output_type: loglikelihood\nvalidation_split: validation\n"
            "doc_to_text: \"{{context}}\"\ndoc_to_target: \"{{' ' + continuation.lstrip(' ')}}\"\ntarget_delimiter: \"\"\n"
            "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
            "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\nmetadata:\n  version: 1.0\n"
        )
    if task not in _PREPARED:
        raise PrunekitError(f"task {task!r} is not available with --backend lm-eval; use the default backend")
    rows = root / f"{task}.jsonl"
    with rows.open("w", encoding="utf-8") as fh:
        for doc in load_docs(task, data_dir, limit):
            fh.write(json.dumps({"ctx": doc.contexts[0], "choices": [c[1:] for c in doc.continuations], "gold": doc.gold}) + "\n")
    metrics = "  - metric: acc\n" + ("  - metric: acc_norm\n" if _PREPARED[task] else "")
    return (
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    validation: {rows}\n"
        "output_type: multiple_choice\nvalidation_split: validation\n"
        'doc_to_text: "{{ctx}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{gold}}"\n'
        f"metric_list:\n{metrics}metadata:\n  version: 1.0\n"
    )


def evaluate_tasks_lm_eval(
    model: nn.Module, tokenizer, tasks: list[str], data_dir: str | None = None, limit: int | None = None,
    batch_size: int = 8, device: str = "cpu",
) -> dict[str, dict[str, float]]:
    """``{task: {"acc": ..., "acc_norm": ...}}`` from lm-evaluation-harness on the given model."""
    if not available():
        raise PrunekitError("--backend lm-eval needs lm-evaluation-harness; install it with `pip install lm-eval`")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="prunekit-lmeval-") as tmp:
        root = Path(tmp)
        for task in tasks:
            (root / f"prunekit_{task}.yaml").write_text(_task_yaml(task, root, data_dir, limit))
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
        out = lm_eval.simple_evaluate(
            model=lm, tasks=[f"prunekit_{t}" for t in tasks], task_manager=TaskManager(include_path=tmp),
            limit=limit, num_fewshot=0, log_samples=False,
        )
    results: dict[str, dict[str, float]] = {}
    for task in tasks:
        r = out["results"][f"prunekit_{task}"]
        results[task] = {
            k.split(",")[0]: v for k, v in r.items()
            if k.startswith(("acc,", "acc_norm,", "acc_stderr", "acc_norm_stderr", "perplexity,"))
        }
    return results
