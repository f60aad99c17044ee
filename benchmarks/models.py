"""Offline model zoo: PixArt pipelines built from configs with random weights, saved and loaded back.

No weights can be downloaded on our machines, so every pipeline here is built from a config (cost and token counts
do not depend on the weights), written with `save_pretrained` and read back with `from_pretrained`, so the real
loading path is the one exercised. The text encoder is a small random T5 with a word-level tokenizer built in
code. A diffusers checkpoint path or hub name (e.g. ``PixArt-alpha/PixArt-XL-2-512x512``) loads as usual.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DEFAULT_CACHE = Path(os.environ.get("SDTM_MODEL_CACHE", Path.home() / ".cache" / "sdtm_plugin" / "models"))

_WORDS = (
    "a an the of and with in on at to from by for under over near far big small red green blue yellow black white "
    "cat dog bird fish horse cow tree flower house car boat city river mountain sky sun moon star cloud forest "
    "photo painting portrait landscape close up view night day morning evening light dark bright soft detailed "
    "astronaut riding sitting running standing old young man woman child robot castle garden beach ocean snow"
).split()


@dataclass(frozen=True)
class PixArtPreset:
    """A PixArt-architecture pipeline: transformer, T5 text encoder, VAE, DPM-Solver scheduler.

    The latent grid is ``sample_size`` squared; tokens = ``(sample_size / patch_size)^2``. Images are
    ``sample_size * 2^(len(vae_channels) - 1)`` pixels on a side.
    """

    num_layers: int
    num_attention_heads: int
    attention_head_dim: int
    sample_size: int
    caption_channels: int
    text_layers: int = 1
    text_heads: int = 2
    text_d_ff: int = 64
    max_sequence_length: int = 120
    vae_channels: tuple[int, ...] = (8, 8)
    patch_size: int = 2
    # transformer options beyond the size (e.g. real PixArt's learned sigma)
    extra: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return (self.sample_size // self.patch_size) ** 2

    @property
    def resolution(self) -> int:
        return self.sample_size * 2 ** (len(self.vae_channels) - 1)


PRESETS: dict[str, PixArtPreset] = {
    # tests: 8x8 = 64 tokens, 4 blocks, 32-px images
    "tiny": PixArtPreset(num_layers=4, num_attention_heads=2, attention_head_dim=16, sample_size=16, caption_channels=32),
    # the embedded default of the benchmark: PixArt-XL-2-512 geometry (1024 tokens, 512-px images) at a CPU-friendly
    # width and depth
    "pixart-small": PixArtPreset(
        num_layers=8, num_attention_heads=6, attention_head_dim=64, sample_size=64, caption_channels=64,
        text_d_ff=128, vae_channels=(16, 16, 16, 16),
    ),
}


def _tokenizer(max_length: int):
    """A word-level fast tokenizer with T5's special tokens (pad=0, eos=1, unk=2), built without any download."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in _WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_length
    )


def build_pixart_pipeline(preset: PixArtPreset, seed: int = 0):
    """A `PixArtAlphaPipeline` with random weights from `preset` (in memory)."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = _tokenizer(preset.max_sequence_length)
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer), d_model=preset.caption_channels, d_kv=preset.caption_channels // preset.text_heads,
            d_ff=preset.text_d_ff, num_layers=preset.text_layers, num_heads=preset.text_heads,
            pad_token_id=0, eos_token_id=1,
        )
    ).eval()
    dim = preset.num_attention_heads * preset.attention_head_dim
    transformer = PixArtTransformer2DModel(
        num_attention_heads=preset.num_attention_heads,
        attention_head_dim=preset.attention_head_dim,
        in_channels=4,
        out_channels=8,
        num_layers=preset.num_layers,
        cross_attention_dim=dim,
        sample_size=preset.sample_size,
        patch_size=preset.patch_size,
        caption_channels=preset.caption_channels,
        norm_num_groups=min(32, dim),
        **preset.extra,
    ).eval()
    n = len(preset.vae_channels)
    vae = AutoencoderKL(
        block_out_channels=preset.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        latent_channels=4,
        norm_num_groups=min(8, preset.vae_channels[0]),
        sample_size=preset.resolution,
    ).eval()
    scheduler = DPMSolverMultistepScheduler()
    return PixArtAlphaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )


def _preset_dir(name: str, preset: PixArtPreset, seed: int, cache_dir: Path) -> Path:
    digest = hashlib.sha1(json.dumps([asdict(preset), seed], sort_keys=True, default=str).encode()).hexdigest()[:10]
    return cache_dir / f"{name}-{digest}"


def load_pipeline(name_or_path: str = "pixart-small", seed: int = 0, cache_dir: str | Path | None = None,
                  torch_dtype: torch.dtype | None = None):
    """A preset name (built once, saved, then loaded with `from_pretrained`), or any diffusers path / hub name."""
    from diffusers import DiffusionPipeline

    kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    if name_or_path not in PRESETS:
        return DiffusionPipeline.from_pretrained(name_or_path, **kwargs)
    preset = PRESETS[name_or_path]
    path = _preset_dir(name_or_path, preset, seed, Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE)
    if not (path / "model_index.json").exists():
        logger.info("building random-weight %s pipeline into %s", name_or_path, path)
        build_pixart_pipeline(preset, seed).save_pretrained(path)
    return DiffusionPipeline.from_pretrained(path, **kwargs)
