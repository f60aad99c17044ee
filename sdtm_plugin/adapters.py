"""Per-architecture adapters: which sub-layers are merged and what token grid each block works on.

An adapter lists, for one model family, every block's merged sub-layers (self-attention and feed-forward modules
whose first input is the (B, N, C) image-token sequence) and where the (h, w) token grid comes from. The merge,
schedule, cache and state code is shared by all families.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class SubLayer:
    """One merged module of a block.

    Attributes:
        name: key of its cache slot within the block ("attn", "attn2", "mlp").
        role: "attn" or "mlp": which of `merge_attn` / `merge_mlp` (and which phase) governs it.
        module: the module whose input is merged and whose output is unmerged.
    """

    name: str
    role: str
    module: nn.Module


@dataclass
class PatchLayout:
    """What one model exposes to merging.

    Attributes:
        blocks: per block, its sub-layers in call order.
        grid_sources: modules whose (B, C, H, W) input gives the token grid of the listed blocks (U-Net
            transformers, one per resolution); empty when every block works on the model input's grid.
    """

    blocks: list[list[SubLayer]]
    grid_sources: list[tuple[nn.Module, list[int]]] = field(default_factory=list)


@dataclass(frozen=True)
class Adapter:
    """How to patch one family of models.

    Attributes:
        name: shown in errors and logs.
        matches: whether a model belongs to this family.
        layout: the model's `PatchLayout`.
        token_grid: ``(model, input) -> (h, w)``, the token grid of the model's (B, C, H, W) latent input.
        input_name: keyword of that input in the model's forward ("hidden_states", or "sample" for U-Nets).
    """

    name: str
    matches: Callable[[nn.Module], bool]
    layout: Callable[[nn.Module], PatchLayout]
    token_grid: Callable[[nn.Module, torch.Tensor], tuple[int, int]]
    input_name: str = "hidden_states"


def _check_latents(hidden_states: torch.Tensor) -> None:
    if hidden_states.dim() != 4:
        raise ValueError(f"expected latents (B, C, H, W), got shape {tuple(hidden_states.shape)}")


def _patch_grid(model: nn.Module, hidden_states: torch.Tensor) -> tuple[int, int]:
    """(B, C, H, W) latents cut into p x p patches -> (H // p, W // p), row-major as PatchEmbed flattens them."""
    _check_latents(hidden_states)
    p = model.config.patch_size
    return hidden_states.shape[-2] // p, hidden_states.shape[-1] // p


def _pixel_grid(model: nn.Module, hidden_states: torch.Tensor) -> tuple[int, int]:
    _check_latents(hidden_states)
    return hidden_states.shape[-2], hidden_states.shape[-1]


def _basic_block(block: nn.Module) -> list[SubLayer]:
    return [SubLayer("attn", "attn", block.attn1), SubLayer("mlp", "mlp", block.ff)]


def _is_pixart(model: nn.Module) -> bool:
    from diffusers import PixArtTransformer2DModel

    return isinstance(model, PixArtTransformer2DModel) and all(
        getattr(b, "norm_type", None) == "ada_norm_single" for b in model.transformer_blocks
    )


def _is_dit(model: nn.Module) -> bool:
    from diffusers import DiTTransformer2DModel

    return isinstance(model, DiTTransformer2DModel) and all(
        getattr(b, "norm_type", None) == "ada_norm_zero" for b in model.transformer_blocks
    )


def _transformer_layout(model: nn.Module) -> PatchLayout:
    return PatchLayout([_basic_block(b) for b in model.transformer_blocks])


def _is_sd3(model: nn.Module) -> bool:
    from diffusers import SD3Transformer2DModel

    return isinstance(model, SD3Transformer2DModel)


def _sd3_layout(model: nn.Module) -> PatchLayout:
    """Image stream only: the joint attention's image input, the dual attention (SD3.5) and the image MLP.

    Text tokens are never merged; they attend to the merged image tokens in the joint attention.
    """
    blocks = []
    for block in model.transformer_blocks:
        subs = [SubLayer("attn", "attn", block.attn)]
        if getattr(block, "use_dual_attention", False):
            subs.append(SubLayer("attn2", "attn", block.attn2))
        subs.append(SubLayer("mlp", "mlp", block.ff))
        blocks.append(subs)
    return PatchLayout(blocks)


def _is_unet(model: nn.Module) -> bool:
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention import BasicTransformerBlock

    if not isinstance(model, UNet2DConditionModel):
        return False
    blocks = [m for m in model.modules() if isinstance(m, BasicTransformerBlock)]
    return bool(blocks) and all(b.norm_type == "layer_norm" and not b.only_cross_attention for b in blocks)


def _unet_layout(model: nn.Module) -> PatchLayout:
    """Every spatial transformer's blocks, each transformer's input giving its resolution's grid (tomesd's domain).

    Blocks are numbered in execution order (down, mid, up) so that layer protection's "last block" is the last run.
    """
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    blocks: list[list[SubLayer]] = []
    sources: list[tuple[nn.Module, list[int]]] = []
    stages = [*model.down_blocks, model.mid_block, *model.up_blocks]
    for module in (m for stage in stages if stage is not None for m in stage.modules()):
        if isinstance(module, Transformer2DModel):
            first = len(blocks)
            blocks.extend(_basic_block(b) for b in module.transformer_blocks)
            sources.append((module, list(range(first, len(blocks)))))
    return PatchLayout(blocks, sources)


ADAPTERS: tuple[Adapter, ...] = (
    Adapter(
        "PixArt-alpha / PixArt-Sigma (PixArtTransformer2DModel, BasicTransformerBlock with ada_norm_single)",
        _is_pixart, _transformer_layout, _patch_grid,
    ),
    Adapter(
        "Stable Diffusion 3 / 3.5 (SD3Transformer2DModel, JointTransformerBlock, image stream)",
        _is_sd3, _sd3_layout, _patch_grid,
    ),
    Adapter("DiT (DiTTransformer2DModel, BasicTransformerBlock with ada_norm_zero)", _is_dit, _transformer_layout, _patch_grid),
    Adapter(
        "Stable Diffusion 1.x / 2.x U-Net (UNet2DConditionModel, BasicTransformerBlock with layer_norm)",
        _is_unet, _unet_layout, _pixel_grid, input_name="sample",
    ),
)


def supported_models() -> str:
    return "; ".join(a.name for a in ADAPTERS)


def find_adapter(model: nn.Module) -> Adapter:
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    raise TypeError(f"token merging does not support {type(model).__name__}; supported models: {supported_models()}")
