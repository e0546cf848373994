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
