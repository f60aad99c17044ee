"""Image quality without downloaded weights: prompt adherence, FID and KID on the procedural shapes.

- **Prompt adherence** (`analyse`, `adherence_table`): an analytic reading of a decoded image, per caption
  attribute. The shape is the largest saturated connected region (the background is grey); its colour is the
  nearest of the six hues, its position the 3 x 3 cell of its centroid, its size the side of its bounding box, its
  shape the best-overlapping template; the background texture is read from the high-passed grey level (no energy:
  plain; energy along one axis only: striped; else dotted). Scores are accuracies over a fixed prompt set.
- **FID / KID** (`frechet_distance`, `kernel_distance`) on the features of `AttributeNet`, a small CNN trained by
  `python -m benchmarks.train` to recognise the caption attributes of rendered images, so that generated images are
  compared with the *data* (renders of the same prompts), not only with the baseline's output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import PyTorchModelHubMixin
from scipy import linalg, ndimage
from torch import nn

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


def evaluation_prompts(n: int, seed: int = 0) -> list[Prompt]:
    """A fixed prompt set: `n` distinct scenes of the attribute grid in a seeded order, cycling through every value
    of each attribute as evenly as the grid allows."""
    grid = shapes.scene_grid()
    if not 1 <= n <= len(grid):
        raise ValueError(f"n (number of prompts) must be in [1, {len(grid)}], got {n}")
    order = torch.randperm(len(grid), generator=torch.Generator().manual_seed(seed))
    picked = grid[order]
    # greedy balance: take the next scene whose values are the least used so far
    counts = {name: np.zeros(len(v)) for name, v in shapes.VOCABULARY.items()}
    rows = torch.stack([getattr(picked, a) for a in shapes.ATTRIBUTES], 1).numpy()
    chosen: list[int] = []
    available = np.ones(len(rows), bool)
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


def _texture(image: np.ndarray, mask: np.ndarray) -> int:
    grey = image.mean(-1)
    scale = image.shape[0] / shapes.RESOLUTION
    size = int(round(shapes.TEXTURE_PERIOD / 2 * scale)) + 1  # a box filter half a period wide keeps gradients
    residual = grey - ndimage.uniform_filter(grey, size=size, mode="nearest")
    keep = ~ndimage.binary_dilation(mask, iterations=size // 2 + 1)
    edge = size // 2
    keep[:edge], keep[-edge:], keep[:, :edge], keep[:, -edge:] = False, False, False, False
    if keep.sum() < 64:
        return 0
    energy = float(np.mean(residual[keep] ** 2))
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
    """A small CNN that recognises the caption attributes of a (B, 3, 64, 64) image in [0, 1].

    Its `features` (B, feature_dim) are the embedding of FID / KID; trained by ``python -m benchmarks.train``.
    """

    def __init__(self, width: int = 32, feature_dim: int = 128) -> None:
        super().__init__()

        def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(8, c_out), nn.SiLU()]

        self.trunk = nn.Sequential(
            *block(3, width, 1), *block(width, 2 * width, 2), *block(2 * width, 4 * width, 2),
            *block(4 * width, 4 * width, 2), nn.Conv2d(4 * width, width, 1), nn.Flatten(),
            nn.Linear(width * 8 * 8, feature_dim),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, len(v)) for name, v in shapes.VOCABULARY.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, feature_dim); other sizes are resized to 64 px."""
        if images.shape[-1] != shapes.RESOLUTION or images.shape[-2] != shapes.RESOLUTION:
            images = nn.functional.interpolate(images, size=(shapes.RESOLUTION,) * 2, mode="bilinear", antialias=True)
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


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID between two (N, D) feature sets: |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root, _ = linalg.sqrtm(s_a @ s_b, disp=False)
    root = root.real
    return float(max(0.0, np.sum((mu_a - mu_b) ** 2) + np.trace(s_a + s_b - 2 * root)))


def kernel_distance(a: np.ndarray, b: np.ndarray) -> float:
    """KID: unbiased MMD^2 with the cubic polynomial kernel (x.y / D + 1)^3 between (N, D) feature sets."""
    d = a.shape[1]
    k_aa, k_bb, k_ab = ((x @ y.T / d + 1) ** 3 for x, y in ((a, a), (b, b), (a, b)))
    n, m = len(a), len(b)
    return float((k_aa.sum() - np.trace(k_aa)) / (n * (n - 1)) + (k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
                 - 2 * k_ab.mean())


def reference_images(prompts: list[Prompt], per_prompt: int = 4, seed: int = 1) -> torch.Tensor:
    """Renders of the prompts' scenes (`per_prompt` each, other nuisance draws): the data side of FID / KID."""
    index = torch.tensor([[p.colour, p.shape, p.size, p.position, p.texture] for p in prompts]).repeat(per_prompt, 1)
    scenes = shapes.Scenes(*index.T)
    return shapes.render(scenes, torch.Generator().manual_seed(seed))


class QualityScorer:
    """Scores generated images of a fixed prompt set: adherence per attribute, FID and KID against the data.

    Args:
        prompts: the prompt set; `__call__` takes the images of its first ``len(images)`` prompts, in order.
        features: folder of a trained `AttributeNet` (``save_pretrained``).
        per_prompt: renders per prompt on the data side of FID / KID.
    """

    def __init__(self, prompts: list[Prompt], features: str | Path, per_prompt: int = 4) -> None:
        self.prompts = prompts
        self.net = AttributeNet.from_pretrained(features).eval()
        self.reference = extract_features(self.net, reference_images(prompts, per_prompt))

    def __call__(self, images: np.ndarray) -> dict[str, float]:
        table = adherence_table(images, self.prompts[: len(images)])
        feats = extract_features(self.net, images)
        return {
            "adherence": table["adherence"], "all_correct": table["all_correct"],
            **{f"adherence_{a}": table[a] for a in ATTRIBUTES},
            "fid": frechet_distance(feats, self.reference), "kid": kernel_distance(feats, self.reference),
        }


def default_features() -> Path:
    """The attribute network shipped with the trained reference pipeline."""
    from .models import WEIGHTS

    return WEIGHTS / "pixart-shapes" / "features"
