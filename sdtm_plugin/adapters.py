"""Per-architecture adapters: which sub-layers are merged and what token grid each block works on.

An adapter lists, for one model family, every block's merged sub-layers (self-attention and feed-forward modules
whose first input is the (B, N, C) image-token sequence or a joint [text; image] one, or a `ParallelBlock`) and
where the (h, w) token grid comes from. The merge, schedule, cache and state code is shared by all families. Rotary
models (FLUX.1, FLUX.2, Qwen-Image, Wan, HunyuanVideo) name where their queries and keys are made (`RotarySite`), so
that rows merged or selected per image are rotated per row (`rotary.RowRotary`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .rotary import RotaryArg, complex_pairs


@dataclass(frozen=True)
class RotarySite:
    """A module of an attention whose output is the query or key that its processor then rotates (FLUX: the
    per-head RMS norms; Wan: the norms across heads). Methods that reduce only the query rows (token caching) rotate
    there, each row by its own position, and withhold the table from the processor.

    Attributes:
        module: the norm (its output is (B, S, H, D), or (B, S, H·D) with heads flattened).
        side: "query" or "key".
        rows: what its rows are: "image" tokens, "text" tokens, "joint" [text; image], or "image_text" [image; text]
            with the text rows unrotated (HunyuanVideo's single-stream attention).
    """

    module: nn.Module
    side: str
    rows: str


@dataclass(frozen=True)
class SubLayer:
    """One merged module of a block.

    Attributes:
        name: key of its cache slot within the block ("attn", "attn2", "mlp").
        role: "attn" (self-attention), "cross" (cross-attention to the text) or "mlp": which of the method's flags
            (and which phase) governs it.
        module: the module whose input is merged and whose output is unmerged.
        rotary: where the module receives a rotary table over [text; image] tokens, which is merged with the tokens;
            None: no rotary positions.
        query: a self-attention's query projection: where a method that keeps every key (token caching) reduces the
            rows, the keys and values being projected from the whole input; None: not supported there.
        keys: its key and value projections: where a method that keeps every query merges the rows.
        sites: where its queries and keys are rotated (rotary models).
        joint: its input is the joint [text; image] sequence, text first (FLUX.2's single-stream block, whose one
            attention module also runs the MLP branch): only the image suffix is merged, the text rows pass through.
        text_mask: its `attention_mask` covers the text rows only and the processor pads it to the query count
            (HunyuanVideo 1.5): the mask passes through a merged call, and queries and keys must be the same rows.
        key_mask: its `attention_mask` is a key mask (B, 1, 1, N + T) or (B, N + T) over [image; text] that keeps
            every image column (HunyuanVideo 1.0, Z-Image): a call whose keys are merged keeps the mask's last N' + T
            columns.
        text_last: with `joint`, the sequence is [image; text] (Z-Image's), else [text; image].
    """

    name: str
    role: str
    module: nn.Module
    rotary: RotaryArg | None = None
    query: nn.Module | None = None
    keys: tuple[nn.Module, ...] = ()
    sites: tuple[RotarySite, ...] = ()
    joint: bool = False
    text_mask: bool = False
    key_mask: bool = False
    text_last: bool = False


@dataclass(frozen=True)
class ParallelBlock:
    """A block whose attention and MLP read one normalised [text; image] sequence side by side and whose outputs one
    projection mixes (FLUX's single-stream block): ``y = proj_out([attn(x); act_mlp(proj_mlp(x))])``.

    The image rows of x are merged once (at `proj_mlp`'s input, the first call) and the merge reused at `attn`'s
    input; outputs are unmerged where the merged rows end: at `proj_out`'s output when both branches merge (the
    projection, ~40 % of the block's linear MACs, then runs on the merged rows too), else at the merged branch's
    output. Text rows are never merged.

    Attributes:
        text_last: the sequence is [image; text] (HunyuanVideo's single-stream block, whose attention reads the image
            rows and the text rows as two inputs and returns them as a pair), else [text; image] (FLUX's).
        key_mask: as `SubLayer.key_mask`.
    """

    proj_mlp: nn.Module
    act_mlp: nn.Module
    attn: nn.Module
    proj_out: nn.Module
    rotary: RotaryArg | None = None
    query: nn.Module | None = None
    keys: tuple[nn.Module, ...] = ()
    sites: tuple[RotarySite, ...] = ()
    text_last: bool = False
    key_mask: bool = False


@dataclass
class PatchLayout:
    """What one model exposes to merging.

    Attributes:
        blocks: per block, its sub-layers in call order, or its `ParallelBlock`.
        grid_sources: modules whose (B, C, H, W) input gives the token grid of the listed blocks (U-Net
            transformers, one per resolution); empty when every block works on the model input's grid.
    """

    blocks: list[list[SubLayer] | ParallelBlock]
    grid_sources: list[tuple[nn.Module, list[int]]] = field(default_factory=list)

    def sublayer_modules(self, roles: tuple[str, ...] = ("attn", "mlp")) -> list[nn.Module]:
        """Every self-attention and MLP module (a `ParallelBlock`'s attention and MLP input projection), and the
        modules of other `roles` asked for ("cross")."""
        return [module for block in self.blocks
                for module in ([block.attn, block.proj_mlp] if isinstance(block, ParallelBlock)
                               else [sub.module for sub in block if sub.role in roles])]


@dataclass(frozen=True)
class Adapter:
    """How to patch one family of models.

    Attributes:
        name: shown in errors and logs.
        matches: whether a model belongs to this family.
        layout: the model's `PatchLayout`.
        token_grid: ``(model, input, inputs) -> (h, w)`` or ``(frames, h, w)``, the token grid of the model's latent input, `inputs`
            holding the forward's arguments named in `grid_inputs`.
        input_name: keyword of that input in the model's forward ("hidden_states", or "sample" for U-Nets).
        grid_inputs: other arguments of the forward that `token_grid` reads (FLUX: its packed tokens' "img_ids").
        video: its token grid is (frames, h, w), so windows may span frames (`st` > 1).
        timestep_name: keyword of the timestep in the model's forward; None where it is no timestep the clock can
            read (Z-Image's `t` is (1000 - t) / 1000, rising: a bare model's forwards are then counted).
    """

    name: str
    matches: Callable[[nn.Module], bool]
    layout: Callable[[nn.Module], PatchLayout]
    token_grid: Callable[[nn.Module, torch.Tensor, Mapping[str, Any]], tuple[int, ...]]
    input_name: str = "hidden_states"
    grid_inputs: tuple[str, ...] = ()
    video: bool = False
    timestep_name: str | None = "timestep"


def _check_latents(hidden_states: torch.Tensor) -> None:
    if hidden_states.dim() != 4:
        raise ValueError(f"expected latents (B, C, H, W), got shape {tuple(hidden_states.shape)}")


def _patch_grid(model: nn.Module, hidden_states: torch.Tensor, inputs: Mapping[str, Any]) -> tuple[int, int]:
    """(B, C, H, W) latents cut into p x p patches -> (H // p, W // p), row-major as PatchEmbed flattens them."""
    _check_latents(hidden_states)
    p = model.config.patch_size
    return hidden_states.shape[-2] // p, hidden_states.shape[-1] // p


def _pixel_grid(model: nn.Module, hidden_states: torch.Tensor, inputs: Mapping[str, Any]) -> tuple[int, int]:
    _check_latents(hidden_states)
    return hidden_states.shape[-2], hidden_states.shape[-1]


def _basic_block(block: nn.Module) -> list[SubLayer]:
    """Self-attention, cross-attention (when the block has one) and MLP of a `BasicTransformerBlock`."""
    attn = block.attn1
    subs = [SubLayer("attn", "attn", attn, query=attn.to_q, keys=(attn.to_k, attn.to_v))]
    if block.attn2 is not None:
        subs.append(SubLayer("attn2", "cross", block.attn2))
    return [*subs, SubLayer("mlp", "mlp", block.ff)]


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


def _is_flux(model: nn.Module) -> bool:
    from diffusers import FluxTransformer2DModel

    return isinstance(model, FluxTransformer2DModel)


_FLUX_ROTARY = RotaryArg("image_rotary_emb", None, seq_dim=0)  # (T + N, head_dim) cos and sin, text rows first


def _flux_grid(model: nn.Module, hidden_states: torch.Tensor, inputs: Mapping[str, Any]) -> tuple[int, int]:
    """The (h, w) grid of FLUX.1's packed tokens (B, N, C), read off `img_ids` (N, 3) = [0, row, col] in row-major
    order (FluxPipeline's). Raises for ids that are no such grid (FLUX Kontext and FLUX Fill append reference-image
    tokens: not supported)."""
    return _ids_grid(hidden_states, inputs.get("img_ids"), "FLUX", (1, 2), 3,
                     "reference-image tokens, as in FLUX Kontext, are not supported")


def _flux2_grid(model: nn.Module, hidden_states: torch.Tensor, inputs: Mapping[str, Any]) -> tuple[int, int]:
    """The (h, w) grid of FLUX.2's packed tokens, read off `img_ids` (N, 4) = [0, row, col, 0] (Flux2Pipeline's
    [time, row, column, layer]). Reference images (their tokens appended with other time ids) and the reference-image
    KV cache (`kv_cache_mode`, FLUX.2 Klein) are refused."""
    if inputs.get("kv_cache_mode") is not None:
        raise ValueError(
            f"token merging does not support FLUX.2's reference-image KV cache (kv_cache_mode="
            f"{inputs['kv_cache_mode']!r}): its cached reference keys sit between the text and the image rows; "
            "generate without reference images")
    return _ids_grid(hidden_states, inputs.get("img_ids"), "FLUX.2", (1, 2), 4,
                     "reference-image tokens (image editing) are not supported")


def _ids_grid(hidden_states: torch.Tensor, ids: torch.Tensor | None, family: str, axes: tuple[int, int],
              width: int, refused: str) -> tuple[int, int]:
    """(h, w) of packed tokens (B, N, C) whose position ids (N, `width`) hold [row, col] at columns `axes` and 0
    elsewhere, in row-major order; one host sync per ids tensor (the pipeline passes the same one at every step: the
    grid is kept on the tensor, with the version it was read at, and goes with it)."""
    if hidden_states.dim() != 3:
        raise ValueError(f"expected packed latents (B, N, C), got shape {tuple(hidden_states.shape)}")
    if ids is None:
        raise ValueError(f"{family} token merging needs the forward's img_ids to know the token grid")
    if ids.dim() == 3:  # the batched form: one grid for the batch
        ids = ids[0]
    n = hidden_states.shape[1]
    if ids.is_meta:  # shape-only runs (MAC counting) have no ids to read: a square grid
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"on the meta device the {family} token grid must be square, got {n} tokens")
        return side, side
    known = getattr(ids, "_sdtm_grid", None)
    if known is not None and known[0] == ids._version:
        return known[1]
    if ids.shape != (n, width):
        raise ValueError(f"img_ids must be ({n}, {width}) for {n} image tokens, got {tuple(ids.shape)}")
    h, w = (int(v) + 1 for v in ids[:, list(axes)].amax(0).tolist())
    expected = torch.zeros(h * w, width, dtype=ids.dtype, device=ids.device)
    expected[:, axes[0]] = torch.arange(h, device=ids.device).repeat_interleave(w)
    expected[:, axes[1]] = torch.arange(w, device=ids.device).repeat(h)
    if h * w != n or not torch.equal(ids, expected):
        raise ValueError(f"token merging supports {family} image tokens on one row-major grid; these img_ids are not "
                         f"one ({refused})")
    ids._sdtm_grid = (ids._version, (h, w))
    return h, w


def _flux_layout(model: nn.Module) -> PatchLayout:
    """Double-stream blocks: the joint attention's image input (with its rotary table) and the image MLP; single-stream
    blocks: the image suffix of the joint sequence (`ParallelBlock`). Text tokens are never merged."""
    blocks: list[list[SubLayer] | ParallelBlock] = [
        [SubLayer("attn", "attn", b.attn, _FLUX_ROTARY, b.attn.to_q, (b.attn.to_k, b.attn.to_v),
                  _flux_sites(b.attn, "image")), SubLayer("mlp", "mlp", b.ff)]
        for b in model.transformer_blocks
    ]
    blocks += [ParallelBlock(b.proj_mlp, b.act_mlp, b.attn, b.proj_out, _FLUX_ROTARY, b.attn.to_q,
                             (b.attn.to_k, b.attn.to_v), _flux_sites(b.attn, "joint"))
               for b in model.single_transformer_blocks]
    return PatchLayout(blocks)


def _flux_sites(attn: nn.Module, rows: str) -> tuple[RotarySite, ...]:
    """FLUX rotates queries and keys after its per-head RMS norms: the image (double-stream) or joint (single-stream)
    stream's, and the double-stream text stream's (`norm_added_q` / `norm_added_k`)."""
    sites = (RotarySite(attn.norm_q, "query", rows), RotarySite(attn.norm_k, "key", rows))
    if getattr(attn, "added_kv_proj_dim", None) is not None:
        sites += (RotarySite(attn.norm_added_q, "query", "text"), RotarySite(attn.norm_added_k, "key", "text"))
    return sites


def _is_wan(model: nn.Module) -> bool:
    from diffusers import WanTransformer3DModel

    return isinstance(model, WanTransformer3DModel)


_WAN_ROTARY = RotaryArg("rotary_emb", 3, seq_dim=1)  # (1, N, 1, head_dim) cos and sin; attn1(x, None, None, rotary)


def _wan_grid(model: nn.Module, hidden_states: torch.Tensor, inputs: Mapping[str, Any]) -> tuple[int, int, int]:
    """Wan's (frames, rows, columns) video token grid after its (1, 2, 2) patches, tokens flattened frame by frame:
    windows span `st` frames (1: within a frame), global matching (IDM, ToMe) pairs tokens across all frames."""
    return _video_grid(hidden_states, model.config.patch_size)


def _video_grid(hidden_states: torch.Tensor, patch: tuple[int, int, int]) -> tuple[int, int, int]:
    """(B, C, F, H, W) latents in (pt, ph, pw) patches -> the (frames, rows, columns) token grid."""
    if hidden_states.dim() != 5:
        raise ValueError(f"expected video latents (B, C, F, H, W), got shape {tuple(hidden_states.shape)}")
    return tuple(size // p for size, p in zip(hidden_states.shape[2:], patch))


def _wan_layout(model: nn.Module) -> PatchLayout:
    """Self-attention (with its 3-D rotary table), cross-attention to the text and feed-forward of every block (the
    merging methods leave the cross-attention on all tokens, as PixArt's)."""
    return PatchLayout([[SubLayer("attn", "attn", b.attn1, _WAN_ROTARY, b.attn1.to_q, (b.attn1.to_k, b.attn1.to_v),
                                  (RotarySite(b.attn1.norm_q, "query", "image"), RotarySite(b.attn1.norm_k, "key", "image"))),
                         SubLayer("attn2", "cross", b.attn2), SubLayer("mlp", "mlp", b.ffn)]
                        for b in model.blocks])


def _is_flux2(model: nn.Module) -> bool:
    from diffusers import Flux2Transformer2DModel

    return isinstance(model, Flux2Transformer2DModel)


def _flux2_layout(model: nn.Module) -> PatchLayout:
    """Double-stream blocks as FLUX.1's; single-stream blocks: the attention module, which runs the MLP branch too
    (one fused input projection, one fused output projection), merged on the image suffix of its joint input
    (`SubLayer.joint`, role "attn": both branches see the merged rows)."""
    blocks: list[list[SubLayer] | ParallelBlock] = [
        [SubLayer("attn", "attn", b.attn, _FLUX_ROTARY, b.attn.to_q, (b.attn.to_k, b.attn.to_v),
                  _flux_sites(b.attn, "image")), SubLayer("mlp", "mlp", b.ff)]
        for b in model.transformer_blocks
    ]
    blocks += [[SubLayer("attn", "attn", b.attn, _FLUX_ROTARY,
                         sites=(RotarySite(b.attn.norm_q, "query", "joint"), RotarySite(b.attn.norm_k, "key", "joint")),
                         joint=True)]
               for b in model.single_transformer_blocks]
    return PatchLayout(blocks)


def _is_qwen_image(model: nn.Module) -> bool:
    from diffusers import QwenImageTransformer2DModel

    return isinstance(model, QwenImageTransformer2DModel)


# (image (N, D/2), text (T, D/2)) complex rotations, passed by keyword
_QWEN_ROTARY = RotaryArg("image_rotary_emb", None, seq_dim=0, pairs=complex_pairs)


def _qwen_grid(model: nn.Module, hidden_states: torch.Tensor, inputs: Mapping[str, Any]) -> tuple[int, int]:
    """Qwen-Image's (h, w) token grid from the forward's `img_shapes`, per image a list of (frames, h, w) shapes
    (QwenImagePipeline's ``[[(1, h, w)]] * batch``). One image per sample: several shapes (Qwen-Image-Edit's
    reference images, appended to the tokens) are refused."""
    if hidden_states.dim() != 3:
        raise ValueError(f"expected packed latents (B, N, C), got shape {tuple(hidden_states.shape)}")
    shapes = inputs.get("img_shapes")
    if not shapes:
        raise ValueError("Qwen-Image token merging needs the forward's img_shapes to know the token grid")
    first = [tuple(int(v) for v in shape) for shape in shapes[0]]
    if len(first) != 1 or first[0][0] != 1 or any([tuple(int(v) for v in s) for s in sample] != first
                                                   for sample in shapes):
        raise ValueError(f"token merging supports one image of one frame per sample (img_shapes [[(1, h, w)]] per "
                         f"image), got {shapes[0]!r}; reference images (Qwen-Image-Edit) are not supported")
    _, h, w = first[0]
    if h * w != hidden_states.shape[1]:
        raise ValueError(f"img_shapes give {h} x {w} tokens, the latents hold {hidden_states.shape[1]}")
    return h, w


def _qwen_layout(model: nn.Module) -> PatchLayout:
    """The image stream of every dual-stream block: the joint attention's image input (its complex 3-axis rotary
    table, text positions after the image's) and the image MLP. Text tokens are never merged."""
    norms = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")
    if any(getattr(b.attn, n, None) is None for b in model.transformer_blocks for n in norms):
        raise TypeError("Qwen-Image blocks without query/key norms (qk_norm=None) have no place to rotate merged rows")
    return PatchLayout([
        [SubLayer("attn", "attn", b.attn, _QWEN_ROTARY, b.attn.to_q, (b.attn.to_k, b.attn.to_v),
                  (RotarySite(b.attn.norm_q, "query", "image"), RotarySite(b.attn.norm_k, "key", "image"),
                   RotarySite(b.attn.norm_added_q, "query", "text"), RotarySite(b.attn.norm_added_k, "key", "text"))),
         SubLayer("mlp", "mlp", b.img_mlp)]
        for b in model.transformer_blocks
    ])


def _is_z_image(model: nn.Module) -> bool:
    from diffusers import ZImageTransformer2DModel

    return isinstance(model, ZImageTransformer2DModel)


# (B, S, D/2) complex, one table per image over its [image; caption] sequence (the image's positions follow its caption)
_Z_IMAGE_ROTARY = RotaryArg("freqs_cis", None, seq_dim=1, per_image=True)
_Z_IMAGE_SEQ_MULTIPLE = 32  # Z-Image pads every image's and caption's tokens to a multiple of this


def _z_image_grid(model: nn.Module, images: Any, inputs: Mapping[str, Any]) -> tuple[int, int]:
    """Z-Image's (h, w) token grid: its input is a list of (C, F, H, W) latents, one per image, patchified in
    `patch_size` x `patch_size` patches. Every image of a call must have one size with a token count that needs no
    padding (a multiple of 32: 1024 px gives 4096), so that the image rows lead every unified sequence."""
    if not isinstance(images, (list, tuple)) or not images or not all(isinstance(x, torch.Tensor) for x in images):
        raise ValueError("Z-Image token merging supports its standard mode (a list of (C, F, H, W) latents); the omni "
                         "mode's nested lists (reference images, SigLIP features) are not supported")
    shapes = {tuple(x.shape) for x in images}
    if len(shapes) != 1 or len(next(iter(shapes))) != 4 or next(iter(shapes))[1] != 1:
        raise ValueError(f"Z-Image token merging needs every image of a call at one size and one frame, got latent "
                         f"shapes {sorted(shapes)}")
    p = inputs.get("patch_size") or 2
    _, _, height, width = next(iter(shapes))
    h, w = height // p, width // p
    if (h * w) % _Z_IMAGE_SEQ_MULTIPLE:
        raise ValueError(f"Z-Image pads {h} x {w} = {h * w} image tokens to a multiple of {_Z_IMAGE_SEQ_MULTIPLE}; token "
                         f"merging needs a token count without padding (e.g. 1024 x 1024 px: 64 x 64)")
    return h, w


def _z_image_layout(model: nn.Module) -> PatchLayout:
    """The main layers' attention and feed-forward on the image prefix of each [image; caption] sequence; the noise
    and context refiners and the caption rows never merge."""
    return PatchLayout([
        [SubLayer("attn", "attn", b.attention, _Z_IMAGE_ROTARY, b.attention.to_q,
                  (b.attention.to_k, b.attention.to_v), joint=True, key_mask=True, text_last=True),
         SubLayer("mlp", "mlp", b.feed_forward, joint=True, text_last=True)]
        for b in model.layers
    ])


def _is_hunyuan_video(model: nn.Module) -> bool:
    """HunyuanVideo 1.0 with its plain blocks (the token-replace blocks of its I2V variant are not supported)."""
    from diffusers import HunyuanVideoTransformer3DModel
    from diffusers.models.transformers.transformer_hunyuan_video import (HunyuanVideoSingleTransformerBlock,
                                                                         HunyuanVideoTransformerBlock)

    return (isinstance(model, HunyuanVideoTransformer3DModel)
            and all(type(b) is HunyuanVideoTransformerBlock for b in model.transformer_blocks)
            and all(type(b) is HunyuanVideoSingleTransformerBlock for b in model.single_transformer_blocks))


def _hunyuan_layout(model: nn.Module) -> PatchLayout:
    """Dual-stream blocks: the joint attention's video input (3-D rotary positions on the video rows only, the text
    after the video and unrotated, a key mask over both) and the video MLP; single-stream blocks: the video prefix of
    the [video; text] sequence (`ParallelBlock` with `text_last`). The token refiner and the text never merge."""
    blocks: list[list[SubLayer] | ParallelBlock] = [
        [SubLayer("attn", "attn", b.attn, _HUNYUAN_ROTARY, b.attn.to_q, (b.attn.to_k, b.attn.to_v),
                  (RotarySite(b.attn.norm_q, "query", "image"), RotarySite(b.attn.norm_k, "key", "image")),
                  key_mask=True),
         SubLayer("mlp", "mlp", b.ff)]
        for b in model.transformer_blocks
    ]
    blocks += [ParallelBlock(b.proj_mlp, b.act_mlp, b.attn, b.proj_out, _HUNYUAN_ROTARY, b.attn.to_q,
                             (b.attn.to_k, b.attn.to_v),
                             (RotarySite(b.attn.norm_q, "query", "image_text"),
                              RotarySite(b.attn.norm_k, "key", "image_text")), text_last=True, key_mask=True)
               for b in model.single_transformer_blocks]
    return PatchLayout(blocks)


def _is_hunyuan_video15(model: nn.Module) -> bool:
    from diffusers import HunyuanVideo15Transformer3DModel

    return isinstance(model, HunyuanVideo15Transformer3DModel)


_HUNYUAN_ROTARY = RotaryArg("image_rotary_emb", None, seq_dim=0)  # (N, D) cos and sin over the video rows only


def _hunyuan_grid(model: nn.Module, hidden_states: torch.Tensor, inputs: Mapping[str, Any]) -> tuple[int, int, int]:
    """HunyuanVideo's (frames, rows, columns) token grid after its (patch_size_t, patch_size, patch_size) patches,
    tokens flattened frame by frame."""
    p = model.config.patch_size
    return _video_grid(hidden_states, (model.config.patch_size_t, p, p))


def _hunyuan15_layout(model: nn.Module) -> PatchLayout:
    """Every dual-stream block's video stream: the joint attention's video input (rotary positions on the video rows
    only, the text unrotated and after the video) and the video MLP. The token refiner and the text stream are
    untouched."""
    return PatchLayout([
        [SubLayer("attn", "attn", b.attn, _HUNYUAN_ROTARY,
                  sites=(RotarySite(b.attn.norm_q, "query", "image"), RotarySite(b.attn.norm_k, "key", "image")),
                  text_mask=True),
         SubLayer("mlp", "mlp", b.ff)]
        for b in model.transformer_blocks
    ])


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
        "FLUX.1 (FluxTransformer2DModel: double-stream image stream and single-stream image suffix, rotary positions)",
        _is_flux, _flux_layout, _flux_grid, grid_inputs=("img_ids",),
    ),
    Adapter(
        "FLUX.2 (Flux2Transformer2DModel: double-stream image stream and single-stream image suffix, 4-axis rotary "
        "positions)",
        _is_flux2, _flux2_layout, _flux2_grid, grid_inputs=("img_ids", "kv_cache_mode"),
    ),
    Adapter(
        "Qwen-Image (QwenImageTransformer2DModel: dual-stream image stream, 3-axis rotary positions)",
        _is_qwen_image, _qwen_layout, _qwen_grid, grid_inputs=("img_shapes",),
    ),
    Adapter(
        "Wan 2.1 / 2.2 video (WanTransformer3DModel: self-attention with 3-D rotary positions, feed-forward)",
        _is_wan, _wan_layout, _wan_grid, video=True,
    ),
    Adapter(
        "HunyuanVideo 1.0 (HunyuanVideoTransformer3DModel with its plain blocks: dual-stream video stream and "
        "single-stream video prefix, 3-D rotary positions)",
        _is_hunyuan_video, _hunyuan_layout, _hunyuan_grid, video=True,
    ),
    Adapter(
        "HunyuanVideo 1.5 (HunyuanVideo15Transformer3DModel: dual-stream video stream, 3-D rotary positions)",
        _is_hunyuan_video15, _hunyuan15_layout, _hunyuan_grid, video=True,
    ),
    Adapter(
        "Z-Image (ZImageTransformer2DModel: main layers on the image prefix of each [image; caption] sequence, "
        "per-image rotary tables)",
        _is_z_image, _z_image_layout, _z_image_grid, input_name="x", grid_inputs=("patch_size",), timestep_name=None,
    ),
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
