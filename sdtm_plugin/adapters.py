"""Per-architecture adapters: where the merged sub-layers sit and what token grid a forward works on.

An adapter names, for one model family, the blocks, each block's self-attention and feed-forward modules, and how
to read the (h, w) token grid from the transformer's input. Merge, schedule, cache and state code is shared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class SubLayers:
    """The modules of one block whose (B, N, C) inputs are merged."""

    attn: nn.Module
    mlp: nn.Module


@dataclass(frozen=True)
class Adapter:
    """How to patch one family of transformer models.

    Attributes:
        name: shown in errors and logs.
        matches: whether a model belongs to this family.
        sublayers: the model's blocks, in order, as `SubLayers`.
        token_grid: ``(model, hidden_states) -> (h, w)``, the patch grid of a forward's latent input.
    """

    name: str
    matches: Callable[[nn.Module], bool]
    sublayers: Callable[[nn.Module], list[SubLayers]]
    token_grid: Callable[[nn.Module, torch.Tensor], tuple[int, int]]


def _latent_patch_grid(model: nn.Module, hidden_states: torch.Tensor) -> tuple[int, int]:
    """(B, C, H, W) latents cut into p x p patches -> (H // p, W // p), row-major as PatchEmbed flattens them."""
    if hidden_states.dim() != 4:
        raise ValueError(f"expected latents (B, C, H, W), got shape {tuple(hidden_states.shape)}")
    p = model.config.patch_size
    return hidden_states.shape[-2] // p, hidden_states.shape[-1] // p


def _is_pixart(model: nn.Module) -> bool:
    from diffusers import PixArtTransformer2DModel

    if not isinstance(model, PixArtTransformer2DModel):
        return False
    return all(getattr(b, "norm_type", None) == "ada_norm_single" for b in model.transformer_blocks)


def _basic_blocks(model: nn.Module) -> list[SubLayers]:
    return [SubLayers(block.attn1, block.ff) for block in model.transformer_blocks]


PIXART = Adapter(
    name="PixArt-alpha / PixArt-Sigma (PixArtTransformer2DModel, BasicTransformerBlock with ada_norm_single)",
    matches=_is_pixart,
    sublayers=_basic_blocks,
    token_grid=_latent_patch_grid,
)

ADAPTERS: tuple[Adapter, ...] = (PIXART,)


def supported_models() -> str:
    return "; ".join(a.name for a in ADAPTERS)


def find_adapter(model: nn.Module) -> Adapter:
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    raise TypeError(f"token merging does not support {type(model).__name__}; supported models: {supported_models()}")
