"""Why attn-mlp+GP lost to LR for Wanda under cpu-recon-v1 (issue 3): one unit, studied alone.

Protocol "massive-activation-v1": the default model (float32 copy) and the Wanda LR model that the
cpu-recon-v1 grid saved (bench/work/cpu-recon-v1/wanda-lr; run `PRUNEKIT_BENCH_KEEP_MODELS=1 python
bench/recon_grid.py wanda-lr` first if it is gone). 16 C4 windows of 256 tokens, seed 0 (the grid's
calibration windows), 14 trained on and 2 held out. For block BLOCK (default 11, where SmolLM2 writes
a massive activation into the residual stream), fit the pruned model's block to the dense model's
block output in two ways: the whole block on the pruned model's block input, or its MLP part alone
on the pruned model's mid residual (what attn-mlp does). AdamW (0.9, 0.95), no weight decay, linear
decay, batch 1, pruned weights' gradients zeroed, at the grid's 28 steps and lr 2e-4, at 230 steps
(cpu-recon-v2's count) and at 28 steps with lr 1e-3. Reports normalised error on held-out and
trained windows, and the massive coordinate's value in the dense and the LR model.

    python bench/massive_activation.py [BLOCK]   # writes bench/results/massive-activation-v1.json
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

import prunekit
from prunekit.data import documents, sample_windows
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


def _err(f, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((f(x) - y) ** 2).sum() / (y**2).sum())


def _train(params: list[torch.nn.Parameter], f, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> None:
    masks = [(p, (p != 0).float()) for p in params if p.dim() == 2]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / steps))
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        i = torch.randint(0, TRAIN, (1,), generator=gen)
        loss = torch.nn.functional.mse_loss(f(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        for p, m in masks:
            p.grad.mul_(m)
        opt.step()
        sched.step()


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
        "protocol": "massive-activation-v1", "block": block, "windows": N, "seqlen": SEQ, "trained_on": TRAIN,
        "massive": {"dim": dim, "dense_max": float(yd[..., dim].abs().max()), "lr_model_max": float(ys[..., dim].abs().max())},
        "runs": [],
    }
    pos = torch.arange(SEQ)[None]
    pe = lr_model.model.rotary_emb(xs, pos)
    for steps, lr in ((28, 2e-4), (230, 2e-4), (28, 1e-3)):
        row = {"steps": steps, "lr": lr}
        blk = copy.deepcopy(lr_model.model.layers[block])
        f_block = lambda x, b=blk: b(x, position_embeddings=pe, position_ids=pos, attention_mask=None)  # noqa: E731
        part = copy.deepcopy(lr_model.model.layers[block])
        f_mlp = lambda h, b=part: h + b.mlp(b.post_attention_layernorm(h))  # noqa: E731
        for name, f, x, params in (
            ("block", f_block, xs, list(blk.parameters())),
            ("mlp", f_mlp, hs, [*part.post_attention_layernorm.parameters(), *part.mlp.parameters()]),
        ):
            before = _err(f, x[TRAIN:], yd[TRAIN:])
            t = time.perf_counter()
            _train(params, f, x, yd, steps, lr)
            row[name] = {"heldout_before": before, "heldout_after": _err(f, x[TRAIN:], yd[TRAIN:]),
                         "calib_after": _err(f, x[:TRAIN], yd[:TRAIN]), "seconds": time.perf_counter() - t}
        print(json.dumps(row), flush=True)
        result["runs"].append(row)
    dest = HERE / "results" / "massive-activation-v1.json"
    write_json(dest, result)


if __name__ == "__main__":
    main()
