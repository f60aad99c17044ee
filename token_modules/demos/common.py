"""Shared pieces of the selection demos (SDTPS, SEPS): synthetic cluttered digit canvases, a small patch encoder,
retrieval metrics, the training loop, MAC counting and mean ± std tables."""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from skimage import data as skdata
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

Tensor = torch.Tensor
log = logging.getLogger("token_modules.demos")


def setup(threads: int = 2) -> None:
    """Plain message logging and a fixed CPU thread count (the demos are timed on 2 cores)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(threads)


# --- synthetic data ---

TEXTURES = ("grass", "gravel", "brick")  # scikit-image samples that load offline


def paste(canvas: np.ndarray, digits: np.ndarray, top: np.ndarray, left: np.ndarray) -> None:
    """In place, max-blend one digit per canvas: canvas (S, H, W), digits (S, h, w), top/left (S,) pixel corners."""
    h, w = digits.shape[1:]
    s = np.arange(len(canvas))[:, None, None]
    r = top[:, None, None] + np.arange(h)[None, :, None]
    c = left[:, None, None] + np.arange(w)[None, None, :]
    canvas[s, r, c] = np.maximum(canvas[s, r, c], digits)


def texture_crops(name: str, count: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Random (count, height, width) crops in [0, 1] of the scikit-image texture ``name`` (one of TEXTURES)."""
    if name not in TEXTURES:
        raise ValueError(f"texture name must be one of {TEXTURES}, got {name!r}")
    tex = getattr(skdata, name)() / 255.0
    win = np.lib.stride_tricks.sliding_window_view(tex, (height, width))
    return win[rng.integers(0, win.shape[0], count), rng.integers(0, win.shape[1], count)]


def patch_windows(x: np.ndarray, patch: int, context: int = 0) -> np.ndarray:
    """(S, H, W) -> (S, N, w*w): for every patch x patch patch (row-major), its pixels with ``context`` pixels of
    surroundings (zero padding at the border), w = patch + 2 context."""
    s, h, w = x.shape
    if h % patch or w % patch:
        raise ValueError(f"image size must be a multiple of patch={patch}, got {h}x{w}")
    win = patch + 2 * context
    padded = np.pad(x, ((0, 0), (context, context), (context, context)))
    views = np.lib.stride_tricks.sliding_window_view(padded, (win, win), axis=(1, 2))[:, ::patch, ::patch]
    return views.reshape(s, (h // patch) * (w // patch), win * win)


# --- model pieces ---


def residual_mlp(dim: int) -> nn.Sequential:
    """LayerNorm -> Linear(dim, 2 dim) -> GELU -> Linear(2 dim, dim); the caller adds the residual."""
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))


