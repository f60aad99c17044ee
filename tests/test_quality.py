"""Image-quality metrics on constructed images: the analytic adherence checker, FID and KID."""

import numpy as np
import pytest
import torch

from benchmarks.reference import quality, shapes, shapes_checker


def _render(rows, seed=0):
    """(B, H, W, 3) numpy renders of scenes given as attribute-index rows (colour, shape, size, position, texture)."""
    index = torch.tensor(rows)
    return shapes.render(shapes.Scenes(*index.T), torch.Generator().manual_seed(seed)).permute(0, 2, 3, 1).numpy()


def _all_values():
    """A few scenes that together use every value of every attribute."""
    return [[c, c % 3, c % 2, p, p % 3] for c in range(6) for p in (c, 8 - c)] + [[0, 1, 1, 6, 2], [3, 2, 0, 7, 1]]


def test_renders_of_every_attribute_value_score_one():
    rows = _all_values()
    ok = shapes_checker.adherence(_render(rows), [shapes_checker.Prompt(*r) for r in rows])
    assert ok.all(), np.argwhere(~ok)


def test_checker_reads_the_whole_attribute_grid():
    grid = shapes.scene_grid()
    rows = torch.stack([getattr(grid, a) for a in shapes.ATTRIBUTES], 1).tolist()
    table = shapes_checker.adherence_table(_render(rows, seed=3), [shapes_checker.Prompt(*r) for r in rows])
    assert min(table[a] for a in shapes.ATTRIBUTES) >= 0.99, table


@pytest.mark.parametrize("attribute, wrong", [("colour", 3), ("shape", 2), ("size", 0), ("position", 8), ("texture", 0)])
def test_a_wrong_attribute_scores_zero_for_it_only(attribute, wrong):
    right = [1, 0, 1, 0, 1]  # a large yellow circle at the top left on a striped background
    image = right.copy()
    image[shapes.ATTRIBUTES.index(attribute)] = wrong
    ok = shapes_checker.adherence(_render([image]), [shapes_checker.Prompt(*right)])[0]
    expected = [a != attribute for a in shapes.ATTRIBUTES]
    assert ok.tolist() == expected


def test_an_empty_image_meets_no_object_attribute():
    blank = np.full((1, 64, 64, 3), 0.5)
    found = shapes_checker.analyse(blank[0])
    assert found["colour"] == found["shape"] == found["size"] == found["position"] == -1
    assert found["texture"] == shapes.TEXTURES.index("plain")
    table = shapes_checker.adherence_table(blank, [shapes_checker.Prompt(0, 0, 0, 0, 0)])
    assert table["colour"] == table["position"] == 0.0 and table["texture"] == 1.0 and table["all_correct"] == 0.0


def test_checker_errors_name_the_bad_input():
    with pytest.raises(ValueError, match="image must be"):
        shapes_checker.analyse(np.zeros((64, 64)))
    with pytest.raises(ValueError, match="same length"):
        shapes_checker.adherence(np.zeros((2, 64, 64, 3)), [shapes_checker.Prompt(0, 0, 0, 0, 0)])
    with pytest.raises(ValueError, match="number of prompts"):
        shapes_checker.evaluation_prompts(0)


def test_evaluation_prompts_are_fixed_distinct_and_balanced():
    prompts = shapes_checker.evaluation_prompts(54)
    assert prompts == shapes_checker.evaluation_prompts(54)
    assert len(set(prompts)) == 54
    for i, values in enumerate(shapes.VOCABULARY.values()):
        counts = np.bincount([p.expected()[shapes.ATTRIBUTES[i]] for p in prompts], minlength=len(values))
        assert counts.max() - counts.min() <= 1, (shapes.ATTRIBUTES[i], counts)


def test_fid_of_a_set_against_itself_and_a_shifted_set():
    g = np.random.default_rng(0)
    a = g.normal(size=(400, 8))
    b = g.normal(size=(400, 8))  # same distribution, other samples
    shifted = b + 0.5
    assert quality.frechet_distance(a, a) < 1e-6
    assert quality.frechet_distance(a, b) < 0.3 < quality.frechet_distance(a, shifted)
    # FID = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2): a shift s of one set changes only the mean term
    gap = a.mean(0) - b.mean(0)
    expected = quality.frechet_distance(a, b) + 8 * 0.25 - 2 * 0.5 * gap.sum()
    assert quality.frechet_distance(a, shifted) == pytest.approx(expected, rel=1e-6)


def test_shipped_feature_network_separates_data_from_degraded_images():
    """Distances in the feature space of the trained attribute network: renders vs other renders near zero, noisy or
    blurred renders clearly farther (KID's interval above the clean one's, FID larger)."""
    eval_set = quality.evaluation_set("tune").head(32)
    scorer = quality.QualityScorer(eval_set, quality.judge(), resamples=500)
    renders = shapes_checker.reference_images(eval_set.prompts, per_prompt=1, seed=7).permute(0, 2, 3, 1).numpy()
    clean = scorer.summary(scorer.scores(renders))
    assert clean["adherence"].estimate == 100.0
    noisy = np.clip(renders + np.random.default_rng(0).normal(0, 0.15, renders.shape), 0, 1)
    blurred = torch.nn.functional.avg_pool2d(torch.from_numpy(renders).permute(0, 3, 1, 2), 5, 1, 2)
    blurred = blurred.permute(0, 2, 3, 1).numpy()
    for degraded in (noisy, blurred):
        scores = scorer.summary(scorer.scores(degraded))
        assert scores["fid"].estimate > 2 * clean["fid"].estimate and scores["kid"].low > clean["kid"].high


def test_paired_differences_between_two_saved_settings(tmp_path):
    """`python -m benchmarks.compare`: A - B from the per-prompt scores a run saved, on the same prompts; a setting
    against itself differs by exactly 0, a setting that gets one attribute wrong on half the prompts by that share."""
    from benchmarks.compare import main
    from benchmarks.judging import scores_path

    eval_set = quality.evaluation_set("tune").head(16)
    scorer = quality.QualityScorer(eval_set, quality.judge(), resamples=200)
    renders = shapes_checker.reference_images(eval_set.prompts, per_prompt=1, seed=7).permute(0, 2, 3, 1).numpy()
    exact = scorer.scores(renders)
    wrong = quality.SetScores(exact.correct.copy(), exact.features, exact.detail)
    wrong.correct[:8, 0] = 0.0  # the first attribute (colour, asked by every prompt) wrong on the first 8 prompts
    exact.save(scores_path(tmp_path, "pixart-shapes", eval_set, "sdtm"))
    wrong.save(scores_path(tmp_path, "pixart-shapes", eval_set, "sdtm match_dim=64"))
    run = ["--run", str(tmp_path), "--model", "pixart-shapes", "--set", "tune", "16"]
    same = main([*run, "sdtm", "sdtm"])
    assert (same[["difference", "low", "high"]] == 0).all().all()
    table = main([*run, "sdtm:match_dim=64", "sdtm"])
    expected = (wrong.correct[:, 0] - exact.correct[:, 0]).mean() * 100
    assert expected == -50.0 and table.loc["adherence_colour", "difference"] == pytest.approx(expected)
    assert table.loc["adherence_colour", "high"] < 0 and table.loc["fid", "difference"] == 0
    with pytest.raises(FileNotFoundError, match="no saved scores"):
        main([*run, "tome", "sdtm"])
