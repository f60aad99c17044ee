"""The quality protocol on the multi-object scenes (issue 28): evaluation sets, scoring with NaN-aware intervals,
constructed losses caught per attribute."""

import dataclasses

import numpy as np
import pytest
import torch
from scipy import ndimage

from benchmarks import stats
from benchmarks.reference import data, quality, scenes, scenes_checker
from benchmarks.reference.scenes import Scenes


def test_scene_evaluation_sets_are_fixed_disjoint_and_balanced_over_counts():
    report, tune = quality.evaluation_set("report", "scenes"), quality.evaluation_set("tune", "scenes")
    assert (len(report), len(tune)) == (288, 144) and report.data == tune.data == "scenes"
    assert not set(report.prompts) & set(tune.prompts) and not set(report.seeds) & set(tune.seeds)
    assert len(set(report.prompts)) == len(report)
    assert quality.evaluation_set("report", "scenes") is report
    # the counts take turns: every prefix of three has one scene of each count
    assert [p.count for p in report.prompts[:9]] == [1, 2, 3] * 3
    assert report.head(12).prompts == report.prompts[:12]
    # other attributes are drawn uniformly: every texture and colour occurs, both relations among the pairs
    assert {p.texture for p in report.prompts} == {0, 1, 2}
    assert {o.colour for p in report.prompts for o in p.objects} == set(range(len(scenes.COLOURS)))
    assert {p.relation for p in report.prompts if p.count == 2} == {0, 1}
    # the shapes sets are a separate draw of their own data
    assert quality.evaluation_set("report").data == "shapes"
    with pytest.raises(ValueError, match="data must be one of"):
        quality.evaluation_set("report", "faces")


def test_nan_aware_mean_interval_leaves_out_what_a_prompt_does_not_ask():
    values = np.array([100.0, np.nan, 0.0, np.nan, 100.0, 100.0])
    counts = stats.bootstrap_counts(len(values), 500, seed=3)
    interval = stats.mean_interval(values, counts)
    assert interval.estimate == pytest.approx(75.0)
    assert 0.0 <= interval.low <= 75.0 <= interval.high <= 100.0
    difference = stats.paired_mean_difference(values, np.where(np.isnan(values), np.nan, 100.0), counts)
    assert difference.estimate == pytest.approx(-25.0)
    with pytest.raises(ValueError, match="every entry is NaN"):
        stats.mean_interval(np.full(4, np.nan), stats.bootstrap_counts(4, 10))


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    """A scorer on the scenes tune set's first 24 prompts with an untrained feature network (the protocol's
    mechanics do not depend on its training) fitted on 128 renders (the shipped one uses 2,048)."""
    folder = tmp_path_factory.mktemp("features")
    torch.manual_seed(0)
    scenes_data = data.data_set("scenes")
    quality.AttributeNet(heads=scenes_data.heads, resolution=scenes_data.resolution).save_pretrained(folder)

    def few_renders(seed: int) -> torch.Tensor:
        batch = scenes.sample_scenes(64, torch.Generator().manual_seed(seed))
        return torch.cat([scenes.render(batch, torch.Generator().manual_seed(seed + 1 + k)) for k in range(2)])

    evaluation = dataclasses.replace(scenes_data.evaluation, feature_renders=few_renders)
    patched = pytest.MonkeyPatch()
    patched.setitem(data.DATA_SETS, "scenes", dataclasses.replace(scenes_data, evaluation=evaluation))
    quality.feature_space.cache_clear()
    try:
        yield quality.QualityScorer(quality.evaluation_set("tune", "scenes").head(24), folder, per_prompt=2,
                                    resamples=500)
    finally:
        patched.undo()
        quality.feature_space.cache_clear()


def _renders(prompts, seed: int = 11) -> np.ndarray:
    return scenes_checker.reference_images(prompts, 1, seed).permute(0, 2, 3, 1).numpy()


def test_scenes_protocol_scores_the_data_as_right_and_catches_constructed_losses(scorer):
    prompts = list(scorer.eval_set.prompts)
    clean = scorer.scores(_renders(prompts))
    assert scorer.attributes == scenes_checker.ATTRIBUTES
    assert clean.correct.shape == (24, len(scenes_checker.ATTRIBUTES))
    relation = scenes_checker.ATTRIBUTES.index("relation")
    assert np.array_equal(np.isnan(clean.correct[:, relation]), [p.count != 2 for p in prompts])
    summary = scorer.summary(clean)
    for name in ("adherence", "all_correct", "adherence_count", "adherence_relation", "adherence_shape"):
        assert summary[name].estimate == 100.0, name
    assert summary["detail"].estimate > 90
    base = clean
    rules = stats.margins(scorer.attributes, summary["kid"].estimate)

    # the last object of every scene of two or three objects left out: count fails, position / colour shares drop
    dropped = [dataclasses.replace(p, objects=p.objects[:-1]) if p.count > 1 else p for p in prompts]
    differences = scorer.compare(scorer.scores(_renders(dropped)), base)
    assert differences["adherence_count"].estimate == pytest.approx(-100 * np.mean([p.count > 1 for p in prompts]))
    ok, failed = stats.equal_quality(differences, rules)
    assert not ok and "adherence_count" in failed and "adherence_texture" not in failed

    # a blur keeps every attribute readable and fails the detail
    blurred = ndimage.gaussian_filter(_renders(prompts), (0, 1.2, 1.2, 0))
    ok, failed = stats.equal_quality(scorer.compare(scorer.scores(blurred), base), rules)
    assert not ok and "detail" in failed and not any(f.startswith("adherence") for f in failed)


def test_scene_detail_statistics_see_every_object():
    """Outline and shading are averaged over the objects: removing one object's outline lowers the outline."""
    batch = Scenes.from_list([scenes.Scene(((0, 0, 1, 0), (2, 1, 1, 8)), 1)])
    full = scenes.render(batch, torch.Generator().manual_seed(2)).permute(0, 2, 3, 1).numpy()[0]
    flat = scenes.render(batch, torch.Generator().manual_seed(2), outline=False).permute(0, 2, 3, 1).numpy()[0]
    sharp, outline, shading, texture = scenes_checker.detail_statistics(full)
    assert outline > 0.3 and shading > 0.1 and texture > 1e-3
    assert scenes_checker.detail_statistics(flat)[1] < 0.1
