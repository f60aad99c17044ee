"""The quality protocol: disjoint tune / report sets, paired-bootstrap intervals, the non-inferiority rule, distances
that resolve, and the detail measure."""

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage

from benchmarks import stats
from benchmarks.reference import quality, shapes, shapes_checker

ATTRIBUTES = shapes_checker.ATTRIBUTES


@pytest.fixture(scope="module")
def scorer():
    """A scorer on the first 48 prompts of the tune set (the shipped attribute network)."""
    return quality.QualityScorer(quality.evaluation_set("tune").head(48), quality.judge(), resamples=1000)


def _renders(eval_set, seed=7, **kwargs):
    """(N, H, W, 3) renders of the set's prompts with nuisance draws of `seed` (other than the reference's)."""
    index = torch.tensor([[p.colour, p.shape, p.size, p.position, p.texture] for p in eval_set.prompts])
    return shapes.render(shapes.Scenes(*index.T), torch.Generator().manual_seed(seed), **kwargs).permute(0, 2, 3, 1).numpy()


# -- the sets ---------------------------------------------------------------------------------------------------------
def test_tune_and_report_sets_share_no_prompt_and_no_seed():
    tune, report = quality.evaluation_set("tune"), quality.evaluation_set("report")
    assert len(report) >= 256 and len(tune) >= 128
    assert not set(tune.prompts) & set(report.prompts)
    assert len(set(report.prompts)) == len(report) and len(set(tune.prompts)) == len(tune)
    assert not set(tune.seeds) & set(report.seeds)
    per_prompt = 4  # the scorer's data renders draw nuisance seeds reference_seed + k
    renders = {s.name: set(range(s.reference_seed, s.reference_seed + per_prompt)) for s in (tune, report)}
    assert not renders["tune"] & renders["report"]
    assert not (renders["tune"] | renders["report"]) & (set(tune.seeds) | set(report.seeds))
    # every attribute value equally often in the report set, and nearly so in the CPU default's prefix
    for eval_set, slack in ((report, 0), (report.head(64), 1)):
        for attribute, values in shapes.VOCABULARY.items():
            counts = np.bincount([getattr(p, attribute) for p in eval_set.prompts], minlength=len(values))
            assert counts.max() - counts.min() <= slack, (eval_set.name, len(eval_set), attribute, counts)
    assert quality.evaluation_set("report") is report  # fixed: built once, the same every time


def test_bad_evaluation_set_requests_are_clear_errors(scorer):
    with pytest.raises(ValueError, match="evaluation set must be one of"):
        quality.evaluation_set("test")
    with pytest.raises(ValueError, match=r"quality prompts must be in \[2, 144\]"):
        quality.evaluation_set("tune").head(1)
    with pytest.raises(ValueError, match="one per prompt of the tune set"):
        scorer.scores(np.zeros((3, 64, 64, 3)))


def test_evaluation_prompts_leave_out_excluded_scenes():
    first = shapes_checker.evaluation_prompts(100, seed=3)
    second = shapes_checker.evaluation_prompts(100, seed=3, exclude=first)
    assert not set(first) & set(second)
    with pytest.raises(ValueError, match=r"must be in \[1, 872\]"):
        shapes_checker.evaluation_prompts(873, exclude=first)


# -- intervals and the rule -------------------------------------------------------------------------------------------
def test_bootstrap_interval_covers_the_true_difference_at_its_nominal_rate():
    """Per-prompt differences like attribute flips (-20 / 0 / +20 points with chances 0.15 / 0.8 / 0.05: a true mean
    difference of -2 points): the 95 % interval must contain it in about 95 % of 400 independent data sets of 120
    prompts (the binomial spread of the rate at 400 trials is +-2.2 points)."""
    rng = np.random.default_rng(0)
    n, trials, true_difference = 120, 400, -2.0
    covered = 0
    for trial in range(trials):
        base = rng.integers(0, 6, n) * 20.0  # 0..5 attributes right, in points
        method = base + rng.choice([-20.0, 0.0, 20.0], size=n, p=[0.15, 0.8, 0.05])
        interval = stats.paired_mean_difference(method, base, stats.bootstrap_counts(n, 1000, seed=trial))
        covered += interval.low <= true_difference <= interval.high
    assert 0.92 <= covered / trials <= 0.98, covered / trials


