"""The multi-object scenes of the 1,024-token reference model and their analytic checker (issue 28)."""

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks.reference import scenes, scenes_checker as checker
from benchmarks.reference.scenes import Scene, SceneObject, Scenes

N = 200
RENDER_SEED = 1


@pytest.fixture(scope="module")
def sample() -> tuple[list[Scene], torch.Tensor]:
    batch = scenes.sample_scenes(N, torch.Generator().manual_seed(0))
    return batch.to_list(), scenes.render(batch, torch.Generator().manual_seed(RENDER_SEED))


def as_numpy(images: torch.Tensor) -> np.ndarray:
    return images.permute(0, 2, 3, 1).numpy()


def render(batch: list[Scene]) -> np.ndarray:
    """(B, H, W, 3) renders with a fixed nuisance seed (the nuisance draws do not depend on the scenes)."""
    return as_numpy(scenes.render(Scenes.from_list(batch), torch.Generator().manual_seed(RENDER_SEED)))


def rates(scores: np.ndarray) -> dict[str, float]:
    return {a: round(float(np.nanmean(scores[:, i])), 4) for i, a in enumerate(checker.ATTRIBUTES)}


def test_every_attribute_of_every_object_is_read_off_clean_renders(sample):
    batch, images = sample
    assert {s.count for s in batch} == {1, 2, 3} and {s.texture for s in batch} == {0, 1, 2}
    found = [checker.analyse(image) for image in as_numpy(images)]
    assert all(len(f.objects) == s.count for f, s in zip(found, batch))
    per_object = np.array([[getattr(d, a) == getattr(o, a) for a in checker.OBJECT_ATTRIBUTES]
                           for s, f in zip(batch, found) for o, d in zip(s.objects, checker.match(s, f))])
    assert per_object.mean(0).min() >= 0.99, per_object.mean(0)
    scores = checker.adherence(as_numpy(images), batch)
    assert scores.shape == (N, len(checker.ATTRIBUTES))
    assert min(rates(scores).values()) >= 0.99, rates(scores)
    relation = scores[:, checker.ATTRIBUTES.index("relation")]
    assert np.array_equal(np.isnan(relation), [s.count != 2 for s in batch])


def test_readable_after_a_4x_pool_and_bilinear_upsampling(sample):
    """A proxy for the detail a 32 x 32 latent holds: every attribute stays readable."""
    batch, images = sample
    coarse = F.interpolate(F.avg_pool2d(images, 4), scale_factor=4, mode="bilinear", align_corners=False)
    found = rates(checker.adherence(as_numpy(coarse), batch))
    print("per-attribute rate after a 4x pool and bilinear upsampling:", found)
    assert min(found.values()) >= 0.97, found


def test_a_swapped_colour_scores_zero_on_that_object_only(sample):
    batch = [s for s in sample[0] if s.count >= 2][:24]
    slot = [i % s.count for i, s in enumerate(batch)]
    swapped = [Scene(tuple(o._replace(colour=(o.colour + 3) % 6) if j == k else o for j, o in enumerate(s.objects)),
                     s.texture) for s, k in zip(batch, slot)]
    for image, scene, k in zip(render(swapped), batch, slot):
        found = checker.analyse(image)
        right = [d is not None and d.colour == o.colour for o, d in zip(scene.objects, checker.match(scene, found))]
        assert right == [j != k for j in range(scene.count)]
        score = checker.score(image, scene)
        assert score["colour"] == pytest.approx(1 - 1 / scene.count)
        assert all(v == 1 for a, v in score.items() if a != "colour" and not np.isnan(v))


def test_a_missing_object_scores_zero_on_count_and_on_its_attributes(sample):
    batch = [s for s in sample[0] if s.count >= 2][:24]
    slot = [i % s.count for i, s in enumerate(batch)]
    removed = [Scene(s.objects[:k] + s.objects[k + 1:], s.texture) for s, k in zip(batch, slot)]
    for image, scene, k in zip(render(removed), batch, slot):
        matched = checker.match(scene, checker.analyse(image))
        assert [d is None for d in matched] == [j == k for j in range(scene.count)]
        score = checker.score(image, scene)
        assert score["count"] == 0 and score["texture"] == 1
        for a in checker.OBJECT_ATTRIBUTES:
            assert score[a] == pytest.approx(1 - 1 / scene.count)
        if scene.count == 2:
            assert score["relation"] == 0


