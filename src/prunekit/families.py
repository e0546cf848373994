"""Model-family knowledge, in one table, and the discovery of a model's parts from it.

prunekit never forks modeling code (DESIGN property 1). What it needs to know about a family is
where the list of decoder blocks sits, which submodules of a block are its attention and MLP
parts, which norm reads the residual stream between the two (reconstruction of the attention and
MLP parts on their own splits the block there), and which linears read the same input (they share
calibration statistics, and their order is the order of the forward pass, as GPTQ writes it).
Adding a family is one entry in ``FAMILIES``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import PrunekitError

try:  # GPT-2 uses a transposed linear layer
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - very old transformers
    Conv1D = ()  # type: ignore[assignment]


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # values of config.model_type
    blocks: str  # dotted path from the *ForCausalLM module to the nn.ModuleList of blocks
    attention: str  # attention submodule of a block
    mlp: tuple[str, ...]  # the MLP part: one submodule, or the block's own linears (OPT)
    mid_norm: str  # the norm whose input is the residual stream between attention and MLP
    linear_groups: tuple[tuple[str, ...], ...]  # linears sharing one input, in forward order
    mlp_branch: tuple[str, ...]  # modules applied in order to the mid residual h: block output = h + branch(h)
    final_norm: str = "model.norm"  # the norm between the last block and the LM head


_LLAMA_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

FAMILIES: tuple[Family, ...] = (
    Family(
        name="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3", "gemma"),
        blocks="model.layers",
        attention="self_attn",
        mlp=("mlp",),
        mid_norm="post_attention_layernorm",
        linear_groups=_LLAMA_GROUPS,
        mlp_branch=("post_attention_layernorm", "mlp"),
    ),
    Family(  # Gemma 2 and 3 normalise the attention output before the residual add
        name="gemma2",
        model_types=("gemma2", "gemma3_text"),
        blocks="model.layers",
        attention="self_attn",
        mlp=("mlp",),
        mid_norm="pre_feedforward_layernorm",
        linear_groups=_LLAMA_GROUPS,
        mlp_branch=("pre_feedforward_layernorm", "mlp", "post_feedforward_layernorm"),
    ),
    Family(
        name="opt",
        model_types=("opt",),
        blocks="model.decoder.layers",
        attention="self_attn",
        mlp=("fc1", "fc2"),
        mid_norm="final_layer_norm",
        linear_groups=(
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.out_proj",),
            ("fc1",),
            ("fc2",),
        ),
        mlp_branch=("final_layer_norm", "fc1", "activation_fn", "fc2"),
        final_norm="model.decoder.final_layer_norm",
    ),
    Family(
        name="gpt2",
        model_types=("gpt2",),
        blocks="transformer.h",
        attention="attn",
        mlp=("mlp",),
        mid_norm="ln_2",
        linear_groups=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
        mlp_branch=("ln_2", "mlp"),
        final_norm="transformer.ln_f",
    ),
)


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES for t in f.model_types)


def family_for(model: nn.Module) -> Family:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    raise PrunekitError(
        f"model type {model_type!r} is not supported; supported families: {', '.join(supported_model_types())} "
        "(add an entry to prunekit.families.FAMILIES for another decoder-only family)"
    )


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out_features, in_features]``; a view, so in-place edits reach the module.

    GPT-2's ``Conv1D`` stores ``[in, out]`` and computes ``x @ W``.
    """
    w = module.weight.data
    return w.t() if (bool(Conv1D) and isinstance(module, Conv1D)) else w


def _get(root: nn.Module, path: str) -> nn.Module:
    obj: nn.Module = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass
class Layout:
    """Where a model's parts are, found through its family."""

    family: Family
    blocks: nn.ModuleList

    def block_linears(self, index: int) -> dict[str, nn.Module]:
        """All linears of block ``index`` by their name inside the block, in forward order."""
        block = self.blocks[index]
        found = {name: m for name, m in block.named_modules() if is_linear(m)}
        ordered = [n for group in self.family.linear_groups for n in group if n in found]
        return {n: found[n] for n in ordered + [n for n in found if n not in ordered]}

    def input_groups(self, index: int) -> list[list[str]]:
        """Linears of block ``index`` grouped by shared input (a linear missing from the table is alone)."""
        names = list(self.block_linears(index))
        groups = [[n for n in g if n in names] for g in self.family.linear_groups]
        listed = {n for g in groups for n in g}
        return [g for g in groups if g] + [[n] for n in names if n not in listed]

    def attention(self, index: int) -> nn.Module:
        return _get(self.blocks[index], self.family.attention)

    def mid_norm(self, index: int) -> nn.Module:
        return _get(self.blocks[index], self.family.mid_norm)


def discover(model: nn.Module) -> Layout:
    """Find the blocks of ``model`` and check that each block has the parts the family table names."""
    fam = family_for(model)
    try:
        blocks = _get(model, fam.blocks)
    except AttributeError:
        raise PrunekitError(
            f"{type(model).__name__} has no {fam.blocks}; load it with AutoModelForCausalLM (a causal LM head model)"
        ) from None
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise PrunekitError(f"{fam.blocks} of {type(model).__name__} is not a non-empty list of blocks")
    layout = Layout(family=fam, blocks=blocks)
    for i, block in enumerate(blocks):
        if getattr(block, "do_layer_norm_before", True) is False:
            raise PrunekitError("post-LayerNorm OPT blocks (OPT-350M) are not supported; use another OPT size")
        for path in (fam.attention, fam.mid_norm, *fam.mlp, *fam.mlp_branch):
            try:
                _get(block, path)
            except AttributeError:
                raise PrunekitError(
                    f"block {i} of this {fam.name}-family model has no {path}; its modeling code differs from "
                    "the family table in prunekit/families.py"
                ) from None
        if not layout.block_linears(i):
            raise PrunekitError(f"block {i} has no linear layers to prune")
    return layout


class Readout(nn.Module):
    """Final norm, LM head and (Gemma 2/3) logit soft-capping: hidden states -> next-token logits.

    Reconstruction reads a unit's output through it for the ``kd`` objective and the end-to-end
    guard; it shares (does not copy) the model's own modules.
    """

    def __init__(self, model: nn.Module, with_norm: bool = True) -> None:
        super().__init__()
        self.norm: nn.Module | None = None  # not needed for a model's last hidden state (already normed)
        if with_norm:
            fam = family_for(model)
            try:
                self.norm = _get(model, fam.final_norm)
            except AttributeError:
                raise PrunekitError(f"this {fam.name}-family model has no {fam.final_norm}; see prunekit/families.py") from None
        self.head = model.get_output_embeddings()
        self.softcap = getattr(model.config, "final_logit_softcapping", None)

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        """Float32 logits of hidden states that already passed the final norm (a model's last hidden state)."""
        z = self.head(normed.to(self.head.weight.dtype)).float()
        return torch.tanh(z / self.softcap) * self.softcap if self.softcap else z

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        assert self.norm is not None, "built with_norm=False: use logits() on normed hidden states"
        return self.logits(self.norm(hidden))
