"""Offline model zoo: the trained reference pipeline, and pipelines built from configs with random weights.

No weights can be downloaded on our machines. One preset carries **learned weights**: ``pixart-shapes``, a small
PixArt-alpha pipeline the project trained on its procedural captioned shapes (`benchmarks.reference.train`) and ships in
``benchmarks/reference/weights/pixart-shapes`` (loaded with `from_pretrained`); image-quality figures (prompt adherence,
FID / KID) are measured on it. Every other preset is built from a config with **random weights** (cost and token
counts do not depend on the weights), written with `save_pretrained` and read back with `from_pretrained`, so the
real loading path is the one exercised; on those, PSNR / SSIM against the baseline say how much a method changes
the output, not image quality. Text encoders are small random T5 / CLIP models with a word-level tokenizer built
in code; the denoiser (transformer or U-Net) has the preset's real architecture. Full-size presets reproduce the
published denoiser configs (PixArt-XL-2, SD3-medium, DiT-XL/2, SD 1.5) and are built on the ``meta`` device to
count MACs. A diffusers checkpoint path or hub name (e.g. ``PixArt-alpha/PixArt-XL-2-512x512``) loads as usual.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

DEFAULT_CACHE = Path(os.environ.get("SDTM_MODEL_CACHE", Path.home() / ".cache" / "sdtm_plugin" / "models"))
from .reference import WEIGHTS
FAMILIES = ("pixart", "sd3", "dit", "sd-unet", "flux", "wan", "flux2", "qwen-image", "hunyuan-video", "z-image")
MACS_ONLY = ("flux2", "qwen-image", "hunyuan-video", "z-image")  # families whose text encoders are not built here
VIDEO = ("wan", "hunyuan-video")  # (frames, height, width) latents

PACKED = ("flux", "flux2", "qwen-image")  # families whose pipelines pack 2 x 2 latent pixels per token

_WORDS = (
    "a an the of and with in on at to from by for under over near far big small red green blue yellow black white "
    "cat dog bird fish horse cow tree flower house car boat city river mountain sky sun moon star cloud forest "
    "photo painting portrait landscape close up view night day morning evening light dark bright soft detailed "
    "astronaut riding sitting running standing old young man woman child robot castle garden beach ocean snow"
).split()


@dataclass(frozen=True)
class ModelPreset:
    """One pipeline of the zoo.

    Attributes:
        family: one of `FAMILIES`: which pipeline and denoiser class (those of `MACS_ONLY` count MACs only: their
            pipelines' text encoders are not built here).
        denoiser: the denoiser's config (constructor keywords), the published one for full-size presets.
        text_dim: width of the small random text encoder(s) (T5 d_model; CLIP hidden sizes for SD3 / SD U-Nets).
        text_tokens: text tokens the pipeline hands the denoiser (PixArt 120, SD3 77 + 256 = 333, SD 77, DiT 0,
            FLUX.1-dev 512 T5 tokens, schnell 256; Wan 512 UMT5 tokens).
        vae_channels: VAE `block_out_channels`; images are ``latent side * 2^(len - 1)`` pixels.
        text_layers / text_ff: depth and feed-forward width of the random text encoders.
        full_size: a published architecture (MAC counting builds it on the meta device).
        weights: folder of a trained pipeline shipped with the project (learned weights), else None (random).
        data: the data set a trained preset learnt (`benchmarks.reference.data`), whose quality protocol scores it.
    """

    family: str
    denoiser: dict
    text_dim: int | tuple[int, ...]
    text_tokens: int
    vae_channels: tuple[int, ...]
    text_layers: int = 1
    text_ff: int = 64
    full_size: bool = False
    description: str = ""
    extra: dict = field(default_factory=dict)
    weights: Path | None = None
    data: str = ""

    @property
    def trained(self) -> bool:
        return self.weights is not None

    @property
    def sample_size(self) -> int:
        """Side (video: height) of the VAE latent (FLUX's and the video models' configs have none: the preset's `extra`
        holds it)."""
        if self.family in VIDEO:
            return self.extra["latent"][1]
        return self.denoiser.get("sample_size", self.extra.get("sample_size"))

    @property
    def token_patch(self) -> int:
        """Latent pixels per token side: the denoiser's patch size; FLUX packs 2 x 2 latent pixels per token."""
        if self.family == "z-image":
            return self.denoiser.get("all_patch_size", (2,))[0]
        return 2 if self.family in PACKED else self.denoiser.get("patch_size", 1)

    @property
    def num_tokens(self) -> int:
        if self.family in VIDEO:  # (frames, height, width) latents in (pt, p, p) patches (Wan: (1, 2, 2))
            frames, height, width = self.extra["latent"]
            pt, p = (1, 2) if self.family == "wan" else (self.denoiser.get("patch_size_t", 1), self.token_patch)
            return (frames // pt) * (height // p) * (width // p)
        return (self.sample_size // self.token_patch) ** 2

    @property
    def resolution(self) -> int:
        return self.sample_size * 2 ** (len(self.vae_channels) - 1)

    @property
    def latent_channels(self) -> int:
        if self.family in PACKED:  # packed: 2 x 2 latent pixels per token
            return self.denoiser["in_channels"] // 4
        if self.family in VIDEO:
            return self.denoiser["in_channels"]
        return self.denoiser.get("in_channels", 4)


def _trained(name: str, description: str) -> ModelPreset:
    """A shipped trained pipeline (PixArt or FLUX) as a preset: its denoiser config and geometry read from the saved
    configs."""
    folder = WEIGHTS / name
    read = lambda part: json.loads((folder / part / "config.json").read_text())  # noqa: E731
    denoiser = {k: v for k, v in read("transformer").items() if not k.startswith("_")}
    vae = read("vae")
    trained = json.loads((folder / "train_config.json").read_text())
    data = trained.get("data", "shapes")
    if trained.get("arch", "pixart") == "flux":
        clip, t5 = read("text_encoder"), read("text_encoder_2")
        latent = vae["sample_size"] // 2 ** (len(vae["block_out_channels"]) - 1)
        return ModelPreset(
            "flux", denoiser, (clip["hidden_size"], t5["d_model"]), trained["text_tokens"],
            tuple(vae["block_out_channels"]), text_layers=t5["num_layers"], text_ff=t5["d_ff"],
            description=description, weights=folder, data=data, extra={"sample_size": latent},
        )
    text = read("text_encoder")
    return ModelPreset(
        "pixart", denoiser, text["d_model"], 120, tuple(vae["block_out_channels"]), text_layers=text["num_layers"],
        text_ff=text["d_ff"], description=description, weights=folder, data=data,
    )


def _pixart(num_layers, heads, head_dim, sample_size, caption_channels) -> dict:
    return dict(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8, num_layers=num_layers,
        cross_attention_dim=heads * head_dim, sample_size=sample_size, patch_size=2, caption_channels=caption_channels,
        norm_num_groups=min(32, heads * head_dim),
    )


def _sd3(num_layers, heads, head_dim, sample_size, joint_dim, pooled_dim, pos_max, dual=()) -> dict:
    return dict(
        sample_size=sample_size, patch_size=2, in_channels=16, num_layers=num_layers, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=joint_dim, caption_projection_dim=heads * head_dim,
        pooled_projection_dim=pooled_dim, out_channels=16, pos_embed_max_size=pos_max, dual_attention_layers=dual,
    )


def _dit(num_layers, heads, head_dim, sample_size) -> dict:
    return dict(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8, num_layers=num_layers,
        sample_size=sample_size, patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=min(32, heads * head_dim),
    )


def _unet(channels, cross_dim, head_dim, sample_size, layers_per_block=2, groups=32) -> dict:
    n = len(channels)
    return dict(
        block_out_channels=channels, layers_per_block=layers_per_block, sample_size=sample_size, in_channels=4,
        out_channels=4, down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1), cross_attention_dim=cross_dim,
        attention_head_dim=head_dim, norm_num_groups=groups,
    )


def _flux(num_layers, num_single_layers, heads, head_dim, joint_dim, pooled_dim, rope, guidance) -> dict:
    return dict(
        patch_size=1, in_channels=64, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=joint_dim,
        pooled_projection_dim=pooled_dim, guidance_embeds=guidance, axes_dims_rope=rope,
    )


def _wan(num_layers, heads, head_dim, ffn_dim, text_dim, freq_dim, channels=16) -> dict:
    return dict(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=channels,
        out_channels=channels,
        text_dim=text_dim, freq_dim=freq_dim, ffn_dim=ffn_dim, num_layers=num_layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6,
    )


_SD_VAE = (128, 256, 512, 512)
# learned weights: the trained reference pipeline (image quality is measured on it); written by
# ``python -m benchmarks.reference.train --export benchmarks/reference/weights/<name>``
TRAINED_PRESETS = {
    "pixart-shapes": "trained PixArt-alpha on procedural shapes, 256 tokens, 64-px images (learned weights)",
    "pixart-shapes128": "pixart-shapes fine-tuned at twice the resolution: the same shapes, 1,024 tokens, 128-px images "
                        "(learned weights)",
    "pixart-scenes": "trained PixArt-alpha on procedural scenes of 1-3 objects, 1,024 tokens, 128-px images "
                     "(learned weights)",
    "flux-shapes": "trained FLUX-architecture model (double- and single-stream blocks, rotary positions) on "
                   "procedural shapes, 256 tokens, 64-px images (learned weights)",
}
PRESETS: dict[str, ModelPreset] = {
    name: _trained(name, description) for name, description in TRAINED_PRESETS.items()
    if (WEIGHTS / name / "model_index.json").exists()
}
PRESETS.update({
    # tests: tiny pipelines of each family, 32-px images
    "tiny": ModelPreset("pixart", _pixart(4, 2, 16, 16, 32), 32, 120, (8, 8), description="tiny PixArt, 64 tokens"),
    "tiny-sd3": ModelPreset(
        "sd3", _sd3(3, 2, 16, 16, 32, 32, 32, dual=(0,)), (16, 16), 77 + 256, (8, 8),
        description="tiny SD3.5-style (dual attention in block 0), 64 tokens",
    ),
    "tiny-dit": ModelPreset("dit", _dit(3, 2, 16, 16), 0, 0, (8, 8), description="tiny DiT, 64 tokens"),
    "tiny-wan": ModelPreset(
        "wan", {**_wan(2, 2, 16, 64, 32, 32), "rope_max_seq_len": 64}, 32, 16, (8, 8),
        description="tiny Wan 2.1-style video, 3 latent frames of 8 x 8 tokens", extra={"latent": (3, 16, 16)},
    ),
    "tiny-flux": ModelPreset(
        "flux", _flux(2, 2, 2, 16, 32, 32, (4, 6, 6), guidance=True), (32, 32), 16, (8, 8),
        description="tiny FLUX.1-dev-style (2 double- and 2 single-stream blocks, guidance), 64 tokens",
        extra={"sample_size": 16},
    ),
    "tiny-sd": ModelPreset(
        "sd-unet", _unet((16, 32), 32, 4, 16, layers_per_block=1, groups=8), 32, 77, (8, 8),
        description="tiny SD U-Net, 256 + 64 tokens",
    ),
    # the embedded default of the benchmark: PixArt-XL-2-512 geometry (1024 tokens, 512-px images) at a CPU-friendly
    # width and depth
    "pixart-small": ModelPreset(
        "pixart", _pixart(8, 6, 64, 64, 64), 64, 120, (16, 16, 16, 16), text_ff=128,
        description="PixArt, 1024 tokens, 8 blocks of width 384 (CPU default)",
    ),
    # published denoiser architectures (random weights; small random text encoders, SD VAE)
    "pixart-xl-2-512": ModelPreset(
        "pixart", _pixart(28, 16, 72, 64, 4096), 4096, 120, _SD_VAE, full_size=True,
        description="PixArt-XL-2 512x512 (PixArt-alpha/PixArt-XL-2-512x512)",
    ),
    "pixart-xl-2-1024": ModelPreset(
        "pixart", _pixart(28, 16, 72, 128, 4096), 4096, 120, _SD_VAE, full_size=True,
        description="PixArt-XL-2 1024x1024 (PixArt-alpha/PixArt-XL-2-1024-MS)",
    ),
    "pixart-sigma-xl-2-2k": ModelPreset(
        "pixart", _pixart(28, 16, 72, 256, 4096), 4096, 300, _SD_VAE, full_size=True,
        description="PixArt-Sigma XL-2 2048x2048, 16384 tokens (PixArt-alpha/PixArt-Sigma-XL-2-2K-MS; MACs only)",
    ),
    "sd3-medium": ModelPreset(
        "sd3", _sd3(24, 24, 64, 128, 4096, 2048, 192), (768, 1280), 77 + 256, _SD_VAE, full_size=True,
        description="Stable Diffusion 3 medium 1024x1024 (stabilityai/stable-diffusion-3-medium-diffusers)",
    ),
    "dit-xl-2-256": ModelPreset(
        "dit", _dit(28, 16, 72, 32), 0, 0, _SD_VAE, full_size=True,
        description="DiT-XL/2 256x256 (facebook/DiT-XL-2-256)",
    ),
    "flux-dev": ModelPreset(
        "flux", _flux(19, 38, 24, 128, 4096, 768, (16, 56, 56), guidance=True), (768, 4096), 512, _SD_VAE,
        full_size=True, extra={"sample_size": 128},
        description="FLUX.1-dev 1024x1024, 4096 tokens (black-forest-labs/FLUX.1-dev)",
    ),
    "flux-schnell": ModelPreset(
        "flux", _flux(19, 38, 24, 128, 4096, 768, (16, 56, 56), guidance=False), (768, 4096), 256, _SD_VAE,
        full_size=True, extra={"sample_size": 128},
        description="FLUX.1-schnell 1024x1024, 4096 tokens (black-forest-labs/FLUX.1-schnell)",
    ),
    # CPU timing at the real token count of a forward, reduced depth and width: FLUX.1-dev 1024 px (4096 image + 512
    # text tokens, 128-wide heads, its rotary axes) and Wan2.1 480p x 81 frames (32,760 tokens)
    "qwen-image-cpu": ModelPreset(
        "qwen-image", dict(patch_size=2, in_channels=64, out_channels=16, num_layers=1, attention_head_dim=128,
                           num_attention_heads=6, joint_attention_dim=64, axes_dims_rope=(16, 56, 56)),
        64, 256, (16, 16, 16, 16), extra={"sample_size": 128},
        description="Qwen-Image 1024 px geometry (4096 + 256 tokens) at 1 block of width 768 (CPU timing, bare "
                    "denoiser: `python -m benchmarks.host --real`)",
    ),
    "flux-dev-cpu": ModelPreset(
        "flux", _flux(1, 2, 6, 128, 64, 64, (16, 56, 56), guidance=True), (64, 64), 512, (16, 16, 16, 16),
        extra={"sample_size": 128},
        description="FLUX.1-dev geometry (4096 + 512 tokens) at 1 double + 2 single blocks of width 768 (CPU timing)",
    ),
    "wan2.1-480p-cpu": ModelPreset(
        "wan", _wan(1, 2, 128, 1024, 64, 64), 64, 512, (8, 8, 8, 8), extra={"latent": (21, 60, 104)},
        description="Wan2.1 480p x 81 frames geometry (32,760 tokens) at 1 block of width 256 (CPU timing)",
    ),
    # Wan 2.1 text-to-video, 81 frames (21 latent frames); the VAE is the 8x spatial, 4x temporal Wan VAE
    "wan2.1-1.3b-480p": ModelPreset(
        "wan", _wan(30, 12, 128, 8960, 4096, 256), 4096, 512, _SD_VAE, full_size=True, extra={"latent": (21, 60, 104)},
        description="Wan2.1-T2V-1.3B 480x832, 81 frames, 32,760 tokens (Wan-AI/Wan2.1-T2V-1.3B-Diffusers; MACs only)",
    ),
    "wan2.1-14b-720p": ModelPreset(
        "wan", _wan(40, 40, 128, 13824, 4096, 256), 4096, 512, _SD_VAE, full_size=True, extra={"latent": (21, 90, 160)},
        description="Wan2.1-T2V-14B 720x1280, 81 frames, 75,600 tokens (Wan-AI/Wan2.1-T2V-14B-Diffusers; MACs only)",
    ),
    # Wan 2.2 A14B: two experts of Wan2.1-14B's architecture (high noise, then low noise), one per forward
    "wan2.2-a14b-720p": ModelPreset(
        "wan", _wan(40, 40, 128, 13824, 4096, 256), 4096, 512, _SD_VAE, full_size=True, extra={"latent": (21, 90, 160)},
        description="Wan2.2-T2V-A14B 720x1280, 81 frames, 75,600 tokens, each forward one expert "
                    "(Wan-AI/Wan2.2-T2V-A14B-Diffusers; MACs only)",
    ),
    # Wan 2.2 TI2V-5B: 48-channel latents of a 16x spatial, 4x temporal VAE; 704 x 1280 x 121 frames -> (31, 44, 80)
    "wan2.2-ti2v-5b-720p": ModelPreset(
        "wan", _wan(30, 24, 128, 14336, 4096, 256, channels=48), 4096, 512, _SD_VAE, full_size=True,
        extra={"latent": (31, 44, 80)},
        description="Wan2.2-TI2V-5B 704x1280, 121 frames, 27,280 tokens (Wan-AI/Wan2.2-TI2V-5B-Diffusers; MACs only)",
    ),
    # HunyuanVideo 1.0 720 x 1280 x 129 frames: a 8x spatial, 4x temporal VAE -> (33, 90, 160) latents, 2 x 2 patches
    "hunyuan-video-720p": ModelPreset(
        "hunyuan-video", dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128,
                              num_layers=20, num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2,
                              patch_size_t=1, text_embed_dim=4096, pooled_projection_dim=768,
                              rope_axes_dim=(16, 56, 56)),
        4096, 256, _SD_VAE, full_size=True, extra={"latent": (33, 90, 160)},
        description="HunyuanVideo 720x1280, 129 frames, 118,800 tokens + 256 text "
                    "(hunyuanvideo-community/HunyuanVideo; MACs only)",
    ),
    "z-image-turbo": ModelPreset(
        "z-image", dict(in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2, n_heads=30, n_kv_heads=30,
                        cap_feat_dim=2560, axes_dims=[32, 48, 48]),
        2560, 512, _SD_VAE, full_size=True, extra={"sample_size": 128},
        description="Z-Image-Turbo 1024x1024, 4096 tokens + 512 caption (Tongyi-MAI/Z-Image-Turbo; MACs only)",
    ),
    "flux2-dev": ModelPreset(
        "flux2", dict(patch_size=1, in_channels=128, num_layers=8, num_single_layers=48, attention_head_dim=128,
                      num_attention_heads=48, joint_attention_dim=15360, timestep_guidance_channels=256,
                      mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), guidance_embeds=True),
        15360, 512, _SD_VAE, full_size=True, extra={"sample_size": 128},
        description="FLUX.2-dev 1024x1024, 4096 tokens + 512 text (black-forest-labs/FLUX.2-dev; MACs only)",
    ),
    "qwen-image": ModelPreset(
        "qwen-image", dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                           num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56)),
        3584, 256, _SD_VAE, full_size=True, extra={"sample_size": 128},
        description="Qwen-Image 1024x1024, 4096 tokens + 256 text (Qwen/Qwen-Image; MACs only)",
    ),
    "sd-1.5": ModelPreset(
        "sd-unet", _unet((320, 640, 1280, 1280), 768, 8, 64), 768, 77, _SD_VAE, full_size=True,
        description="Stable Diffusion 1.5 512x512 U-Net",
    ),
})


