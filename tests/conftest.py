"""Shared fixtures: tiny random models of every supported family (built from configs, no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

# Never touch the network. PRUNEKIT_TEST_THREADS=1 keeps the tests on one core next to a benchmark.
if os.environ.get("PRUNEKIT_TEST_THREADS"):
    torch.set_num_threads(int(os.environ["PRUNEKIT_TEST_THREADS"]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

VOCAB = 128
HIDDEN = 32
INTER = 64
HEADS = 4
HEAD_DIM = HIDDEN // HEADS
LAYERS = 2
MAX_POS = 64

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "opt", "gpt2")

def _config(family: str, layers: int):
    import transformers as tf

    common = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POS,
    )
    if family == "llama":
        return tf.LlamaConfig(**common), tf.LlamaForCausalLM
    if family == "mistral":
        return tf.MistralConfig(**common, sliding_window=None), tf.MistralForCausalLM
    if family == "qwen2":
        return tf.Qwen2Config(**common), tf.Qwen2ForCausalLM
    if family == "qwen3":
        return tf.Qwen3Config(**common, head_dim=HEAD_DIM), tf.Qwen3ForCausalLM
    if family == "gemma":
        return tf.GemmaConfig(**common, head_dim=HEAD_DIM), tf.GemmaForCausalLM
    if family == "gemma2":
        types = ["sliding_attention", "full_attention"] * layers
        return (
            tf.Gemma2Config(
                **common,
                head_dim=HEAD_DIM,
                query_pre_attn_scalar=HEAD_DIM,
                sliding_window=4,
                layer_types=types[:layers],
            ),
            tf.Gemma2ForCausalLM,
        )
    if family == "gemma3_text":
        types = ["sliding_attention", "full_attention"] * layers
        return (
            tf.Gemma3TextConfig(
                **common,
                head_dim=HEAD_DIM,
                query_pre_attn_scalar=HEAD_DIM,
                sliding_window=4,
                layer_types=types[:layers],
            ),
            tf.Gemma3ForCausalLM,
        )
    if family == "opt":
        return (
            tf.OPTConfig(
                vocab_size=VOCAB,
                hidden_size=HIDDEN,
                ffn_dim=INTER,
                num_hidden_layers=layers,
                num_attention_heads=HEADS,
                max_position_embeddings=MAX_POS,
                word_embed_proj_dim=HIDDEN,
                dropout=0.0,
                attention_dropout=0.0,
            ),
            tf.OPTForCausalLM,
        )
    if family == "gpt2":
        return (
            tf.GPT2Config(
                vocab_size=VOCAB,
                n_embd=HIDDEN,
                n_layer=layers,
                n_head=HEADS,
                n_positions=MAX_POS,
                n_inner=INTER,
                bos_token_id=1,
                eos_token_id=1,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
            ),
            tf.GPT2LMHeadModel,
        )
    raise KeyError(family)


def make_tiny_model(family: str, seed: int = 0, layers: int = LAYERS, attn: str = "eager"):
    """A random tiny causal LM of ``family`` in eval mode (float32, on CPU)."""
    config, cls = _config(family, layers)
    config._attn_implementation = attn
    config.use_cache = False
    torch.manual_seed(seed)
    model = cls(config)
    # Random init puts many norms at exactly 1 / 0 and Gemma's at 0; perturb every parameter a little
    # so that no block is an identity-like map and per-block differences show up in the tests.
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.eval()
    return model


@pytest.fixture
def tiny_model():
    """Factory fixture: ``tiny_model(family, seed=0, layers=2)``."""
    return make_tiny_model


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


def random_ids(n: int, seqlen: int, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seqlen), generator=g)


class WhitespaceTokenizer:
    """A tiny tokenizer: one id per whitespace-separated word, ids assigned in order of first sight."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}
        self.calls = 0

    def __call__(self, text: str) -> dict:
        self.calls += 1
        return {"input_ids": [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]}


@pytest.fixture
def ws_tokenizer() -> WhitespaceTokenizer:
    return WhitespaceTokenizer()


# ----------------------------------------------------------------------------- saved tiny models for CLI tests


def save_tiny_model_dir(path, family: str = "llama", seed: int = 0, layers: int = LAYERS, safe: bool = True):
    """A tiny random model and a word-level tokenizer (``w3 w4 ...``) saved as ``save_pretrained`` does.

    The tokenizer is built in memory (no download), so command-line tests can load the directory
    with plain ``AutoTokenizer``/``AutoModelForCausalLM`` as prunekit does.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    model = make_tiny_model(family, seed=seed, layers=layers)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    if not safe:  # transformers 5 writes safetensors only; turn them into the pickle file older tools wrote
        from safetensors.torch import load_file

        weights = path / "model.safetensors"
        torch.save(load_file(weights), path / "pytorch_model.bin")
        weights.unlink()
    return path


def write_word_text(path, words: int = 4000, seed: int = 0):
    """A .txt corpus of random ``wN`` words the tiny tokenizer knows."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (words,), generator=g).tolist()
    path.write_text(" ".join(f"w{i}" for i in ids))
    return path


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A saved tiny Llama (3 blocks) with its tokenizer, shared by the command-line tests (read only)."""
    return save_tiny_model_dir(tmp_path_factory.mktemp("models") / "tiny", layers=3)


@pytest.fixture(scope="session")
def word_text(tmp_path_factory):
    return write_word_text(tmp_path_factory.mktemp("corpus") / "words.txt")