def test_another_texture_scores_zero_on_texture(sample):
    batch = sample[0][:30]
    other = [Scene(s.objects, (s.texture + 1 + i % 2) % 3) for i, s in enumerate(batch)]
    scores = checker.adherence(render(other), batch)
    found = rates(scores)
    assert found["texture"] == 0
    assert all(v == 1 for a, v in found.items() if a != "texture"), found


def test_a_wrong_relation_scores_zero():
    """Two objects in the caption's cells swapped: positions and relation wrong, the rest right."""
    scene = Scene((SceneObject(0, 0, 1, 0), SceneObject(4, 1, 0, 2)), 1)  # red circle left of a blue square
    swapped = Scene((SceneObject(4, 1, 0, 0), SceneObject(0, 0, 1, 2)), 1)
    assert scene.caption.endswith("at the top left, left of a small blue square at the top right")
    score = checker.score(render([swapped])[0], scene)
    assert score["relation"] == 0 and score["position"] == 0
    assert score["colour"] == score["shape"] == score["size"] == score["count"] == score["texture"] == 1


def test_captions_parse_back_to_their_scenes_and_stay_short(sample):
    batch = sample[0]
    captions = scenes.scene_captions(Scenes.from_list(batch))
    assert [scenes.parse_caption(c) for c in captions] == batch
    assert len(set(captions)) == len(set(batch))
    words = set(scenes.caption_words())
    for caption in captions:
        tokens = re.findall(r"\w+|[^\w\s]+", caption)  # the tokenizer's whitespace pre-tokenizer
        assert set(tokens) <= words and len(tokens) <= 40, caption
    assert scenes.parse_caption("One object on a plain background: a large red circle in the center") == Scene(
        (SceneObject(0, 0, 1, 4),), 0)


def test_rendering_is_deterministic_by_seed():
    batch = scenes.sample_scenes(6, torch.Generator().manual_seed(3))
    again = scenes.sample_scenes(6, torch.Generator().manual_seed(3))
    assert batch.to_list() == again.to_list()
    first = scenes.render(batch, torch.Generator().manual_seed(4))
    assert torch.equal(first, scenes.render(again, torch.Generator().manual_seed(4)))
    assert not torch.equal(first, scenes.render(batch, torch.Generator().manual_seed(5)))
    assert first.shape == (6, 3, 128, 128) and 0 <= first.min() and first.max() <= 1
    assert Scenes.from_list(batch.to_list()).to_list() == batch.to_list()


@pytest.mark.parametrize("objects, message", [
    ((), "1 to 3 objects"),
    (((0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 0, 2), (0, 0, 0, 3)), "1 to 3 objects"),
    (((0, 0, 0, 4), (0, 0, 0, 4)), "distinct cells"),
    (((0, 0, 0, 5), (0, 0, 0, 1)), "reading order"),
    (((6, 0, 0, 0),), "colour index"),
    (((0, 0, 2, 0),), "size index"),
])
def test_bad_scenes_are_refused(objects, message):
    with pytest.raises(ValueError, match=message):
        Scene(objects, 0)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="texture index"):
        Scene(((0, 0, 0, 0),), 3)
    empty_first = torch.tensor([[-1, 0, -1]])
    with pytest.raises(ValueError, match="first object"):
        Scenes(empty_first, empty_first, empty_first, empty_first, torch.tensor([0]))
    with pytest.raises(ValueError, match="shape"):
        Scenes(*(torch.zeros(2, 2, dtype=torch.long),) * 4, torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="number of scenes"):
        scenes.sample_scenes(0, torch.Generator())
    with pytest.raises(ValueError, match="resolution"):
        scenes.render(scenes.sample_scenes(1, torch.Generator()), torch.Generator(), resolution=16)
    with pytest.raises(ValueError, match="not a scene caption"):
        scenes.parse_caption("a red circle")
    with pytest.raises(ValueError, match="contradicts"):
        scenes.parse_caption("two objects on a plain background: a large red circle at the top left")
    with pytest.raises(ValueError, match="square"):
        checker.analyse(np.zeros((64, 32, 3)))
    with pytest.raises(ValueError, match="same length"):
        checker.adherence(np.zeros((2, 64, 64, 3)), [Scene(((0, 0, 0, 0),), 0)])
