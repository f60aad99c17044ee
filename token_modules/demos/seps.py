"""Does SEPS's text-guided patch slimming beat simple token reduction for image-text retrieval when captions
refer to a few patches? (offline, CPU, under 5 minutes on 2 cores)

Task (`TaskConfig`). Images: 32x32 canvases (4x4 px patches, N = 64) holding 4 scikit-learn digits in 4 of 16 cells
(jittered) over a texture. Text: an "object word" names a digit and its cell ("three@cell5"); the text encoder composes
it from a class and a cell embedding. Each image has 2 sparse captions, "a X and Y", naming disjoint pairs of its
digits (each refers to ~8 of the 64 patches), and one dense description "image with A B C D" naming all 4, produced
by an imperfect captioner (each object word wrong with probability 0.2). The description is an image-side input, as
SEPS's generated dense text is; it is never attached to the query caption (that would leak its ground truth).

Model (`ModelConfig`). Image tokens: `WindowEncoder` (pixel window -> Linear + position -> residual MLP), (B, 64, D);
words: (B, L, D). Every variant scores pairs with the same similarity, the released code's patch-word alignment
(`PatchWordAlignment`, LeakyReLU form), over its own tokens:
- no slimming: all 64 patches;
- mean:        1 token, the mean of the patches;
- random:      `TokenSparse` + `TokenAggregation` on uniform random scores, 64 -> 32 -> 12 + 1 = 13 tokens;
- SEPS code:   `SEPS(use_paper_version=False)`: raw s^im + s^st + s^dt scores, 13 tokens per (image, caption) pair;
- SEPS paper:  `SEPS(use_paper_version=True, paper_alignment=False)`: learned predictor, min-max, beta = 0.25, 13
               tokens per pair.
All variants train with the same budget (`TrainConfig`, same batches per seed): symmetric InfoNCE over in-batch
pairs, learnable temperature, false negatives (another image that also contains both named digits) left out.
Reported on held-out images (from held-out digit images): R@1/5/10 image->text and text->image, mean ± std over seeds,
where a caption matches every image containing the two digits it names (almost always just its source image); tokens
per image and MACs per image-caption pair after the encoders, at the demo width and at the seeds' width (C = 512,
196 patches, 12-word captions, 40-word descriptions).

    python -m token_modules.demos.seps [--out outputs/demos] [--seeds 3] [--epochs 6] [--threads 2]

Output in --out: seps_results.json (every number).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from token_modules.demos.common import (
    TrainConfig,
    WindowEncoder,
    count_macs,
    log,
    mean_std,
    paste,
    patch_windows,
    recall_at_k,
    residual_mlp,
    setup,
    table,
    texture_crops,
)
from token_modules.demos.common import train as train_loop
from token_modules.selection import TokenAggregation, TokenSparse, aggregated_count
from token_modules.seps import SEPS, PatchWordAlignment

VARIANTS = ("no slimming", "mean", "random", "SEPS code", "SEPS paper")
FILLERS = ("a", "and", "image", "with")
Tensor = torch.Tensor


@dataclass
class TaskConfig:
    """Synthetic image-text data (module docstring)."""

    size: int = 32
    patch: int = 4
    context: int = 2  # pixels of surroundings in each patch's input window (4x4 patch -> 8x8 window)
    cell: int = 8
    jitter: int = 1
    objects: int = 4  # digits per image
    caption_objects: int = 2  # digits named per sparse caption; an image's captions name disjoint digits
    dense_error: float = 0.2  # probability that the dense description names a wrong object
    texture: float = 0.2
    noise: float = 0.05
    train_images: int = 1500
    test_images: int = 200
    test_digits: int = 500  # digit images held out for the test canvases
    seed: int = 0

    @property
    def cells(self) -> int:
        return (self.size // self.cell) ** 2

    @property
    def num_patches(self) -> int:
        return (self.size // self.patch) ** 2

    @property
    def window(self) -> int:
        return self.patch + 2 * self.context

    @property
    def vocab(self) -> int:
        return 10 * self.cells + len(FILLERS)


@dataclass
class ModelConfig:
    dim: int = 32
    sparse_ratio: float = 0.5
    aggr_ratio: float = 0.4
    beta: float = 0.25


@dataclass
class Split:
    """patches (V, N, w*w); captions (T, L) word ids with caption_image (T,); dense (V, L_d) word ids; objects
    (V, k) the object words of each image; relevant (V, T) bool."""

    patches: Tensor
    captions: Tensor
    caption_image: Tensor
    dense: Tensor
    objects: Tensor
    relevant: Tensor


def relevance(objects: Tensor, captions: Tensor, cells: int) -> Tensor:
    """(V, k) image object words, (T, L) caption word ids -> (V, T) bool: the image contains every object the
    caption names (filler words ignored)."""
    named = captions[:, None, :, None] == objects[None, :, None, :]  # (T, V, L, k)
    is_obj = (captions < 10 * cells)[:, None, :]
    return (named.any(-1) | ~is_obj).all(-1).T


def _render(cfg: TaskConfig, images: np.ndarray, target: np.ndarray, count: int, rng: np.random.Generator) -> Split:
    cols = cfg.size // cfg.cell
    cells = np.argsort(rng.random((count, cfg.cells)), 1)[:, : cfg.objects]  # distinct cells per image
    digits = rng.integers(0, len(images), (count, cfg.objects))
    canvas = cfg.texture * texture_crops("grass", count, cfg.size, cfg.size, rng)
    for k in range(cfg.objects):  # loop over the 4 object slots, not samples
        j = rng.integers(-cfg.jitter, cfg.jitter + 1, (2, count))
        top = np.clip(cells[:, k] // cols * cfg.cell + j[0], 0, cfg.size - cfg.cell)
        left = np.clip(cells[:, k] % cols * cfg.cell + j[1], 0, cfg.size - cfg.cell)
        paste(canvas, images[digits[:, k]], top, left)
    canvas = canvas + cfg.noise * rng.standard_normal(canvas.shape)
    objects = target[digits] * cfg.cells + cells  # (V, k) object word ids
    a, and_, image, with_ = (10 * cfg.cells + i for i in range(len(FILLERS)))
    per_cap = cfg.caption_objects
    caps = []
    for c in range(cfg.objects // per_cap):  # "a X and Y" for each disjoint pair of objects
        named = objects[:, c * per_cap:(c + 1) * per_cap]
        words = [np.full(count, a)]
        for i in range(per_cap):
            words += [named[:, i]] + ([np.full(count, and_)] if i < per_cap - 1 else [])
        caps.append(np.stack(words, 1))
    captions = np.stack(caps, 1).reshape(count * len(caps), -1)  # image-major: captions of image v are adjacent
    wrong = rng.random(objects.shape) < cfg.dense_error
    described = np.where(wrong, rng.integers(0, 10 * cfg.cells, objects.shape), objects)
    dense = np.concatenate([np.full((count, 1), image), np.full((count, 1), with_), described], 1)
    objects_t, captions_t = torch.tensor(objects), torch.tensor(captions)
    return Split(
        patches=torch.tensor(patch_windows(canvas, cfg.patch, cfg.context), dtype=torch.float32),
        captions=captions_t,
        caption_image=torch.arange(count).repeat_interleave(len(caps)),
        dense=torch.tensor(dense),
        objects=objects_t,
        relevant=relevance(objects_t, captions_t, cfg.cells),
    )


def make_data(cfg: TaskConfig) -> tuple[Split, Split]:
    """Train and test splits whose canvases use disjoint sets of digit images."""
    rng = np.random.default_rng(cfg.seed)
    digits = load_digits()
    perm = rng.permutation(len(digits.target))
    test_pool, train_pool = perm[: cfg.test_digits], perm[cfg.test_digits:]
    images = digits.images / 16.0
    return tuple(  # type: ignore[return-value]
        _render(cfg, images[pool], digits.target[pool], n, rng)
        for pool, n in ((train_pool, cfg.train_images), (test_pool, cfg.test_images))
    )


class TextEncoder(nn.Module):
    """Word ids (T, L) -> (T, L, D): an object word is its class embedding + its cell embedding, a filler word has its
    own; then a residual MLP."""

    def __init__(self, cells: int, dim: int) -> None:
        super().__init__()
        self.cells = cells
        self.digit, self.cell = nn.Embedding(10, dim), nn.Embedding(cells, dim)
        self.filler = nn.Embedding(len(FILLERS), dim)
        self.mlp = residual_mlp(dim)

    def forward(self, words: Tensor) -> Tensor:
        n_obj = 10 * self.cells
        is_obj = (words < n_obj).unsqueeze(-1)
        obj = self.digit((words // self.cells).clamp_max(9)) + self.cell(words % self.cells)
        h = torch.where(is_obj, obj, self.filler((words - n_obj).clamp_min(0)))
        return h + self.mlp(h)


class RetrievalNet(nn.Module):
    """Encoders + one token reduction (`VARIANTS`) + patch-word alignment -> similarity (V, T)."""

    def __init__(self, variant: str, task: TaskConfig, cfg: ModelConfig) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        n, d = task.num_patches, cfg.dim
        self.variant = variant
        # encoders first, so that every variant starts from the same encoder weights for a given seed
        self.image = WindowEncoder(task.window, n, d)
        self.text = TextEncoder(task.cells, d)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.align = PatchWordAlignment(paper_form=False)
        if variant == "random":
            self.sparse = TokenSparse(d, cfg.sparse_ratio, scoring="sum")
            self.aggr = TokenAggregation(d, aggregated_count(n, cfg.sparse_ratio, cfg.aggr_ratio))
            self.generator: torch.Generator | None = None  # set for reproducible evaluation
        elif variant.startswith("SEPS"):
            paper = variant == "SEPS paper"
            self.seps = SEPS(d, n, cfg.sparse_ratio, cfg.aggr_ratio, cfg.beta, use_paper_version=paper,
                             paper_alignment=False)

    def tokens_per_image(self) -> int:
        if self.variant == "no slimming":
            return self.image.pos.shape[0]
        if self.variant == "mean":
            return 1
        agg = self.aggr if self.variant == "random" else self.seps.aggr
        return agg.num_out + 1

    def similarity(self, patches: Tensor, words: Tensor, dense: Tensor) -> Tensor:
        """Encoded patches (V, N, D), caption words (T, L, D), dense words (V, L_d, D) -> S (V, T)."""
        if self.variant == "no slimming":
            return self.align(patches, words)
        if self.variant == "mean":
            return self.align(patches.mean(1, keepdim=True), words)
        if self.variant == "random":
            sel = self.sparse(patches, torch.rand(patches.shape[:2], generator=self.generator))
            return self.align(torch.cat([self.aggr(sel.tokens), sel.extra], 1), words)
        return self.seps(patches, words, dense=dense)

    def forward(self, patches: Tensor, captions: Tensor, dense: Tensor) -> Tensor:
        """patches (V, N, w*w), captions (T, L) and dense (V, L_d) word ids -> S (V, T)."""
        return self.similarity(self.image(patches), self.text(captions), self.text(dense))


def info_nce(sim: Tensor, scale: Tensor, relevant: Tensor) -> Tensor:
    """Symmetric InfoNCE over a (B, B) similarity whose diagonal holds the pairs; other relevant pairs (false
    negatives) are left out of the denominators."""
    logits = scale.clamp(max=math.log(100.0)).exp() * sim
    eye = torch.eye(len(sim), dtype=torch.bool)
    logits = logits.masked_fill(relevant & ~eye, float("-inf"))
    target = torch.arange(len(sim))
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


@torch.no_grad()
def evaluate(model: RetrievalNet, split: Split, chunk: int = 10) -> dict[str, float]:
    """Recalls over every (test image, test caption) pair, scored in chunks of images."""
    words, dense = model.text(split.captions), model.text(split.dense)
    patches = model.image(split.patches)
    sim = torch.cat([model.similarity(patches[i:i + chunk], words, dense[i:i + chunk])
                     for i in range(0, len(patches), chunk)])
    return recall_at_k(sim, split.relevant)


def run(variant: str, train: Split, test: Split, task: TaskConfig, cfg: ModelConfig, tcfg: TrainConfig,
        seed: int) -> dict[str, float]:
    """Train one variant with one seed -> held-out recalls."""
    torch.manual_seed(seed)
    model = RetrievalNet(variant, task, cfg)
    pick = torch.Generator().manual_seed(seed)
    per_image = len(train.captions) // len(train.patches)

    def loss_fn(idx: Tensor) -> Tensor:
        cap = idx * per_image + torch.randint(per_image, idx.shape, generator=pick)  # one caption per image
        sim = model(train.patches[idx], train.captions[cap], train.dense[idx])
        return info_nce(sim, model.logit_scale, train.relevant[idx][:, cap])

    losses = train_loop(model, loss_fn, len(train.patches), tcfg, seed)
    if variant == "random":
        model.generator = torch.Generator().manual_seed(seed)
    return {**evaluate(model, test), "final loss": losses[-1]}


def budgets(task: TaskConfig, cfg: ModelConfig, pairs: int = 16) -> dict[str, dict[str, float]]:
    """Tokens per image and MACs per image-caption pair after the encoders (a pairs x pairs batch, so that per-image
    work is shared by `pairs` captions as in retrieval), at the demo width and at the seeds' width (C = 512, 196
    patches, 12-word captions, 40-word descriptions)."""
    res = {}
    g = torch.Generator().manual_seed(0)
    demo = (torch.randn(pairs, task.num_patches, cfg.dim, generator=g), torch.randn(pairs, 5, cfg.dim, generator=g),
            torch.randn(pairs, 6, cfg.dim, generator=g))
    wide_task = TaskConfig(size=56, patch=4, cell=8)  # 196 patches
    wide_cfg = ModelConfig(dim=512)
    wide = (torch.randn(pairs, 196, 512, generator=g), torch.randn(pairs, 12, 512, generator=g),
            torch.randn(pairs, 40, 512, generator=g))
    for variant in VARIANTS:
        torch.manual_seed(0)
        model, wide_model = RetrievalNet(variant, task, cfg).eval(), RetrievalNet(variant, wide_task, wide_cfg).eval()
        res[variant] = {
            "tokens/image": model.tokens_per_image(),
            "kMACs/pair": count_macs(lambda: model.similarity(*demo)) / pairs**2 / 1e3,  # noqa: B023
            "C=512 MMACs/pair": count_macs(lambda: wide_model.similarity(*wide)) / pairs**2 / 1e6,  # noqa: B023
        }
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/demos")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = ap.parse_args()
    if args.seeds < 1 or args.epochs < 1:
        raise SystemExit(f"--seeds and --epochs must be >= 1, got {args.seeds} and {args.epochs}")
    setup(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    task, cfg, tcfg = TaskConfig(), ModelConfig(), TrainConfig(epochs=args.epochs, batch_size=32)
    t_start, cpu_start = time.time(), time.process_time()
    train, test = make_data(task)
    chance = recall_at_k(torch.rand(test.relevant.shape, generator=torch.Generator().manual_seed(1)), test.relevant)
    log.info("train %d images / %d captions, test %d / %d; %d epochs, %d seeds; chance i2t R@1 %.1f, t2i R@1 %.1f",
             len(train.patches), len(train.captions), len(test.patches), len(test.captions), tcfg.epochs, args.seeds,
             chance["i2t R@1"], chance["t2i R@1"])
    runs: dict[str, list[dict[str, float]]] = {}
    for variant in args.variants:
        t0 = time.time()
        runs[variant] = [run(variant, train, test, task, cfg, tcfg, seed) for seed in range(args.seeds)]
        m, s = mean_std([r["rsum"] for r in runs[variant]])
        log.info("%-11s rsum %.1f ± %.1f  (%.0f s)", variant, m, s, time.time() - t0)
    cost = budgets(task, cfg)
    rows = {v: {**{k: [r[k] for r in rs] for k in rs[0] if k != "final loss"}, **cost[v]} for v, rs in runs.items()}
    columns = [f"{d} R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)] + ["rsum", "tokens/image", "kMACs/pair",
                                                                            "C=512 MMACs/pair"]
    wall, cpu = time.time() - t_start, time.process_time() - cpu_start
    log.info("\n%s\nchance: i2t R@1 %.1f, t2i R@1 %.1f; %d seeds; wall %.0f s, CPU %.0f s", table(rows, columns),
             chance["i2t R@1"], chance["t2i R@1"], args.seeds, wall, cpu)
    result = {"task": asdict(task), "model": asdict(cfg), "train": asdict(tcfg), "chance": chance, "runs": runs,
              "cost": cost, "wall_s": wall, "cpu_s": cpu, "threads": args.threads}
    (out_dir / "seps_results.json").write_text(json.dumps(result, indent=1))
    log.info("results: %s", out_dir / "seps_results.json")


if __name__ == "__main__":
    main()
