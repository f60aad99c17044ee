"""The quality protocol of one trained model in a benchmark session (`QualityRun`): its evaluation set, the judge,
the baseline's images and scores of that set, and each method's quality columns (figures with intervals,
differences to the baseline with intervals, the verdict, fidelity to the baseline's images)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import stats
from .measure import psnr, rel_l2, ssim
from .plots import slug
from .reference import quality

if TYPE_CHECKING:
    from .runner import Job, ModelSession


def scores_path(out: Path, model: str, eval_set: quality.EvalSet, label: str) -> Path:
    """Where a job's per-prompt quality scores (`quality.SetScores`) are saved."""
    return out / "scores" / model.replace("/", "_") / f"{eval_set.name}{len(eval_set)}" / f"{slug(label)}.npz"


def interval_columns(intervals: dict[str, stats.Interval], suffix: str = "") -> dict[str, float]:
    """``{name: Interval}`` -> CSV columns ``name<suffix>``, ``name<suffix>_low``, ``name<suffix>_high``."""
    out = {}
    for name, interval in intervals.items():
        out.update({f"{name}{suffix}": interval.estimate, f"{name}{suffix}_low": interval.low,
                    f"{name}{suffix}_high": interval.high})
    return out


class QualityRun:
    """Quality of the jobs of one `ModelSession` (trained presets: learned weights, a judge).

    Args:
        session: the session whose pipelines generate the evaluation set.
    """

    def __init__(self, session: ModelSession) -> None:
        self.session = session
        self.baseline: tuple[np.ndarray, torch.Tensor, quality.SetScores] | None = None  # images, latents, scores

    @property
    def eval_set(self) -> quality.EvalSet:
        """The evaluation set's prompts and seeds that quality is measured on (its first `quality_prompts`)."""
        s = self.session
        eval_set = quality.evaluation_set(s.settings.eval_set, s.preset.data if s.trained else "shapes")
        n = s.settings.quality_prompts
        return eval_set if not n else eval_set.head(n)

    @property
    def enabled(self) -> bool:
        return self.session.trained and self.session.settings.quality_prompts != 0

    @functools.cached_property
    def scorer(self) -> quality.QualityScorer:
        preset = self.session.preset
        own = preset.weights / "features"  # a pipeline shipping its own judge; else its data set's shared one
        return quality.QualityScorer(self.eval_set, own if own.exists() else quality.judge(preset.data))

    @functools.cached_property
    def baseline_kid(self) -> float:
        return self.scorer.summary(self.baseline[2])["kid"].estimate

    def images(self, job: Job, pipe) -> tuple[np.ndarray, torch.Tensor]:
        """The evaluation set's images and final latents for `job` (the baseline's generated once and kept)."""
        if self.baseline is None:
            images, latents = self._generate(self.session.pipe)
            self.baseline = images, latents, self.scorer.scores(images)
        return self.baseline[:2] if job.method == "baseline" else self._generate(pipe)

    def row(self, job: Job, images: np.ndarray, latents: torch.Tensor) -> dict[str, Any]:
        """Quality against the data with intervals, differences to the baseline's images of the same prompts and
        seeds with intervals, the equal-quality verdict; PSNR, SSIM, relative L2 against those images. The
        per-prompt scores are saved beside the CSV (`scores_path`) for any later analysis."""
        s = self.session
        base_images, base_latents, base_scores = self.baseline
        scores = base_scores if job.method == "baseline" else self.scorer.scores(images)
        scores.save(scores_path(s.settings.out, s.name, self.eval_set, job.label))
        summary, differences = self.scorer.summary(scores), self.scorer.compare(scores, base_scores)
        verdict = stats.verdict(differences, stats.margins(self.scorer.attributes, self.baseline_kid), len(images))
        row = {"quality_set": self.eval_set.name, "quality_images": len(images),
               "equal_quality": verdict.verdict == "equal", "verdict": verdict.verdict,
               "quality_failures": " ".join(verdict.failed), "quality_worse": " ".join(verdict.worse),
               "prompts_to_resolve": verdict.prompts_needed,
               **interval_columns(summary), **interval_columns(differences, "_diff")}
        if s.settings.measure_fidelity:
            row.update(psnr_db=psnr(images, base_images), ssim=ssim(images, base_images),
                       rel_l2_latents=rel_l2(latents, base_latents))
        return row

    def _generate(self, pipe) -> tuple[np.ndarray, torch.Tensor]:
        """Images (N, H, W, 3) and final latents of the evaluation set's prompts with its seeds (a batch takes its
        first prompt's), in calls of the timed call's batch: step caches decide on a whole batch, so their quality
        is measured as their speed is."""
        eval_set, batch = self.eval_set, self.session.settings.batch_size
        results = [self.session.call(pipe, [p.caption for p in eval_set.prompts[i:i + batch]], seed=eval_set.seeds[i])
                   for i in range(0, len(eval_set), batch)]
        return np.concatenate([r.images for r in results]), torch.cat([r.latents for r in results])
