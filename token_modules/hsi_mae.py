"""HSI-conditioned masked autoencoder: multi-modal guided SpectralGPT (seeds/004).

Hyperspectral cubes (B, C, T, H, W) are cut into 3-D spatial-spectral patches (``band_patch`` bands x
``patch_size``^2 pixels), embedded, given factorised (spectral + spatial) positional embeddings and 75 % masked.
Auxiliary images (IR, AF, thickness, ...) are each encoded to one global vector by a small ViT or CNN; the visible
HSI tokens then cross-attend to the available auxiliary vectors (HSI tokens are queries, auxiliary vectors
keys/values), pass through pre-norm transformer blocks, and an MAE decoder reconstructs the masked patches.

Losses: L2 on masked tokens only, against per-patch normalised pixels (a fixed target: the reference used the
trainable patch embedding as target, which can collapse), plus symmetric InfoNCE (temperature 0.07, L2-normalised
embeddings, targets ``arange(B)``) between the pooled HSI encoding and each available auxiliary vector, averaged over
the modalities present (never inflated when some are missing).

Fixes of the reference code (research/token_modules.md §5.2): one residual per sub-layer (its double residual
doubled activations every block), real cross-attention, pixel targets, normalised contrastive logits.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor
DEFAULT_AUX = ("ir", "af", "thickness")


@dataclass
class AuxEncoderConfig:
    """One auxiliary modality's encoder: a small ViT (mean-pooled tokens) or CNN (global average pool)."""

    in_chans: int = 1
    img_size: int = 224
    kind: str = "vit"
    dim: int = 256
    depth: int = 4
    num_heads: int = 4
    patch_size: int = 16

    def __post_init__(self) -> None:
        if self.kind not in ("vit", "cnn"):
            raise ValueError(f"kind must be 'vit' or 'cnn', got {self.kind!r}")
        if self.kind == "vit" and self.img_size % self.patch_size:
            raise ValueError(f"img_size ({self.img_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.dim % self.num_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")


