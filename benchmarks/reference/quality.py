"""Image quality without downloaded weights, measured so that it holds out of sample.

The protocol (issue 24), the same for every data set of `benchmarks.reference.data` (its `Evaluation` holds what is
specific: prompts, checker, renders):
- **Two disjoint evaluation sets** (`evaluation_set`): *tune* (144 prompts) for ablations and for choosing
  settings, *report* (288 prompts) for the published figures only. They share no scene and no generator seed, and
  their data renders (the reference side of the distances) use other nuisance seeds again. Both are balanced over
  every attribute value, and so is every prefix of them closely (the CPU default scores a prefix).
- **Prompt adherence**: an analytic reading of a decoded image, per caption attribute, by the data set's checker
  (`shapes_checker`: one shape; `scenes_checker`: several objects matched to the caption's phrases, count, relation).
- **Detail against the data** (`benchmarks.reference.detail`): what merging loses first and adherence cannot see:
  edge sharpness, the objects' dark outline, their shading gradient and the background texture's energy, each
  compared with renders of the same scene (1 = as in the data).
- **Distances to the data** (`paired_kid`, `frechet_distance`) on `FeatureSpace`: the features of `AttributeNet`
  (a small CNN trained by ``python -m benchmarks.reference.train`` on the data) projected on their 16 leading principal
  directions over renders of the data (every scene of the single-shape grid; 1,024 sampled scenes) and whitened, so that the dimension is far below the sample count and KID's
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
from typing import Any

import numpy as np
import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from .. import stats
from .data import data_set
from .detail import DETAIL_STATISTICS, detail_similarity

# every adherence column a data set can have, in the order of the harness' CSV (a data set fills its own)
ATTRIBUTES = ("colour", "shape", "size", "position", "texture", "count", "relation")


# -- learned features, FID and KID --------------------------------------------------------------------------------
class AttributeNet(nn.Module, PyTorchModelHubMixin):
    """A small CNN that recognises the caption attributes of a (B, 3, R, R) image in [0, 1].

    Its `features` (B, feature_dim) are the embedding of FID / KID; trained by ``python -m benchmarks.reference.train``.

    Args:
        heads: ``{label: classes}`` of its classification heads (default: the single-shape data's attributes).
        resolution: R, a power of two >= 64; stride-2 stages bring it to 8 x 8 before the feature layer.
    """

    def __init__(self, width: int = 32, feature_dim: int = 128, heads: dict[str, int] | None = None,
                 resolution: int = 64) -> None:
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
        heads = heads or data_set("shapes").heads
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
        data: the data set (`benchmarks.reference.data.DATA_SETS`) the prompts come from.
        prompts: the scenes, in order.
        seeds: the generator seed of each prompt's generation.
        reference_seed: nuisance seed of the first data render per prompt (the k-th uses ``reference_seed + k``).
    """

    name: str
    data: str
    prompts: tuple[Any, ...]
    seeds: tuple[int, ...]
    reference_seed: int

    def __len__(self) -> int:
        return len(self.prompts)

    def head(self, n: int) -> "EvalSet":
        """The first `n` prompts (balanced prefixes; the CPU default's report subset)."""
        if not 2 <= n <= len(self):
            raise ValueError(f"quality prompts must be in [2, {len(self)}] for the {self.name} set, got {n}")
        return EvalSet(self.name, self.data, self.prompts[:n], self.seeds[:n], self.reference_seed)


# (size, scene-order seed, first generator seed, first render seed); the report set is drawn first, the tune set
# from the scenes left
EVAL_SETS = {"report": (288, 2024, 20_000, 30_000), "tune": (144, 2025, 10_000, 40_000)}


@functools.lru_cache(maxsize=None)
def evaluation_set(name: str, data: str = "shapes") -> EvalSet:
    """The tune or report set of a data set (see the module docstring); they share no scene and no seed."""
    if name not in EVAL_SETS:
        raise ValueError(f"evaluation set must be one of {sorted(EVAL_SETS)}, got {name!r}")
    draw_prompts = data_set(data).evaluation.prompts
    taken: list[Any] = []
    for set_name, (size, order_seed, first_seed, render_seed) in EVAL_SETS.items():
        prompts = draw_prompts(size, order_seed, taken)
        if set_name == name:
            return EvalSet(name, data, tuple(prompts), tuple(range(first_seed, first_seed + size)), render_seed)
        taken += prompts
    raise AssertionError("unreachable")


# -- distances to the data --------------------------------------------------------------------------------------------
FEATURE_DIM = 16
KID_SCALE = 1e3  # KID is reported x 1000


class FeatureSpace:
    """`AttributeNet` features projected on their `dim` leading principal directions over the data set's feature
    renders (`Evaluation.feature_renders`) and whitened: (B, H, W, 3) images -> (B, dim), unit variance per direction
    on the data."""

    def __init__(self, net: AttributeNet, data: str = "shapes", dim: int = FEATURE_DIM, seed: int = 900) -> None:
        self.net = net.eval()
        renders = data_set(data).evaluation.feature_renders(seed)
        features = extract_features(self.net, renders)
        self.mean = features.mean(0)
        _, singular, directions = np.linalg.svd(features - self.mean, full_matrices=False)
        variance = singular[:dim] ** 2 / (len(features) - 1)
        self.projection = directions[:dim].T / np.sqrt(variance)  # (feature_dim, dim)

    def __call__(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        return (extract_features(self.net, images) - self.mean) @ self.projection


@functools.lru_cache(maxsize=2)
def feature_space(features: str, data: str = "shapes") -> FeatureSpace:
    """The `FeatureSpace` of the `AttributeNet` saved in folder `features` on `data` (fitted once per process)."""
    return FeatureSpace(AttributeNet.from_pretrained(features), data)


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


# -- scoring a set, with uncertainty ----------------------------------------------------------------------------------
@dataclass
class SetScores:
    """Per-prompt results of one method on an evaluation set: the material of every figure and interval.

    Attributes:
        correct: (N, A) each attribute of the data set's `Evaluation.attributes` read back right: 1 / 0, a share
            for attributes of several objects, NaN where the prompt does not ask for it.
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
        self.evaluation = data_set(eval_set.data).evaluation
        self.attributes = self.evaluation.attributes
        self.space = feature_space(str(features), eval_set.data)
        renders = [self.evaluation.references(eval_set.prompts, 1, eval_set.reference_seed + k)
                   for k in range(per_prompt)]
        self.reference = np.stack([self.space(r) for r in renders], 1)  # (N, P, D)
        self.reference_detail = np.mean([[self.evaluation.detail(im) for im in r.permute(0, 2, 3, 1).numpy()]
                                         for r in renders], 0)  # (N, 4)
        self._k_yy = reference_kernel(self.reference)
        self.counts = stats.bootstrap_counts(len(eval_set), resamples)

    def scores(self, images: np.ndarray) -> SetScores:
        """(N, H, W, 3) images in [0, 1] of the set's prompts, in order -> `SetScores`."""
        if len(images) != len(self.eval_set):
            raise ValueError(f"images must be one per prompt of the {self.eval_set.name} set ({len(self.eval_set)}), "
                             f"got {len(images)}")
        statistics = np.stack([self.evaluation.detail(im) for im in images])
        correct = np.asarray(self.evaluation.adherence(images, list(self.eval_set.prompts)), np.float64)
        return SetScores(correct, self.space(images), detail_similarity(statistics, self.reference_detail))

    def _metrics(self, scores: SetScores) -> dict[str, np.ndarray]:
        """Per-prompt values (N,) of the mean-type metrics, in percent; an attribute a prompt does not ask for is NaN
        in its column and left out of the prompt's adherence."""
        correct = scores.correct.astype(np.float64) * 100
        asked = ~np.isnan(correct)
        return {"adherence": np.nanmean(correct, 1), "all_correct": np.all(~asked | (correct == 100), 1) * 100.0,
                **{f"adherence_{a}": correct[:, i] for i, a in enumerate(self.attributes)},
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


# data set -> the pipeline shipping its judge
JUDGES = {"shapes": "pixart-shapes", "shapes128": "pixart-shapes128", "scenes": "pixart-scenes"}


def judge(data: str = "shapes") -> Path:
    """The attribute network that scores images of data set `data` (adherence, FID / KID): the one shipped with the
    data set's first reference pipeline, so that every model trained on that data (PixArt, FLUX) is judged by the
    same network."""
    from . import WEIGHTS

    if data not in JUDGES:
        raise ValueError(f"data must be one of {sorted(JUDGES)}, got {data!r}")
    return WEIGHTS / JUDGES[data] / "features"