def test_paired_interval_is_narrower_than_an_unpaired_one_for_correlated_methods():
    rng = np.random.default_rng(1)
    base = rng.random(200) < 0.6
    method = np.where(rng.random(200) < 0.05, ~base, base)  # 5 % of the readings differ
    counts = stats.bootstrap_counts(200, 2000, seed=1)
    paired = stats.paired_mean_difference(method * 100.0, base * 100.0, counts)
    alone = stats.mean_interval(base * 100.0, counts)
    assert paired.high - paired.low < 0.5 * (alone.high - alone.low)


def test_non_inferiority_rule_on_intervals():
    rules = stats.margins(ATTRIBUTES, baseline_kid=10.0)
    same = {r.metric: stats.Interval(0.0, 0.0, 0.0) for r in rules}
    assert stats.equal_quality(same, rules) == (True, [])
    # an interval whose lower end reaches below the margin fails, even with a point estimate of zero
    wide = {**same, "adherence": stats.Interval(0.0, -2.5, 2.5)}
    assert stats.equal_quality(wide, rules) == (False, ["adherence"])
    shape = {**same, "adherence_shape": stats.Interval(-3.0, -5.5, -0.5)}
    assert stats.equal_quality(shape, rules) == (False, ["adherence_shape"])
    kid = {**same, "kid": stats.Interval(1.0, 0.2, 2.5)}  # margin: 20 % of the baseline's 10
    assert stats.equal_quality(kid, rules) == (False, ["kid"])
    assert stats.equal_quality({**same, "kid": stats.Interval(1.0, 0.2, 1.9)}, rules)[0]
    with pytest.raises(ValueError, match="no interval for metric"):
        stats.equal_quality({"adherence": stats.Interval(0, 0, 0)}, rules)
    with pytest.raises(ValueError, match="at least 2 prompts"):
        stats.bootstrap_counts(1)


def test_three_way_verdicts_and_the_prompts_that_would_resolve_them():
    rules = stats.margins(ATTRIBUTES, baseline_kid=10.0)  # KID margin +2
    same = {r.metric: stats.Interval(0.0, 0.0, 0.0) for r in rules}
    assert stats.verdict(same, rules, 288) == stats.Verdict("equal", (), (), pytest.approx(float("nan"), nan_ok=True))
    # a loss shown: the whole interval past the margin
    worse = stats.verdict({**same, "kid": stats.Interval(4.0, 2.5, 5.5), "detail": stats.Interval(-1, -2.5, 0.5)},
                          rules, 288)
    assert worse.verdict == "worse" and worse.worse == ("kid",) and worse.failed == ("detail", "kid")
    # neither: a KID estimate of +1 whose interval reaches +3; the half-width 2 must shrink to the room 1: 4x prompts
    open_ = stats.verdict({**same, "kid": stats.Interval(1.0, -1.0, 3.0)}, rules, 100)
    assert open_.verdict == "inconclusive" and open_.failed == ("kid",) and open_.prompts_needed == 400
    # an estimate already past its margin: more prompts would not show equality
    past = stats.verdict({**same, "adherence": stats.Interval(-2.5, -4.0, -1.0)}, rules, 100)
    assert past.verdict == "inconclusive" and past.prompts_needed == float("inf")
    # the most demanding failing metric decides
    two = stats.verdict({**same, "kid": stats.Interval(1.0, -1.0, 3.0), "adherence": stats.Interval(-1.0, -4.0, 2.0)},
                        rules, 100)
    assert two.prompts_needed == 900


