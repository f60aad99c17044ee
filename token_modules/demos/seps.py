"""Where does SEPS's text-guided patch slimming pay for image-text retrieval? Accuracy against MACs per image-caption
pair over a sweep of token budgets, on 64- and 196-patch images (offline, CPU, a few minutes per task on 2 cores).

Tasks (`TASKS`, `TaskConfig`). ``grid64``: 32x32 canvases (4x4 px patches, N = 64); ``grid196``: 56x56 canvases
(N = 196, a ViT-B/16-224 grid). Each holds 4 scikit-learn digits in 4 of its 8x8 px cells (16 or 49 cells, jittered)
over a texture. Text: an "object word" names a digit and its cell ("three@cell5"); the text encoder composes it from
a class and a cell embedding. Each image has 2 sparse captions, "a X and Y", naming disjoint pairs of its digits (the
named digits have ink in ~10 patches: 15 % of a 64-patch image, 5 % of a 196-patch one), and one dense description
"image with A B C D" naming all 4, produced by an imperfect captioner (each object word wrong with probability 0.2).
The description is an image-side input, as SEPS's generated dense text is; it is never attached to the query caption
(that would leak its ground truth).

Model (`ModelConfig`, `Setting`). Image tokens: `WindowEncoder` (pixel window -> Linear + position -> residual MLP),
(B, N, D); words: (B, L, D). Every variant scores pairs with the same similarity, the released code's patch-word
alignment (`PatchWordAlignment`, LeakyReLU form), over its own tokens:
- no slimming: all N patches;
- mean:        1 token, the mean of the patches;
- random:      `TokenSparse` + `TokenAggregation` on uniform random scores, N -> ceil(N rho) -> N_c + 1 tokens, once
               per image (text-independent);
- SEPS code:   `SEPS(use_paper_version=False)`: raw s^im + s^st [+ s^dt] scores, N_c + 1 tokens per pair;
- SEPS paper:  `SEPS(use_paper_version=True, paper_alignment=False)`: learned predictor, min-max, beta = 0.25,
               N_c + 1 tokens per pair.
The budget (rho = sparse_ratio, alpha = aggr_ratio, N_c = floor(N rho alpha)) and, for SEPS, the dense-text term
s^dt on or off are swept (`SweepConfig`). All settings train with the same budget (`TrainConfig`, same batches per
seed): symmetric InfoNCE over in-batch pairs, learnable temperature, false negatives (another image that also contains
both named digits) left out. Reported on held-out images (from held-out digit images): R@1/5/10 image->text and
text->image and rsum, mean ± std over seeds, where a caption matches every image containing the two digits it names;
for SEPS, the share of the named digits' patches it keeps when slimming a caption's own image ("named kept %"; chance
is the kept fraction K / N).

Cost (`pair_macs`): multiply-accumulates per image-caption pair after the encoders, counted by FlopCounterMode on the
code each setting runs (matmuls and linears; elementwise ops, sorts and softmaxes are not counted, and no fused
attention, which it would count as 0 on CPU, is used), split into selection (everything before the alignment) and
alignment, on a grid of 2 images x the task's test captions (per-image work is shared by every caption it is
compared with, as in retrieval); at the demo's shapes (D = 32, 5-word captions, 6-word descriptions) and at the
seeds' (C = 512, 12-word captions, 40-word descriptions, same N and budget). SEPS is counted in its batched form
(`SEPS.forward`); its per-pair form (`SEPS.reference_forward`) is counted too, for comparison.

    python -m token_modules.demos.seps [--tasks grid64 grid196] [--out outputs/seps] [--seeds 3] [--threads 2]
                                       [--budgets RHO:ALPHA ...] [--no-dense-budgets RHO:ALPHA ...]

Outputs in --out: seps_results.json (settings, timings and the closing checks), seps_runs.csv (every run),
seps_sweep.csv and seps_sweep.md (the accuracy-MACs table), seps_accuracy_vs_macs.png.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
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
    texture_crops,
)
from token_modules.demos.common import train as train_loop
from token_modules.selection import TokenAggregation, TokenSparse, aggregated_count, keep_count
from token_modules.seps import SEPS, PatchWordAlignment

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the non-interactive backend is chosen)

VARIANTS = ("no slimming", "mean", "random", "SEPS code", "SEPS paper")
BUDGETED = ("random", "SEPS code", "SEPS paper")  # variants that take a token budget
FILLERS = ("a", "and", "image", "with")
RECALLS = tuple(f"{d} R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10))
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
    beta: float = 0.25


@dataclass(frozen=True)
class Setting:
    """One point of the sweep: a variant, its budget (rho = sparse_ratio, alpha = aggr_ratio; ignored by "no
    slimming" and "mean") and, for SEPS, whether the dense description's term s^dt is used."""

    variant: str
    sparse_ratio: float = 0.5
    aggr_ratio: float = 0.4
    dense: bool = True

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")

    @property
    def budgeted(self) -> bool:
        return self.variant in BUDGETED

    @property
    def label(self) -> str:
        if not self.budgeted:
            return self.variant
        dense = "" if not self.variant.startswith("SEPS") or self.dense else ", no s^dt"
        return f"{self.variant} ρ={self.sparse_ratio:g} α={self.aggr_ratio:g}{dense}"


@dataclass
class SweepConfig:
    """Budgets (sparse_ratio, aggr_ratio), and the budgets at which SEPS also runs without the dense term s^dt;
    `expand` gives the settings to run."""

    budgets: tuple[tuple[float, float], ...] = ((0.5, 0.4), (0.25, 0.4), (0.125, 0.5))
    no_dense_budgets: tuple[tuple[float, float], ...] = ((0.5, 0.4),)
    variants: tuple[str, ...] = VARIANTS

    def expand(self, num_patches: int) -> list[Setting]:
        """Every setting once: the budget-free variants once, "random" once per budget, SEPS once per budget with
        s^dt and once per no-dense budget without. Raises ValueError for a budget leaving no aggregated token
        (N_c = floor(N rho alpha) < 1), a no-dense budget outside ``budgets``, no budget or an unknown variant."""
        if not self.budgets or not self.variants:
            raise ValueError("budgets and variants must be non-empty")
        unknown = set(self.variants) - set(VARIANTS)
        if unknown:
            raise ValueError(f"variants must be among {VARIANTS}, got {sorted(unknown)}")
        extra = set(self.no_dense_budgets) - set(self.budgets)
        if extra:
            raise ValueError(f"no_dense_budgets must be among budgets {self.budgets}, got {sorted(extra)}")
        for rho, alpha in self.budgets:
            aggregated_count(num_patches, rho, alpha)  # validates the ratios and N_c >= 1
        settings: list[Setting] = []
        for variant in self.variants:
            if variant not in BUDGETED:
                settings.append(Setting(variant))
                continue
            settings += [Setting(variant, rho, alpha) for rho, alpha in self.budgets]
            if variant.startswith("SEPS"):
                settings += [Setting(variant, rho, alpha, dense=False) for rho, alpha in self.no_dense_budgets]
        return list(dict.fromkeys(settings))  # repeated budgets run once


@dataclass
class TaskRun:
    """A task of the demo: its data, training budget and sweep."""

    task: TaskConfig
    train: TrainConfig
    sweep: SweepConfig = field(default_factory=SweepConfig)


TASKS = {
    "grid64": TaskRun(TaskConfig(), TrainConfig(epochs=6, batch_size=32),
                      SweepConfig(budgets=((0.5, 0.4), (0.25, 0.5), (0.125, 0.5)))),
    # 1000 training images and no rho = 0.5 budget keep the 196-patch sweep near 5 minutes on one core; the
    # paper's ViT budget 0.5:0.4 is one --budgets away (its per-pair aggregation makes it the slowest to train)
    "grid196": TaskRun(TaskConfig(size=56, train_images=1000), TrainConfig(epochs=6, batch_size=32),
                       SweepConfig(budgets=((0.25, 0.4), (0.125, 0.5), (0.0625, 0.5)),
                                   no_dense_budgets=((0.0625, 0.5),))),
}


@dataclass
class Split:
    """patches (V, N, w*w); captions (T, L) word ids with caption_image (T,); dense (V, L_d) word ids; objects
    (V, k) the object words of each image; relevant (V, T) bool; named_patches (T, N) bool: the patches where the
    digits a caption names have ink, in its own image."""

    patches: Tensor
    captions: Tensor
    caption_image: Tensor
    dense: Tensor
    objects: Tensor
    relevant: Tensor
    named_patches: Tensor


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
    ink = np.zeros((cfg.objects, count, cfg.size, cfg.size))  # where each object's digit has ink
    for k in range(cfg.objects):  # loop over the 4 object slots, not samples
        j = rng.integers(-cfg.jitter, cfg.jitter + 1, (2, count))
        top = np.clip(cells[:, k] // cols * cfg.cell + j[0], 0, cfg.size - cfg.cell)
        left = np.clip(cells[:, k] % cols * cfg.cell + j[1], 0, cfg.size - cfg.cell)
        paste(canvas, images[digits[:, k]], top, left)
        paste(ink[k], (images[digits[:, k]] > 0.25).astype(float), top, left)
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
    g = cfg.size // cfg.patch
    inked = ink.reshape(cfg.objects, count, g, cfg.patch, g, cfg.patch).any((3, 5)).reshape(cfg.objects, count, -1)
    named_patches = inked.reshape(len(caps), per_cap, count, -1).any(1).transpose(1, 0, 2).reshape(len(captions), -1)
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
        named_patches=torch.tensor(named_patches),
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
    """Encoders + one token reduction (`Setting`) + patch-word alignment -> similarity (V, T)."""

    def __init__(self, setting: Setting, task: TaskConfig, cfg: ModelConfig) -> None:
        super().__init__()
        n, d = task.num_patches, cfg.dim
        self.setting = setting
        # encoders first, so that every setting starts from the same encoder weights for a given seed
        self.image = WindowEncoder(task.window, n, d)
        self.text = TextEncoder(task.cells, d)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.align = PatchWordAlignment(paper_form=False)
        rho, alpha = setting.sparse_ratio, setting.aggr_ratio
        if setting.variant == "random":
            self.sparse = TokenSparse(d, rho, scoring="sum")
            self.aggr = TokenAggregation(d, aggregated_count(n, rho, alpha))
            self.generator: torch.Generator | None = None  # set for reproducible evaluation
        elif setting.variant.startswith("SEPS"):
            self.seps = SEPS(d, n, rho, alpha, cfg.beta, use_paper_version=setting.variant == "SEPS paper",
                             paper_alignment=False)

    def tokens_per_image(self) -> int:
        variant = self.setting.variant
        if variant == "no slimming":
            return self.image.pos.shape[0]
        if variant == "mean":
            return 1
        agg = self.aggr if variant == "random" else self.seps.aggr
        return agg.num_out + 1

    def tokens(self, patches: Tensor, words: Tensor, dense: Tensor) -> Tensor:
        """Encoded patches (V, N, D), caption words (T, L, D), dense words (V, L_d, D) -> the tokens aligned with the
        words: (V, P, D) shared by every caption, or (V, T, P, D) per pair (SEPS)."""
        variant = self.setting.variant
        if variant == "no slimming":
            return patches
        if variant == "mean":
            return patches.mean(1, keepdim=True)
        if variant == "random":
            sel = self.sparse(patches, torch.rand(patches.shape[:2], generator=self.generator))
            return torch.cat([self.aggr(sel.tokens), sel.extra], 1)
        return self.seps.slim_pairs(patches, words, dense=dense if self.setting.dense else None)

    def similarity(self, patches: Tensor, words: Tensor, dense: Tensor) -> Tensor:
        """Encoded patches (V, N, D), caption words (T, L, D), dense words (V, L_d, D) -> S (V, T)."""
        return self.align(self.tokens(patches, words, dense), words)

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


def run(setting: Setting, train: Split, test: Split, task: TaskConfig, cfg: ModelConfig, tcfg: TrainConfig,
        seed: int) -> dict[str, float]:
    """Train one setting with one seed -> held-out recalls and the final training loss."""
    torch.manual_seed(seed)
    model = RetrievalNet(setting, task, cfg)
    pick = torch.Generator().manual_seed(seed)
    per_image = len(train.captions) // len(train.patches)

    def loss_fn(idx: Tensor) -> Tensor:
        cap = idx * per_image + torch.randint(per_image, idx.shape, generator=pick)  # one caption per image
        sim = model(train.patches[idx], train.captions[cap], train.dense[idx])
        return info_nce(sim, model.logit_scale, train.relevant[idx][:, cap])

    losses = train_loop(model, loss_fn, len(train.patches), tcfg, seed)
    if setting.variant == "random":
        model.generator = torch.Generator().manual_seed(seed)
    return {**evaluate(model, test), "named kept %": named_kept(model, test), "final loss": losses[-1]}


@torch.no_grad()
def named_kept(model: RetrievalNet, split: Split) -> float:
    """SEPS only (NaN otherwise): % of the patches showing a caption's named digits that SEPS keeps when it slims the
    caption's own image under it (chance: the kept fraction K / N)."""
    if not model.setting.variant.startswith("SEPS"):
        return float("nan")
    patches = model.image(split.patches)[split.caption_image]  # (T, N, D): each caption's own image
    dense = model.text(split.dense)[split.caption_image] if model.setting.dense else None
    _, sel = model.seps.slim(patches, model.text(split.captions), dense=dense)
    named = split.named_patches
    return 100 * (sel.mask.bool() & named).sum().item() / named.sum().item()


@dataclass(frozen=True)
class CostShape:
    """Shapes at which MACs are counted: channel width, caption words and description words."""

    name: str
    dim: int
    caption_words: int
    dense_words: int


SEEDS_SHAPE = CostShape("C=512", 512, 12, 40)  # the seeds' ViT-B/16 width, typical caption and description lengths


def pair_macs(setting: Setting, task: TaskConfig, shape: CostShape, captions: int, images: int = 2
              ) -> dict[str, float]:
    """MACs per image-caption pair of `setting` on random encoded inputs of ``shape``, over an ``images`` x
    ``captions`` grid: "selection" (`RetrievalNet.tokens`), "alignment" and, for SEPS, "per-pair selection" (the same
    slimming by `SEPS.reference_forward`)."""
    torch.manual_seed(0)
    model = RetrievalNet(setting, task, ModelConfig(dim=shape.dim)).eval()
    g = torch.Generator().manual_seed(0)
    patches = torch.randn(images, task.num_patches, shape.dim, generator=g)
    words = torch.randn(captions, shape.caption_words, shape.dim, generator=g)
    dense = torch.randn(images, shape.dense_words, shape.dim, generator=g)
    pairs = images * captions
    with torch.no_grad():
        tokens = model.tokens(patches, words, dense)
    out = {"selection": count_macs(lambda: model.tokens(patches, words, dense)) / pairs,
           "alignment": count_macs(lambda: model.align(tokens, words)) / pairs}
    if setting.variant.startswith("SEPS"):
        d = dense if setting.dense else None
        out["per-pair selection"] = count_macs(lambda: model.seps.reference_forward(patches, words, dense=d)) / pairs
        out["per-pair selection"] -= out["alignment"]
    return out


def run_task(name: str, spec: TaskRun, seeds: int, cfg: ModelConfig) -> pd.DataFrame:
    """Every setting of the task's sweep, every seed -> one row per (setting, seed): recalls, rsum and MACs per pair
    at the demo's shapes and at `SEEDS_SHAPE`."""
    task = spec.task
    t0 = time.time()
    train, test = make_data(task)
    demo_shape = CostShape("demo", cfg.dim, test.captions.shape[1], test.dense.shape[1])
    log.info("%s: N = %d patches; train %d images / %d captions, test %d / %d; %d epochs, %d seeds", name,
             task.num_patches, len(train.patches), len(train.captions), len(test.patches), len(test.captions),
             spec.train.epochs, seeds)
    rows = []
    for setting in spec.sweep.expand(task.num_patches):
        t1 = time.time()
        macs = {}
        for shape in (demo_shape, SEEDS_SHAPE):
            for part, value in pair_macs(setting, task, shape, len(test.captions)).items():
                macs[f"{shape.name} {part}"] = value
        tokens = RetrievalNet(setting, task, cfg).tokens_per_image()
        for seed in range(seeds):
            res = run(setting, train, test, task, cfg, spec.train, seed)
            rows.append({"task": name, "setting": setting.label, **asdict(setting), "tokens": tokens, "seed": seed,
                         **res, **macs})
        rsum = [r["rsum"] for r in rows[-seeds:]]
        log.info("  %-32s rsum %5.1f ± %4.1f  (%.0f s)", setting.label, *mean_std(rsum), time.time() - t1)
    log.info("%s: %.0f s wall", name, time.time() - t0)
    return pd.DataFrame(rows)


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (task, setting): mean and std over seeds of the recalls and rsum; MACs per pair and their ratio to no
    slimming's alignment MACs at the same shapes."""
    keys = ["task", "setting"]
    meta = ["variant", "sparse_ratio", "aggr_ratio", "dense", "tokens"]
    metrics = [*RECALLS, "rsum", "named kept %"]
    grouped = runs.groupby(keys, sort=False)
    out = grouped[meta + [c for c in runs.columns if "selection" in c or "alignment" in c]].first()
    out = out.join(grouped[metrics].mean()).join(grouped[metrics].std(ddof=1).fillna(0.0).add_suffix(" std"))
    out["seeds"] = grouped.size()
    for shape in ("demo", SEEDS_SHAPE.name):
        total = out[f"{shape} selection"] + out[f"{shape} alignment"]
        out[f"{shape} total"] = total
        base = out.xs("no slimming", level="setting")[f"{shape} alignment"]
        out[f"{shape} / no-slim align"] = total / base.reindex(out.index.get_level_values("task")).to_numpy()
    return out.reset_index()


def markdown(summary: pd.DataFrame, task: str) -> str:
    """The accuracy-MACs table of one task: recalls and rsum as mean ± std; MACs per pair (selection + alignment,
    total as a multiple of no slimming's alignment) at the demo's shapes (kMACs) and at C = 512 (MMACs)."""
    rows = summary[summary.task == task]
    s512 = SEEDS_SHAPE.name
    n = TASKS[task].task.num_patches
    head = (["setting", "tokens", *RECALLS, "rsum", "named kept % (K/N)", "demo sel. k", "demo align k",
             "demo total (x)", f"{s512} sel. M", f"{s512} align M", f"{s512} total (x)", f"{s512} per-pair sel. M"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in rows.iterrows():
        per_pair = r.get(f"{s512} per-pair selection", float("nan"))
        kept = 100 * keep_count(n, r.sparse_ratio) / n
        named = "" if pd.isna(r["named kept %"]) else f"{r['named kept %']:.0f} ({kept:.0f})"
        cells = [r.setting, str(r.tokens)] + [f"{r[m]:.1f} ± {r[m + ' std']:.1f}" for m in [*RECALLS, "rsum"]] + [
            named, f"{r['demo selection'] / 1e3:.1f}", f"{r['demo alignment'] / 1e3:.1f}",
            f"{r['demo total'] / 1e3:.1f} ({r['demo / no-slim align']:.2f})",
            f"{r[f'{s512} selection'] / 1e6:.2f}", f"{r[f'{s512} alignment'] / 1e6:.2f}",
            f"{r[f'{s512} total'] / 1e6:.2f} ({r[f'{s512} / no-slim align']:.2f})",
            "" if pd.isna(per_pair) else f"{per_pair / 1e6:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def closing_checks(summary: pd.DataFrame, within: float = 0.02, cost: float = 0.5) -> dict[str, dict]:
    """Per task: the SEPS setting closest to no slimming (highest mean rsum) and its cost; and, at each MAC shape,
    whether a SEPS setting reaches no slimming's mean rsum within ``within`` at <= ``cost`` x no slimming's
    alignment MACs, with the best SEPS rsum at that cost and the cheapest SEPS setting within that rsum."""
    checks = {}
    for task, rows in summary.groupby("task", sort=False):
        base = rows[rows.setting == "no slimming"].iloc[0]
        seps = rows[rows.variant.str.startswith("SEPS")]
        best = seps.loc[seps.rsum.idxmax()]
        shapes = ("demo", SEEDS_SHAPE.name)
        res = {"no slimming rsum": base.rsum,
               "closest": {"setting": best.setting, "rsum": best.rsum, "rsum std": best["rsum std"],
                           "gap %": 100 * (1 - best.rsum / base.rsum),
                           **{f"{s} / no-slim align": best[f"{s} / no-slim align"] for s in shapes}}}
        for shape in shapes:
            ratio = seps[f"{shape} / no-slim align"]
            close = seps[seps.rsum >= (1 - within) * base.rsum]
            cheap = seps[ratio <= cost]
            res[shape] = {
                "reached": bool((close[f"{shape} / no-slim align"] <= cost).any()),
                "best rsum at <= cost": None if cheap.empty else cheap.rsum.max(),
                "best setting at <= cost": None if cheap.empty else cheap.loc[cheap.rsum.idxmax()].setting,
                "cheapest ratio within rsum": None if close.empty else close[f"{shape} / no-slim align"].min(),
                "cheapest ratio of any SEPS setting": ratio.min(),
            }
        checks[str(task)] = res
    return checks


def plot(summary: pd.DataFrame, path: Path) -> None:
    """rsum (mean ± std) against total MACs per pair as a multiple of no slimming's alignment MACs: one row per
    task, the demo's shapes and C = 512 side by side."""
    tasks = list(dict.fromkeys(summary.task))
    shapes = ("demo", SEEDS_SHAPE.name)
    colors = dict(zip(VARIANTS, ("black", "tab:gray", "tab:orange", "tab:blue", "tab:green")))
    fig, axes = plt.subplots(len(tasks), 2, figsize=(10, 3.6 * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks):
        rows = summary[summary.task == task]
        base = rows[rows.setting == "no slimming"].iloc[0]
        for ax, shape in zip(row, shapes):
            x = f"{shape} / no-slim align"
            for (variant, dense), grp in rows.groupby(["variant", "dense"], sort=False):
                grp = grp.sort_values(x)
                label = variant + ("" if dense or not variant.startswith("SEPS") else ", no s^dt")
                ax.errorbar(grp[x], grp.rsum, yerr=grp["rsum std"], color=colors[variant], label=label, capsize=2,
                            marker="o", mfc=colors[variant] if dense else "white", ls="-" if dense else "--")
                if variant.startswith("SEPS") and dense:
                    for _, r in grp.iterrows():
                        ax.annotate(f"ρ={r.sparse_ratio:g}", (r[x], r.rsum), fontsize=6, xytext=(3, 3),
                                    textcoords="offset points", color=colors[variant])
            ax.axhline(0.98 * base.rsum, color="black", lw=0.6, ls=":")
            ax.axvline(0.5, color="black", lw=0.6, ls=":")
            ax.set_xscale("log")
            ax.set_title(f"{task}, MACs at {shape} shapes", fontsize=9)
            ax.set_xlabel("MACs per pair / no slimming's alignment MACs")
            ax.set_ylabel("rsum")
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def budget(text: str) -> tuple[float, float]:
    """"RHO:ALPHA" -> (sparse_ratio, aggr_ratio), for the command line."""
    try:
        rho, alpha = (float(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a budget is RHO:ALPHA, e.g. 0.5:0.4, got {text!r}") from None
    return rho, alpha


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--out", default="outputs/seps")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budgets", nargs="+", type=budget, metavar="RHO:ALPHA",
                    help="replace the tasks' budgets (sparse_ratio:aggr_ratio)")
    ap.add_argument("--no-dense-budgets", nargs="*", type=budget, metavar="RHO:ALPHA",
                    help="replace the budgets at which SEPS also runs without s^dt")
    args = ap.parse_args()
    if args.seeds < 1 or args.threads < 1:
        raise SystemExit(f"--seeds and --threads must be >= 1, got {args.seeds} and {args.threads}")
    setup(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig()
    specs = {}
    for name in args.tasks:
        sweep = TASKS[name].sweep
        if args.budgets is not None:  # keeps the no-dense budgets that remain
            sweep = replace(sweep, budgets=tuple(args.budgets),
                            no_dense_budgets=tuple(b for b in sweep.no_dense_budgets if b in args.budgets))
        if args.no_dense_budgets is not None:
            sweep = replace(sweep, no_dense_budgets=tuple(args.no_dense_budgets))
        sweep.expand(TASKS[name].task.num_patches)  # fail before any training
        specs[name] = replace(TASKS[name], sweep=sweep)
    frames, timing = [], {}
    for name in args.tasks:
        t0, c0 = time.time(), time.process_time()
        frames.append(run_task(name, specs[name], args.seeds, cfg))
        timing[name] = {"wall_s": time.time() - t0, "cpu_s": time.process_time() - c0}
    runs = pd.concat(frames, ignore_index=True)
    summary = summarise(runs)
    checks = closing_checks(summary)
    tables = {name: markdown(summary, name) for name in args.tasks}
    for name in args.tasks:
        log.info("\n%s (%d seeds, wall %.0f s, CPU %.0f s, %d threads)\n%s", name, args.seeds,
                 timing[name]["wall_s"], timing[name]["cpu_s"], args.threads, tables[name])
        log.info("%s closing checks: %s", name, json.dumps(checks[name], default=float))
    runs.to_csv(out_dir / "seps_runs.csv", index=False)
    summary.to_csv(out_dir / "seps_sweep.csv", index=False)
    (out_dir / "seps_sweep.md").write_text("\n\n".join(f"### {n}\n\n{t}" for n, t in tables.items()) + "\n")
    plot(summary, out_dir / "seps_accuracy_vs_macs.png")
    result = {"tasks": {n: {"task": asdict(specs[n].task), "train": asdict(specs[n].train),
                            "sweep": asdict(specs[n].sweep), **timing[n]} for n in args.tasks},
              "model": asdict(cfg), "seeds": args.seeds, "threads": args.threads, "checks": checks}
    (out_dir / "seps_results.json").write_text(json.dumps(result, indent=1, default=float))
    log.info("results in %s", out_dir)


if __name__ == "__main__":
    main()