@dataclass
class HSIMAEConfig:
    """Defaults are the full seeds/004 configuration: 1x12x224x224 cubes, 3x16x16 patches -> 784 tokens of 768,
    16 encoder blocks, three ViT auxiliary encoders (256-d). Decoder sizes and ``cond_depth`` are not given by the
    seed: MAE/SpectralGPT's 512-d decoder (4 blocks here) and one conditioning layer are used."""

    img_size: int = 224
    bands: int = 12
    in_chans: int = 1
    patch_size: int = 16
    band_patch: int = 3
    dim: int = 768
    depth: int = 16
    num_heads: int = 12
    mlp_ratio: float = 4.0
    cond_depth: int = 1
    decoder_dim: int = 512
    decoder_depth: int = 4
    decoder_heads: int = 16
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    aux: dict[str, AuxEncoderConfig] = field(default_factory=lambda: {m: AuxEncoderConfig() for m in DEFAULT_AUX})
    contrast_dim: int = 256
    temperature: float = 0.07
    contrastive_weight: float = 1.0
    contrast_unconditioned: bool = True

    def __post_init__(self) -> None:
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size ({self.img_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.bands % self.band_patch:
            raise ValueError(f"bands ({self.bands}) must be a multiple of band_patch ({self.band_patch})")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.dim % self.num_heads or self.decoder_dim % self.decoder_heads:
            raise ValueError("dim / decoder_dim must be divisible by num_heads / decoder_heads")
        if not 0 < self.temperature <= 1:
            raise ValueError(f"temperature must be in (0, 1], got {self.temperature}")

    @property
    def grid(self) -> tuple[int, int, int]:
        """(T', H', W') token grid."""
        s = self.img_size // self.patch_size
        return self.bands // self.band_patch, s, s

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w

    @property
    def patch_volume(self) -> int:
        return self.in_chans * self.band_patch * self.patch_size**2


def _mlp(dim: int, ratio: float) -> nn.Sequential:
    hidden = int(dim * ratio)
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class Block(nn.Module):
    """Pre-norm transformer block, (B, N, D) -> (B, N, D): x + attn(LN x), then x + mlp(LN x); one residual each."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _mlp(dim, mlp_ratio)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ConditioningBlock(nn.Module):
    """HSI tokens (B, N, D) cross-attend to auxiliary vectors (B, M, D); absent vectors are masked out.

    ``present``: (B, M) bool. A sample with no auxiliary vector gets no update at all, so with every modality absent
    the block is the identity (and the model equals the standalone HSI encoder).
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)

    def forward(self, x: Tensor, aux: Tensor, present: Tensor) -> Tensor:
        any_present = present.any(1)
        # a row of all-masked keys would give NaN: unmask slot 0 there and zero the update instead
        ignore = ~present
        ignore[:, 0] &= any_present
        kv = self.norm_kv(aux)
        upd = self.attn(self.norm_q(x), kv, kv, key_padding_mask=ignore, need_weights=False)[0]
        return x + upd * any_present[:, None, None].to(upd.dtype)


class FactorisedPosEmbed(nn.Module):
    """Learnable spectral (T', D) + spatial (H'W', D) embeddings -> (1, T'H'W', D), spectral-major token order."""

    def __init__(self, grid: tuple[int, int, int], dim: int) -> None:
        super().__init__()
        t, h, w = grid
        self.spectral = nn.Parameter(torch.randn(t, 1, dim) * 0.02)
        self.spatial = nn.Parameter(torch.randn(1, h * w, dim) * 0.02)

    def forward(self) -> Tensor:
        return (self.spectral + self.spatial).flatten(0, 1)[None]


class HSIEncoder(nn.Module):
    """Standalone HSI encoder: 3-D patch embedding + positions + blocks + norm. (B, C, T, H, W) -> (B, L, D)."""

    def __init__(self, config: HSIMAEConfig) -> None:
        super().__init__()
        c = self.config = config
        kernel = (c.band_patch, c.patch_size, c.patch_size)
        self.patch_embed = nn.Conv3d(c.in_chans, c.dim, kernel_size=kernel, stride=kernel)
        self.pos_embed = FactorisedPosEmbed(c.grid, c.dim)
        self.blocks = nn.ModuleList(Block(c.dim, c.num_heads, c.mlp_ratio) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.dim)

    def check_input(self, hsi: Tensor) -> None:
        c = self.config
        want = (c.in_chans, c.bands, c.img_size, c.img_size)
        if hsi.dim() != 5 or tuple(hsi.shape[1:]) != want:
            raise ValueError(f"hsi must be (B, C, T, H, W) = (B, {', '.join(map(str, want))}), got {tuple(hsi.shape)}")

    def embed(self, hsi: Tensor) -> Tensor:
        """(B, C, T, H, W) -> (B, L, D) patch tokens with positions, spectral-major order."""
        self.check_input(hsi)
        return self.patch_embed(hsi).flatten(2).transpose(1, 2) + self.pos_embed()

    def forward_tokens(self, x: Tensor) -> Tensor:
        """(B, N, D) tokens (any subset of positions) -> (B, N, D) features."""
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, hsi: Tensor) -> Tensor:
        return self.forward_tokens(self.embed(hsi))


