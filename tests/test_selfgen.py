"""Self-generated calibration: the English filter, exact window length, and the on-disk cache key."""

from __future__ import annotations

import torch

from conftest import make_tiny_model
from prunekit.selfgen import is_english, self_calibration


class LetterTokenizer:
    """Every id decodes to a letter, so every start is English; id 0 is the only special token."""

    pad_token_id = None
    eos_token_id = 0
    all_special_ids = [0]

    def decode(self, ids) -> str:
        return "".join(chr(97 + int(i) % 26) for i in ids)


def test_is_english():
    assert is_english("The cat sat.")
    assert not is_english("日本語のテキスト")
    assert not is_english("1234 ,.")  # no run of two letters
    assert not is_english("abc\x00")


def test_windows_have_the_length_and_are_cached_per_setting(tmp_path):
    model = make_tiny_model("llama")
    tok = LetterTokenizer()
    a = self_calibration(model, tok, 3, 10, seed=0, batch_size=2, cache_dir=str(tmp_path))
    assert a.shape == (3, 10)
    assert not bool((a[:, 0] == 0).any())  # the special token never starts a window
    files = list((tmp_path / "selfgen").glob("*.pt"))
    assert len(files) == 1
    torch.save({"key": {}, "input_ids": torch.zeros(3, 10, dtype=torch.long)}, files[0])  # not this key: ignored
    assert torch.equal(self_calibration(model, tok, 3, 10, seed=0, batch_size=2, cache_dir=str(tmp_path)), a)
    # the sampling seed is set per batch, so a different batch size is a different cache entry
    self_calibration(model, tok, 3, 10, seed=0, batch_size=3, cache_dir=str(tmp_path))
    self_calibration(model, tok, 3, 10, seed=1, batch_size=2, cache_dir=str(tmp_path))
    assert len(list((tmp_path / "selfgen").glob("*.pt"))) == 3


def test_a_tokenizer_without_english_starts_is_one_clear_error(tmp_path):
    import pytest

    from prunekit.errors import PrunekitError

    class DigitTokenizer(LetterTokenizer):
        def decode(self, ids) -> str:
            return "".join(str(int(i) % 10) for i in ids)

    with pytest.raises(PrunekitError, match="--calib c4"):
        self_calibration(make_tiny_model("llama"), DigitTokenizer(), 2, 8, seed=0, batch_size=2, cache_dir=str(tmp_path))
