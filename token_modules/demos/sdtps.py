"""SDTPS learns on three corrupted "modalities" of the same digit (offline, CPU, a few minutes).

Data (research/token_modules.md §6 recipe): scikit-learn 8x8 digits upsampled to 16x16; RGB = the image, NIR = its
Sobel magnitude, TIR = 1 - Gaussian blur. In each modality 50 % of the 2x2 patches are independently replaced by
noise, so which patches are informative differs per modality. 64 patches per modality.

Per modality a trained encoder (Linear(4 -> 64) + positions + CLS + 1 transformer layer) gives patches (B, 64, 64)
and a global (CLS). Heads, trained the same way (cross-entropy on the digit class; 3 seeds):
- sdtps: `MultiModalSDTPS` (rho 0.5, alpha 0.4, beta 0.25): 64 -> 32 kept -> 12 + 1 = 13 tokens per modality;
- random: the same `TokenSparse` + `TokenAggregation` with uniform random scores (no predictor, no guidance);
- mean: mean pooling of all 64 patches.
Each head's tokens are mean-pooled, concatenated over modalities, layer-normalised: the retrieval feature.
Reported on held-out digits (query = every 5th, gallery = the rest, match = same class): mAP and Rank-1 (cosine),
beside chance. Then the downstream cost of one transformer block (C = 512, 8 heads) on the default SDTPS output
(26 tokens) vs all 128 patches: MACs (torch FlopCounterMode, explicit attention matmuls counted) and CPU latency
(interleaved repeats, median), SDTPS's own cost included. Outputs in --out: sdtps_masks.png, sdtps_results.json.

    python -m token_modules.demos.sdtps [--out outputs/demos] [--epochs 15] [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from token_modules.sdtps import MultiModalSDTPS
from token_modules.selection import TokenAggregation, TokenSparse, aggregated_count

MODS = ("rgb", "nir", "tir")
SIDE, PATCH, DIM, CORRUPT = 16, 2, 64, 0.5
N_PATCH = (SIDE // PATCH) ** 2


def make_data(seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, np.ndarray]]:
    """-> ({m: (S, 64, 4) patches}, labels (S,), {m: (S, 16, 16) corrupted images for plotting})."""
    rng = np.random.default_rng(seed)
    digits = load_digits()
    img = ndimage.zoom(digits.images / 16.0, (1, 2, 2), order=1).clip(0, 1)  # (S, 16, 16)
    s = len(img)
    sobel = np.hypot(ndimage.sobel(img, 1), ndimage.sobel(img, 2))
    images = {
        "rgb": img,
        "nir": sobel / sobel.max(),
        "tir": 1.0 - ndimage.gaussian_filter(img, (0, 1.5, 1.5)),
    }
    g = SIDE // PATCH
    data = {}
    for m, x in images.items():
        p = x.reshape(s, g, PATCH, g, PATCH).transpose(0, 1, 3, 2, 4).reshape(s, g * g, PATCH * PATCH)
        corrupt = rng.random((s, N_PATCH)) < CORRUPT  # independent per modality
        p[corrupt] = rng.uniform(0, 1, (corrupt.sum(), PATCH * PATCH))
        data[m] = torch.tensor(p, dtype=torch.float32)
        images[m] = p.reshape(s, g, g, PATCH, PATCH).transpose(0, 1, 3, 2, 4).reshape(s, SIDE, SIDE)
    return data, torch.tensor(digits.target), images


class Encoder(nn.Module):
    """Patch pixels (B, N, 4) -> (patch tokens (B, N, D), global CLS (B, D))."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(PATCH * PATCH, DIM)
        self.pos = nn.Parameter(torch.randn(N_PATCH, DIM) * 0.02)
        self.cls = nn.Parameter(torch.zeros(1, 1, DIM))
        self.block = nn.TransformerEncoderLayer(DIM, 4, 2 * DIM, dropout=0.0, batch_first=True, norm_first=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(x) + self.pos
        h = self.block(torch.cat([self.cls.expand(len(h), -1, -1), h], 1))
        return h[:, 1:], h[:, 0]


class RandomSelection(nn.Module):
    """Baseline: TokenSparse + TokenAggregation per modality on uniform random scores (no predictor, no guidance)."""

    def __init__(self) -> None:
        super().__init__()
        n_c = aggregated_count(N_PATCH, 0.5, 0.4)
        self.sparse = TokenSparse(DIM, 0.5, scoring="sum")
        self.aggr = nn.ModuleDict({m: TokenAggregation(DIM, n_c) for m in MODS})

    def forward(self, patches: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for m, p in patches.items():
            sel = self.sparse(p, torch.rand(p.shape[:2], device=p.device))
            out[m] = torch.cat([self.aggr[m](sel.tokens), sel.extra], 1)
        return out


class ReIDModel(nn.Module):
    """Encoders + head ("sdtps", "random" or "mean") -> normalised retrieval feature (B, 3D) and class logits."""

    def __init__(self, head: str) -> None:
        super().__init__()
        self.head = head
        self.encoders = nn.ModuleDict({m: Encoder() for m in MODS})
        if head == "sdtps":
            self.select = MultiModalSDTPS(DIM, N_PATCH, MODS, sparse_ratio=0.5, aggr_ratio=0.4, beta=0.25)
        elif head == "random":
            self.select = RandomSelection()
        self.norm = nn.LayerNorm(DIM * len(MODS))  # no running stats: BN's lagged badly at this size
        self.classifier = nn.Linear(DIM * len(MODS), 10)

    def forward(self, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        enc = {m: self.encoders[m](x[m]) for m in MODS}
        patches, globals_ = {m: e[0] for m, e in enc.items()}, {m: e[1] for m, e in enc.items()}
        masks = {}
        if self.head == "sdtps":
            out = self.select(patches, globals_)
            tokens, masks = out.tokens, out.masks
        elif self.head == "random":
            tokens = self.select(patches)
        else:
            tokens = patches
        feat = self.norm(torch.cat([tokens[m].mean(1) for m in MODS], -1))
        return feat, self.classifier(feat), masks


def retrieval(feat: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """mAP and Rank-1 (%), query = every 5th sample, gallery = the rest, cosine similarity."""
    q = torch.arange(len(labels)) % 5 == 0
    sim = F.normalize(feat[q], dim=-1) @ F.normalize(feat[~q], dim=-1).T
    order = sim.argsort(-1, descending=True)
    hits = (labels[~q][order] == labels[q][:, None]).float()  # (Q, G) relevance in ranked order
    precision = hits.cumsum(-1) / torch.arange(1, hits.shape[1] + 1)
    ap = (precision * hits).sum(-1) / hits.sum(-1).clamp_min(1)
    return 100 * ap.mean().item(), 100 * hits[:, 0].mean().item()


def train_eval(head: str, train: dict, y_train: torch.Tensor, test: dict, y_test: torch.Tensor, epochs: int,
               seed: int) -> tuple[float, float, ReIDModel]:
    torch.manual_seed(seed)
    model = ReIDModel(head)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    n, bs = len(y_train), 128
    for _ in range(epochs):
        model.train()
        order = torch.randperm(n)
        for i in range(0, n - bs + 1, bs):
            idx = order[i:i + bs]
            _, logits, _ = model({m: x[idx] for m, x in train.items()})
            loss = F.cross_entropy(logits, y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        feat, _, _ = model(test)
    return (*retrieval(feat, y_test), model)


class Block(nn.Module):
    """Pre-norm transformer block with explicit attention matmuls (so FlopCounterMode counts them on CPU)."""

    def __init__(self, dim: int, heads: int = 8) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-1, -2) * (c // self.heads) ** -0.5).softmax(-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))
        return x + self.mlp(self.norm2(x))


def downstream_cost(batch: int = 32, repeats: int = 15) -> dict[str, dict[str, float]]:
    """MACs and CPU latency per modality batch: one block on 128 patches vs SDTPS (3 modalities) + block on 26."""
    torch.manual_seed(0)
    sdtps, block = MultiModalSDTPS().eval(), Block(512).eval()
    p = {m: torch.randn(batch, 128, 512) for m in MODS}
    g = {m: torch.randn(batch, 512) for m in MODS}
    runs = {
        "block_128": lambda: [block(p[m]) for m in MODS],
        "sdtps_only": lambda: sdtps(p, g),
        "sdtps+block_26": lambda: [block(t) for t in sdtps(p, g).tokens.values()],
    }
    res = {}
    with torch.no_grad():
        for name, fn in runs.items():
            with FlopCounterMode(display=False) as fc:
                fn()
            res[name] = {"GMACs": fc.get_total_flops() / 2 / 1e9, "ms": []}
        for name, fn in runs.items():  # warm-up
            fn()
        for _ in range(repeats):  # interleaved, so drifts hit every variant alike
            for name, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                res[name]["ms"].append(1e3 * (time.perf_counter() - t0))
    for r in res.values():
        ms = r.pop("ms")
        r["median_ms"], r["min_ms"], r["max_ms"] = statistics.median(ms), min(ms), max(ms)
    return res


def plot_masks(model: ReIDModel, test: dict, images: dict, path: Path, count: int = 6) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with torch.no_grad():
        _, _, masks = model({m: x[:count] for m, x in test.items()})
    g = SIDE // PATCH
    fig, axes = plt.subplots(len(MODS), count, figsize=(1.6 * count, 1.7 * len(MODS)))
    for r, m in enumerate(MODS):
        for c in range(count):
            ax = axes[r, c]
            ax.imshow(images[m][c], cmap="gray")
            keep = masks[m][c].view(g, g).numpy().repeat(PATCH, 0).repeat(PATCH, 1)
            ax.imshow(np.ma.masked_where(keep > 0, keep), cmap="autumn", alpha=0.45, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(m.upper())
    fig.suptitle("SDTPS selection (tinted = discarded patches), held-out digits", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/demos")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--bench-only", action="store_true", help="only the 26 vs 128 token cost measurement")
    args = ap.parse_args()
    torch.set_num_threads(2)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {}

    if not args.bench_only:
        data, labels, images = make_data(0)
        perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
        test_idx, train_idx = perm[:500], perm[500:]
        train = {m: x[train_idx] for m, x in data.items()}
        test = {m: x[test_idx] for m, x in data.items()}
        y_test = labels[test_idx]
        chance = retrieval(torch.randn(len(test_idx), 8, generator=torch.Generator().manual_seed(1)), y_test)
        print(f"train {len(train_idx)}, test {len(test_idx)} digits; {args.epochs} epochs, {args.seeds} seeds")
        print(f"chance (random features): mAP {chance[0]:.1f}  Rank-1 {chance[1]:.1f}")
        results["chance"] = {"mAP": chance[0], "rank1": chance[1]}
        for head in ("sdtps", "random", "mean"):
            t0 = time.time()
            runs = [train_eval(head, train, labels[train_idx], test, y_test, args.epochs, s) for s in range(args.seeds)]
            maps, r1s = [r[0] for r in runs], [r[1] for r in runs]
            results[head] = {"mAP": maps, "rank1": r1s}
            sd = statistics.stdev if len(maps) > 1 else (lambda _: 0.0)
            print(f"{head:7s} mAP {np.mean(maps):5.1f} ± {sd(maps):4.1f}   "
                  f"Rank-1 {np.mean(r1s):5.1f} ± {sd(r1s):4.1f}"
                  f"   ({time.time() - t0:.0f} s)")
            if head == "sdtps":
                plot_masks(runs[0][2], test, {m: x[test_idx.numpy()] for m, x in images.items()},
                           out_dir / "sdtps_masks.png")
        print(f"masks: {out_dir / 'sdtps_masks.png'}")

    cost = downstream_cost()
    results["cost"] = cost
    print("\ndownstream cost, batch 32 x 3 modalities, C=512 (one transformer block, 8 heads), CPU 2 threads:")
    for name, r in cost.items():
        print(f"  {name:15s} {r['GMACs']:7.2f} GMACs   median {r['median_ms']:7.1f} ms "
              f"(min {r['min_ms']:.1f}, max {r['max_ms']:.1f})")
    base, ours = cost["block_128"], cost["sdtps+block_26"]
    print(f"  SDTPS + block on 26 vs block on 128: MACs x{ours['GMACs'] / base['GMACs']:.3f}, "
          f"latency x{ours['median_ms'] / base['median_ms']:.3f}")
    (out_dir / "sdtps_results.json").write_text(json.dumps(results, indent=1))
    print(f"results: {out_dir / 'sdtps_results.json'}")


if __name__ == "__main__":
    main()