def test_non_inferiority_accepts_an_identical_method_and_rejects_constructed_losses(scorer):
    clean = _renders(scorer.eval_set)
    base = scorer.scores(clean)
    rules = stats.margins(ATTRIBUTES, scorer.summary(base)["kid"].estimate)
    assert stats.equal_quality(scorer.compare(scorer.scores(clean.copy()), base), rules) == (True, [])
    # a third of the shapes drawn wrong: the shape attribute fails
    rows = np.array([[p.colour, p.shape, p.size, p.position, p.texture] for p in scorer.eval_set.prompts])
    rows[::3, 1] = (rows[::3, 1] + 1) % 3
    wrong = shapes.render(shapes.Scenes(*torch.tensor(rows).T), torch.Generator().manual_seed(7))
    ok, failed = stats.equal_quality(scorer.compare(scorer.scores(wrong.permute(0, 2, 3, 1).numpy()), base), rules)
    assert not ok and "adherence_shape" in failed and "adherence_colour" not in failed
    # blurred: every attribute still read right, the detail fails
    blurred = ndimage.gaussian_filter(clean, (0, 0.8, 0.8, 0))
    ok, failed = stats.equal_quality(scorer.compare(scorer.scores(blurred), base), rules)
    assert not ok and "detail" in failed and not any(f.startswith("adherence") for f in failed)


# -- distances --------------------------------------------------------------------------------------------------------
def test_kid_is_zero_for_the_data_and_grows_with_a_shift():
    rng = np.random.default_rng(2)
    n, p, d = 150, 4, 16
    reference = rng.normal(size=(n, p, d))
    counts = stats.bootstrap_counts(n, 1000, seed=2)
    kids = []
    for shift in (0.0, 0.25, 0.5, 1.0):
        x = rng.normal(size=(n, d)) + shift
        matrix = quality.kid_matrix(x, reference)
        kids.append(stats.percentile_interval(quality.paired_kid(matrix), quality.paired_kid(matrix, counts)))
    same = kids[0]
    assert same.low < 0 < same.high and same.high - same.low < 0.1  # ~0 with a small standard error
    assert all(a.estimate < b.estimate for a, b in zip(kids, kids[1:]))
    assert kids[2].low > same.high  # a shift of half a standard deviation is resolved


def test_kid_leaves_out_pairs_of_the_same_prompt():
    """Generated images that match their own prompt's data renders closely: KID over all pairs is far below zero
    (same-prompt pairs are not independent draws), the paired estimator is ~0 (the data against itself)."""
    rng = np.random.default_rng(3)
    reference = rng.normal(size=(200, 4, 8)) + rng.normal(size=(200, 1, 8)) * 3  # prompts differ strongly
    x, others = reference[:, 0] + 0.01 * rng.normal(size=(200, 8)), reference[:, 1:]
    matrix = quality.kid_matrix(x, others)
    paired = stats.percentile_interval(quality.paired_kid(matrix),
                                       quality.paired_kid(matrix, stats.bootstrap_counts(200, 1000)))
    flat = others.reshape(-1, 8)
    k = lambda a, b: (a @ b.T / 8 + 1) ** 3  # noqa: E731
    n, m = len(x), len(flat)
    all_pairs = ((k(x, x).sum() - np.trace(k(x, x))) / (n * (n - 1))
                 + (k(flat, flat).sum() - np.trace(k(flat, flat))) / (m * (m - 1)) - 2 * k(x, flat).mean())
    assert paired.low < 0 < paired.high and all_pairs < paired.low - 2 * (paired.high - paired.low)


def test_weighted_statistics_equal_the_statistics_of_the_resampled_set():
    rng = np.random.default_rng(4)
    x, reference = rng.normal(size=(30, 5)), rng.normal(size=(30, 3, 5)) + 0.3
    counts = np.zeros((1, 30))
    draw = rng.integers(0, 30, 30)
    np.add.at(counts[0], draw, 1)
    assert quality.frechet_distance(x, reference, counts)[0] == pytest.approx(
        quality.frechet_distance(x[draw], reference[draw]), rel=1e-9)
    assert quality.frechet_distance(x, reference, np.ones((1, 30)))[0] == pytest.approx(
        quality.frechet_distance(x, reference))
    # KID of a draw: the same-prompt pairs (repeats of one prompt included) left out
    matrix = quality.kid_matrix(x, reference)
    resampled = matrix[np.ix_(draw, draw)]
    keep = draw[:, None] != draw[None, :]
    assert quality.paired_kid(matrix, counts)[0] == pytest.approx(resampled[keep].mean(), rel=1e-9)