class AttentionPool(nn.Module):
    """Learned attention pooling that stays in the tokens' space: (..., K, D) -> sum_k softmax_k(w . LN(x_k)) x_k,
    (..., D)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.score = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (self.score(x).softmax(-2) * x).sum(-2)


class WindowEncoder(nn.Module):
    """Patch tokens from pixel windows: (..., N, w*w) -> (..., N, D) = h + MLP(h), h = Linear(x) + position
    [+ offset, e.g. a modality embedding broadcast over the tokens]."""

    def __init__(self, window: int, num_patches: int, dim: int) -> None:
        super().__init__()
        self.embed = nn.Linear(window * window, dim)
        self.pos = nn.Parameter(torch.randn(num_patches, dim) * 0.1)
        self.mlp = residual_mlp(dim)

    def forward(self, x: Tensor, offset: Tensor | None = None) -> Tensor:
        h = self.embed(x) + self.pos
        if offset is not None:
            h = h + offset
        return h + self.mlp(h)


# --- metrics ---


def class_retrieval(feat: Tensor, labels: Tensor, query: Tensor) -> dict[str, float]:
    """ReID-style retrieval by cosine similarity, match = same label: mAP and R@1 in %.

    feat (S, D), labels (S,), query (S,) bool: the queries; the rest is the gallery.
    """
    q = nn.functional.normalize(feat[query], dim=-1)
    g = nn.functional.normalize(feat[~query], dim=-1)
    order = (q @ g.T).argsort(-1, descending=True)
    hits = (labels[~query][order] == labels[query][:, None]).float()  # (Q, G) relevance in ranked order
    precision = hits.cumsum(-1) / torch.arange(1, hits.shape[1] + 1)
    ap = (precision * hits).sum(-1) / hits.sum(-1).clamp_min(1)
    return {"mAP": 100 * ap.mean().item(), "R@1": 100 * hits[:, 0].mean().item()}


def recall_at_k(sim: Tensor, relevant: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Image-text retrieval recalls in %, both directions, and their sum.

    sim (V, T) image-caption similarity; relevant (V, T) bool, True where caption t describes image v (the standard
    protocol: one-hot, each caption's source image; every row and column needs a True). i2t: an image is a hit at K
    when a relevant caption ranks in its top K; t2i likewise for a caption. Ties count against the query (wrong items
    scoring equal to the best relevant one rank before it). Keys "i2t R@K", "t2i R@K", "rsum".
    """
    if relevant.shape != sim.shape or relevant.dtype != torch.bool:
        raise ValueError(f"relevant must be a bool (V, T) = {tuple(sim.shape)} tensor, got {relevant.dtype} "
                         f"{tuple(relevant.shape)}")
    if not (relevant.any(0).all() and relevant.any(1).all()):
        raise ValueError("relevant must mark at least one match in every row (image) and column (caption)")
    out = {}
    for name, s, rel in (("i2t", sim, relevant), ("t2i", sim.T, relevant.T)):
        best = s.masked_fill(~rel, float("-inf")).amax(1, keepdim=True)  # best relevant item per query
        rank = ((s >= best) & ~rel).sum(1)  # irrelevant items ranked at or above it
        out.update({f"{name} R@{k}": 100 * (rank < k).float().mean().item() for k in ks})
    out["rsum"] = sum(out.values())
    return out


# --- training ---


@dataclass
class TrainConfig:
    """Optimisation budget shared by every variant of a demo (same epochs, batches, learning rate)."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4


def train(model: nn.Module, loss_fn: Callable[[Tensor], Tensor], num_samples: int, cfg: TrainConfig,
          seed: int) -> list[float]:
    """AdamW over shuffled mini-batches; loss_fn(indices (b,)) -> scalar loss. Returns the mean loss per epoch.

    The shuffling generator is seeded by ``seed``, so every variant sees the same batches for a given seed.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history = []
    model.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(num_samples, generator=gen)
        losses = []
        for i in range(0, num_samples - cfg.batch_size + 1, cfg.batch_size):  # drop the ragged last batch
            loss = loss_fn(order[i:i + cfg.batch_size])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        history.append(sum(losses) / len(losses))
    model.eval()
    return history


# --- cost ---


class Block(nn.Module):
    """Pre-norm transformer block, (B, N, C) -> (B, N, C), with explicit attention matmuls (FlopCounterMode does not
    count CPU fused attention)."""

    def __init__(self, dim: int, heads: int = 4, mlp_ratio: int = 2) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim must be divisible by heads, got dim={dim}, heads={heads}")
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-1, -2) * (c // self.heads) ** -0.5).softmax(-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))
        return x + self.mlp(self.norm2(x))


def count_macs(fn: Callable[[], object]) -> float:
    """Multiply-accumulates of the matmuls / linears / convs run by ``fn()`` (FlopCounterMode flops / 2)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 2


# --- reporting ---


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def table(rows: Mapping[str, Mapping[str, object]], columns: Sequence[str]) -> str:
    """Markdown table: one row per variant; a list of floats is shown as mean ± std, a float to 3 significant
    figures, anything else as is."""

    def cell(x: object) -> str:
        if isinstance(x, (list, tuple)):
            m, s = mean_std(x)
            return f"{m:.1f} ± {s:.1f}"
        if isinstance(x, float):
            return f"{x:.3g}"
        return str(x)

    lines = ["| variant | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for name, r in rows.items()]
    return "\n".join(lines)
