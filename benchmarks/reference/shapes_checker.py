"""Analytic reading of the single-shape images (`benchmarks.reference.shapes`) and their evaluation prompts.

- **Prompts** (`evaluation_prompts`): distinct scenes of the attribute grid in a seeded order, every prefix balanced
  over every attribute value as closely as the grid allows.
- **Adherence** (`analyse`, `adherence`): the shape is the largest saturated connected region (the background is
  grey); its colour is the nearest of the six hues, its position the 3 x 3 cell of its centroid, its size the side of
  its bounding box, its shape the best-overlapping template; the background texture is read from the high-passed grey
  level (no energy: plain; energy along one axis only: striped; else dotted).
- **Detail** (`detail_statistics`): `benchmarks.reference.detail` on the shape and the background's energy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from . import detail, shapes

ATTRIBUTES = shapes.ATTRIBUTES


@dataclass(frozen=True)
class Prompt:
    """A caption and the attribute indices it asks for."""

    colour: int
    shape: int
    size: int
    position: int
    texture: int

    @property
    def caption(self) -> str:
        return shapes.caption(self.colour, self.shape, self.size, self.position, self.texture)

    def expected(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in shapes.ATTRIBUTES}


def evaluation_prompts(n: int, seed: int = 0, exclude: list[Prompt] | tuple[Prompt, ...] = ()) -> list[Prompt]:
    """A fixed prompt set: `n` distinct scenes of the attribute grid (less `exclude`) in a seeded order, cycling
    through every value of each attribute as evenly as the grid allows (greedily, so prefixes are balanced too)."""
    grid = shapes.scene_grid()
    left = len(grid) - len(set(exclude))
    if not 1 <= n <= left:
        raise ValueError(f"n (number of prompts) must be in [1, {left}], got {n}")
    order = torch.randperm(len(grid), generator=torch.Generator().manual_seed(seed))
    picked = grid[order]
    # greedy balance: take the next scene whose values are the least used so far
    counts = {name: np.zeros(len(v)) for name, v in shapes.VOCABULARY.items()}
    rows = torch.stack([getattr(picked, a) for a in shapes.ATTRIBUTES], 1).numpy()
    chosen: list[int] = []
    excluded = set(exclude)
    available = np.array([Prompt(*map(int, row)) not in excluded for row in rows])
    for _ in range(n):
        cost = sum(counts[a][rows[:, i]] for i, a in enumerate(shapes.ATTRIBUTES))
        cost = np.where(available, cost, np.inf)
        best = int(np.argmin(cost))
        chosen.append(best)
        available[best] = False
        for i, a in enumerate(shapes.ATTRIBUTES):
            counts[a][rows[best, i]] += 1
    return [Prompt(*map(int, rows[i])) for i in chosen]


# -- analytic reading of an image ------------------------------------------------------------------------------------
MIN_OBJECT_PIXELS = 12
SATURATION_MIN = 0.4
TEXTURE_ENERGY_MIN = 4e-4  # mean squared high-passed grey level of a plain background stays far below
STRIPE_AXIS_FRACTION = 0.6  # share of that energy explained by one axis' profile: stripes ~0.9, dots ~0.2


def _object_mask(image: np.ndarray) -> np.ndarray:
    """(H, W) bool: the largest connected region of saturated pixels."""
    value = image.max(-1)
    chroma = value - image.min(-1)
    saturated = (chroma > SATURATION_MIN * np.maximum(value, 1e-6)) & (value > 0.12)
    labels, count = ndimage.label(saturated)
    if count == 0:
        return saturated
    sizes = ndimage.sum_labels(saturated, labels, index=np.arange(1, count + 1))
    return labels == 1 + int(np.argmax(sizes))


def _hue(image: np.ndarray, mask: np.ndarray) -> float:
    """Chroma-weighted circular mean hue in degrees of the masked pixels."""
    r, g, b = (image[mask][:, i] for i in range(3))
    # hexagonal hue plane: x = r - (g + b) / 2, y = sqrt(3) / 2 (g - b)
    x, y = np.sum(r - (g + b) / 2), np.sum(np.sqrt(3) / 2 * (g - b))
    return float(np.degrees(np.arctan2(y, x)) % 360)


def _shape(mask: np.ndarray) -> int:
    """Index of the template (circle / square / triangle) filling the mask's bounding box that overlaps it most."""
    ys, xs = np.nonzero(mask)
    cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
    r = max(xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()) / 2
    h, w = mask.shape
    yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    dx, dy = (xx - cx)[None], (yy - cy)[None]
    inside = shapes.shape_distance(torch.arange(3)[:, None, None], dx, dy, torch.tensor(float(r))) > 0
    m = torch.from_numpy(mask)[None]
    iou = (inside & m).sum((1, 2)) / (inside | m).sum((1, 2)).clamp_min(1)
    return int(iou.argmax())


