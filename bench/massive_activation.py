"""Why attn-mlp+GP lost to LR for Wanda under cpu-recon-v1 (issue 3): one unit, studied alone.

Protocol "massive-activation-v2": the default model (float32 copy) and the Wanda LR model that the
cpu-recon-v1 grid saved (bench/work/cpu-recon-v1/wanda-lr; run `PRUNEKIT_BENCH_KEEP_MODELS=1 python
bench/recon_grid.py wanda-lr` first if it is gone). 16 C4 windows of 256 tokens, seed 0 (the grid's
calibration windows), 14 trained on and 2 held out. For block BLOCK (default 11, where SmolLM2 writes
a massive activation into the residual stream), fit the pruned model's block to the dense model's
block output in two ways: the whole block on the pruned model's block input, or its MLP part alone
on the pruned model's mid residual (what attn-mlp does). Both go through the engine's own `fit`
(AdamW 0.9/0.95, no weight decay, linear decay, batch 1, a shuffle per epoch, masks held, weights
restored if the held-out error ends worse): 2 epochs at lr 2e-4 (the grid's 28 steps), 16 epochs
(224 steps, near cpu-recon-v2's 230) and 2 epochs at lr 1e-3. Reports normalised error on held-out
and trained windows, and the massive coordinate's value in the dense and the LR model.
(massive-activation-v1 ran the same study with its own training loop, windows drawn with replacement.)

    python bench/massive_activation.py [BLOCK]   # writes bench/results/massive-activation-v2.json
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch

import prunekit
from prunekit.config import ReconConfig
from prunekit.data import documents, sample_windows
from prunekit.families import is_linear
from prunekit.reconstruct import FitData, Point, Unit, fit
from recon_grid import dense_copy, write_json

HERE = Path(__file__).parent
SEQ, N, TRAIN = 256, 16, 14


def _states(model, ids: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block ``layer``'s input, mid residual (input of the mid norm) and output."""
    got = {}
    norm = model.model.layers[layer].post_attention_layernorm
    h = norm.register_forward_pre_hook(lambda _m, inp: got.__setitem__("mid", inp[0].detach()))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    h.remove()
    return out.hidden_states[layer], got["mid"], out.hidden_states[layer + 1]


def _unit(name: str, modules: list[torch.nn.Module], forward) -> tuple[Unit, dict[str, torch.Tensor]]:
    """An engine unit over ``modules`` with ``forward``, and the masks its zero weights make."""
    linears = {f"{name}.{n}": m for mod in modules for n, m in mod.named_modules() if is_linear(m)}
    masks = {n: m.weight != 0 for n, m in linears.items()}
    return Unit(name, modules, linears, Point(None), Point(None), forward), masks


def main() -> None:
    block = int(sys.argv[1]) if len(sys.argv) > 1 else 11
    torch.manual_seed(0)
    dense, tok = prunekit.load_model(str(dense_copy(HERE / "work")), dtype="float32")
    lr_model, _ = prunekit.load_model(str(HERE / "work" / "cpu-recon-v1" / "wanda-lr"), dtype="float32")
    ids = sample_windows(documents("c4", os.environ.get("PRUNEKIT_DATA_DIR", "../shared/data")), tok, N, SEQ, 0)
    _, _, yd = _states(dense, ids, block)
    xs, hs, ys = _states(lr_model, ids, block)
    dim = int(yd.abs().amax(dim=(0, 1)).argmax())
    result = {
        "protocol": "massive-activation-v2", "block": block, "windows": N, "seqlen": SEQ, "trained_on": TRAIN,
        "massive": {"dim": dim, "dense_max": float(yd[..., dim].abs().max()), "lr_model_max": float(ys[..., dim].abs().max())},
        "runs": [],
    }
    pos = torch.arange(SEQ)[None]
    pe = lr_model.model.rotary_emb(xs, pos)
    rows = torch.arange(N)
    for epochs, lr in ((2, 2e-4), (16, 2e-4), (2, 1e-3)):
        row = {"steps": epochs * TRAIN, "epochs": epochs, "lr": lr}
        blk = copy.deepcopy(lr_model.model.layers[block])
        f_block = lambda x, b=blk: b(x, position_embeddings=pe, position_ids=pos, attention_mask=None)  # noqa: E731
        part = copy.deepcopy(lr_model.model.layers[block])
        f_mlp = lambda h, b=part: h + b.mlp(b.post_attention_layernorm(h))  # noqa: E731
        cfg = ReconConfig(recon="br", epochs=epochs, lr=lr, recon_batch_size=1).resolved()
        for name, modules, f, x in (
            ("block", [blk], f_block, xs),
            ("mlp", [part.post_attention_layernorm, part.mlp], f_mlp, hs),
        ):
            unit, masks = _unit(name, modules, f)
            rec = fit(unit, masks, FitData(x, yd, rows[:TRAIN], rows[TRAIN:], 1, torch.device("cpu")), cfg, seed=0)
            row[name] = {"heldout_before": rec.heldout_before, "heldout_after": rec.heldout_after,
                         "calib_after": rec.calib_after, "steps": rec.steps, "seconds": rec.seconds, "note": rec.note}
        print(json.dumps(row), flush=True)
        result["runs"].append(row)
    dest = HERE / "results" / "massive-activation-v2.json"
    write_json(dest, result)


if __name__ == "__main__":
    main()