def word_tokenizer(max_length: int, words: Iterable[str] | None = None):
    """A word-level fast tokenizer over `words` (default: the random presets' vocabulary) with T5's special tokens
    (pad=0, eos=1, unk=2), built without any download."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in _WORDS if words is None else words:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_length
    )


def _t5(preset: ModelPreset, d_model: int, vocab: int):
    from transformers import T5Config, T5EncoderModel

    heads = max(1, d_model // 64) if d_model >= 64 else 2
    return T5EncoderModel(
        T5Config(
            vocab_size=vocab, d_model=d_model, d_kv=d_model // heads, d_ff=preset.text_ff,
            num_layers=preset.text_layers, num_heads=heads, pad_token_id=0, eos_token_id=1,
        )
    ).eval()


def _clip(preset: ModelPreset, hidden: int, vocab: int, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=preset.text_ff, num_hidden_layers=preset.text_layers,
        num_attention_heads=max(1, hidden // 64) if hidden >= 64 else 2, max_position_embeddings=77,
        projection_dim=hidden, pad_token_id=0, bos_token_id=1, eos_token_id=1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _vae(preset: ModelPreset, latent_channels: int, **extra):
    from diffusers import AutoencoderKL

    n = len(preset.vae_channels)
    return AutoencoderKL(**extra,
        block_out_channels=preset.vae_channels, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, latent_channels=latent_channels,
        layers_per_block=2 if preset.full_size else 1, norm_num_groups=min(32, preset.vae_channels[0]),
        sample_size=preset.resolution,
    ).eval()


def pipeline_class(preset: ModelPreset) -> type:
    import diffusers

    return getattr(diffusers, {
        "pixart": "PixArtAlphaPipeline", "sd3": "StableDiffusion3Pipeline", "dit": "DiTPipeline",
        "sd-unet": "StableDiffusionPipeline", "flux": "FluxPipeline", "wan": "WanPipeline", "flux2": "Flux2Pipeline",
        "qwen-image": "QwenImagePipeline", "hunyuan-video": "HunyuanVideoPipeline", "z-image": "ZImagePipeline",
    }[preset.family])


def call_default(pipeline_cls: type, name: str) -> Any:
    """The default of a pipeline call's argument (e.g. ``num_inference_steps``, ``guidance_scale``)."""
    import inspect

    return inspect.signature(pipeline_cls.__call__).parameters[name].default


