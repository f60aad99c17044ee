"""Does SDTPS's cross-modal patch selection beat simple token reduction when identity hides in a small, moving part
of cluttered tri-modal images? (offline, CPU, under 5 minutes on 2 cores)

Task (identity = digit class, 10 identities; `TaskConfig`). Each sample is a 32x16 canvas per modality (RGB, NIR,
TIR), cut into 2x2 patches: N = 128 patches, as in the seeds' 256x128 ReID crops. The identity digit (8x8 = 12.5 %
of the canvas) sits in one of 8 cells, jittered, at the same place in every modality. Each modality also has its own
clutter: a texture crop (grass / gravel / brick) and a distractor digit of any class in another cell. Modalities
differ by blur and gain (NIR: blur 0.7, TIR: blur 1.2 x 1.3). Modality-specific corruption: in 30 % of samples one
modality is blinded (the identity digit is missing from it; stronger noise). Within one modality the identity digit
and a distractor look alike; what singles the identity out is that it is present at the same place in the *other*
modalities too. SDTPS's cross-modal guidance as seeded (cosine of a modality's patches to the other modalities'
globals) cannot see that, since a global has no position; the `aligned` head's guidance (cosine to the other
modalities' patch at the same place) can.

Model (`ModelConfig`). A shared encoder (`WindowEncoder`: pixel window -> linear + position + modality embedding ->
residual MLP, one backbone for all modalities as in DeMo) gives per modality patches (B, 128, D) and a global
(B, D), the attention pooling of the patches. A head reduces the 128 patches; one shared pooling block (attention
pooling + residual MLP) summarises the kept tokens of each modality; the summaries are concatenated over modalities
and layer-normalised: the retrieval feature. Heads:
- full:   all 128 tokens;
- mean:   1 token, the mean of the 128 patches;
- random: `TokenSparse` + `TokenAggregation` on uniform random scores, 128 -> 64 -> 25 + 1 = 26 tokens;
- beta=0: `MultiModalSDTPS` with beta = 0: learned predictor only, no own- or cross-modal guidance, 26 tokens;
- SDTPS:  `MultiModalSDTPS` (rho 0.5, alpha 0.4, beta 0.25), 26 tokens;
- aligned: the same with ``guidance="aligned"``: the cross-modal term compares each patch with the other modalities'
          patch at the same place instead of their globals, 26 tokens.
Every variant is trained the same way (`TrainConfig`, same batches per seed): cross-entropy on the head feature plus
cross-entropy on the concatenated globals (DeMo trains both branches; SDTPS needs meaningful globals to be guided
by). Reported on held-out digit images (query = every 5th sample, gallery = the rest, match = same class): mAP and
R@1, mean ± std over seeds; tokens per modality and MACs per sample after the (common) encoder, at the demo width and
at the seeds' width (C = 512, one 8-head block); and, for the selecting heads, how much of the identity digit's
patches and of the distractors' patches the kept set covers (chance: the kept fraction, 50 %).

    python -m token_modules.demos.sdtps [--out outputs/demos] [--seeds 3] [--epochs 7] [--threads 2]

Outputs in --out: sdtps_results.json (every number), sdtps_masks.png and sdtps_aligned_masks.png (selections,
seed 0).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from sklearn.datasets import load_digits
from torch import nn

from token_modules.demos.common import (
    TEXTURES,
    AttentionPool,
    Block,
    TrainConfig,
    WindowEncoder,
    class_retrieval,
    count_macs,
    log,
    paste,
    patch_windows,
    residual_mlp,
    setup,
    table,
    texture_crops,
)
from token_modules.demos.common import train as train_loop
from token_modules.sdtps import MultiModalSDTPS, SDTPSOutput
from token_modules.selection import TokenAggregation, TokenSparse, aggregated_count

MODS = ("rgb", "nir", "tir")
HEADS = ("full", "mean", "random", "beta=0", "SDTPS", "aligned")
MASK_PNG = {"SDTPS": "sdtps_masks.png", "aligned": "sdtps_aligned_masks.png"}
Tensor = torch.Tensor


@dataclass
class TaskConfig:
    """Synthetic tri-modal ReID data (module docstring)."""

    height: int = 32
    width: int = 16
    patch: int = 2
    context: int = 3  # pixels of surroundings in each patch's input window (2x2 patch -> 8x8 window)
    cell: int = 8  # digit size and placement grid
    jitter: int = 1  # +- pixels around the cell corner
    distractors: int = 1  # per modality, independent across modalities (2: nothing learns in the budget)
    texture: float = 0.35  # clutter texture amplitude (digits peak at 1)
    noise: float = 0.05
    blind_prob: float = 0.3  # probability that one modality of a sample misses the identity digit
    blind_noise: float = 0.15
    views_per_train_digit: int = 2
    test_digits: int = 500
    seed: int = 0

    @property
    def grid(self) -> tuple[int, int]:
        return self.height // self.patch, self.width // self.patch

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def window(self) -> int:
        return self.patch + 2 * self.context


@dataclass
class ModelConfig:
    dim: int = 32
    sparse_ratio: float = 0.5
    aggr_ratio: float = 0.4
    beta: float = 0.25


@dataclass
class Split:
    """patches {m: (S, N, w*w)} pixel windows around each patch; labels (S,); identity / distractor (M, S, N) bool:
    the patch holds identity / distractor ink; blinded (M, S) bool; images {m: (S, H, W)} for plotting."""

    patches: dict[str, Tensor]
    labels: Tensor
    identity: Tensor
    distractor: Tensor
    blinded: Tensor
    images: dict[str, np.ndarray]

    def subset(self, idx: Tensor) -> dict[str, Tensor]:
        return {m: x[idx] for m, x in self.patches.items()}


def _render(cfg: TaskConfig, pool: np.ndarray, digit_idx: np.ndarray, rng: np.random.Generator) -> dict:
    """Render S samples whose identity digits are pool[digit_idx]; distractors are drawn from the same pool."""
    s, cell, ncells = len(digit_idx), cfg.cell, (cfg.height // cfg.cell) * (cfg.width // cfg.cell)
    cols = cfg.width // cfg.cell

    def corner(cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        j = rng.integers(-cfg.jitter, cfg.jitter + 1, (2, len(cells)))
        top = np.clip(cells // cols * cell + j[0], 0, cfg.height - cell)
        left = np.clip(cells % cols * cell + j[1], 0, cfg.width - cell)
        return top, left

    id_cell = rng.integers(0, ncells, s)
    id_top, id_left = corner(id_cell)
    blind_mod = np.where(rng.random(s) < cfg.blind_prob, rng.integers(0, len(MODS), s), -1)
    out = {"patches": {}, "identity": [], "distractor": [], "images": {}}
    for mi, m in enumerate(MODS):
        blinded = blind_mod == mi
        ident = np.zeros((s, cfg.height, cfg.width))
        paste(ident, pool[digit_idx], id_top, id_left)
        ident[blinded] = 0.0
        # distractor cells: distinct, never the identity's cell
        keys = rng.random((s, ncells))
        keys[np.arange(s), id_cell] = np.inf
        distr = np.zeros_like(ident)
        for d_cell in np.argsort(keys, 1)[:, : cfg.distractors].T:  # loop over the distractor slots, not samples
            top, left = corner(d_cell)
            paste(distr, pool[rng.integers(0, len(pool), s)], top, left)
        crop = texture_crops(TEXTURES[mi], s, cfg.height, cfg.width, rng)
        canvas = np.maximum(np.maximum(ident, distr), cfg.texture * crop)
        if m == "nir":
            canvas = ndimage.gaussian_filter(canvas, (0, 0.7, 0.7))
        elif m == "tir":
            canvas = 1.3 * ndimage.gaussian_filter(canvas, (0, 1.2, 1.2))
        sigma = np.where(blinded, cfg.blind_noise, cfg.noise)[:, None, None]
        canvas = canvas + sigma * rng.standard_normal(canvas.shape)
        out["patches"][m] = torch.tensor(patch_windows(canvas, cfg.patch, cfg.context), dtype=torch.float32)
        out["images"][m] = canvas
        out["identity"].append(patch_windows(ident, cfg.patch).max(-1) > 0.25)
        out["distractor"].append(patch_windows(distr, cfg.patch).max(-1) > 0.25)
    out["blinded"] = torch.tensor(np.stack([blind_mod == i for i in range(len(MODS))]))
    return out


def make_data(cfg: TaskConfig) -> tuple[Split, Split]:
    """Train and test splits from disjoint sets of digit images (identities = the 10 classes)."""
    rng = np.random.default_rng(cfg.seed)
    digits = load_digits()
    images, target = digits.images / 16.0, digits.target
    perm = rng.permutation(len(target))
    test_pool, train_pool = perm[: cfg.test_digits], perm[cfg.test_digits:]
    splits = []
    for pool, views in ((train_pool, cfg.views_per_train_digit), (test_pool, 1)):
        idx = np.tile(np.arange(len(pool)), views)
        r = _render(cfg, images[pool], idx, rng)
        splits.append(Split(r["patches"], torch.tensor(target[pool][idx]), torch.tensor(np.stack(r["identity"])),
                            torch.tensor(np.stack(r["distractor"])), r["blinded"], r["images"]))
    return splits[0], splits[1]


class RandomSelection(nn.Module):
    """Baseline head: `TokenSparse` + `TokenAggregation` per modality on uniform random scores (no predictor, no
    guidance): patches {m: (B, N, C)} -> tokens {m: (B, N_c + 1, C)}."""

    def __init__(self, dim: int, num_patches: int, sparse_ratio: float, aggr_ratio: float) -> None:
        super().__init__()
        self.sparse = TokenSparse(dim, sparse_ratio, scoring="sum")
        n_c = aggregated_count(num_patches, sparse_ratio, aggr_ratio)
        self.aggr = nn.ModuleDict({m: TokenAggregation(dim, n_c) for m in MODS})
        self.generator: torch.Generator | None = None  # set for reproducible evaluation

    def forward(self, patches: dict[str, Tensor]) -> SDTPSOutput:
        tokens, masks, scores = {}, {}, {}
        for m, p in patches.items():  # over the 3 modalities
            sel = self.sparse(p, torch.rand(p.shape[:2], generator=self.generator))
            tokens[m], masks[m], scores[m] = torch.cat([self.aggr[m](sel.tokens), sel.extra], 1), sel.mask, sel.score
        return SDTPSOutput(tokens, masks, scores)


class Encoder(nn.Module):
    """Shared backbone: windows {m: (B, N, w*w)} -> patch tokens (M, B, N, D) and globals (M, B, D), plus the
    global branch's classifier. Tokens: `WindowEncoder` with a modality embedding; global = attention pooling of the
    tokens (a CLS-like summary in the tokens' own space, so that SDTPS's cosines are meaningful)."""

    def __init__(self, task: TaskConfig, cfg: ModelConfig) -> None:
        super().__init__()
        self.tokens = WindowEncoder(task.window, task.num_patches, cfg.dim)
        self.modality = nn.Parameter(torch.randn(len(MODS), 1, 1, cfg.dim) * 0.1)
        self.pool = AttentionPool(cfg.dim)
        self.norm, self.classifier = nn.LayerNorm(len(MODS) * cfg.dim), nn.Linear(len(MODS) * cfg.dim, 10)

    def forward(self, x: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        h = self.tokens(torch.stack([x[m] for m in MODS]), self.modality)
        return h, self.pool(h)

    def logits(self, globals_: Tensor) -> Tensor:
        """globals (M, B, D) -> identity logits (B, 10) from their concatenation."""
        return self.classifier(self.norm(globals_.permute(1, 0, 2).reshape(globals_.shape[1], -1)))


class ReIDOutput(NamedTuple):
    """feature (B, M*D) the retrieval feature; logits, global_logits (B, 10); masks / scores {m: (B, N)} of the
    selecting heads (empty otherwise)."""

    feature: Tensor
    logits: Tensor
    global_logits: Tensor
    masks: dict[str, Tensor]
    scores: dict[str, Tensor]


class ReIDNet(nn.Module):
    """`Encoder` -> head -> shared pooling block -> `ReIDOutput`. The pooling block (attention pooling + residual
    MLP, shared by the modalities) is the same for every head; for the mean head it sees a single token."""

    def __init__(self, head: str, task: TaskConfig, cfg: ModelConfig) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        n, d = task.num_patches, cfg.dim
        self.head = head
        self.encoder = Encoder(task, cfg)
        if head == "random":
            self.select = RandomSelection(d, n, cfg.sparse_ratio, cfg.aggr_ratio)
        elif head in ("beta=0", "SDTPS", "aligned"):
            beta = 0.0 if head == "beta=0" else cfg.beta
            guidance = "aligned" if head == "aligned" else "global"
            self.select = MultiModalSDTPS(d, n, MODS, cfg.sparse_ratio, cfg.aggr_ratio, beta, guidance=guidance)
        self.pool, self.pool_mlp = AttentionPool(d), residual_mlp(d)
        self.norm, self.classifier = nn.LayerNorm(len(MODS) * d), nn.Linear(len(MODS) * d, 10)

    def forward(self, x: dict[str, Tensor]) -> ReIDOutput:
        """x {m: (B, N, w*w)} -> `ReIDOutput`."""
        patches, globals_ = self.encoder(x)
        masks: dict[str, Tensor] = {}
        scores: dict[str, Tensor] = {}
        if self.head == "full":
            tokens = patches
        elif self.head == "mean":
            tokens = patches.mean(2, keepdim=True)
        else:
            if self.head == "random":
                out = self.select(dict(zip(MODS, patches)))
            else:
                out = self.select(dict(zip(MODS, patches)), dict(zip(MODS, globals_)))
            tokens, masks, scores = torch.stack([out.tokens[m] for m in MODS]), out.masks, out.scores
        pooled = self.pool(tokens)  # (M, B, D)
        pooled = pooled + self.pool_mlp(pooled)
        feat = self.norm(pooled.permute(1, 0, 2).reshape(pooled.shape[1], -1))
        return ReIDOutput(feat, self.classifier(feat), self.encoder.logits(globals_), masks, scores)


def pretrain_encoder(task: TaskConfig, cfg: ModelConfig, tcfg: TrainConfig, seed: int) -> dict[str, Tensor]:
    """Backbone pretraining on clean single digits (training pool only: no clutter, no distractors, no blinding), as
    ReID backbones start from ImageNet / CLIP weights; every head then starts from this same state."""
    clean = replace(task, distractors=0, texture=0.0, blind_prob=0.0)
    data, _ = make_data(clean)
    torch.manual_seed(seed)
    encoder = Encoder(task, cfg)

    def loss_fn(idx: Tensor) -> Tensor:
        return F.cross_entropy(encoder.logits(encoder(data.subset(idx))[1]), data.labels[idx])

    train_loop(encoder, loss_fn, len(data.labels), tcfg, seed)
    return encoder.state_dict()


def mask_analysis(out: ReIDOutput, split: Split) -> dict[str, float]:
    """Where the selection goes, over the modality-samples that contain the identity (blinded ones left out): share
    (%) of identity, distractor and background patches kept, and the AUC (%) of the fused score for identity versus
    distractor patches (50 = cannot tell them apart; the kept counts depend on the top-k cut, the AUC does not)."""
    kept = torch.stack([out.masks[m] for m in MODS]).bool()  # (M, S, N)
    score = torch.stack([out.scores[m] for m in MODS])
    ok = ~split.blinded[..., None]
    ident = split.identity & ok
    distr = split.distractor & ok & ~split.identity
    back = ok & ~split.identity & ~split.distractor
    above = (score[..., :, None] > score[..., None, :]).float() + 0.5 * (score[..., :, None] == score[..., None, :])
    pairs = ident[..., :, None] & distr[..., None, :]  # (M, S, N, N) identity x distractor patch pairs
    res = {f"{name} kept %": 100 * (kept & sel).sum().item() / sel.sum().item()
           for name, sel in (("identity", ident), ("distractor", distr), ("background", back))}
    res["id-vs-distractor AUC %"] = 100 * (above * pairs).sum().item() / pairs.sum().item()
    return res


def run(head: str, train: Split, test: Split, task: TaskConfig, cfg: ModelConfig, tcfg: TrainConfig, seed: int,
        backbone: dict[str, Tensor]) -> tuple[dict[str, float], ReIDNet]:
    """Fine-tune one variant from the pretrained backbone with one seed -> (held-out metrics, model)."""
    torch.manual_seed(seed)
    model = ReIDNet(head, task, cfg)
    model.encoder.load_state_dict(backbone)

    def loss_fn(idx: Tensor) -> Tensor:
        out = model(train.subset(idx))
        y = train.labels[idx]
        return F.cross_entropy(out.logits, y) + F.cross_entropy(out.global_logits, y)

    losses = train_loop(model, loss_fn, len(train.labels), tcfg, seed)
    if head == "random":
        model.select.generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        out = model(test.patches)
    query = torch.arange(len(test.labels)) % 5 == 0
    metrics = {**class_retrieval(out.feature, test.labels, query), "final loss": losses[-1]}
    if out.masks:
        metrics.update(mask_analysis(out, test))
    return metrics, model


def budgets(task: TaskConfig, cfg: ModelConfig) -> dict[str, dict[str, float]]:
    """Tokens per modality after the head and MACs per sample after the common encoder: at the demo width and at the
    seeds' width (C = 512, 128 patches, one 8-head block with MLP ratio 4 on the kept tokens)."""
    res = {}
    x = {m: torch.zeros(1, task.num_patches, task.window**2) for m in MODS}
    wide_p = {m: torch.randn(1, 128, 512) for m in MODS}
    wide_g = {m: torch.randn(1, 512) for m in MODS}
    wide_block = Block(512, heads=8, mlp_ratio=4)
    for head in HEADS:
        torch.manual_seed(0)
        model = ReIDNet(head, task, cfg).eval()
        total, encoder = count_macs(lambda: model(x)), count_macs(lambda: model.encoder(x))
        reduced = aggregated_count(task.num_patches, cfg.sparse_ratio, cfg.aggr_ratio) + 1
        tokens = {"full": task.num_patches, "mean": 1}.get(head, reduced)
        if head == "full":
            wide = lambda: [wide_block(p) for p in wide_p.values()]  # noqa: E731
        elif head == "mean":
            wide = lambda: [wide_block(p.mean(1, keepdim=True)) for p in wide_p.values()]  # noqa: E731
        elif head == "random":
            sel = RandomSelection(512, 128, cfg.sparse_ratio, cfg.aggr_ratio)
            wide = lambda: [wide_block(t) for t in sel(wide_p).tokens.values()]  # noqa: E731
        else:
            sd = MultiModalSDTPS(512, 128, MODS, cfg.sparse_ratio, cfg.aggr_ratio,
                                 guidance="aligned" if head == "aligned" else "global")
            wide = lambda: [wide_block(t) for t in sd(wide_p, wide_g).tokens.values()]  # noqa: E731
        res[head] = {"tokens/modality": tokens, "encoder kMACs": encoder / 1e3,
                     "head+block kMACs": (total - encoder) / 1e3, "C=512 head+block MMACs": count_macs(wide) / 1e6}
    return res