class AuxEncoder(nn.Module):
    """Auxiliary image (B, C, H, W) -> one global vector (B, dim). Per-sample ops only (no batch norm), so an absent
    sample's content cannot leak into other samples."""

    def __init__(self, config: AuxEncoderConfig) -> None:
        super().__init__()
        c = self.config = config
        if c.kind == "vit":
            self.stem = nn.Conv2d(c.in_chans, c.dim, c.patch_size, stride=c.patch_size)
            self.pos_embed = nn.Parameter(torch.randn(1, (c.img_size // c.patch_size) ** 2, c.dim) * 0.02)
            self.blocks = nn.ModuleList(Block(c.dim, c.num_heads) for _ in range(c.depth))
        else:
            chans = [c.in_chans] + [c.dim // 2 ** (c.depth - 1 - i) for i in range(c.depth)]
            self.stem = nn.Sequential(*[
                nn.Sequential(nn.Conv2d(a, b, 3, stride=2, padding=1), nn.GroupNorm(1, b), nn.GELU())
                for a, b in zip(chans[:-1], chans[1:])
            ])
        self.norm = nn.LayerNorm(c.dim)

    def forward(self, x: Tensor) -> Tensor:
        c = self.config
        if x.dim() != 4 or tuple(x.shape[1:]) != (c.in_chans, c.img_size, c.img_size):
            raise ValueError(f"auxiliary input must be (B, {c.in_chans}, {c.img_size}, {c.img_size}), got {tuple(x.shape)}")
        h = self.stem(x)
        if c.kind == "vit":
            h = h.flatten(2).transpose(1, 2) + self.pos_embed
            for blk in self.blocks:
                h = blk(h)
            return self.norm(h.mean(1))
        return self.norm(h.mean((2, 3)))


def random_masking(
    x: Tensor, mask_ratio: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample random masking. x: (B, L, D) -> (visible (B, L_keep, D), mask (B, L) 1 = masked,
    ids_restore (B, L)); L_keep = round(L * (1 - mask_ratio)) exactly, for every sample."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    b, n, d = x.shape
    keep = round(n * (1 - mask_ratio))  # round, not int: int(100 * (1 - 0.9)) is 9
    if keep < 1:
        raise ValueError(f"mask_ratio {mask_ratio} leaves no visible token of {n}; use a smaller ratio")
    noise = torch.rand(b, n, generator=generator, device=x.device if generator is None else generator.device)
    ids_shuffle = noise.to(x.device).argsort(1)
    ids_restore = ids_shuffle.argsort(1)
    visible = x.gather(1, ids_shuffle[:, :keep, None].expand(-1, -1, d))
    mask = torch.ones(b, n, device=x.device)
    mask[:, :keep] = 0
    return visible, mask.gather(1, ids_restore), ids_restore


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean over masked tokens of the per-token MSE. pred, target: (B, L, P); mask: (B, L), 1 = masked."""
    per_token = (pred - target).pow(2).mean(-1)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def masked_info_nce(z: Tensor, z_aux: Tensor, valid: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Symmetric InfoNCE between z (B, E) and each modality's z_aux (M, B, E), both L2-normalised.

    valid: (M, B) bool, samples whose modality is present; only those take part (as queries and as negatives).
    Returns (loss, per-modality loss (M,)); loss averages the modalities with >= 2 valid samples (0 if none).
    """
    m, b, _ = z_aux.shape
    target = torch.arange(b, device=z.device)

    def directed(logits: Tensor) -> Tensor:  # (M, B, B), rows = queries -> (M, B) CE, 0 on invalid rows
        pair = valid[:, :, None] & valid[:, None, :]
        filler = torch.where(valid[:, :, None], float("-inf"), 0.0).to(logits.dtype)
        logits = torch.where(pair, logits, filler)
        return F.cross_entropy(logits.reshape(m * b, b), target.repeat(m), reduction="none").view(m, b) * valid

    logits = torch.einsum("be,mne->mbn", z, z_aux) / temperature
    count = valid.sum(1)
    per_mod = (directed(logits) + directed(logits.transpose(1, 2))).sum(1) / (2 * count.clamp(min=1))
    active = (count >= 2).to(per_mod.dtype)
    return (per_mod * active).sum() / active.sum().clamp(min=1), per_mod


class HSIConditionedMAE(nn.Module):
    """Masked autoencoder over HSI cubes, conditioned on auxiliary modality vectors, with a contrastive head.

    `forward(hsi, aux, aux_present)`:
        hsi: (B, C, T, H, W); aux: {name: (B, C_m, H_m, W_m) or None}, any subset of ``config.aux`` (missing or None
        = absent for the whole batch); aux_present: optional {name: (B,) bool} for per-sample absence.
    Returns a dict: loss, recon_loss, contrastive_loss, contrastive_per_modality {m: scalar}, pred (B, L, P),
    target (B, L, P), mask (B, L), latent (B, L_vis, D), hsi_embedding (B, E), aux_embeddings {m: (B, E)}.

    With ``contrast_unconditioned`` (default) the contrastive term uses the HSI encoding computed *without*
    auxiliary conditioning (same visible tokens, batched with the conditioned pass): otherwise the HSI side can
    align by copying the auxiliary vector it was conditioned on, and the standalone encoder learns nothing from it.
    """

    def __init__(self, config: HSIMAEConfig | None = None) -> None:
        super().__init__()
        c = self.config = config or HSIMAEConfig()
        self.aux_names = tuple(c.aux)
        self.encoder = HSIEncoder(c)
        self.aux_encoders = nn.ModuleDict({m: AuxEncoder(a) for m, a in c.aux.items()})
        self.aux_proj = nn.ModuleDict({m: nn.Linear(a.dim, c.dim) for m, a in c.aux.items()})
        self.aux_type = nn.Parameter(torch.randn(max(len(c.aux), 1), c.dim) * 0.02)  # which modality a key is
        self.cond_blocks = nn.ModuleList(ConditioningBlock(c.dim, c.num_heads) for _ in range(c.cond_depth))
        self.decoder_embed = nn.Linear(c.dim, c.decoder_dim)
        self.mask_token = nn.Parameter(torch.randn(c.decoder_dim) * 0.02)
        self.decoder_pos = FactorisedPosEmbed(c.grid, c.decoder_dim)
        self.decoder_blocks = nn.ModuleList(
            Block(c.decoder_dim, c.decoder_heads, c.mlp_ratio) for _ in range(c.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(c.decoder_dim)
        self.decoder_pred = nn.Linear(c.decoder_dim, c.patch_volume)
        self.hsi_head = nn.Linear(c.dim, c.contrast_dim)
        self.aux_heads = nn.ModuleDict({m: nn.Linear(a.dim, c.contrast_dim) for m, a in c.aux.items()})

    def extract_encoder(self) -> HSIEncoder:
        """An independent copy of the HSI encoder (no auxiliary branch) for downstream use."""
        return copy.deepcopy(self.encoder)

    def patchify(self, hsi: Tensor) -> Tensor:
        """(B, C, T, H, W) -> (B, L, C*t*p*p), tokens in the patch embedding's (T', H', W') order."""
        c = self.config
        t, h, w = c.grid
        x = hsi.reshape(hsi.shape[0], c.in_chans, t, c.band_patch, h, c.patch_size, w, c.patch_size)
        return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(hsi.shape[0], t * h * w, c.patch_volume)

    def unpatchify(self, patches: Tensor) -> Tensor:
        """(B, L, C*t*p*p) -> (B, C, T, H, W), the inverse of `patchify`."""
        c = self.config
        t, h, w = c.grid
        x = patches.reshape(patches.shape[0], t, h, w, c.in_chans, c.band_patch, c.patch_size, c.patch_size)
        return x.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(
            patches.shape[0], c.in_chans, c.bands, c.img_size, c.img_size
        )

    def target(self, hsi: Tensor) -> Tensor:
        """Reconstruction target (B, L, P): pixel patches, normalised per patch when ``norm_pix_loss``."""
        x = self.patchify(hsi)
        if self.config.norm_pix_loss:
            x = (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True) + 1e-6).sqrt()
        return x

    def encode_aux(
        self, aux: Mapping[str, Tensor | None] | None, aux_present: Mapping[str, Tensor] | None, batch: int
    ) -> tuple[list[str], dict[str, Tensor], Tensor]:
        """-> (names of the given modalities, {m: global vector (B, dim_m)}, present (B, M) bool)."""
        aux = {m: x for m, x in (aux or {}).items() if x is not None}
        aux_present = dict(aux_present or {})
        for what, keys in (("aux", aux), ("aux_present", aux_present)):
            unknown = set(keys) - set(self.aux_names)
            if unknown:
                raise ValueError(f"{what} has unknown modalities {sorted(unknown)}; accepted: {self.aux_names}")
        names = [m for m in self.aux_names if m in aux]
        globals_ = {}
        present = []
        for m in names:
            if aux[m].shape[0] != batch:
                raise ValueError(f"aux['{m}'] has batch {aux[m].shape[0]}, hsi has {batch}")
            globals_[m] = self.aux_encoders[m](aux[m])
            p = aux_present.get(m)
            if p is None:
                p = torch.ones(batch, dtype=torch.bool, device=aux[m].device)
            elif p.shape != (batch,) or p.dtype != torch.bool:
                raise ValueError(f"aux_present['{m}'] must be a bool tensor of shape ({batch},), got {p.dtype} {tuple(p.shape)}")
            present.append(p)
        present_t = torch.stack(present, 1) if present else torch.zeros(batch, 0, dtype=torch.bool)
        return names, globals_, present_t

    def condition(self, x: Tensor, names: list[str], globals_: Mapping[str, Tensor], present: Tensor) -> Tensor:
        """Visible HSI tokens (B, N, D) attend to the available auxiliary vectors -> (B, N, D)."""
        if not names:
            return x
        idx = [self.aux_names.index(m) for m in names]
        keys = torch.stack([self.aux_proj[m](globals_[m]) for m in names], 1) + self.aux_type[idx]
        for blk in self.cond_blocks:
            x = blk(x, keys, present.to(x.device))
        return x

    def forward(
        self,
        hsi: Tensor,
        aux: Mapping[str, Tensor | None] | None = None,
        aux_present: Mapping[str, Tensor] | None = None,
        mask_ratio: float | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, object]:
        c = self.config
        b = hsi.shape[0]
        tokens = self.encoder.embed(hsi)
        visible, mask, ids_restore = random_masking(tokens, c.mask_ratio if mask_ratio is None else mask_ratio, generator)
        names, globals_, present = self.encode_aux(aux, aux_present, b)
        conditioned = self.condition(visible, names, globals_, present)

        need_plain = c.contrast_unconditioned and bool(names)
        # one batched pass: conditioned tokens for the decoder, unconditioned ones for the contrastive term
        feats = self.encoder.forward_tokens(torch.cat([conditioned, visible]) if need_plain else conditioned)
        latent = feats[:b]
        contrast_feats = feats[b:] if need_plain else latent

        d = self.decoder_embed(latent)
        n_mask = ids_restore.shape[1] - d.shape[1]
        d = torch.cat([d, self.mask_token.expand(b, n_mask, -1)], 1)
        d = d.gather(1, ids_restore[..., None].expand(-1, -1, d.shape[2])) + self.decoder_pos()
        for blk in self.decoder_blocks:
            d = blk(d)
        pred = self.decoder_pred(self.decoder_norm(d))
        target = self.target(hsi)
        recon = masked_mse(pred, target, mask)

        z = F.normalize(self.hsi_head(contrast_feats.mean(1)), dim=-1)
        z_aux = {m: F.normalize(self.aux_heads[m](globals_[m]), dim=-1) for m in names}
        if names:
            contrast, per_mod = masked_info_nce(z, torch.stack([z_aux[m] for m in names]), present.T, c.temperature)
        else:
            contrast, per_mod = recon.new_zeros(()), recon.new_zeros(0)
        return {
            "loss": recon + c.contrastive_weight * contrast,
            "recon_loss": recon,
            "contrastive_loss": contrast,
            "contrastive_per_modality": dict(zip(names, per_mod)),
            "pred": pred,
            "target": target,
            "mask": mask,
            "latent": latent,
            "hsi_embedding": z,
            "aux_embeddings": z_aux,
        }


def model_complexity(config: HSIMAEConfig | None = None, batch: int = 1) -> dict[str, float]:
    """Parameters and multiply-accumulates of a configuration, counted shape-only on the ``meta`` device.

    MACs come from `torch.utils.flop_counter.FlopCounterMode` (which reports FLOPs = 2 x MACs for matmuls and
    convolutions, attention score/value products included on meta) divided by 2; element-wise ops are not counted.
    Returns params (total and per part), ``mae_gmacs`` (one pretraining forward: masked encoder, conditioning with
    every auxiliary modality, decoder and the unconditioned contrastive pass) and ``encoder_gmacs`` (the standalone
    encoder on all L tokens), per ``batch`` samples.
    """
    from torch.utils.flop_counter import FlopCounterMode

    c = config or HSIMAEConfig()
    with torch.device("meta"):
        model = HSIConditionedMAE(c).eval()
        hsi = torch.empty(batch, c.in_chans, c.bands, c.img_size, c.img_size)
        aux = {m: torch.empty(batch, a.in_chans, a.img_size, a.img_size) for m, a in c.aux.items()}

    def gmacs(fn) -> float:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / 2 / 1e9

    def count(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    return {
        "params": count(model),
        "params_encoder": count(model.encoder),
        "params_aux": count(model.aux_encoders),
        "params_decoder": count(model) - count(model.encoder) - count(model.aux_encoders),
        "num_tokens": c.num_tokens,
        "mae_gmacs": gmacs(lambda: model(hsi, aux)),
        "encoder_gmacs": gmacs(lambda: model.encoder(hsi)),
    }


if __name__ == "__main__":
    stats = model_complexity()
    print(f"full seeds/004 configuration ({stats['num_tokens']} tokens), batch 1:")
    for k, v in stats.items():
        print(f"  {k}: {v / 1e6:.2f}M" if k.startswith("params") else f"  {k}: {v}")
    print(f"  (GFLOPs = 2 x GMACs: mae {2 * stats['mae_gmacs']:.1f}, encoder {2 * stats['encoder_gmacs']:.1f})")