def build_denoiser(preset: ModelPreset, device: str | torch.device = "cpu") -> nn.Module:
    """The preset's transformer / U-Net with random weights, built directly on `device` (``"meta"``: shapes only)."""
    from diffusers import (DiTTransformer2DModel, Flux2Transformer2DModel, FluxTransformer2DModel,
                           HunyuanVideoTransformer3DModel, PixArtTransformer2DModel, QwenImageTransformer2DModel,
                           SD3Transformer2DModel, UNet2DConditionModel, WanTransformer3DModel, ZImageTransformer2DModel)

    cls = {
        "pixart": PixArtTransformer2DModel, "sd3": SD3Transformer2DModel, "dit": DiTTransformer2DModel,
        "sd-unet": UNet2DConditionModel, "flux": FluxTransformer2DModel, "wan": WanTransformer3DModel,
        "flux2": Flux2Transformer2DModel, "qwen-image": QwenImageTransformer2DModel,
        "hunyuan-video": HunyuanVideoTransformer3DModel, "z-image": ZImageTransformer2DModel,
    }[preset.family]
    with torch.device(device):
        return cls(**preset.denoiser).eval()


def denoiser_inputs(preset: ModelPreset, batch_size: int = 2, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Keyword inputs of one denoiser forward as the preset's pipeline makes them (batch 2 = one image with CFG)."""
    cfg, b = preset.denoiser, batch_size
    side = preset.sample_size
    new = dict(device=device, dtype=dtype)
    latents = torch.randn(b, preset.latent_channels, side, side, **new)
    timestep = torch.full((b,), 500, device=device, dtype=torch.long)
    if preset.family == "pixart":
        inputs = dict(
            hidden_states=latents, encoder_hidden_states=torch.randn(b, preset.text_tokens, cfg["caption_channels"], **new),
            timestep=timestep,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        )
        if side == 128:  # PixArt-XL-2-1024 conditions on size and aspect ratio
            inputs["added_cond_kwargs"] = {
                "resolution": torch.full((b, 2), float(preset.resolution), **new), "aspect_ratio": torch.ones(b, 1, **new)
            }
        return inputs
    if preset.family == "sd3":
        return dict(
            hidden_states=latents,
            encoder_hidden_states=torch.randn(b, preset.text_tokens, cfg["joint_attention_dim"], **new),
            pooled_projections=torch.randn(b, cfg["pooled_projection_dim"], **new), timestep=timestep,
        )
    if preset.family == "dit":
        return dict(hidden_states=latents, timestep=timestep, class_labels=torch.arange(b, device=device) % 1000)
    if preset.family == "flux":
        return flux_inputs(preset, b, device, dtype)
    if preset.family in ("flux2", "qwen-image"):
        return _packed_inputs(preset, b, device, dtype)
    if preset.family == "z-image":  # a list of (C, 1, H, W) latents and one of captions; its `t` is (1000 - t) / 1000
        return dict(x=[torch.randn(preset.latent_channels, 1, side, side, **new) for _ in range(b)],
                    t=torch.full((b,), 0.5, **new),
                    cap_feats=[torch.randn(preset.text_tokens, cfg["cap_feat_dim"], **new) for _ in range(b)])
    if preset.family == "hunyuan-video":  # guidance-distilled: the scale (x 1000) is an input of one forward
        return dict(hidden_states=torch.randn(b, preset.latent_channels, *preset.extra["latent"], **new),
                    timestep=timestep,
                    encoder_hidden_states=torch.randn(b, preset.text_tokens, cfg["text_embed_dim"], **new),
                    encoder_attention_mask=torch.ones(b, preset.text_tokens, device=device, dtype=torch.long),
                    pooled_projections=torch.randn(b, cfg["pooled_projection_dim"], **new),
                    guidance=torch.full((b,), 6000.0, **new))
    if preset.family == "wan":  # one call per guidance branch: the pipeline does not batch them
        return dict(hidden_states=torch.randn(b, preset.latent_channels, *preset.extra["latent"], **new),
                    timestep=timestep, encoder_hidden_states=torch.randn(b, preset.text_tokens, cfg["text_dim"], **new))
    return dict(
        sample=latents, timestep=timestep,
        encoder_hidden_states=torch.randn(b, preset.text_tokens, cfg["cross_attention_dim"], **new),
    )


def _packed_inputs(preset: ModelPreset, batch_size: int, device: str | torch.device,
                   dtype: torch.dtype) -> dict[str, Any]:
    """FLUX.2 / Qwen-Image forward inputs as their pipelines make them: packed latents (B, N, C), the text states, the
    timestep in [0, 1]; FLUX.2's [time, row, column, layer] image ids and [0, 0, 0, token] text ids (and its embedded
    guidance), Qwen-Image's ``img_shapes`` and text mask."""
    cfg, b = preset.denoiser, batch_size
    side = preset.sample_size // 2
    new = dict(device=device, dtype=dtype)
    inputs = dict(hidden_states=torch.randn(b, side * side, cfg["in_channels"], **new),
                  encoder_hidden_states=torch.randn(b, preset.text_tokens, cfg["joint_attention_dim"], **new),
                  timestep=torch.full((b,), 0.5, **new))
    if preset.family == "qwen-image":
        return dict(inputs, img_shapes=[[(1, side, side)]] * b,
                    encoder_hidden_states_mask=torch.ones(b, preset.text_tokens, dtype=torch.bool, device=device))
    ids = torch.zeros(side, side, 4, dtype=torch.long, device=device)
    ids[..., 1] = torch.arange(side, device=device)[:, None]
    ids[..., 2] = torch.arange(side, device=device)[None]
    txt_ids = torch.zeros(preset.text_tokens, 4, dtype=torch.long, device=device)
    txt_ids[:, 3] = torch.arange(preset.text_tokens, device=device)
    inputs.update(img_ids=ids.reshape(-1, 4), txt_ids=txt_ids)
    if cfg.get("guidance_embeds"):
        inputs["guidance"] = torch.full((b,), 4.0, **new)
    return inputs


def flux_inputs(preset: ModelPreset, batch_size: int = 1, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """FLUX forward inputs as FluxPipeline makes them: packed latents (B, N, 64), T5 tokens, the pooled CLIP vector,
    the timestep in [0, 1], the row-major image ids [0, row, col] and zero text ids (guidance for dev)."""
    cfg, b = preset.denoiser, batch_size
    side = preset.sample_size // 2
    new = dict(device=device, dtype=dtype)
    ids = torch.zeros(side, side, 3, **new)
    ids[..., 1] = torch.arange(side, **new)[:, None]
    ids[..., 2] = torch.arange(side, **new)[None]
    inputs = dict(
        hidden_states=torch.randn(b, side * side, cfg["in_channels"], **new),
        encoder_hidden_states=torch.randn(b, preset.text_tokens, cfg["joint_attention_dim"], **new),
        pooled_projections=torch.randn(b, cfg["pooled_projection_dim"], **new),
        timestep=torch.full((b,), 0.5, **new), img_ids=ids.reshape(-1, 3),
        txt_ids=torch.zeros(preset.text_tokens, 3, **new),
    )
    if cfg.get("guidance_embeds"):
        inputs["guidance"] = torch.full((b,), 3.5, **new)
    return inputs


def wan_temporal_stages(preset: ModelPreset) -> list[bool]:
    """Which downsampling stages of a Wan VAE halve time: all but the first (Wan's [False, True, True]: 4x), the only
    one of a two-level VAE."""
    stages = len(preset.vae_channels) - 1
    return [stages == 1 or i > 0 for i in range(stages)]


def wan_call_size(preset: ModelPreset) -> dict[str, int]:
    """WanPipeline's height, width and num_frames that give the preset's latent (frames, height, width)."""
    frames, height, width = preset.extra["latent"]
    spatial = 2 ** (len(preset.vae_channels) - 1)
    return dict(height=height * spatial, width=width * spatial,
                num_frames=(frames - 1) * 2 ** sum(wan_temporal_stages(preset)) + 1)


def build_pipeline(preset: ModelPreset, seed: int = 0):
    """The preset's diffusers pipeline with random weights (in memory, CPU, fp32)."""
    from diffusers import (
        DiTPipeline, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline, PixArtAlphaPipeline,
        StableDiffusion3Pipeline, StableDiffusionPipeline,
    )

    if preset.family in MACS_ONLY:
        raise NotImplementedError(f"{preset.family} presets count MACs only (--macs-only): their pipelines' text "
                                  "encoders are not built here")
    torch.manual_seed(seed)
    denoiser = build_denoiser(preset)
    if preset.family == "dit":
        return DiTPipeline(transformer=denoiser, vae=_vae(preset, 4), scheduler=DPMSolverMultistepScheduler())
    if preset.family == "pixart":
        tokenizer = word_tokenizer(preset.text_tokens)
        return PixArtAlphaPipeline(
            tokenizer=tokenizer, text_encoder=_t5(preset, preset.text_dim, len(tokenizer)), vae=_vae(preset, 4),
            transformer=denoiser, scheduler=DPMSolverMultistepScheduler(),
        )
    if preset.family == "sd-unet":
        tokenizer = word_tokenizer(77)
        return StableDiffusionPipeline(
            vae=_vae(preset, 4), text_encoder=_clip(preset, preset.text_dim, len(tokenizer), projection=False),
            tokenizer=tokenizer, unet=denoiser, scheduler=DPMSolverMultistepScheduler(steps_offset=1), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )
    if preset.family == "wan":
        from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
        from transformers import UMT5Config, UMT5EncoderModel

        tokenizer = word_tokenizer(preset.text_tokens)
        d_model = preset.denoiser["text_dim"]
        heads = max(1, d_model // 64) if d_model >= 64 else 2
        encoder = UMT5EncoderModel(UMT5Config(
            vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // heads, d_ff=preset.text_ff,
            num_layers=preset.text_layers, num_heads=heads, pad_token_id=0, eos_token_id=1,
        )).eval()
        # a causal video VAE downsampling 2^(n-1) in space and, as Wan's, in time at every stage but the first
        temporal = wan_temporal_stages(preset)
        vae = AutoencoderKLWan(base_dim=preset.vae_channels[0], z_dim=16, dim_mult=[1] * len(preset.vae_channels),
                               num_res_blocks=1, temperal_downsample=temporal, scale_factor_temporal=2 ** sum(temporal),
                               scale_factor_spatial=2 ** len(temporal)).eval()
        return WanPipeline(  # Wan 2.1's flow-matching UniPC solver
            tokenizer=tokenizer, text_encoder=encoder, vae=vae, transformer=denoiser,
            scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
        )
    if preset.family == "flux":
        clip_tok, t5_tok = word_tokenizer(77), word_tokenizer(preset.text_tokens)
        clip_dim, t5_dim = preset.text_dim
        return FluxPipeline(
            transformer=denoiser,
            # FLUX.1's scheduler: resolution-dependent shift of the flow-matching sigmas
            scheduler=FlowMatchEulerDiscreteScheduler(
                shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                max_image_seq_len=4096,
            ),
            vae=_vae(preset, 16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                     use_post_quant_conv=False),
            text_encoder=_clip(preset, clip_dim, len(clip_tok), projection=False), tokenizer=clip_tok,
            text_encoder_2=_t5(preset, t5_dim, len(t5_tok)), tokenizer_2=t5_tok,
        )
    clip_tok, t5_tok = word_tokenizer(77), word_tokenizer(256)
    clip_l, clip_g = preset.text_dim
    return StableDiffusion3Pipeline(
        transformer=denoiser, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        # SD3's VAE: 16 latent channels, a shift as well as a scale, no quant convs
        vae=_vae(preset, 16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=_clip(preset, clip_l, len(clip_tok), projection=True), tokenizer=clip_tok,
        text_encoder_2=_clip(preset, clip_g, len(clip_tok), projection=True), tokenizer_2=word_tokenizer(77),
        text_encoder_3=_t5(preset, preset.denoiser["joint_attention_dim"], len(t5_tok)), tokenizer_3=t5_tok,
    )


# bump when `build_pipeline` changes what a preset builds, so cached pipelines are rebuilt
_BUILDER_VERSION = 2


def _preset_dir(name: str, preset: ModelPreset, seed: int, cache_dir: Path) -> Path:
    ident = [asdict(preset), seed, _BUILDER_VERSION]
    digest = hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return cache_dir / f"{name}-{digest}"


def load_pipeline(name_or_path: str = "pixart-small", seed: int = 0, cache_dir: str | Path | None = None,
                  dtype: torch.dtype | None = None):
    """A preset name (trained: its shipped folder; random: built once, saved, then loaded with `from_pretrained`),
    or any diffusers path / hub name."""
    from diffusers import DiffusionPipeline

    kwargs = {"dtype": dtype} if dtype is not None else {}
    if name_or_path in TRAINED_PRESETS and name_or_path not in PRESETS:
        raise FileNotFoundError(
            f"the trained preset {name_or_path!r} is missing from {WEIGHTS / name_or_path}: reinstall the project or "
            f"retrain it with `python -m benchmarks.reference.train --export {WEIGHTS / name_or_path}`"
        )
    if name_or_path not in PRESETS:
        return DiffusionPipeline.from_pretrained(name_or_path, **kwargs)
    preset = PRESETS[name_or_path]
    if preset.trained:
        return DiffusionPipeline.from_pretrained(preset.weights, **kwargs)
    path = _preset_dir(name_or_path, preset, seed, Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE)
    if not (path / "model_index.json").exists():
        logger.info("building random-weight %s pipeline into %s", name_or_path, path)
        build_pipeline(preset, seed).save_pretrained(path)
    return DiffusionPipeline.from_pretrained(path, **kwargs)
