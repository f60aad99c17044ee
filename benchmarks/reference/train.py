"""Train a reference pipeline: a small PixArt-alpha on procedural captioned images, offline, on a CPU.

    python -m benchmarks.reference.train                       # pixart-shapes: all stages into outputs/train, then export
    python -m benchmarks.reference.train --stage denoiser      # one stage (resumes from its last checkpoint)
    python -m benchmarks.reference.train --export benchmarks/reference/weights/pixart-shapes   # write the shipped pipeline (fp16)
    python -m benchmarks.reference.train --data scenes --out outputs/train-scenes    # the 1,024-token multi-object model,
                                                     # started from the shipped pixart-shapes weights
    python -m benchmarks.reference.train --data shapes128 --out outputs/train-shapes128   # pixart-shapes at 128 px

The data set (`benchmarks.reference.data`) decides the resolution, the vocabulary, the feature network's heads and
the monitored prompts; ``TrainConfig.for_data`` holds each one's defaults.

Stages, each resumable (a checkpoint every few minutes and at the end; a re-run continues where it stopped):
1. ``vae``: a small `AutoencoderKL` (64-px RGB -> 16 x 16 x 8 latents) trained on its posterior mode with
   reconstruction (weighted towards the shape's pixels) + edge + tiny KL loss; its `scaling_factor` is set to
   1 / std of the latents afterwards.
2. ``features``: the attribute classifier whose penultimate features define FID / KID (`benchmarks.reference.quality`).
3. ``denoiser``: `PixArtTransformer2DModel` (256 tokens, patch 1) with v-prediction, so that the high-noise steps,
   where the layout is decided, carry an x0-space weight of at least 1; captions dropped 10 % of the time for
   classifier-free guidance; EMA weights are the ones exported. The text encoder is a small random T5, frozen.
   ``--arch flux`` trains a `FluxTransformer2DModel` instead (double- and single-stream blocks, 3-axis rotary
   positions; 2 x 2 latent pixels packed per token, a 2x VAE so that 64-px images give 256 tokens) with the
   rectified-flow objective FLUX is trained with, for a `FluxPipeline` (frozen random CLIP and T5), sampled with
   true classifier-free guidance (`true_cfg_scale`, an empty negative prompt): it is not guidance-distilled.

Data are drawn from a generator seeded by (seed, step), so a resumed run sees the same batches as an uninterrupted
one. ``--budget-minutes`` caps the wall-clock time of the whole command: a stage that runs out saves and stops, and
the export uses what was reached (a warning says so).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import data_set

logger = logging.getLogger(__name__)

STAGES = ("vae", "features", "denoiser")
ARCHES = ("pixart", "flux")


@dataclass
class TrainConfig:
    """Everything that determines the trained weights (saved beside them as ``train_config.json``)."""

    seed: int = 0
    data: str = "shapes"  # `benchmarks.reference.data.DATA_SETS`
    arch: str = "pixart"  # the denoiser and pipeline: "pixart" or "flux" (`ARCHES`)
    init_from: str = ""  # a pipeline folder whose VAE and denoiser weights start the training (its words first)
    interpolation_scale: float = 0.0  # the denoiser's position-embedding scale (0: diffusers' default)
    # text encoder: a random, frozen T5 (word-level tokenizer over the caption vocabulary)
    text_dim: int = 128
    text_layers: int = 2
    text_tokens: int = 16  # training pads captions to this; masking makes it equivalent to the pipeline's 120
    # VAE: 64 px -> 16 x 16 x 8
    vae_channels: tuple[int, ...] = (16, 32, 64)
    latent_channels: int = 8
    vae_steps: int = 1500
    vae_batch: int = 16
    vae_lr: float = 2e-3
    vae_kl: float = 1e-7
    vae_object_weight: float = 10.0  # extra loss weight on the shape's pixels: few, but they carry the caption
    # attribute classifier for FID / KID
    feature_steps: int = 600
    feature_batch: int = 64
    feature_lr: float = 2e-3
    # denoiser (FLUX: `layers` double-stream blocks, then `single_layers` single-stream ones)
    layers: int = 6
    single_layers: int = 0
    flow_shift: float = 3.0  # FLUX: the sampler's (and training's) timestep shift towards high noise
    true_cfg_scale: float = 4.5  # FLUX: classifier-free guidance scale of the exported pipeline's calls
    heads: int = 4
    head_dim: int = 64
    steps: int = 1500
    batch: int = 32
    lr: float = 5e-4
    warmup: int = 100
    min_lr_fraction: float = 0.1
    ema_decay: float = 0.995  # ~200-step horizon: a short run improves too fast for a longer average
    caption_dropout: float = 0.1
    # extra loss weight on the latent pixels of the captioned objects (saturated in the image): a few objects on a
    # large textured background leave them a small share of a plain MSE, though they carry most of the caption
    object_loss_weight: float = 0.0
    grad_clip: float = 1.0
    train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    # monitoring
    eval_every: int = 375
    eval_prompts: int = 27
    checkpoint_minutes: float = 5.0

    @classmethod
    def tiny(cls) -> "TrainConfig":
        """A few-second configuration for tests (same code paths, toy sizes)."""
        return cls(text_dim=32, text_layers=1, vae_channels=(8, 8, 8), latent_channels=4, vae_steps=10, vae_batch=4,
                   feature_steps=10, feature_batch=8, layers=1, heads=2, head_dim=16, steps=16, batch=8, warmup=2,
                   lr=1e-3, eval_every=0, checkpoint_minutes=0.0)

    @classmethod
    def for_data(cls, name: str) -> "TrainConfig":
        """The defaults of a data set: ``scenes`` (128 px, 1,024 tokens, captions of up to ~35 words) starts from
        the shipped pixart-shapes pipeline, whose VAE is convolutional (any size) and whose positions it keeps on the
        same scale (a 32 x 32 grid spanning the 16 x 16 grid's range), so the VAE is fine-tuned briefly and the
        denoiser continues from where it stands. ``shapes128`` (pixart-shapes' own data at 128 px) starts the same
        way, sized for 2.5 CPU hours at one thread (VAE 300 steps ~1.3 s, feature network 600 ~1.8 s, denoiser 400
        of batch 16 ~14.5 s, four 27-prompt monitor evaluations ~5 min each)."""
        if name == "shapes":
            return cls()
        if name == "scenes":
            from . import WEIGHTS

            return cls(data="scenes", init_from=str(WEIGHTS / "pixart-shapes"), interpolation_scale=2.0,
                       text_tokens=40, vae_steps=300, vae_batch=8, vae_lr=5e-4, feature_steps=800, feature_batch=32,
                       steps=600, batch=16, lr=3e-4, warmup=50, eval_every=150, eval_prompts=24,
                       object_loss_weight=5.0)
        if name == "shapes128":
            from . import WEIGHTS

            return cls(data="shapes128", init_from=str(WEIGHTS / "pixart-shapes"), interpolation_scale=2.0,
                       vae_steps=300, vae_batch=8, vae_lr=5e-4, feature_steps=600, feature_batch=32,
                       steps=400, batch=16, lr=2e-4, warmup=50, eval_every=100)
        data_set(name)  # raises, naming the data sets
        raise AssertionError("unreachable")

    @classmethod
    def for_arch(cls, data: str, arch: str) -> "TrainConfig":
        """`for_data`'s defaults for the denoiser `arch`: FLUX on shapes has a 2x VAE (64 px -> 32 x 32 x 8, 256
        packed tokens), 2 double- and 4 single-stream blocks of width 256 and a 3-axis rotary table, trained from
        scratch (its VAE differs from the shipped PixArt's)."""
        if arch not in ARCHES:
            raise ValueError(f"arch must be one of {ARCHES}, got {arch!r}")
        cfg = cls.for_data(data)
        if arch == "flux":
            if data != "shapes":
                raise ValueError(f"the FLUX reference is defined on the shapes data set, got data={data!r}")
            cfg = cls(arch="flux", vae_channels=(16, 32), vae_steps=1000, layers=2, single_layers=4)
        return cfg

    @classmethod
    def from_json(cls, path: Path) -> "TrainConfig":
        data = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
        return cls(**data)


# -- components ---------------------------------------------------------------------------------------------------
def build_tokenizer(cfg: TrainConfig, max_length: int = 120):
    """Word-level fast tokenizer over the data's caption vocabulary with T5's special tokens (pad 0, eos 1, unk 2)."""
    from ..models import word_tokenizer

    return word_tokenizer(max_length, data_set(cfg.data).words)


def build_text_encoder(cfg: TrainConfig, vocab_size: int) -> nn.Module:
    """The frozen random T5. It is drawn for the single-shape vocabulary and extended with rows for further words,
    so that a data set extending it keeps the same encoder for the words they share."""
    from transformers import T5Config, T5EncoderModel

    base = 3 + len(data_set("shapes").words)
    torch.manual_seed(cfg.seed)
    heads = max(1, cfg.text_dim // 64)
    config = T5Config(vocab_size=min(base, vocab_size), d_model=cfg.text_dim, d_kv=cfg.text_dim // heads,
                      d_ff=2 * cfg.text_dim, num_layers=cfg.text_layers, num_heads=heads, pad_token_id=0,
                      eos_token_id=1)
    encoder = T5EncoderModel(config).eval().requires_grad_(False)
    # entries of RMS ~1, as real text encoders produce (unit-norm word vectors leave positions unlearnt)
    encoder.get_input_embeddings().weight.data.normal_(0.0, 1.0)
    if vocab_size > base:
        encoder.resize_token_embeddings(vocab_size)
        added = torch.randn(vocab_size - base, cfg.text_dim, generator=torch.Generator().manual_seed(cfg.seed + 1))
        encoder.get_input_embeddings().weight.data[base:] = added
    return encoder


def build_clip(cfg: TrainConfig, vocab_size: int) -> nn.Module:
    """FLUX's pooled text vector: a frozen random CLIP text encoder over the same word vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(cfg.seed + 2)
    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=cfg.text_dim, intermediate_size=2 * cfg.text_dim,
        num_hidden_layers=cfg.text_layers, num_attention_heads=max(1, cfg.text_dim // 64), max_position_embeddings=77,
        projection_dim=cfg.text_dim, pad_token_id=0, bos_token_id=1, eos_token_id=1,
    )
    return CLIPTextModel(config).eval().requires_grad_(False)


def build_vae(cfg: TrainConfig) -> nn.Module:
    from diffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    return AutoencoderKL(
        block_out_channels=cfg.vae_channels, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, latent_channels=cfg.latent_channels, layers_per_block=1,
        # 4 channels per group: a group norm over one channel would erase the per-image tone of a flat background
        norm_num_groups=max(1, cfg.vae_channels[0] // 4), sample_size=data_set(cfg.data).resolution,
        mid_block_add_attention=False, **({"shift_factor": 0.0} if cfg.arch == "flux" else {}),
    )


def latent_side(cfg: TrainConfig) -> int:
    return data_set(cfg.data).resolution // 2 ** (len(cfg.vae_channels) - 1)


def build_transformer(cfg: TrainConfig) -> nn.Module:
    from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel

    torch.manual_seed(cfg.seed)
    width = cfg.heads * cfg.head_dim
    if cfg.arch == "flux":
        # rotary: a quarter of each head for the (unused) first id axis, the rest shared by rows and columns, even
        axis = cfg.head_dim // 8 * 2 + cfg.head_dim % 8
        rows = (cfg.head_dim - axis) // 2
        return FluxTransformer2DModel(
            patch_size=1, in_channels=4 * cfg.latent_channels, num_layers=cfg.layers, num_single_layers=cfg.single_layers,
            attention_head_dim=cfg.head_dim, num_attention_heads=cfg.heads, joint_attention_dim=cfg.text_dim,
            pooled_projection_dim=cfg.text_dim, guidance_embeds=False, axes_dims_rope=(axis, rows, rows),
        )
    return PixArtTransformer2DModel(
        num_attention_heads=cfg.heads, attention_head_dim=cfg.head_dim, in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        num_layers=cfg.layers, cross_attention_dim=width, sample_size=latent_side(cfg), patch_size=1,
        caption_channels=cfg.text_dim, norm_num_groups=min(32, width), interpolation_scale=cfg.interpolation_scale or None,
    )


def load_initial(cfg: TrainConfig, model: nn.Module, part: str) -> None:
    """Load `part` ("vae", "transformer") of the `init_from` pipeline into `model`; its position table, a buffer
    made from the config, is left as built."""
    if not cfg.init_from:
        return
    from safetensors.torch import load_file

    files = sorted((Path(cfg.init_from) / part).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"init_from: no {part} weights in {cfg.init_from}")
    state = {k: v.float() for f in files for k, v in load_file(f).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"init_from {cfg.init_from}/{part} does not fit: missing {missing}, unexpected {unexpected}")
    logger.info("%s starts from %s", part, cfg.init_from)


def noise_scheduler(cfg: TrainConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=cfg.train_timesteps, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
                         beta_schedule="linear", prediction_type="v_prediction")


def sampling_scheduler(cfg: TrainConfig):
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    if cfg.arch == "flux":
        return FlowMatchEulerDiscreteScheduler(shift=cfg.flow_shift)

    return DPMSolverMultistepScheduler(num_train_timesteps=cfg.train_timesteps, beta_start=cfg.beta_start,
                                       beta_end=cfg.beta_end, beta_schedule="linear", prediction_type="v_prediction")


def pipeline_call_kwargs(cfg: TrainConfig) -> dict:
    """What a call of the exported pipeline needs besides prompts (PixArt: no resolution binning; FLUX: the trained
    size, the trained text length and true classifier-free guidance)."""
    if cfg.arch == "flux":
        side = data_set(cfg.data).resolution
        return dict(height=side, width=side, max_sequence_length=cfg.text_tokens, negative_prompt="",
                    true_cfg_scale=cfg.true_cfg_scale)
    return dict(use_resolution_binning=False, clean_caption=False)


def encode_captions(tokenizer, text_encoder: nn.Module, captions: list[str], max_length: int):
    """(B, L, D) embeddings and (B, L) mask, tokenized exactly as `PixArtAlphaPipeline.encode_prompt` does."""
    ids = tokenizer(captions, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
                    return_tensors="pt")
    with torch.no_grad():
        embeds = text_encoder(ids.input_ids, attention_mask=ids.attention_mask)[0]
    return embeds, ids.attention_mask


# -- training loop plumbing -----------------------------------------------------------------------------------------
class Budget:
    """Wall-clock budget shared by the stages of one command."""

    def __init__(self, minutes: float | None) -> None:
        self.deadline = None if minutes is None else time.monotonic() + 60 * minutes

    def exhausted(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline


def step_generator(seed: int, stage: str, step: int) -> torch.Generator:
    """The data / noise generator of one training step: resumed runs see the same batches."""
    return torch.Generator().manual_seed((seed * 1_000_003 + STAGES.index(stage) * 7_919 + step) % (2**63))


def cosine_lr(step: int, total: int, peak: float, warmup: int, floor: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class Checkpoint:
    """Resumable state of one stage, saved as ``<dir>/<stage>.pt``."""

    step: int = 0
    models: dict[str, dict] = field(default_factory=dict)
    optimizer: dict | None = None
    history: list[dict] = field(default_factory=list)
    done: bool = False

    @staticmethod
    def load(path: Path) -> "Checkpoint":
        if not path.exists():
            return Checkpoint()
        return Checkpoint(**torch.load(path, weights_only=False))

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(asdict(self), tmp)
        tmp.replace(path)


def run_stage(stage: str, total: int, ckpt_path: Path, models: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
              train_step: Callable[[int], dict[str, float]], budget: Budget, checkpoint_minutes: float,
              on_step: Callable[[int], dict[str, float] | None] | None = None) -> Checkpoint:
    """Run `train_step(step)` from the checkpoint's step to `total`, saving every few minutes; returns the state."""
    ckpt = Checkpoint.load(ckpt_path)
    if ckpt.step:
        for name, model in models.items():
            model.load_state_dict(ckpt.models[name])
        optimizer.load_state_dict(ckpt.optimizer)
        logger.info("%s: resuming at step %d of %d", stage, ckpt.step, total)

    def save(done: bool) -> None:
        ckpt.models = {name: model.state_dict() for name, model in models.items()}
        ckpt.optimizer, ckpt.done = optimizer.state_dict(), done
        ckpt.save(ckpt_path)

    last_save = time.monotonic()
    bar = tqdm(range(ckpt.step, total), desc=stage, initial=ckpt.step, total=total, mininterval=10)
    for step in bar:
        if budget.exhausted():
            logger.warning("%s: wall-clock budget spent at step %d of %d; saving and stopping", stage, step, total)
            save(done=False)
            return ckpt
        record = {"step": step, **train_step(step)}
        extra = on_step(step + 1) if on_step else None
        if extra:
            record.update(extra)
            logger.info("%s step %d: %s", stage, step + 1, extra)
        ckpt.history.append(record)
        ckpt.step = step + 1
        bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k != "step" and isinstance(v, float)})
        if checkpoint_minutes and time.monotonic() - last_save > 60 * checkpoint_minutes:
            save(done=False)
            last_save = time.monotonic()
    save(done=True)
    return ckpt


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# -- stages ---------------------------------------------------------------------------------------------------------
def _edges(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


def train_vae(cfg: TrainConfig, out: Path, budget: Budget) -> nn.Module:
    data = data_set(cfg.data)
    vae = build_vae(cfg).train()
    load_initial(cfg, vae, "vae")
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)

    def train_step(step: int) -> dict[str, float]:
        g = step_generator(cfg.seed, "vae", step)
        images = data.render(data.sample(cfg.vae_batch, g), g)
        x = images * 2 - 1
        chroma = images.max(1, keepdim=True).values - images.min(1, keepdim=True).values
        weight = 1 + cfg.vae_object_weight * (chroma > 0.3).float()  # the background is grey
        weight = weight / weight.mean()
        _set_lr(optimizer, cosine_lr(step, cfg.vae_steps, cfg.vae_lr, 50, 0.05))
        posterior = vae.encode(x).latent_dist
        # the posterior mode: sampled latents (std ~1 at init) drown a fresh encoder's means for hundreds of steps
        recon = vae.decode(posterior.mode()).sample
        error = recon - x
        mse = F.mse_loss(recon, x)
        edge = sum(F.l1_loss(a, b) for a, b in zip(_edges(recon), _edges(x)))
        kl = posterior.kl().mean()  # summed over the latent, averaged over the batch
        loss = (error.pow(2) * weight).mean() + 0.5 * (error.abs() * weight).mean() + edge + cfg.vae_kl * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": loss.item(), "psnr": float(10 * torch.log10(4 / mse.detach()))}

    run_stage("vae", cfg.vae_steps, out / "vae.pt", {"vae": vae}, optimizer, train_step, budget, cfg.checkpoint_minutes)
    return calibrate_vae(vae.eval(), cfg)


@torch.no_grad()
def calibrate_vae(vae: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Set `scaling_factor` so that scaled latents have unit standard deviation on the data."""
    data = data_set(cfg.data)
    g = step_generator(cfg.seed + 1, "vae", 0)
    x = data.render(data.sample(256 * 64 // data.resolution, g), g) * 2 - 1
    std = float(vae.encode(x).latent_dist.mode().std())
    vae.register_to_config(scaling_factor=1.0 / std)
    return vae


def train_features(cfg: TrainConfig, out: Path, budget: Budget) -> nn.Module:
    from .quality import AttributeNet

    data = data_set(cfg.data)
    net = AttributeNet(heads=data.heads, resolution=data.resolution).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.feature_lr, weight_decay=1e-4)

    def train_step(step: int) -> dict[str, float]:
        g = step_generator(cfg.seed, "features", step)
        batch = data.sample(cfg.feature_batch, g)
        labels = data.labels(batch)
        logits = net(data.render(batch, g))
        _set_lr(optimizer, cosine_lr(step, cfg.feature_steps, cfg.feature_lr, 50, 0.02))
        loss = sum(F.cross_entropy(logits[name], target) for name, target in labels.items())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        acc = torch.stack([(logits[n].argmax(-1) == target).float().mean() for n, target in labels.items()]).mean()
        return {"loss": loss.item(), "acc": float(acc)}

    run_stage("features", cfg.feature_steps, out / "features.pt", {"net": net}, optimizer, train_step, budget,
              cfg.checkpoint_minutes)
    return net.eval()


class EMA(nn.Module):
    """Exponential moving average of a model's parameters, with the usual (1 + n) / (10 + n) warm-up."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        n = int(self.updates)
        decay = min(self.decay, (1 + n) / (10 + n))
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            ema_p.lerp_(p.detach(), 1 - decay)


def _object_weighted_mse(pred: torch.Tensor, target: torch.Tensor, images: torch.Tensor, weight: float) -> torch.Tensor:
    """MSE over (B, C, h, w) latents weighted ``1 + weight * object share`` per latent pixel, normalised by the
    weights' sum; the object share is the fraction of the latent pixel's image pixels that are saturated (chroma
    > 0.2 in [0, 1]: the objects; the background is grey). `images`: (B, 3, H, W) in [-1, 1]."""
    rgb = (images + 1) / 2
    objects = (rgb.amax(1, keepdim=True) - rgb.amin(1, keepdim=True) > 0.2).float()
    share = F.adaptive_avg_pool2d(objects, pred.shape[-2:])
    weights = 1 + weight * share
    return ((pred - target).square() * weights).sum() / (weights.sum() * pred.shape[1])


class FluxObjective:
    """FLUX's rectified flow on (B, C, h, w) latents: x_t = (1 - t) x0 + t noise, the model predicts noise - x0 from
    the packed tokens; t uniform, shifted towards high noise as the sampler's schedule is (`flow_shift`)."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.tokenizer = build_tokenizer(cfg)
        self.clip_tokenizer = build_tokenizer(cfg, max_length=77)
        self.t5 = build_text_encoder(cfg, len(self.tokenizer))
        self.clip = build_clip(cfg, len(self.clip_tokenizer))

    def text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, D) T5 embeddings and (B, D) pooled CLIP vectors, as `FluxPipeline.encode_prompt` makes them (no
        attention mask: FLUX attends to the padding too)."""
        with torch.no_grad():
            ids = self.tokenizer(captions, padding="max_length", max_length=self.cfg.text_tokens, truncation=True,
                                 return_tensors="pt").input_ids
            clip_ids = self.clip_tokenizer(captions, padding="max_length", max_length=77, truncation=True,
                                           return_tensors="pt").input_ids
            return self.t5(ids)[0], self.clip(clip_ids).pooler_output

    def predict(self, transformer: nn.Module, latents: torch.Tensor, noise: torch.Tensor, u: torch.Tensor,
                captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(prediction, target), both (B, C, h, w)."""
        from diffusers import FluxPipeline

        b, c, h, w = latents.shape
        shift = self.cfg.flow_shift
        t = shift * u / (1 + (shift - 1) * u)
        noisy = torch.lerp(latents, noise, t.view(-1, 1, 1, 1))
        embeds, pooled = self.text(captions)
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
        text_ids = torch.zeros(embeds.shape[1], 3)
        out = transformer(hidden_states=packed, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=t,
                          img_ids=image_ids, txt_ids=text_ids, return_dict=False)[0]
        scale = 2 ** (len(self.cfg.vae_channels) - 1)  # the pipeline's unpacking takes pixel sizes
        return FluxPipeline._unpack_latents(out, h * scale, w * scale, scale), noise - latents


def train_denoiser(cfg: TrainConfig, out: Path, budget: Budget, vae: nn.Module,
                   evaluate: Callable[[nn.Module], dict[str, float]] | None = None) -> nn.Module:
    data = data_set(cfg.data)
    tokenizer = build_tokenizer(cfg)
    text_encoder = build_text_encoder(cfg, len(tokenizer))
    flux = FluxObjective(cfg) if cfg.arch == "flux" else None
    transformer = build_transformer(cfg).train()
    load_initial(cfg, transformer, "transformer")
    ema = EMA(transformer, cfg.ema_decay)
    scheduler = noise_scheduler(cfg)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    vae = vae.eval().requires_grad_(False)
    scale = vae.config.scaling_factor
    no_size = {"resolution": None, "aspect_ratio": None}

    def train_step(step: int) -> dict[str, float]:
        g = step_generator(cfg.seed, "denoiser", step)
        batch = data.sample(cfg.batch, g)
        images = data.render(batch, g) * 2 - 1
        captions = data.captions(batch)
        drop = (torch.rand(cfg.batch, generator=g) < cfg.caption_dropout).tolist()
        captions = ["" if d else c for c, d in zip(captions, drop)]
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.mode() * scale
        noise = torch.randn(latents.shape, generator=g)
        _set_lr(optimizer, cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup, cfg.min_lr_fraction))
        if flux is not None:
            pred, target = flux.predict(transformer, latents, noise, torch.rand(cfg.batch, generator=g), captions)
        else:
            embeds, mask = encode_captions(tokenizer, text_encoder, captions, cfg.text_tokens)
            t = torch.randint(0, cfg.train_timesteps, (cfg.batch,), generator=g)
            noisy = scheduler.add_noise(latents, noise, t)
            target = scheduler.get_velocity(latents, noise, t)
            pred = transformer(noisy, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=t,
                               added_cond_kwargs=no_size).sample
        loss = F.mse_loss(pred, target) if not cfg.object_loss_weight else _object_weighted_mse(
            pred, target, images, cfg.object_loss_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad = nn.utils.clip_grad_norm_(transformer.parameters(), cfg.grad_clip)
        optimizer.step()
        ema.update(transformer)
        return {"loss": float(loss), "grad_norm": float(grad), "lr": optimizer.param_groups[0]["lr"]}

    def on_step(step: int) -> dict[str, float] | None:
        if evaluate is None or not cfg.eval_every or (step % cfg.eval_every and step != cfg.steps):
            return None
        return evaluate(ema.model)

    run_stage("denoiser", cfg.steps, out / "denoiser.pt", {"transformer": transformer, "ema": ema}, optimizer,
              train_step, budget, cfg.checkpoint_minutes, on_step)
    return ema.model


# -- export ---------------------------------------------------------------------------------------------------------
def assemble_pipeline(cfg: TrainConfig, vae: nn.Module, transformer: nn.Module):
    """The trained components as a `PixArtAlphaPipeline` or a `FluxPipeline` (fp32, CPU)."""
    from diffusers import FluxPipeline, PixArtAlphaPipeline

    if cfg.arch == "flux":
        flux = FluxObjective(cfg)
        return FluxPipeline(scheduler=sampling_scheduler(cfg), vae=vae, text_encoder=flux.clip,
                            tokenizer=flux.clip_tokenizer, text_encoder_2=flux.t5, tokenizer_2=flux.tokenizer,
                            transformer=transformer)
    tokenizer = build_tokenizer(cfg)
    return PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=build_text_encoder(cfg, len(tokenizer)), vae=vae,
                               transformer=transformer, scheduler=sampling_scheduler(cfg))


def export(cfg: TrainConfig, out: Path, target: Path, with_judge: bool = True) -> Path:
    """Write the pipeline (safetensors, fp16 weights) and, `with_judge`, the feature network from the finished
    checkpoints to `target`; a plain `from_pretrained` of it gives one dtype throughout (fp32). Without the judge, the
    data set's shared one scores the pipeline (`quality.judge`)."""
    from .quality import AttributeNet

    stages = {s: Checkpoint.load(out / f"{s}.pt") for s in STAGES}
    missing = [s for s, c in stages.items() if not c.step]
    if missing:
        raise FileNotFoundError(f"no checkpoint for stage(s) {missing} in {out}; train them first")
    for name, c in stages.items():
        if not c.done:
            logger.warning("stage %s stopped early (step %d): exporting what it reached", name, c.step)
    vae = build_vae(cfg)
    vae.load_state_dict(stages["vae"].models["vae"])
    vae = calibrate_vae(vae.eval(), cfg)
    transformer = build_transformer(cfg)
    ema_state = stages["denoiser"].models["ema"]
    transformer.load_state_dict({k.removeprefix("model."): v for k, v in ema_state.items() if k.startswith("model.")})
    pipe = assemble_pipeline(cfg, vae, transformer.eval())
    target.mkdir(parents=True, exist_ok=True)
    # denoiser and VAE in fp16 (diffusers loads them in fp32 unless asked otherwise); the text encoders' weights in
    # fp16 under a config that names fp32: transformers loads a model in the dtype its config names, so one saved as
    # an fp16 model would sit beside an fp32 transformer in a plain `from_pretrained` and fail at the caption
    # projection
    pipe.transformer.half(), pipe.vae.half()
    pipe.save_pretrained(target, safe_serialization=True)
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, name, None)
        if encoder is not None:
            encoder.save_pretrained(target / name, state_dict={k: v.half() for k, v in encoder.state_dict().items()})
    data = data_set(cfg.data)
    if with_judge:
        net = AttributeNet(heads=data.heads, resolution=data.resolution)
        net.load_state_dict(stages["features"].models["net"])
        net.save_pretrained(target / "features")
    (target / "train_config.json").write_text(json.dumps(asdict(cfg), indent=1))
    history = {s: {"steps": c.step, "done": c.done, "last": c.history[-1] if c.history else None}
               for s, c in stages.items()}
    (target / "train_log.json").write_text(json.dumps(history, indent=1))
    write_reference_sample(target, data.reference_prompts)
    logger.info("exported the reference pipeline to %s", target)
    return target


def reference_sample(folder: Path, prompts: tuple[str, ...], steps: int = 10) -> np.ndarray:
    """Images of `prompts` (seed 0) from the pipeline saved in `folder`, loaded with `from_pretrained`."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    cfg = TrainConfig.from_json(folder / "train_config.json")
    return pipe(list(prompts), num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                output_type="np", **pipeline_call_kwargs(cfg)).images


def write_reference_sample(folder: Path, prompts: tuple[str, ...]) -> None:
    """Store what the exported pipeline generates, so that a later load can be checked against it."""
    images = reference_sample(folder, prompts)
    np.savez_compressed(folder / "reference_sample.npz", images=(images * 255).round().astype(np.uint8),
                        prompts=np.array(prompts))


# -- CLI ------------------------------------------------------------------------------------------------------------
def load_stage_vae(cfg: TrainConfig, out: Path) -> nn.Module:
    ckpt = Checkpoint.load(out / "vae.pt")
    if not ckpt.step:
        raise FileNotFoundError(f"the denoiser needs a trained VAE: no {out / 'vae.pt'}; run --stage vae first")
    vae = build_vae(cfg)
    vae.load_state_dict(ckpt.models["vae"])
    return calibrate_vae(vae.eval(), cfg)


def monitor(cfg: TrainConfig, vae: nn.Module) -> Callable[[nn.Module], dict[str, float]]:
    """Prompt adherence of a fixed prompt set, measured on the EMA weights during training."""
    captions, score = data_set(cfg.data).monitor(cfg.eval_prompts)

    def evaluate(transformer: nn.Module) -> dict[str, float]:
        pipe = assemble_pipeline(cfg, vae, transformer)
        pipe.set_progress_bar_config(disable=True)
        images = pipe(captions, generator=torch.Generator().manual_seed(0), output_type="np",
                      num_inference_steps=20, **pipeline_call_kwargs(cfg)).images
        return {f"adh_{k}": float(v) for k, v in score(images).items()}

    return evaluate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reference.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/train"), help="checkpoints (default %(default)s)")
    parser.add_argument("--stage", choices=(*STAGES, "all"), default="all")
    parser.add_argument("--export", type=Path, default=None, metavar="DIR",
                        help="after training, write the pipeline here (default: <out>/pipeline)")
    parser.add_argument("--budget-minutes", type=float, default=120.0, help="wall-clock cap of this command")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default %(default)s)")
    parser.add_argument("--config", type=Path, default=None, help="a train_config.json to reproduce")
    parser.add_argument("--data", default="shapes", help="the data set and its defaults (TrainConfig.for_data): shapes, "
                                                         "shapes128, scenes (default %(default)s)")
    parser.add_argument("--arch", choices=ARCHES, default="pixart", help="the denoiser (default %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a TrainConfig field")
    parser.add_argument("--no-monitor", action="store_true", help="skip the adherence evaluations during training")
    parser.add_argument("--no-judge", action="store_true",
                        help="export without the feature network: the data set's shared judge scores the pipeline "
                             "(benchmarks.reference.quality.judge)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    cfg = TrainConfig.from_json(args.config) if args.config else TrainConfig.for_arch(args.data, args.arch)
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in {f.name for f in fields(TrainConfig)}:
            raise SystemExit(f"--set {key}: not a TrainConfig field")
        setattr(cfg, key, type(getattr(cfg, key))(json.loads(value)))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=1))
    budget = Budget(args.budget_minutes)
    start = time.monotonic()

    stages = STAGES if args.stage == "all" else (args.stage,)
    if "vae" in stages:
        train_vae(cfg, args.out, budget)
    if "features" in stages:
        train_features(cfg, args.out, budget)
    if "denoiser" in stages:
        vae = load_stage_vae(cfg, args.out)
        train_denoiser(cfg, args.out, budget, vae, None if args.no_monitor else monitor(cfg, vae))
    logger.info("training took %.1f min", (time.monotonic() - start) / 60)
    if args.stage == "all" or args.export is not None:
        export(cfg, args.out, args.export or args.out / "pipeline", with_judge=not args.no_judge)


if __name__ == "__main__":
    main()