def _background_energy(image: np.ndarray, mask: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(mean squared high-passed grey level of the background, the high-passed grey level, the background pixels
    used); the energy is 0 when too little background is left."""
    scale = image.shape[0] / shapes.RESOLUTION
    size = int(round(shapes.TEXTURE_PERIOD / 2 * scale)) + 1  # a box filter half a period wide keeps gradients
    return detail.background_energy(image.mean(-1), mask, size)


def _texture(image: np.ndarray, mask: np.ndarray) -> int:
    energy, residual, keep = _background_energy(image, mask)
    if keep.sum() < 64:
        return 0
    if energy < TEXTURE_ENERGY_MIN:
        return shapes.TEXTURES.index("plain")
    masked = np.where(keep, residual, 0.0)
    counts_rows, counts_cols = keep.sum(1), keep.sum(0)
    rows = masked.sum(1)[counts_rows > 8] / counts_rows[counts_rows > 8]
    cols = masked.sum(0)[counts_cols > 8] / counts_cols[counts_cols > 8]
    axis = max(float(np.mean(rows**2)) if rows.size else 0.0, float(np.mean(cols**2)) if cols.size else 0.0)
    return shapes.TEXTURES.index("striped" if axis > STRIPE_AXIS_FRACTION * energy else "dotted")


def analyse(image: np.ndarray) -> dict[str, int]:
    """Read the captioned attributes off one (H, W, 3) image in [0, 1]; -1 where no shape was found."""
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be (H, W, 3) in [0, 1], got shape {image.shape}")
    image = np.clip(np.asarray(image, np.float64), 0, 1)
    h, w, _ = image.shape
    mask = _object_mask(image)
    found = {"texture": _texture(image, mask)}
    if mask.sum() < MIN_OBJECT_PIXELS * (h * w) / shapes.RESOLUTION**2:
        return {"colour": -1, "shape": -1, "size": -1, "position": -1, **found}
    ys, xs = np.nonzero(mask)
    cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2  # shapes are placed by their box
    col, row = min(2, int(cx * 3 // w)), min(2, int(cy * 3 // h))
    side = max(xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()) * shapes.RESOLUTION / w
    small, large = (2 * e for e in shapes.HALF_EXTENT)
    return {
        "colour": int(np.round(_hue(image, mask) / 60)) % 6,
        "shape": _shape(mask),
        "size": int(side > (small + large) / 2),
        "position": row * 3 + col,
        **found,
    }


def adherence(images: np.ndarray, prompts: list[Prompt]) -> np.ndarray:
    """(B, 5) bool: is each attribute of each prompt (in `shapes.ATTRIBUTES` order) met by its image?"""
    if len(images) != len(prompts):
        raise ValueError(f"images and prompts must have the same length, got {len(images)} and {len(prompts)}")
    rows = []
    for image, prompt in zip(images, prompts):
        found, expected = analyse(image), prompt.expected()
        rows.append([found[a] == expected[a] for a in shapes.ATTRIBUTES])
    return np.array(rows, dtype=bool).reshape(len(prompts), len(shapes.ATTRIBUTES))


def adherence_table(images: np.ndarray, prompts: list[Prompt]) -> dict[str, float]:
    """Accuracy per attribute, their mean (``adherence``) and the share of images with every attribute right."""
    ok = adherence(images, prompts)
    table = {a: float(ok[:, i].mean()) for i, a in enumerate(shapes.ATTRIBUTES)}
    table["adherence"] = float(ok.mean())
    table["all_correct"] = float(ok.all(1).mean())
    return table


def detail_statistics(image: np.ndarray) -> np.ndarray:
    """(4,) `detail.detail_statistics` of one (H, W, 3) image in [0, 1]: the shape is its largest saturated region."""
    image = np.clip(np.asarray(image, np.float64), 0, 1)
    mask = _object_mask(image)
    return detail.detail_statistics(image, mask.astype(np.int64), _background_energy(image, mask)[0])


def reference_images(prompts: list[Prompt] | tuple[Prompt, ...], per_prompt: int = 4, seed: int = 1,
                     resolution: int = shapes.RESOLUTION) -> torch.Tensor:
    """Renders of the prompts' scenes (`per_prompt` each, other nuisance draws) at `resolution` px: the data side of
    the distances."""
    index = torch.tensor([[p.colour, p.shape, p.size, p.position, p.texture] for p in prompts]).repeat(per_prompt, 1)
    scenes = shapes.Scenes(*index.T)
    return shapes.render(scenes, torch.Generator().manual_seed(seed), resolution)
