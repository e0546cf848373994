"""Evaluation block by block (prunekit.blockwalk) gives what the whole model on the device gives."""

from __future__ import annotations

import copy
import itertools
import json
import logging

import pytest
import torch
from conftest import make_tiny_model, random_ids, save_tiny_model_dir

from prunekit import blockwalk
from prunekit import zeroshot as zs
from prunekit.blockwalk import Batch, ModelWeights, choose_walk
from prunekit.capture import _children_deep
from prunekit.cli import main
from prunekit.config import EvalConfig
from prunekit.errors import PrunekitError
from prunekit.evaluate import block_error_detail, window_losses
from prunekit.families import Readout, discover

FAMILIES = ["llama", "opt", "gpt2", "gemma2", "gemma3_text"]
RTOL = 1e-5


def close(a: list[float], b: list[float]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x == pytest.approx(y, rel=RTOL, abs=1e-7)


def zeroshot_requests() -> list[tuple[list[int], list[int]]]:
    """Mixed lengths so that every batch is padded to another width; two overflow the 64-token context."""
    lengths = [(5, 3), (20, 1), (2, 7), (40, 4), (70, 2), (11, 11), (60, 10), (1, 1), (3, 2), (9, 0)]
    out = []
    for seed, (n_ctx, n_cont) in enumerate(lengths):
        ids = random_ids(1, n_ctx + n_cont, seed=seed)[0].tolist()
        out.append((ids[:n_ctx], ids[n_ctx:]))
    return out


class Counting(ModelWeights):
    """The default source, recording what is on the device when."""

    def __init__(self, model, device="cpu"):
        super().__init__(model, device)
        self.events: list = []

    def load_stem(self):
        self.events.append("stem")
        super().load_stem()

    def load(self, index):
        self.events.append(index)
        return super().load(index)

    def load_head(self):
        self.events.append("head")
        return super().load_head()


class Skeleton:
    """A source like one that reads weights from safetensors shards: every part of the model sits on
    the meta device except between its load and its release, when it is copied in from saved tensors.
    A walk that used a part outside its step would fail or compute with the wrong weights."""

    def __init__(self, model):
        self.model = model
        self.blocks = discover(model).blocks
        self.stems = _children_deep(model.base_model, self.blocks)
        r = Readout(model)
        self.head = [r.norm, r.head]
        parts = [*self.blocks, *self.stems, *self.head]
        self.saved = {id(m): {n: t.detach().clone() for n, t in self._tensors(m)} for m in parts}
        self.live: set = set()
        self.peak = 0
        self.events: list = []
        for m in parts:
            m.to("meta")

    @staticmethod
    def _tensors(m):
        return itertools.chain(m.named_parameters(), m.named_buffers())

    def _fill(self, key, modules):
        for m in modules:
            m.to_empty(device="cpu")
            for name, t in self._tensors(m):
                t.data.copy_(self.saved[id(m)][name])
        self.live.add(key)
        self.peak = max(self.peak, len(self.live))
        self.events.append(key)

    def _drop(self, key, modules):
        for m in modules:
            m.to("meta")
        self.live.discard(key)

    def load_stem(self):
        self._fill("stem", self.stems)

    def release_stem(self):
        self._drop("stem", self.stems)

    def load(self, index):
        self._fill(index, [self.blocks[index]])
        return self.blocks[index]

    def release(self, index):
        self._drop(index, [self.blocks[index]])

    def load_head(self):
        self._fill("head", self.head)
        return Readout(self.model)

    def release_head(self):
        self._drop("head", self.head)


# ----------------------------------------------------------------------------- equal results


@pytest.mark.parametrize("family,attn", [(f, "eager") for f in FAMILIES] + [("llama", "sdpa"), ("gemma3_text", "sdpa")])
def test_perplexity_block_by_block_equals_whole(family, attn):
    model = make_tiny_model(family, layers=3, attn=attn)
    windows = random_ids(5, 16, seed=3)  # batches of 2, 2, 1
    whole = window_losses(model, windows, 2, "cpu", walk="whole")
    walked = window_losses(model, windows, 2, "cpu", walk="blocks")
    close(walked, whole)
    assert len(set(whole)) == 5  # windows differ, so an order mix-up would show


@pytest.mark.parametrize("family,attn", [(f, "eager") for f in FAMILIES] + [("llama", "sdpa"), ("gemma3_text", "sdpa")])
def test_zeroshot_block_by_block_equals_whole(family, attn):
    """Padded batches of different widths: every batch replays its own masks and positions."""
    model = make_tiny_model(family, layers=3, attn=attn)
    requests = zeroshot_requests()
    whole = zs.score_requests(model, requests, batch_size=3)
    walked = zs.score_requests(model, requests, batch_size=3, walk="blocks")
    close([ll for ll, _ in walked], [ll for ll, _ in whole])
    assert [g for _, g in walked] == [g for _, g in whole]
    assert walked[-1] == (0.0, True)  # the empty continuation


@pytest.mark.parametrize("family,attn", [("llama", "eager"), ("llama", "sdpa"), ("opt", "eager"), ("gemma2", "eager")])
def test_left_padded_batches_replay_their_masks(family, attn):
    """With left padding the mask changes what real tokens see (and OPT's positions): the walk must
    replay each batch's own mask. Compared with the model's last hidden states at real positions."""
    model = make_tiny_model(family, layers=2, attn=attn)
    batches = []
    for seed, (rows, width) in enumerate([(3, 9), (2, 14)]):
        ids = random_ids(rows, width, seed=seed)
        mask = torch.ones(rows, width, dtype=torch.long)
        for r in range(rows):
            mask[r, : 2 * r + 1] = 0  # left padding of different lengths
        batches.append(Batch(ids, mask))
    got: dict[int, torch.Tensor] = {}
    blockwalk.walk(model, batches, "cpu", lambda i, h, readout: got.__setitem__(i, readout.logits(h)))
    readout = Readout(model, with_norm=False)
    for i, b in enumerate(batches):
        with torch.no_grad():
            want = readout.logits(model.base_model(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state)
            unmasked = readout.logits(model.base_model(input_ids=b.input_ids).last_hidden_state)
        real = b.attention_mask.bool()
        torch.testing.assert_close(got[i][real], want[real], rtol=RTOL, atol=1e-5)
        assert not torch.allclose(unmasked[real], want[real], atol=1e-3)  # the mask matters here


@pytest.mark.parametrize("family", FAMILIES)
def test_block_errors_block_by_block_equal_whole(family):
    dense = make_tiny_model(family, layers=3)
    pruned = make_tiny_model(family, seed=4, layers=3)
    windows = random_ids(5, 12, seed=6)
    whole = block_error_detail(dense, pruned, windows, 2, "cpu", walk="whole")
    walked = block_error_detail(dense, pruned, windows, 2, "cpu", walk="blocks")
    for key in whole:
        close(walked[key], whole[key])
    assert len(set(whole["aggregate"])) == 3 and min(whole["aggregate"]) > 0


def test_block_errors_of_the_dense_model_are_zero_block_by_block():
    dense = make_tiny_model("llama", layers=3)
    errs = block_error_detail(dense, copy.deepcopy(dense), random_ids(3, 12, seed=1), 2, "cpu", walk="blocks")
    assert errs["aggregate"] == [0.0, 0.0, 0.0]


# ----------------------------------------------------------------------------- weight sources


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_a_meta_skeleton_source_gives_the_same_results(family):
    """Weights exist only between load and release (a streamed source): same perplexity and
    zero-shot scores, one part on the device at a time, in the walk's order; all meta afterwards."""
    original = make_tiny_model(family, layers=3)
    windows = random_ids(4, 16, seed=2)
    requests = zeroshot_requests()
    want_ppl = window_losses(original, windows, 3, "cpu", walk="whole")
    want_zs = zs.score_requests(original, requests, batch_size=4)

    skeleton = copy.deepcopy(original)
    source = Skeleton(skeleton)
    assert choose_walk("auto", [skeleton], "cpu") == "blocks"  # meta weights always walk
    with pytest.raises(PrunekitError, match="meta device"):
        choose_walk("whole", [skeleton], "cpu")
    close(window_losses(skeleton, windows, 3, "cpu", source=source), want_ppl)
    assert source.events == ["stem", 0, 1, 2, "head"] and source.peak == 1
    got = zs.score_requests(skeleton, requests, batch_size=4, source=source)
    close([ll for ll, _ in got], [ll for ll, _ in want_zs])
    assert [g for _, g in got] == [g for _, g in want_zs]
    assert source.peak == 1 and not source.live
    assert all(p.is_meta for p in skeleton.parameters())


def test_default_source_moves_parts_back_and_block_errors_take_two_sources():
    dense, pruned = make_tiny_model("llama", layers=2), make_tiny_model("llama", seed=2, layers=2)
    windows = random_ids(4, 10, seed=5)
    a, b = Counting(dense), Counting(pruned)
    walked = block_error_detail(dense, pruned, windows, 2, "cpu", sources=(a, b))
    close(walked["aggregate"], block_error_detail(dense, pruned, windows, 2, "cpu", walk="whole")["aggregate"])
    assert a.events == b.events == ["stem", 0, 1]  # no readout for block errors
    assert all(p.device.type == "cpu" for p in dense.parameters())


def test_walk_in_several_passes_when_hidden_states_exceed_the_budget():
    """A budget smaller than one batch: every batch is its own pass over the blocks, same results."""
    model = make_tiny_model("gemma2", layers=2)
    windows = random_ids(5, 12, seed=8)
    batches = [Batch(windows[b : b + 2]) for b in range(0, 5, 2)]
    source = Counting(model)
    out: list[torch.Tensor] = []
    blockwalk.walk(model, batches, "cpu", lambda i, h, r: out.append(r.logits(h)), source=source, max_bytes=1)
    assert source.events == ["stem", 0, 1, "head"] * 3
    with torch.no_grad():
        want = Readout(model, with_norm=False).logits(model.base_model(input_ids=windows).last_hidden_state)
    torch.testing.assert_close(torch.cat(out), want, rtol=RTOL, atol=1e-5)
    one = blockwalk.hidden_bytes(model, batches[0])
    assert one == 2 * 12 * 32 * 4
    assert [list(r) for r in blockwalk.chunks(model, batches, 2 * one)] == [[0, 1], [2]]


# ----------------------------------------------------------------------------- choosing the path


def test_choose_walk(monkeypatch, caplog):
    model = make_tiny_model("llama")
    size = blockwalk.weight_bytes([model], torch.device("cuda"))
    assert size == sum(t.numel() * 4 for t in itertools.chain(model.parameters(), model.buffers()))
    assert blockwalk.weight_bytes([model, model], torch.device("cuda")) == size  # shared tensors count once
    assert choose_walk("auto", [model], "cpu") == "whole"
    assert choose_walk("blocks", [model], "cpu") == "blocks"
    with pytest.raises(PrunekitError, match="unknown eval-walk 'layers'"):
        choose_walk("layers", [model], "cpu")
    gib = 1 << 30
    monkeypatch.setattr(blockwalk, "device_free_bytes", lambda device: (size + 2 * gib + 1, 10 * gib))
    with caplog.at_level(logging.INFO, logger="prunekit.blockwalk"):
        assert choose_walk("auto", [model], "cuda") == "whole"
        assert not caplog.records
        monkeypatch.setattr(blockwalk, "device_free_bytes", lambda device: (size + 2 * gib - 1, 10 * gib))
        assert choose_walk("auto", [model], "cuda") == "blocks"
        assert choose_walk("whole", [model], "cuda") == "whole"
        monkeypatch.setattr(blockwalk, "device_free_bytes", lambda device: (size + 3 * gib, 40 * gib))
        assert choose_walk("auto", [model], "cuda") == "blocks"  # a tenth of a 40 GiB device is spare
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all(line.startswith("evaluating block by block") for line in lines)


def test_eval_walk_setting_is_checked():
    EvalConfig(eval_walk="blocks").validate()
    with pytest.raises(PrunekitError, match="unknown eval-walk 'some'"):
        EvalConfig(eval_walk="some").validate()
    with pytest.raises(PrunekitError, match="needs --backend prunekit"):
        EvalConfig(eval_walk="blocks", backend="lm-eval", eval_tasks="boolq").validate()


def test_zeroshot_tasks_block_by_block(tmp_path):
    """evaluate_tasks walks without moving the model and gives the same metrics."""
    (tmp_path / "zeroshot").mkdir()
    rows = [{"context": " ".join(f"w{i + k}" for k in range(3 + 4 * i)), "continuation": f"w{i + 5}"} for i in range(7)]
    (tmp_path / "zeroshot" / "lambada_openai.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    class Tok:
        bos_token_id, eos_token_id = 1, 2

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [3 + (int(w[1:]) % 100) for w in text.split()]}

    model = make_tiny_model("opt", layers=2)
    whole = zs.evaluate_tasks(model, Tok(), ["lambada"], data_dir=str(tmp_path), batch_size=3, walk="whole")
    walked = zs.evaluate_tasks(model, Tok(), ["lambada"], data_dir=str(tmp_path), batch_size=3, walk="blocks")
    assert walked.metrics["lambada"]["ppl"] == pytest.approx(whole.metrics["lambada"]["ppl"], rel=RTOL)
    assert walked.metrics["lambada"]["acc"] == whole.metrics["lambada"]["acc"]


# ----------------------------------------------------------------------------- command line


def test_eval_and_error_commands_take_eval_walk(model_dir, word_text, tmp_path, capsys):
    ppl = {}
    for walk in ("whole", "blocks"):
        out = tmp_path / f"eval-{walk}"
        argv = ["eval", "--model", str(model_dir), "--data", str(word_text), "--eval-seqlen", "16",
                "--eval-windows", "5", "--eval-batch-size", "2", "--device", "cpu", "--eval-walk", walk, "--out", str(out)]
        assert main(argv) == 0
        ppl[walk] = json.loads((out / "metrics.json").read_text())["perplexity"]
    assert ppl["blocks"][str(word_text)] == pytest.approx(ppl["whole"][str(word_text)], rel=RTOL)

    pruned = save_tiny_model_dir(tmp_path / "other", seed=3, layers=3)
    errs = {}
    for walk in ("whole", "blocks"):
        out = tmp_path / f"err-{walk}"
        argv = ["error", "--model", str(pruned), "--dense", str(model_dir), "--data", str(word_text),
                "--eval-seqlen", "16", "--eval-windows", "4", "--device", "cpu", "--eval-walk", walk, "--out", str(out)]
        assert main(argv) == 0
        errs[walk] = json.loads((out / "errors.json").read_text())["errors"]["other"]
    for key in errs["whole"]:
        close(errs["blocks"][key], errs["whole"][key])

    capsys.readouterr()
    assert main(["eval", "--model", str(model_dir), "--data", str(word_text), "--eval-walk", "sideways"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown eval-walk 'sideways'" in err[0]
    assert main(["error", "--model", str(pruned), "--dense", str(model_dir), "--data", str(word_text),
                 "--eval-walk", "sideways", "--out", str(tmp_path / "e")]) == 2
    assert "unknown eval-walk 'sideways'" in capsys.readouterr().err
