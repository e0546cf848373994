"""One rank of the distributed tests (tests/test_dist.py starts it with torchrun): prune tiny models
with prunekit.pipeline.prune on every rank and let rank 0 save what the test compares.

Usage: torchrun --standalone --nproc-per-node N tests/dist_worker.py OUT_DIR CASES_JSON
CASES_JSON maps a case name to {"config": PruneConfig fields as nested dicts, "n": windows, "seqlen": S}.
"""

from __future__ import annotations

import faulthandler
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import make_tiny_model, random_ids  # noqa: E402

from prunekit import dist  # noqa: E402
from prunekit.checkpoint import Checkpointer  # noqa: E402
from prunekit.config import PruneConfig, set_leaf  # noqa: E402
from prunekit.errors import PrunekitError  # noqa: E402
from prunekit.pipeline import prune  # noqa: E402


def config_from(d: dict) -> PruneConfig:
    cfg = PruneConfig()
    for key, value in d.items():
        set_leaf(cfg, key, value)
    return cfg


class Stop(Exception):
    pass


def run_case(spec: dict, ranks: dist.Ranks) -> dict | None:
    """``spec["checkpoint"]``: a checkpoint directory (rank 0 writes it, the others read it on resume);
    ``spec["stop_after"]``: every rank stops after that window, as an interrupted job would."""
    if spec.get("stream"):
        return run_streamed(spec, ranks)
    model = make_tiny_model(spec.get("family", "llama"), seed=0, layers=spec.get("layers", 3))
    ids = random_ids(spec["n"], spec["seqlen"], seed=1)
    ckpt = Checkpointer(spec["checkpoint"], "x", ranks.world) if spec.get("checkpoint") else None

    def on_window(k: int) -> None:
        if k == spec.get("stop_after"):
            raise Stop

    config = {**spec["config"], **(spec.get("rank1_config", {}) if ranks.rank == 1 else {})}
    try:
        model, report = prune(model, None, config_from(config), calib_ids=ids, progress=False, ranks=ranks,
                              checkpoint=ckpt, on_window=on_window)
    except Stop:  # the others stop at the same window (a rank that left early would take its pending sends along)
        ranks.barrier()
        return None
    except PrunekitError as e:
        return {"error": str(e)}
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "units": [(u.unit, u.calib_before, u.calib_after, u.heldout_before, u.heldout_after, u.steps) for u in report.units],
        "guard": None if report.guard is None else report.guard.to_dict(),
        "retrain": None if report.retrain is None else report.retrain.to_dict(),
    }


def run_streamed(spec: dict, ranks: dist.Ranks) -> dict:
    """``spec["stream"]``: {"src", "out", "lr"}: weights streamed from the shards in src; rank 0 writes out
    (and the masks-only copies to lr), the other ranks read what it committed, as run.py sets it up."""
    from transformers import AutoModelForCausalLM

    from prunekit.blockstore import StreamedBlocks
    from prunekit.shards import ShardWriter, StreamedModel

    paths, resume = spec["stream"], bool(spec.get("resume"))
    sm = StreamedModel(paths["src"], attn_implementation="eager")
    writer = ShardWriter(paths["out"], max_shard_size="20KB", in_place=True, resume=resume) if ranks.main else None
    store = StreamedBlocks(sm, writer, lr_dir=paths["lr"], output=paths["out"], resume=resume)
    ids = random_ids(spec["n"], spec["seqlen"], seed=1)
    ckpt = Checkpointer(spec["checkpoint"], "x", ranks.world) if spec.get("checkpoint") else None

    def on_window(k: int) -> None:
        if k == spec.get("stop_after"):
            raise Stop

    try:
        _, report = prune(sm.model, None, config_from(spec["config"]), calib_ids=ids, progress=False, ranks=ranks,
                          store=store, checkpoint=ckpt, on_window=on_window)
    except Stop:
        ranks.barrier()
        return None
    if not ranks.main:
        return {}
    sm.model.config.use_cache = True
    writer.finish(config=sm.model.config, copy_from=paths["src"], expected=sm.saved_names())
    out = AutoModelForCausalLM.from_pretrained(paths["out"], attn_implementation="eager")
    return {
        "state": {k: v.clone() for k, v in out.state_dict().items()},
        "units": [(u.unit, u.calib_before, u.calib_after, u.heldout_before, u.heldout_after, u.steps) for u in report.units],
        "guard": None if report.guard is None else report.guard.to_dict(),
    }


def main() -> None:
    faulthandler.enable()  # a rank that aborts (SIGABRT from a C++ library) prints where it was
    out, cases = Path(sys.argv[1]), json.loads(sys.argv[2])
    torch.set_num_threads(1)
    ranks = dist.init(dist.from_env())
    results = {name: run_case(spec, ranks) for name, spec in cases.items()}
    if ranks.main:
        torch.save(results, out / f"world{ranks.world}.pt")
    dist.shutdown(ranks)
    # the group must be freed by shutdown, not while the interpreter exits (where gloo's threads now and
    # then abort the process: prunekit.dist._import_group_defaults); Linux names gloo's worker threads
    tasks = Path("/proc/self/task")
    if tasks.is_dir() and any((t / "comm").read_text().strip() == "pt_gloo_runloop" for t in tasks.iterdir()):
        sys.exit(f"rank {ranks.rank}: gloo's threads outlived dist.shutdown (something still holds the process group)")


if __name__ == "__main__":
    main()
