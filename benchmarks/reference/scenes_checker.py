"""Analytic reading of multi-object scenes (`benchmarks.reference.scenes`) and their caption adherence.

`analyse` segments the saturated connected regions of an image (the background is grey): each is one object, its
colour the nearest of the six hues, its shape the best-overlapping template in its bounding box, its size the side
that its area gives for that shape, its position the 3 x 3 cell of the box's centre; the count is the number of
regions. The background texture
is read from the high-passed grey level outside the objects, as `benchmarks.reference.quality` does (no energy: plain; energy
along one axis only: striped; else dotted).

`score` matches the detected objects to the caption's (a maximum-agreement assignment over colour, shape, size and
position; a caption object whose best partner agrees on nothing stays unmatched) and scores per attribute:

- colour, shape, size, position: the share of the caption's objects whose matched detection has it right
  (an unmatched object scores 0 on all four);
- count: 1 when the number of regions is the caption's count;
- texture: 1 when right;
- relation (two-object captions only, NaN otherwise): 1 when the relation holds between the cells of the two
  matched detections.

`adherence` stacks these per image, (N, 7) in `ATTRIBUTES` order, the material of a bootstrap over prompts as
`benchmarks.quality.adherence` is (there bool, here a share per image; average the relation with NaN left out).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from . import detail
from .scenes import (
    COLOURS, HALF_EXTENT, MAX_OBJECTS, RELATIONS, RESOLUTION, SHAPES, TEXTURE_PERIOD, TEXTURES, VOCABULARY, Scene,
    Scenes, render, sample_scenes, shape_distance,
)

OBJECT_ATTRIBUTES = tuple(VOCABULARY)  # colour, shape, size, position
ATTRIBUTES = (*OBJECT_ATTRIBUTES, "count", "texture", "relation")

# thresholds in pixels of a 128-px image (scaled with the image size)
MIN_OBJECT_PIXELS = 100  # a quarter of the smallest object (a small triangle, 392 px): smaller blobs are noise
# chroma (max - min of RGB) of an object pixel: the grey background has none, the objects 0.55-0.78, their dark rim
# 0.27-0.39; chroma mixes linearly with grey, so a fixed threshold puts an edge at the same coverage on dark and
# light backgrounds, blurred or not (a threshold relative to the value does not: sizes then depend on the tone)
CHROMA_MIN = 0.2
SHAPE_FILL = (math.pi / 4, 1.0, 0.5)  # area of each shape over its bounding box's
# mean squared band-passed grey level: a plain background stays below 5e-5, a texture above 5e-4 even after a 4x
# average pool and bilinear upsampling (the detail a 32 x 32 latent holds)
TEXTURE_ENERGY_MIN = 1.5e-4
# stripes put their energy in one axis' profile (fraction ~1) and none in the other's; a dot lattice puts a share
# (0.35-0.65) in each
STRIPE_AXIS_FRACTION = 0.6
STRIPE_CROSS_RATIO = 0.15  # most the other axis may hold, relative: stripes < 0.02, dots > 0.35


@dataclass(frozen=True)
class Detection:
    """One object read off an image: attribute indices as in `SceneObject`, and where it is.

    Attributes:
        centre: (x, y) centre of its bounding box, in pixels of the analysed image.
        pixels: its area in pixels of the analysed image.
    """

    colour: int
    shape: int
    size: int
    position: int
    centre: tuple[float, float]
    pixels: int


@dataclass(frozen=True)
class Analysis:
    """What `analyse` reads off an image: the objects in reading order of their centres, the texture index."""

    objects: tuple[Detection, ...]
    texture: int


def _saturated(image: np.ndarray) -> np.ndarray:
    return image.max(-1) - image.min(-1) > CHROMA_MIN


def _regions(saturated: np.ndarray) -> np.ndarray:
    """(H, W) int labels 1..K of the object regions of a saturated-pixel mask, 0 elsewhere.

    A blur (a generated image, or a 32 x 32 latent's worth of detail) fills the gap between neighbouring objects
    with mixed, still saturated pixels: an opening cuts such bridges, then every saturated pixel within 2 px of a
    region (the triangles' tips, the rims the opening took) goes back to its nearest region.
    """
    scale = saturated.shape[0] / RESOLUTION
    core = ndimage.binary_opening(saturated, structure=np.ones((3, 3), bool), iterations=max(1, round(scale)))
    labels, count = ndimage.label(core)
    if count == 0:
        return labels
    distance, (iy, ix) = ndimage.distance_transform_edt(labels == 0, return_indices=True)
    labels = np.where(saturated & (distance <= 2 * scale), labels[iy, ix], 0)
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, count + 1))
    kept = np.flatnonzero(sizes >= MIN_OBJECT_PIXELS * scale**2) + 1
    relabel = np.zeros(count + 1, dtype=labels.dtype)
    relabel[kept] = np.arange(1, len(kept) + 1)
    return relabel[labels]


def _hue(pixels: np.ndarray) -> float:
    """Chroma-weighted circular mean hue in degrees of (P, 3) RGB pixels."""
    r, g, b = pixels.T
    # hexagonal hue plane: x = r - (g + b) / 2, y = sqrt(3) / 2 (g - b)
    return float(np.degrees(np.arctan2(np.sum(np.sqrt(3) / 2 * (g - b)), np.sum(r - (g + b) / 2))) % 360)


def _shape(mask: np.ndarray) -> int:
    """Index of the template (circle / square / triangle) filling the mask's bounding box that overlaps it most;
    `mask` is cropped to that box."""
    h, w = mask.shape
    r = max(h, w) / 2
    yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    inside = shape_distance(torch.arange(len(SHAPES))[:, None, None], (xx - w / 2)[None], (yy - h / 2)[None],
                            torch.tensor(r)) > 0
    m = torch.from_numpy(mask)[None]
    iou = (inside & m).sum((1, 2)) / (inside | m).sum((1, 2)).clamp_min(1)
    return int(iou.argmax())


def _background_energy(image: np.ndarray, objects: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(energy, band-passed grey level, background pixels used) of an image: the grey level band-passed, away from
    the objects and the border; the energy (mean square over the kept pixels) is 0 when under 64 pixels are left.

    The band: a 1-px Gaussian takes out pixel noise (a generated image's grain), which the texture keeps (a 12-px
    period loses an eighth of its amplitude); subtracting a box filter one period wide takes out the tone and its
    gradient but none of the texture (the box removes its fundamental)."""
    scale = image.shape[0] / RESOLUTION
    grey = ndimage.gaussian_filter(image.mean(-1), sigma=scale)
    return detail.background_energy(grey, objects, int(round(TEXTURE_PERIOD * scale)) | 1)


def _texture(image: np.ndarray, objects: np.ndarray) -> int:
    """Texture index of the background (`_background_energy`): plain without energy, striped when one axis' profile
    holds it and the other's not, else dotted."""
    energy, residual, keep = _background_energy(image, objects)
    if energy < TEXTURE_ENERGY_MIN:
        return TEXTURES.index("plain")
    masked = np.where(keep, residual, 0.0)
    axes = []
    for axis in (0, 1):  # energy of the mean profile across columns, then rows, over lines with enough background
        counts = keep.sum(axis)
        profile = masked.sum(axis)[counts > 8] / counts[counts > 8]
        axes.append(float(np.mean(profile**2)) if profile.size else 0.0)
    low, high = sorted(axes)
    striped = high > STRIPE_AXIS_FRACTION * energy and low < STRIPE_CROSS_RATIO * high
    return TEXTURES.index("striped" if striped else "dotted")


def analyse(image: np.ndarray) -> Analysis:
    """Read the objects and the background texture off one (H, W, 3) image in [0, 1] (square, any size)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.shape[0] != image.shape[1]:
        raise ValueError(f"image must be square (H, W, 3) in [0, 1], got shape {image.shape}")
    image = np.clip(image.astype(np.float64), 0, 1)
    side = image.shape[0]
    saturated = _saturated(image)
    labels = _regions(saturated)
    small, large = (2 * e for e in HALF_EXTENT)
    objects = []
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        mask = labels[box] == index
        (y0, y1), (x0, x1) = ((s.start, s.stop) for s in box)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2  # objects are placed by their bounding box
        col, row = min(2, int(cx * 3 // side)), min(2, int(cy * 3 // side))
        shape = _shape(mask)
        # the side from the area, not the box: a blur blunts the corners (the triangles' most) but keeps the area
        extent = np.sqrt(mask.sum() / SHAPE_FILL[shape]) * RESOLUTION / side
        objects.append(Detection(
            colour=int(np.round(_hue(image[box][mask]) / 60)) % len(COLOURS),
            shape=shape,
            size=int(extent > (small + large) / 2),
            position=row * 3 + col,
            centre=(cx, cy),
            pixels=int(mask.sum()),
        ))
    objects.sort(key=lambda d: (d.position, d.centre[1], d.centre[0]))
    return Analysis(tuple(objects), _texture(image, saturated))


def match(scene: Scene, found: Analysis) -> list[Detection | None]:
    """The detection matched to each of the scene's objects (None: unmatched): the assignment with the most
    attribute agreements in all; a pair that agrees on nothing is no match."""
    agreement = np.array([[sum(getattr(o, a) == getattr(d, a) for a in OBJECT_ATTRIBUTES) for d in found.objects]
                          for o in scene.objects]).reshape(scene.count, len(found.objects))
    matched: list[Detection | None] = [None] * scene.count
    for i, j in zip(*linear_sum_assignment(agreement, maximize=True)):
        if agreement[i, j] > 0:
            matched[i] = found.objects[j]
    return matched


def _relation_holds(relation: int, a: Detection, b: Detection) -> bool:
    if RELATIONS[relation] == "left of":
        return a.position % 3 < b.position % 3
    return a.position // 3 < b.position // 3


def score(image: np.ndarray, scene: Scene) -> dict[str, float]:
    """Adherence of one (H, W, 3) image in [0, 1] to `scene`'s caption: attribute -> score in [0, 1] (`ATTRIBUTES`;
    per-object attributes averaged over the caption's objects; relation NaN unless the caption has one)."""
    found = analyse(image)
    matched = match(scene, found)
    out = {a: float(np.mean([d is not None and getattr(d, a) == getattr(o, a) for o, d in zip(scene.objects, matched)]))
           for a in OBJECT_ATTRIBUTES}
    out["count"] = float(len(found.objects) == scene.count)
    out["texture"] = float(found.texture == scene.texture)
    relation = scene.relation
    out["relation"] = (float("nan") if relation is None else
                       float(None not in matched and _relation_holds(relation, matched[0], matched[1])))
    return out


def adherence(images: np.ndarray, scenes: Sequence[Scene] | Scenes) -> np.ndarray:
    """(N, 7) float: the `score` of each (N, H, W, 3) image in [0, 1] against its scene, columns in `ATTRIBUTES`
    order; the relation column is NaN for scenes of one or three objects."""
    scenes = scenes.to_list() if isinstance(scenes, Scenes) else list(scenes)
    if len(images) != len(scenes):
        raise ValueError(f"images and scenes must have the same length, got {len(images)} and {len(scenes)}")
    return np.array([[score(image, scene)[a] for a in ATTRIBUTES] for image, scene in zip(images, scenes)],
                    dtype=np.float64).reshape(len(scenes), len(ATTRIBUTES))


def adherence_table(images: np.ndarray, scenes: Sequence[Scene] | Scenes) -> dict[str, float]:
    """Mean score per attribute (relation over two-object scenes only), ``adherence`` (the mean over images of each
    image's mean over its attributes) and ``all_correct`` (the share of images with every attribute right)."""
    scores = adherence(images, scenes)
    table = {a: float(np.nanmean(scores[:, i])) for i, a in enumerate(ATTRIBUTES)}
    table["adherence"] = float(np.mean(np.nanmean(scores, 1)))
    table["all_correct"] = float(np.mean(np.all(np.isnan(scores) | (scores == 1), 1)))
    return table


def detail_statistics(image: np.ndarray) -> np.ndarray:
    """(4,) `detail.detail_statistics` of one (H, W, 3) image in [0, 1]: outline and shading averaged over the
    objects `analyse` finds, the texture energy of the background around them."""
    image = np.clip(np.asarray(image, np.float64), 0, 1)
    saturated = _saturated(image)
    labels = _regions(saturated)
    return detail.detail_statistics(image, labels, _background_energy(image, saturated)[0])


def evaluation_prompts(n: int, seed: int = 0, exclude: Sequence[Scene] = ()) -> list[Scene]:
    """A fixed prompt set: `n` distinct scenes (less `exclude`) drawn by `sample_scenes` from `seed`, ordered so that
    the object counts take turns (1, 2, 3, 1, ...): every prefix has the counts balanced, and their other attributes
    are uniform draws."""
    if n < 1:
        raise ValueError(f"n (number of prompts) must be >= 1, got {n}")
    taken, by_count = set(exclude), {c: [] for c in range(1, MAX_OBJECTS + 1)}
    generator = torch.Generator().manual_seed(seed)
    while min(len(v) for v in by_count.values()) < -(-n // MAX_OBJECTS):
        for scene in sample_scenes(4 * n, generator).to_list():
            if scene not in taken:
                taken.add(scene)
                by_count[scene.count].append(scene)
    turns = [by_count[c][i] for i in range(-(-n // MAX_OBJECTS)) for c in by_count]
    return turns[:n]


def reference_images(prompts: Sequence[Scene], per_prompt: int = 4, seed: int = 1) -> torch.Tensor:
    """Renders of the prompts' scenes (`per_prompt` each, other nuisance draws): the data side of the distances."""
    return render(Scenes.from_list(list(prompts) * per_prompt), torch.Generator().manual_seed(seed))
