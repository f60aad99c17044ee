"""The data sets a reference model is trained on, behind one interface for training, features and monitoring.

- ``shapes`` (`benchmarks.reference.shapes`): one shaded shape on a textured background, 64 px, 256 latent tokens
  (`pixart-shapes`).
- ``shapes128``: the same scenes, captions and checker rendered at 128 px, 1,024 latent tokens (issue 41).
- ``scenes`` (`benchmarks.reference.scenes`): one to three objects with a relation, finer textures, 128 px, 1,024
  latent tokens (issue 28).

    data = DATA_SETS["scenes"]
    batch = data.sample(8, torch.Generator().manual_seed(0))
    images = data.render(batch, torch.Generator().manual_seed(1))   # (8, 3, 128, 128) in [0, 1]
    captions, labels = data.captions(batch), data.labels(batch)     # the text and the feature network's targets
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Sequence

import numpy as np
import torch

from . import scenes, scenes_checker, shapes, shapes_checker


@dataclass(frozen=True)
class Evaluation:
    """The data-specific part of the quality protocol (`benchmarks.reference.quality`).

    Attributes:
        attributes: the adherence columns, in order.
        prompts: ``(n, seed, exclude) -> list`` of `n` distinct prompts not in `exclude` (hashable, each with a
            ``caption``), every prefix balanced.
        adherence: ``(images (N, H, W, 3) in [0, 1], prompts) -> (N, A)`` per attribute, 1 right, 0 wrong (a share
            for attributes of several objects), NaN where the prompt does not ask for it.
        detail: ``image (H, W, 3) -> (4,)`` its `detail.DETAIL_STATISTICS`.
        references: ``(prompts, per_prompt, seed) -> (per_prompt * N, 3, R, R)`` renders of the prompts (prompt-major
            within each draw: the k-th draw of prompt i is row ``k * N + i``).
        feature_renders: ``seed -> (M, 3, R, R)`` the renders a feature space is fitted on.
    """

    attributes: tuple[str, ...]
    prompts: Callable[[int, int, Sequence[Any]], list[Any]]
    adherence: Callable[[np.ndarray, Sequence[Any]], np.ndarray]
    detail: Callable[[np.ndarray], np.ndarray]
    references: Callable[[Sequence[Any], int, int], torch.Tensor]
    feature_renders: Callable[[int], torch.Tensor]


@dataclass(frozen=True)
class DataSet:
    """One procedural captioned data set.

    Attributes:
        name: its key in `DATA_SETS`.
        resolution: image side in pixels.
        words: the captions' vocabulary, in tokenizer order: a data set that extends another keeps the other's words
            first, so that a model trained on it keeps its word ids.
        sample: ``(n, generator) -> batch`` of scene descriptions.
        render: ``(batch, generator) -> (B, 3, R, R)`` images in [0, 1].
        captions: ``batch -> list[str]``.
        labels: ``batch -> {head: (B,) long}``, the targets of the feature network (`quality.AttributeNet`).
        heads: ``{head: classes}``.
        monitor: ``n -> (captions, score)``: a fixed prompt set and ``(B, R, R, 3) images -> {attribute: adherence}``.
        reference_prompts: the captions of the stored reference sample of an exported pipeline.
        evaluation: how generated images are scored.
    """

    name: str
    resolution: int
    words: tuple[str, ...]
    sample: Callable[[int, torch.Generator], Any]
    render: Callable[[Any, torch.Generator], torch.Tensor]
    captions: Callable[[Any], list[str]]
    labels: Callable[[Any], dict[str, torch.Tensor]]
    heads: dict[str, int]
    monitor: Callable[[int], tuple[list[str], Callable[[np.ndarray], dict[str, float]]]]
    reference_prompts: tuple[str, ...]
    evaluation: Evaluation


def _shapes_monitor(n: int) -> tuple[list[str], Callable[[np.ndarray], dict[str, float]]]:
    prompts = shapes_checker.evaluation_prompts(n)
    return [p.caption for p in prompts], lambda images: shapes_checker.adherence_table(images, prompts)


def _shapes_feature_renders(seed: int, resolution: int = shapes.RESOLUTION) -> torch.Tensor:
    """Every scene of the attribute grid, two nuisance draws each."""
    grid = shapes.scene_grid()
    return torch.cat([shapes.render(grid, torch.Generator().manual_seed(seed + k), resolution) for k in range(2)])


def _shapes_data(name: str, resolution: int) -> DataSet:
    """The single-shape data rendered at `resolution` px; the checker reads any size."""
    return DataSet(
        name, resolution, tuple(shapes.caption_words()), shapes.sample_scenes,
        partial(shapes.render, resolution=resolution), shapes.scene_captions, lambda batch: batch.as_dict(),
        {k: len(v) for k, v in shapes.VOCABULARY.items()}, _shapes_monitor,
        ("a large red circle at the top left on a striped background",
         "a small blue triangle in the center on a dotted background"),
        Evaluation(shapes_checker.ATTRIBUTES, shapes_checker.evaluation_prompts, shapes_checker.adherence,
                   shapes_checker.detail_statistics, partial(shapes_checker.reference_images, resolution=resolution),
                   partial(_shapes_feature_renders, resolution=resolution)),
    )


def _scenes_feature_renders(seed: int) -> torch.Tensor:
    """1,024 sampled scenes (a third of each count, on average), two nuisance draws each."""
    batch = scenes.sample_scenes(1024, torch.Generator().manual_seed(seed))
    return torch.cat([scenes.render(batch, torch.Generator().manual_seed(seed + 1 + k)) for k in range(2)])


CELLS = len(scenes.POSITIONS)


def _scene_labels(batch: scenes.Scenes) -> dict[str, torch.Tensor]:
    """Count, texture, and per cell its object's colour / shape / size (class 0: no object there)."""
    labels = {"count": batch.count - 1, "texture": batch.texture}
    rows = torch.arange(len(batch))[:, None].expand_as(batch.position)
    present = batch.present
    for name in ("colour", "shape", "size"):
        per_cell = torch.zeros(len(batch), CELLS + 1, dtype=torch.long)  # the last column takes the empty slots
        cell = torch.where(present, batch.position, CELLS)
        per_cell[rows, cell] = torch.where(present, getattr(batch, name) + 1, 0)
        for c in range(CELLS):
            labels[f"cell{c}_{name}"] = per_cell[:, c]
    return labels


