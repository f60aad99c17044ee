"""Register tokens align three modalities built from scikit-learn digits (offline, CPU, about 3 minutes).

Data (8x8 digits): "vision" = the image times a random gain plus noise; "tactile" = Sobel magnitude of a shifted,
randomly blurred copy; "text" = a 4-word caption (class word, ink-level word, two filler words). Each modality has a
frozen random stage-1 encoder producing a token sequence (16 patch tokens, or 4 word tokens). Only the register module
and the loss's temperature train. Reported on held-out digits: instance retrieval vision<->tactile (chance 1/N) and
class-match retrieval for every pair (chance ~10 %), with 1, 2 or 3 overlapping tokens kept (nested prefix).

    python -m token_modules.demos.registers [--out outputs/demos] [--epochs 40] [--lr 5e-4] [--temperature 0.07]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from sklearn.datasets import load_digits
from torch import nn

from token_modules.registers import RegisterTokenConfig, RegisterTokenLoss, RegisterTokenModule

MODS = ("vision", "tactile", "text")
FEAT = 48


def make_data(seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """-> ({vision: (N, 16, 4), tactile: (N, 16, 4), text: (N, 4) word ids}, labels (N,))."""
    rng = np.random.default_rng(seed)
    digits = load_digits()
    img = digits.images / 16.0
    n = len(img)
    vision = img * rng.uniform(0.5, 1.5, (n, 1, 1)) + rng.normal(0, 0.05, img.shape)
    shifted = np.stack([ndimage.shift(x, rng.integers(-1, 2, 2), order=0) for x in img])
    blurred = np.stack([ndimage.gaussian_filter(x, s) for x, s in zip(shifted, rng.uniform(0, 1.0, n))])
    tactile = np.hypot(ndimage.sobel(blurred, 1), ndimage.sobel(blurred, 2))
    ink = np.digitize(img.sum((1, 2)), np.quantile(img.sum((1, 2)), [1 / 3, 2 / 3]))  # 3 levels
    # vocabulary: 0-9 class words, 10-12 ink words, 13 "a", 14 "digit"
    text = np.stack([np.full(n, 13), digits.target, 10 + ink, np.full(n, 14)], 1)

    def patches(x: np.ndarray) -> torch.Tensor:  # (N, 8, 8) standardised per pixel -> (N, 16, 4) 2x2 patches
        x = (x - x.mean(0)) / (x.std(0) + 1e-3)
        return torch.tensor(x.reshape(n, 4, 2, 4, 2).transpose(0, 1, 3, 2, 4).reshape(n, 16, 4), dtype=torch.float32)

    data = {"vision": patches(vision), "tactile": patches(tactile), "text": torch.tensor(text)}
    return data, torch.tensor(digits.target)


class PatchEncoder(nn.Module):
    """Frozen random stage-1 encoder: (N, L, 4) patches or (N, L) word ids -> (N, L, FEAT) tokens.

    Bias-free with centred inputs, so that features vary with content (like a trained encoder's) instead of being
    dominated by a constant shared by every sample."""

    def __init__(self, length: int, vocab: int | None = None) -> None:
        super().__init__()
        self.inp = nn.Embedding(vocab, FEAT) if vocab else nn.Linear(4, FEAT, bias=False)
        self.pos = nn.Parameter(torch.randn(length, FEAT) * 0.3)
        self.mlp = nn.Sequential(nn.Tanh(), nn.Linear(FEAT, FEAT, bias=False), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.inp(x) + self.pos)


@torch.no_grad()
def evaluate(model: RegisterTokenModule, data: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, float]:
    model.eval()
    out = model(data)
    res = {}
    for k in (1, 2, 3):
        z = {m: F.normalize(out["overlapping_tokens"][m][:, :k].mean(1), dim=-1) for m in MODS}
        sim = z["vision"] @ z["tactile"].T
        res[f"inst_vt_k{k}"] = (sim.argmax(1) == torch.arange(len(labels))).float().mean().item()
        for short, a, b in (("vt", "vision", "tactile"), ("vx", "vision", "text"), ("tx", "tactile", "text")):
            s = z[a] @ z[b].T
            res[f"class_{short}_k{k}"] = (labels[s.argmax(1)] == labels).float().mean().item()
    model.train()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/demos")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--temperature", type=float, default=0.07)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    data, labels = make_data(args.seed)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(args.seed))
    test_idx, train_idx = perm[:400], perm[400:]
    train = {m: x[train_idx] for m, x in data.items()}
    test = {m: x[test_idx] for m, x in data.items()}
    encoders = {"vision": PatchEncoder(16), "tactile": PatchEncoder(16), "text": PatchEncoder(4, vocab=15)}
    cfg = RegisterTokenConfig(modalities=MODS, num_tokens=4, num_overlapping=3, dim=64, num_layers=2, num_heads=4,
                              nested_dropout_rate=0.5, feature_dims={m: FEAT for m in MODS})
    model = RegisterTokenModule(cfg, encoders=encoders)
    criterion = RegisterTokenLoss(MODS, cfg.num_overlapping, complementary_weight=0.01, temperature=args.temperature)
    params = [p for p in model.parameters() if p.requires_grad] + list(criterion.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    n, bs = len(train_idx), args.batch_size
    chance_inst, chance_class = 1 / len(test_idx), float((torch.bincount(labels[test_idx]) / len(test_idx)).pow(2).sum())

    history, losses = [evaluate(model, test, labels[test_idx])], []
    t0 = time.time()
    for epoch in range(args.epochs):
        order = torch.randperm(n)
        ep_loss = []
        for i in range(0, n - bs + 1, bs):
            idx = order[i:i + bs]
            result = criterion(model({m: x[idx] for m, x in train.items()}))
            opt.zero_grad()
            result["loss"].backward()
            opt.step()
            ep_loss.append(result["loss"].item())
        losses.append(float(np.mean(ep_loss)))
        history.append(evaluate(model, test, labels[test_idx]))
        if epoch % 5 == 4 or epoch == args.epochs - 1:
            h = history[-1]
            print(f"epoch {epoch + 1:3d}  loss {losses[-1]:.3f}  inst v-t {h['inst_vt_k3']:.3f}  "
                  f"class v-t {h['class_vt_k3']:.3f} v-x {h['class_vx_k3']:.3f} t-x {h['class_tx_k3']:.3f}")
    elapsed = time.time() - t0

    first, last = history[0], history[-1]
    print(f"\nheld-out {len(test_idx)} digits, {elapsed:.0f} s training; chance: instance {chance_inst:.4f}, "
          f"class {chance_class:.3f}")
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    for key in ("inst_vt", "class_vt", "class_vx", "class_tx"):
        prefix = "  ".join(f"k={k}: {last[f'{key}_k{k}']:.3f}" for k in (1, 2, 3))
        print(f"{key:9s} before {first[f'{key}_k3']:.3f}  after {prefix}")
    frozen = all(p.grad is None for p in model.encoders.parameters())
    print(f"frozen encoders received no gradient: {frozen}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(range(1, len(losses) + 1), losses)
    ax1.set(xlabel="epoch", ylabel="train loss", title="InfoNCE + 0.01 x complementary reg")
    for key, label in (("inst_vt_k3", "instance vision-tactile"), ("class_vt_k3", "class vision-tactile"),
                       ("class_vx_k3", "class vision-text"), ("class_tx_k3", "class tactile-text")):
        ax2.plot([h[key] for h in history], label=label)
    ax2.axhline(chance_class, ls="--", c="gray", label="class chance")
    ax2.axhline(chance_inst, ls=":", c="gray", label="instance chance")
    ax2.set(xlabel="epoch", ylabel="held-out top-1", title="retrieval (3 overlapping tokens)", ylim=(0, 1))
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "registers.png"
    fig.savefig(path, dpi=100)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