def test_feature_space_is_low_dimensional_and_whitened_on_the_data():
    space = quality.feature_space(str(quality.judge()))
    renders = shapes_checker.reference_images(quality.evaluation_set("report").prompts, 1, seed=5)
    features = space(renders)
    assert features.shape == (288, quality.FEATURE_DIM) and quality.FEATURE_DIM * 8 <= 288
    assert np.abs(features.mean(0)).max() < 0.25 and 0.6 < features.std(0).mean() < 1.4


def test_data_scores_equal_quality_to_data_and_kid_near_zero(scorer):
    summary = scorer.summary(scorer.scores(_renders(scorer.eval_set)))
    assert summary["adherence"].estimate == 100.0
    kid = summary["kid"]
    assert kid.low < 0 < kid.high and kid.high - kid.low < 15
    assert summary["fid"].low <= summary["fid"].estimate <= summary["fid"].high


# -- detail -----------------------------------------------------------------------------------------------------------
def test_detail_measure_ranks_blurred_and_unshaded_renders_below_clean_ones(scorer):
    clean = _renders(scorer.eval_set)
    variants = {
        "blurred": ndimage.gaussian_filter(clean, (0, 0.7, 0.7, 0)),
        "unshaded": _renders(scorer.eval_set, shading=False),
        "no outline": _renders(scorer.eval_set, outline=False),
    }
    detail = {name: scorer.summary(scorer.scores(images)) for name, images in {"clean": clean, **variants}.items()}
    assert detail["clean"]["detail"].estimate > 90
    for name in variants:
        assert detail[name]["detail"].high < detail["clean"]["detail"].low, name
    # each loss shows in its own statistic
    assert detail["unshaded"]["detail_shading"].estimate < 30 < detail["clean"]["detail_shading"].estimate
    assert detail["no outline"]["detail_outline"].estimate < 30 < detail["clean"]["detail_outline"].estimate
    assert detail["blurred"]["detail_sharpness"].estimate < detail["clean"]["detail_sharpness"].estimate - 20


def test_detail_statistics_of_a_blank_image():
    blank = np.full((64, 64, 3), 0.5)
    sharpness, outline, shading, texture = shapes_checker.detail_statistics(blank)
    assert sharpness == outline == shading == texture == 0.0
    assert quality.detail_similarity(np.zeros((1, 4)), np.zeros((1, 4))).tolist() == [[1.0] * 4]


# -- the harness ------------------------------------------------------------------------------------------------------
def test_harness_rows_carry_intervals_verdicts_and_saved_scores(tmp_path):
    from benchmarks.cli import main

    out = tmp_path / "run"
    table = main(["--model", "pixart-shapes", "--quick", "--no-latency", "--eval-set", "tune", "--quality-prompts",
                  "6", "--out", str(out), "--method", "baseline", "sdtm:ratio=0.5,protect_steps_frequency=-1",
                  "--log-level", "WARNING"]).set_index("method")
    base, merged = table.loc["baseline"], table.loc["sdtm"]
    assert base["quality_set"] == "tune" and base["quality_images"] == 6
    assert bool(base["equal_quality"]) and base["adherence_diff"] == 0 and base["kid_diff_high"] == 0
    for row in (base, merged):
        for name in ("adherence", "detail", "kid", "fid"):
            assert row[f"{name}_low"] <= row[name] <= row[f"{name}_high"], name
    assert merged["adherence_diff_low"] <= merged["adherence_diff"] <= merged["adherence_diff_high"]
    scores = quality.SetScores.load(out / "scores" / "pixart-shapes" / "tune6" / "baseline.npz")
    assert scores.correct.shape == (6, 5) and scores.features.shape == (6, quality.FEATURE_DIM)
    # the baseline's adherence is the mean of its saved per-prompt readings
    assert base["adherence"] == pytest.approx(scores.correct.mean() * 100)
    saved = pd.read_csv(out / "results.csv")
    assert set(saved["equal_quality"].astype(str)) <= {"True", "False"}
