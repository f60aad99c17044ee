"""Image quality without downloaded weights, measured so that it holds out of sample.

The protocol (issue 24):
- **Two disjoint evaluation sets** (`evaluation_set`): *tune* (144 prompts) for ablations and for choosing
  settings, *report* (288 prompts) for the published figures only. They share no scene and no generator seed, and
  their data renders (the reference side of the distances) use other nuisance seeds again. Both are balanced over
  every attribute value, and so is every prefix of them closely (the CPU default scores a prefix).
- **Prompt adherence** (`analyse`, `adherence`): an analytic reading of a decoded image, per caption attribute. The
  shape is the largest saturated connected region (the background is grey); its colour is the nearest of the six
  hues, its position the 3 x 3 cell of its centroid, its size the side of its bounding box, its shape the
  best-overlapping template; the background texture is read from the high-passed grey level (no energy: plain;
  energy along one axis only: striped; else dotted).
- **Detail against the data** (`detail_statistics`): what merging loses first and adherence cannot see: edge
  sharpness, the shape's dark outline, its shading gradient and the background texture's energy, each compared with
  renders of the same scene (1 = as in the data).
- **Distances to the data** (`paired_kid`, `frechet_distance`) on `FeatureSpace`: the features of `AttributeNet`
  (a small CNN trained by ``python -m benchmarks.reference.train`` on the data) projected on their 16 leading principal
  directions over renders of every scene and whitened, so that the dimension is far below the sample count and KID's
  kernel sees unit-scale features. KID is the unbiased MMD^2 with the data renders *of the same prompts*, pairs of
  the same prompt left out (they are not independent draws); FID is biased at finite samples and compared only
  between sets of equal size (the count is in every row).
- **Uncertainty** (`QualityScorer.summary`, `QualityScorer.compare`): a paired bootstrap over prompts
  (`benchmarks.stats`) gives every figure and every difference to the baseline its 95 % interval; "equal quality" is
  the non-inferiority rule of `benchmarks.stats`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import PyTorchModelHubMixin
from scipy import ndimage
from torch import nn

from .. import stats
from . import shapes

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
    grey = image.mean(-1)
    scale = image.shape[0] / shapes.RESOLUTION
    size = int(round(shapes.TEXTURE_PERIOD / 2 * scale)) + 1  # a box filter half a period wide keeps gradients
    residual = grey - ndimage.uniform_filter(grey, size=size, mode="nearest")
    keep = ~ndimage.binary_dilation(mask, iterations=size // 2 + 1)
    edge = size // 2
    keep[:edge], keep[-edge:], keep[:, :edge], keep[:, -edge:] = False, False, False, False
    energy = float(np.mean(residual[keep] ** 2)) if keep.sum() >= 64 else 0.0
    return energy, residual, keep


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


# -- learned features, FID and KID --------------------------------------------------------------------------------
class AttributeNet(nn.Module, PyTorchModelHubMixin):
    """A small CNN that recognises the caption attributes of a (B, 3, R, R) image in [0, 1].

    Its `features` (B, feature_dim) are the embedding of FID / KID; trained by ``python -m benchmarks.reference.train``.

    Args:
        heads: ``{label: classes}`` of its classification heads (default: the single-shape data's attributes).
        resolution: R, a power of two >= 64; stride-2 stages bring it to 8 x 8 before the feature layer.
    """

    def __init__(self, width: int = 32, feature_dim: int = 128, heads: dict[str, int] | None = None,
                 resolution: int = shapes.RESOLUTION) -> None:
        super().__init__()
        if resolution < 64 or resolution & (resolution - 1):
            raise ValueError(f"resolution must be a power of two >= 64, got {resolution}")
        self.resolution = resolution

        def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(8, c_out), nn.SiLU()]

        extra = [layer for _ in range(int(math.log2(resolution // 64))) for layer in block(4 * width, 4 * width, 2)]
        self.trunk = nn.Sequential(
            *block(3, width, 1), *block(width, 2 * width, 2), *block(2 * width, 4 * width, 2),
            *block(4 * width, 4 * width, 2), *extra, nn.Conv2d(4 * width, width, 1), nn.Flatten(),
            nn.Linear(width * 8 * 8, feature_dim),
        )
        heads = heads or {name: len(v) for name, v in shapes.VOCABULARY.items()}
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, classes) for name, classes in heads.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, feature_dim); other sizes are resized to R."""
        r = self.resolution
        if images.shape[-1] != r or images.shape[-2] != r:
            images = nn.functional.interpolate(images, size=(r, r), mode="bilinear", antialias=True)
        return self.trunk(images * 2 - 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = nn.functional.silu(self.features(images))
        return {name: head(feats) for name, head in self.heads.items()}


@torch.no_grad()
def extract_features(net: AttributeNet, images: np.ndarray | torch.Tensor, batch: int = 128) -> np.ndarray:
    """Features of (B, H, W, 3) numpy or (B, 3, H, W) torch images in [0, 1], float64 (B, D)."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images, np.float32)).permute(0, 3, 1, 2)
    net = net.eval()
    return torch.cat([net.features(images[i:i + batch].float()) for i in range(0, len(images), batch)]).double().numpy()


@dataclass(frozen=True)
class EvalSet:
    """A prompt set with one generator seed per prompt and the nuisance seed of its data renders.

    Attributes:
        name: "tune" or "report" (a prefix keeps the name: it is a subset of the same draws).
        prompts: the scenes, in order.
        seeds: the generator seed of each prompt's generation.
        reference_seed: nuisance seed of the first data render per prompt (the k-th uses ``reference_seed + k``).
    """

    name: str
    prompts: tuple[Prompt, ...]
    seeds: tuple[int, ...]
    reference_seed: int

    def __len__(self) -> int:
        return len(self.prompts)

    def head(self, n: int) -> "EvalSet":
        """The first `n` prompts (balanced prefixes; the CPU default's report subset)."""
        if not 2 <= n <= len(self):
            raise ValueError(f"quality prompts must be in [2, {len(self)}] for the {self.name} set, got {n}")
        return EvalSet(self.name, self.prompts[:n], self.seeds[:n], self.reference_seed)


# (size, scene-order seed, first generator seed, first render seed); the report set is drawn first from the whole
# scene grid, the tune set from the scenes left
EVAL_SETS = {"report": (288, 2024, 20_000, 30_000), "tune": (144, 2025, 10_000, 40_000)}


@functools.lru_cache(maxsize=None)
def evaluation_set(name: str) -> EvalSet:
    """The tune or report set (see the module docstring); they share no scene and no seed."""
    if name not in EVAL_SETS:
        raise ValueError(f"evaluation set must be one of {sorted(EVAL_SETS)}, got {name!r}")
    taken: list[Prompt] = []
    for set_name, (size, order_seed, first_seed, render_seed) in EVAL_SETS.items():
        prompts = evaluation_prompts(size, order_seed, exclude=taken)
        if set_name == name:
            return EvalSet(name, tuple(prompts), tuple(range(first_seed, first_seed + size)), render_seed)
        taken += prompts
    raise AssertionError("unreachable")


# -- distances to the data --------------------------------------------------------------------------------------------
FEATURE_DIM = 16
KID_SCALE = 1e3  # KID is reported x 1000


class FeatureSpace:
    """`AttributeNet` features projected on their `dim` leading principal directions over renders of every scene
    (two nuisance draws each) and whitened: (B, H, W, 3) images -> (B, dim), unit variance per direction on the data.
    """

    def __init__(self, net: AttributeNet, dim: int = FEATURE_DIM, seed: int = 900) -> None:
        self.net = net.eval()
        grid = shapes.scene_grid()
        renders = torch.cat([shapes.render(grid, torch.Generator().manual_seed(seed + k)) for k in range(2)])
        features = extract_features(self.net, renders)
        self.mean = features.mean(0)
        _, singular, directions = np.linalg.svd(features - self.mean, full_matrices=False)
        variance = singular[:dim] ** 2 / (len(features) - 1)
        self.projection = directions[:dim].T / np.sqrt(variance)  # (feature_dim, dim)

    def __call__(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        return (extract_features(self.net, images) - self.mean) @ self.projection


@functools.lru_cache(maxsize=2)
def feature_space(features: str) -> FeatureSpace:
    """The `FeatureSpace` of the `AttributeNet` saved in folder `features` (fitted once per process)."""
    return FeatureSpace(AttributeNet.from_pretrained(features))


def _weights(weights: np.ndarray | None, n: int) -> np.ndarray:
    return np.ones((1, n)) if weights is None else np.atleast_2d(weights)


def frechet_distance(a: np.ndarray, b: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray | float:
    """FID between feature sets a (N, D) and b (N, P, D) (P data renders per prompt) or (M, D):
    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2)``.

    With `weights` (R, N), prompt multiplicities of bootstrap draws (b's renders weighted like their prompt), one
    distance per draw (R,); without, a float.
    """
    w = _weights(weights, len(a))
    if b.ndim == 2:  # an unpaired reference: every draw sees all of it
        wb = np.ones((len(w), len(b)))
    else:
        wb = np.repeat(w, b.shape[1], axis=1)
        b = b.reshape(-1, b.shape[-1])

    def moments(x: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        total = weight.sum(1, keepdims=True)
        mean = weight @ x / total
        d = x.shape[1]
        second = (weight @ (x[:, :, None] * x[:, None, :]).reshape(len(x), d * d)).reshape(-1, d, d)
        cov = second / total[..., None] - mean[:, :, None] * mean[:, None, :]
        return mean, cov * (total / (total - 1))[..., None]

    (mu_a, s_a), (mu_b, s_b) = moments(a, w), moments(b, wb)
    eigenvalues = np.linalg.eigvals(s_a @ s_b).real.clip(min=0)  # tr (S_a S_b)^1/2 = sum of sqrt eigenvalues
    fid = ((mu_a - mu_b) ** 2).sum(1) + np.trace(s_a + s_b, axis1=1, axis2=2) - 2 * np.sqrt(eigenvalues).sum(1)
    fid = fid.clip(min=0)
    return float(fid[0]) if weights is None else fid


def _cubic_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[-1] + 1) ** 3


def reference_kernel(reference: np.ndarray) -> np.ndarray:
    """(N, N) KID kernel between the data renders (N, P, D) of each pair of prompts, averaged over their renders."""
    n, p, d = reference.shape
    flat = reference.reshape(n * p, d)
    return _cubic_kernel(flat, flat).reshape(n, p, n, p).mean((1, 3))


def kid_matrix(x: np.ndarray, reference: np.ndarray, k_yy: np.ndarray | None = None) -> np.ndarray:
    """(N, N) per-prompt-pair terms of the unbiased MMD^2 between features x (N, D) and the data's (N, P, D):
    ``k(x_i, x_j) + k(y_i, y_j) - k(x_i, y_j) - k(x_j, y_i)``, kernel ``(x.y / D + 1)^3`` (KID's), data terms
    averaged over the P renders (`k_yy`: the `reference_kernel`, when already computed)."""
    n, p, d = reference.shape
    k_yy = reference_kernel(reference) if k_yy is None else k_yy
    k_xy = _cubic_kernel(x, reference.reshape(n * p, d)).reshape(n, n, p).mean(2)
    return _cubic_kernel(x, x) + k_yy - k_xy - k_xy.T


def paired_kid(matrix: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray | float:
    """KID from a `kid_matrix`: the mean of its off-diagonal terms, pairs of the same prompt left out (a generated
    image and the renders of its own prompt are not independent draws; leaving them out keeps KID unbiased, ~0 for
    the data against itself). With `weights` (R, N) prompt multiplicities, one KID per bootstrap draw (R,)."""
    w = _weights(weights, len(matrix))
    diagonal = (w**2) @ np.diag(matrix)
    kid = (np.einsum("rn,nm,rm->r", w, matrix, w) - diagonal) / (w.sum(1) ** 2 - (w**2).sum(1))
    return float(kid[0]) if weights is None else kid


# -- detail against the data ------------------------------------------------------------------------------------------
DETAIL_STATISTICS = ("sharpness", "outline", "shading", "texture")
# floors of the ratio that compares a statistic with the data's: about a twentieth of its value on the data
# (texture: a tenth of a textured background's energy, so that two plain backgrounds compare as equal)
_DETAIL_FLOOR = np.array([0.05, 0.05, 0.05, 2e-4])


def detail_statistics(image: np.ndarray) -> np.ndarray:
    """(4,) detail of one (H, W, 3) image in [0, 1], in `DETAIL_STATISTICS` order:

    - sharpness: ``sqrt(mean laplacian^2 / mean |gradient|^2)`` of the grey level, an effective spatial frequency
      that does not depend on contrast (blur lowers it);
    - outline: ``1 - value of the shape's 2-px rim / value of its inside`` (the dark outline; 0 without);
    - shading: the shape's brightness slope along the light's diagonal over its mean (0 when flat);
    - texture: energy of the high-passed background (as the texture reading of `analyse` measures it).

    Outline and shading are 0 where no shape is found.
    """
    image = np.clip(np.asarray(image, np.float64), 0, 1)
    grey, value = image.mean(-1), image.max(-1)
    gy, gx = np.gradient(grey)
    gradient = np.mean(gx**2 + gy**2)
    sharpness = np.sqrt(np.mean(ndimage.laplace(grey) ** 2) / gradient) if gradient > 0 else 0.0
    mask = _object_mask(image)
    inside = ndimage.binary_erosion(mask, iterations=3)
    outline = shading = 0.0
    if inside.sum() >= 4:
        rim = mask & ~ndimage.binary_erosion(mask, iterations=2)
        outline = 1 - np.median(value[rim]) / max(np.median(value[inside]), 1e-6)
        ys, xs = np.nonzero(mask)
        cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
        r = max(xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()) / 2
        ys, xs = np.nonzero(inside)
        along = (xs + 0.5 - cx + ys + 0.5 - cy) / (4 * r)  # the shading runs along x + y (top-left light)
        if np.ptp(along) > 0:
            shading = -np.polyfit(along, value[inside], 1)[0] / max(value[inside].mean(), 1e-6)
    return np.array([sharpness, outline, shading, _background_energy(image, mask)[0]])


def detail_similarity(generated: np.ndarray, data: np.ndarray) -> np.ndarray:
    """(N, 4) statistics of generated images and (N, 4) of the data for the same prompts -> (N, 4) in [0, 1]:
    ``min(g, d) / max(g, d)`` after a floor, 1 where the image has the data's detail, lower for less (blur, a lost
    outline) or more (noise, stray texture)."""
    g = np.maximum(generated, 0) + _DETAIL_FLOOR
    d = np.maximum(data, 0) + _DETAIL_FLOOR
    return np.minimum(g, d) / np.maximum(g, d)


# -- scoring a set, with uncertainty ----------------------------------------------------------------------------------
@dataclass
class SetScores:
    """Per-prompt results of one method on an evaluation set: the material of every figure and interval.

    Attributes:
        correct: (N, 5) bool, each attribute read back right (`ATTRIBUTES` order).
        features: (N, D) the images in `FeatureSpace`.
        detail: (N, 4) `detail_similarity` to the data, per `DETAIL_STATISTICS`.
    """

    correct: np.ndarray
    features: np.ndarray
    detail: np.ndarray

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, correct=self.correct, features=self.features, detail=self.detail)

    @classmethod
    def load(cls, path: Path) -> "SetScores":
        with np.load(path) as data:
            return cls(data["correct"], data["features"], data["detail"])


class QualityScorer:
    """Scores generated images of an evaluation set: adherence per attribute, detail, KID / FID against the data,
    each with its paired-bootstrap interval, and the differences to a baseline.

    Args:
        eval_set: the prompts; `scores` takes the images of all of them, in order.
        features: folder of a trained `AttributeNet` (``save_pretrained``).
        per_prompt: data renders per prompt on the reference side of the distances and the detail.
        resamples: bootstrap draws.
    """

    def __init__(self, eval_set: EvalSet, features: str | Path, per_prompt: int = 4,
                 resamples: int = stats.RESAMPLES) -> None:
        self.eval_set = eval_set
        self.space = feature_space(str(features))
        renders = [reference_images(eval_set.prompts, 1, eval_set.reference_seed + k) for k in range(per_prompt)]
        self.reference = np.stack([self.space(r) for r in renders], 1)  # (N, P, D)
        self.reference_detail = np.mean([[detail_statistics(im) for im in r.permute(0, 2, 3, 1).numpy()]
                                         for r in renders], 0)  # (N, 4)
        self._k_yy = reference_kernel(self.reference)
        self.counts = stats.bootstrap_counts(len(eval_set), resamples)

    def scores(self, images: np.ndarray) -> SetScores:
        """(N, H, W, 3) images in [0, 1] of the set's prompts, in order -> `SetScores`."""
        if len(images) != len(self.eval_set):
            raise ValueError(f"images must be one per prompt of the {self.eval_set.name} set ({len(self.eval_set)}), "
                             f"got {len(images)}")
        statistics = np.stack([detail_statistics(im) for im in images])
        return SetScores(adherence(images, list(self.eval_set.prompts)), self.space(images),
                         detail_similarity(statistics, self.reference_detail))

    def _metrics(self, scores: SetScores) -> dict[str, np.ndarray]:
        """Per-prompt values (N,) of the mean-type metrics, in percent."""
        correct = scores.correct.astype(np.float64) * 100
        return {"adherence": correct.mean(1), "all_correct": scores.correct.all(1) * 100.0,
                **{f"adherence_{a}": correct[:, i] for i, a in enumerate(ATTRIBUTES)},
                "detail": scores.detail.mean(1) * 100,
                **{f"detail_{d}": scores.detail[:, i] * 100 for i, d in enumerate(DETAIL_STATISTICS)}}

    def summary(self, scores: SetScores) -> dict[str, stats.Interval]:
        """Every figure of one set with its 95 % interval: adherence, all_correct, per attribute, detail (all in
        percent), KID (x 1000) and FID against the data."""
        out = {name: stats.mean_interval(v, self.counts) for name, v in self._metrics(scores).items()}
        matrix = self._kid_matrix(scores)
        out["kid"] = stats.percentile_interval(self._kid(matrix, None), self._kid(matrix, self.counts))
        out["fid"] = stats.normal_interval(frechet_distance(scores.features, self.reference),
                                           frechet_distance(scores.features, self.reference, self.counts))
        return out

    def compare(self, scores: SetScores, baseline: SetScores) -> dict[str, stats.Interval]:
        """method - baseline for every figure of `summary`, with paired 95 % intervals (same bootstrap draws)."""
        ours, theirs = self._metrics(scores), self._metrics(baseline)
        out = {name: stats.paired_mean_difference(ours[name], theirs[name], self.counts) for name in ours}
        out["kid"] = stats.paired_statistic_difference(self._kid, self._kid_matrix(scores),
                                                       self._kid_matrix(baseline), self.counts)
        fid = lambda features, w: frechet_distance(features, self.reference, w)  # noqa: E731
        out["fid"] = stats.paired_statistic_difference(fid, scores.features, baseline.features, self.counts)
        return out

    def _kid_matrix(self, scores: SetScores) -> np.ndarray:
        return kid_matrix(scores.features, self.reference, self._k_yy)

    @staticmethod
    def _kid(matrix: np.ndarray, weights: np.ndarray | None) -> np.ndarray | float:
        return paired_kid(matrix, weights) * KID_SCALE


def reference_images(prompts: list[Prompt] | tuple[Prompt, ...], per_prompt: int = 4, seed: int = 1) -> torch.Tensor:
    """Renders of the prompts' scenes (`per_prompt` each, other nuisance draws): the data side of the distances."""
    index = torch.tensor([[p.colour, p.shape, p.size, p.position, p.texture] for p in prompts]).repeat(per_prompt, 1)
    scenes = shapes.Scenes(*index.T)
    return shapes.render(scenes, torch.Generator().manual_seed(seed))


def default_features() -> Path:
    """The attribute network shipped with the trained reference pipeline."""
    from . import WEIGHTS

    return WEIGHTS / "pixart-shapes" / "features"
