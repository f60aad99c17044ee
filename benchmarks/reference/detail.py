"""Detail against the data: what merging loses first and adherence cannot see.

Four statistics of an image (`DETAIL_STATISTICS`), each compared with renders of the same scene by
`detail_similarity` (1 = as in the data). The data sets' checkers find the objects and measure the background's
texture energy their own way (`shapes_checker`, `scenes_checker`); the statistics here take those.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

DETAIL_STATISTICS = ("sharpness", "outline", "shading", "texture")
# floors of the ratio that compares a statistic with the data's: about a twentieth of its value on the data
# (texture: a tenth of a textured background's energy, so that two plain backgrounds compare as equal)
_DETAIL_FLOOR = np.array([0.05, 0.05, 0.05, 2e-4])


def background_energy(grey: np.ndarray, objects: np.ndarray, size: int) -> tuple[float, np.ndarray, np.ndarray]:
    """(energy, residual, kept pixels) of an (H, W) grey level's background: the grey level minus its mean over a
    `size`-px box (the tone and its gradient out, the texture in), kept more than half a box away from the `objects`
    mask and the border; the energy, the residual's mean square over the kept pixels, is 0 when under 64 are left."""
    residual = grey - ndimage.uniform_filter(grey, size=size, mode="nearest")
    keep = ~ndimage.binary_dilation(objects, iterations=size // 2 + 1)
    edge = size // 2
    keep[:edge], keep[-edge:], keep[:, :edge], keep[:, -edge:] = False, False, False, False
    energy = float(np.mean(residual[keep] ** 2)) if keep.sum() >= 64 else 0.0
    return energy, residual, keep


def _object_detail(value: np.ndarray, mask: np.ndarray) -> tuple[float, float] | None:
    """(outline, shading) of one object's (H, W) mask on the image's value channel; None when it is too small."""
    inside = ndimage.binary_erosion(mask, iterations=3)
    if inside.sum() < 4:
        return None
    rim = mask & ~ndimage.binary_erosion(mask, iterations=2)
    outline = 1 - np.median(value[rim]) / max(np.median(value[inside]), 1e-6)
    ys, xs = np.nonzero(mask)
    cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
    r = max(xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()) / 2
    ys, xs = np.nonzero(inside)
    along = (xs + 0.5 - cx + ys + 0.5 - cy) / (4 * r)  # the shading runs along x + y (top-left light)
    shading = 0.0
    if np.ptp(along) > 0:
        shading = -np.polyfit(along, value[inside], 1)[0] / max(value[inside].mean(), 1e-6)
    return float(outline), float(shading)


def detail_statistics(image: np.ndarray, objects: np.ndarray, texture_energy: float) -> np.ndarray:
    """(4,) detail of one (H, W, 3) image in [0, 1], in `DETAIL_STATISTICS` order:

    - sharpness: ``sqrt(mean laplacian^2 / mean |gradient|^2)`` of the grey level, an effective spatial frequency
      that does not depend on contrast (blur lowers it);
    - outline: ``1 - value of an object's 2-px rim / value of its inside`` (the dark outline; 0 without);
    - shading: an object's brightness slope along the light's diagonal over its mean (0 when flat);
    - texture: `texture_energy`, the background's high-passed energy as the data set's checker measures it.

    Args:
        objects: (H, W) int labels 1..K of the objects found, 0 elsewhere; outline and shading are averaged over the
            objects large enough to measure, 0 where there is none.
    """
    image = np.clip(np.asarray(image, np.float64), 0, 1)
    grey, value = image.mean(-1), image.max(-1)
    gy, gx = np.gradient(grey)
    gradient = np.mean(gx**2 + gy**2)
    sharpness = np.sqrt(np.mean(ndimage.laplace(grey) ** 2) / gradient) if gradient > 0 else 0.0
    measured = [m for k in range(1, int(objects.max(initial=0)) + 1)
                if (m := _object_detail(value, objects == k)) is not None]
    outline, shading = np.mean(measured, 0) if measured else (0.0, 0.0)
    return np.array([sharpness, outline, shading, texture_energy])


def detail_similarity(generated: np.ndarray, data: np.ndarray) -> np.ndarray:
    """(N, 4) statistics of generated images and (N, 4) of the data for the same prompts -> (N, 4) in [0, 1]:
    ``min(g, d) / max(g, d)`` after a floor, 1 where the image has the data's detail, lower for less (blur, a lost
    outline) or more (noise, stray texture)."""
    g = np.maximum(generated, 0) + _DETAIL_FLOOR
    d = np.maximum(data, 0) + _DETAIL_FLOOR
    return np.minimum(g, d) / np.maximum(g, d)