def plot_masks(model: ReIDNet, test: Split, task: TaskConfig, path: Path, count: int = 8) -> None:
    """Held-out samples, one row per modality: image, discarded patches tinted, identity digit outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with torch.no_grad():
        masks = model({m: x[:count] for m, x in test.patches.items()}).masks

    def up(a: Tensor) -> np.ndarray:  # (N,) patch values -> (H, W) pixels
        return np.kron(a.float().numpy().reshape(task.grid), np.ones((task.patch, task.patch)))

    fig, axes = plt.subplots(len(MODS), count, figsize=(1.1 * count, 2.0 * len(MODS)))
    for r, m in enumerate(MODS):
        for c in range(count):
            ax = axes[r, c]
            ax.imshow(test.images[m][c], cmap="gray")
            keep = up(masks[m][c])
            ax.imshow(np.ma.masked_where(keep > 0, keep), cmap="autumn", alpha=0.45, vmin=0, vmax=1)
            ax.contour(up(test.identity[r, c]), levels=[0.5], colors="cyan", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            title = f"id {test.labels[c].item()}" + (" blind" if test.blinded[r, c] else "")
            ax.set_title(title, fontsize=7)
            if c == 0:
                ax.set_ylabel(m.upper())
    fig.suptitle(f"{model.head}: tinted = discarded, cyan = identity digit", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/demos")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=7)
    ap.add_argument("--pretrain-epochs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--heads", nargs="+", default=list(HEADS), choices=HEADS)
    args = ap.parse_args()
    if args.seeds < 1 or args.epochs < 1:
        raise SystemExit(f"--seeds and --epochs must be >= 1, got {args.seeds} and {args.epochs}")
    setup(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    task, cfg = TaskConfig(), ModelConfig()
    # batches of 32: 4x the updates of 128 at the same compute (at 128 the full head stays at chance)
    tcfg = TrainConfig(epochs=args.epochs, batch_size=32)
    pre_cfg = TrainConfig(epochs=args.pretrain_epochs, batch_size=32)
    t_start, cpu_start = time.time(), time.process_time()
    train, test = make_data(task)
    query = torch.arange(len(test.labels)) % 5 == 0
    chance = class_retrieval(torch.randn(len(test.labels), 8, generator=torch.Generator().manual_seed(1)),
                             test.labels, query)
    log.info("train %d samples, test %d (%d queries); %d epochs, %d seeds; chance mAP %.1f, R@1 %.1f",
             len(train.labels), len(test.labels), int(query.sum()), tcfg.epochs, args.seeds, chance["mAP"],
             chance["R@1"])
    runs: dict[str, list[dict[str, float]]] = {head: [] for head in args.heads}
    for seed in range(args.seeds):
        t0 = time.time()
        backbone = pretrain_encoder(task, cfg, pre_cfg, seed)
        log.info("seed %d: backbone pretrained on clean digits (%.0f s)", seed, time.time() - t0)
        for head in args.heads:
            t0 = time.time()
            metrics, model = run(head, train, test, task, cfg, tcfg, seed, backbone)
            runs[head].append(metrics)
            log.info("seed %d %-7s mAP %.1f  R@1 %.1f  (%.0f s)", seed, head, metrics["mAP"], metrics["R@1"],
                     time.time() - t0)
            if head in ("SDTPS", "aligned") and seed == 0:
                plot_masks(model, test, task, out_dir / MASK_PNG[head])
    cost = budgets(task, cfg)
    rows = {}
    for head, rs in runs.items():
        rows[head] = {k: [r[k] for r in rs] for k in rs[0] if k != "final loss"}
        rows[head].update(cost[head])
    columns = ["mAP", "R@1", "tokens/modality", "head+block kMACs", "C=512 head+block MMACs"]
    mask_columns = ["identity kept %", "distractor kept %", "background kept %", "id-vs-distractor AUC %"]
    wall, cpu = time.time() - t_start, time.process_time() - cpu_start
    log.info("\n%s\n\n%s\nchance: mAP %.1f, R@1 %.1f; kept fraction 50 %%, AUC 50 %%; encoder %.0f kMACs per sample, "
             "common to all; %d seeds; wall %.0f s, CPU %.0f s", table(rows, columns),
             table({h: r for h, r in rows.items() if mask_columns[0] in r}, mask_columns), chance["mAP"],
             chance["R@1"], cost["full"]["encoder kMACs"], args.seeds, wall, cpu)
    result = {"task": asdict(task), "model": asdict(cfg), "train": asdict(tcfg), "pretrain": asdict(pre_cfg),
              "chance": chance, "runs": runs, "cost": cost, "wall_s": wall, "cpu_s": cpu, "threads": args.threads}
    (out_dir / "sdtps_results.json").write_text(json.dumps(result, indent=1))
    log.info("results: %s, masks: %s", out_dir / "sdtps_results.json", ", ".join(
        str(out_dir / MASK_PNG[h]) for h in args.heads if h in MASK_PNG))


if __name__ == "__main__":
    main()
