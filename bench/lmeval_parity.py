"""Parity of the two zero-shot backends on the same items: prunekit's scorer vs lm-evaluation-harness.

    python bench/lmeval_parity.py [--tasks rte,hellaswag,arc_easy,boolq] [--limit 100]

RTE and HellaSwag run through the harness's own task configs (its prompts and preprocessing), the
others through prunekit's prompts scored by the harness (see prunekit/lmeval_backend.py). Writes
bench/results/lmeval-parity.json with both backends' accuracies per task.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import prunekit
from prunekit.lmeval_backend import evaluate_tasks_lm_eval
from prunekit.zeroshot import evaluate_tasks, parse_tasks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", default="rte,hellaswag,arc_easy,boolq")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--data-dir", default=os.environ.get("PRUNEKIT_DATA_DIR", "../shared/data"))
    a = ap.parse_args()
    tasks = parse_tasks(a.tasks)
    model, tok = prunekit.load_model(a.model)
    ours = evaluate_tasks(model, tok, tasks, a.data_dir, a.limit, batch_size=8).metrics
    theirs = evaluate_tasks_lm_eval(model, tok, tasks, a.data_dir, a.limit, batch_size=8)
    rows = {}
    for t in tasks:
        rows[t] = {"n": ours[t]["n"]}
        for key in ("acc", "acc_norm"):
            if key in theirs[t] and ours[t].get(key) is not None:
                rows[t][key] = {"prunekit": ours[t][key], "lm-eval": theirs[t][key],
                                "items_apart": round(abs(ours[t][key] - theirs[t][key]) * ours[t]["n"])}
    out = Path(__file__).parent / "results" / "lmeval-parity.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": a.model, "limit": a.limit, "tasks": rows}, indent=2))
    for t, r in rows.items():
        print(t, r)


if __name__ == "__main__":
    main()
