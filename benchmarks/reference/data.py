"""The data sets a reference model is trained on, behind one interface for training, features and monitoring.

- ``shapes`` (`benchmarks.reference.shapes`): one shaded shape on a textured background, 64 px, 256 latent tokens
  (`pixart-shapes`).
- ``scenes`` (`benchmarks.reference.scenes`): one to three objects with a relation, finer textures, 128 px, 1,024
  latent tokens (issue 28).

    data = DATA_SETS["scenes"]
    batch = data.sample(8, torch.Generator().manual_seed(0))
    images = data.render(batch, torch.Generator().manual_seed(1))   # (8, 3, 128, 128) in [0, 1]
    captions, labels = data.captions(batch), data.labels(batch)     # the text and the feature network's targets
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from . import scenes, scenes_checker, shapes


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


def _shapes_monitor(n: int) -> tuple[list[str], Callable[[np.ndarray], dict[str, float]]]:
    from .quality import adherence_table, evaluation_prompts

    prompts = evaluation_prompts(n)
    return [p.caption for p in prompts], lambda images: adherence_table(images, prompts)


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
    "shapes": DataSet(
        "shapes", shapes.RESOLUTION, tuple(shapes.caption_words()), shapes.sample_scenes, shapes.render,
        shapes.scene_captions, lambda batch: batch.as_dict(), {k: len(v) for k, v in shapes.VOCABULARY.items()},
        _shapes_monitor,
        ("a large red circle at the top left on a striped background",
         "a small blue triangle in the center on a dotted background"),
    ),
    "scenes": DataSet(
        "scenes", scenes.RESOLUTION, tuple(dict.fromkeys([*shapes.caption_words(), *scenes.caption_words()])),
        scenes.sample_scenes, scenes.render, scenes.scene_captions, _scene_labels, _scene_heads(), _scenes_monitor,
        ("one object on a striped background: a large red circle at the top left",
         "two objects on a dotted background: a small blue triangle at the top, above a large green square in the "
         "center"),
    ),
}


def data_set(name: str) -> DataSet:
    if name not in DATA_SETS:
        raise ValueError(f"data must be one of {sorted(DATA_SETS)}, got {name!r}")
    return DATA_SETS[name]