def _scene_heads() -> dict[str, int]:
    heads = {"count": scenes.MAX_OBJECTS, "texture": len(scenes.TEXTURES)}
    for name, values in (("colour", scenes.COLOURS), ("shape", scenes.SHAPES), ("size", scenes.SIZES)):
        heads.update({f"cell{c}_{name}": len(values) + 1 for c in range(CELLS)})
    return heads


def _scenes_monitor(n: int) -> tuple[list[str], Callable[[np.ndarray], dict[str, float]]]:
    batch = scenes.sample_scenes(n, torch.Generator().manual_seed(4242))
    return scenes.scene_captions(batch), lambda images: scenes_checker.adherence_table(images, batch)


DATA_SETS = {
    "shapes": _shapes_data("shapes", shapes.RESOLUTION),
    "shapes128": _shapes_data("shapes128", 2 * shapes.RESOLUTION),
    "scenes": DataSet(
        "scenes", scenes.RESOLUTION, tuple(dict.fromkeys([*shapes.caption_words(), *scenes.caption_words()])),
        scenes.sample_scenes, scenes.render, scenes.scene_captions, _scene_labels, _scene_heads(), _scenes_monitor,
        ("one object on a striped background: a large red circle at the top left",
         "two objects on a dotted background: a small blue triangle at the top, above a large green square in the "
         "center"),
        Evaluation(scenes_checker.ATTRIBUTES, scenes_checker.evaluation_prompts, scenes_checker.adherence,
                   scenes_checker.detail_statistics, scenes_checker.reference_images, _scenes_feature_renders),
    ),
}


def data_set(name: str) -> DataSet:
    if name not in DATA_SETS:
        raise ValueError(f"data must be one of {sorted(DATA_SETS)}, got {name!r}")
    return DATA_SETS[name]
