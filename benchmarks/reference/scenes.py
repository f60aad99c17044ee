"""Procedural captioned scenes of one to three objects at 128 px, rendered on the fly: the data of the
1,024-token reference model (128 px through a 4x VAE with patch 1 is a 32 x 32 latent).

A scene places 1-3 shaded, outlined shapes in distinct cells of a 3 x 3 grid on a grey background with a tonal
gradient and a texture. Its caption names the object count, the background texture and, for each object in reading
order of the cells, its size, colour, shape and cell; a two-object caption also names the relation of the first
object to the second ("left of" when its column is further left, else "above"):

    one object on a dotted background: a large red circle at the top left
    two objects on a plain background: a small yellow triangle at the top, above a large cyan circle at the bottom left
    three objects on a striped background: a small red circle at the top left, a large blue square in the center,
    a small green triangle at the bottom right

Nuisance factors, not captioned: background tone, gradient direction, stripe orientation, texture phase, position
jitter. Rendering is vectorised over the batch (analytic signed distances, 1-pixel anti-aliased edges; a loop over
the three object slots only); the same scenes and generator seed give the same pixels on every machine.

    scenes = sample_scenes(8, torch.Generator().manual_seed(0))
    images = render(scenes, torch.Generator().manual_seed(1))   # (8, 3, 128, 128) in [0, 1]
    captions = scene_captions(scenes)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from .shapes import BackgroundDraws, hue_to_rgb, shape_distance, textured_background, uniform

RESOLUTION = 128
MAX_OBJECTS = 3
COLOURS = ("red", "yellow", "green", "cyan", "blue", "magenta")  # hues 0, 60, ..., 300 degrees
SHAPES = ("circle", "square", "triangle")  # the order of `shape_distance`
SIZES = ("small", "large")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
TEXTURES = ("plain", "striped", "dotted")
COUNTS = ("one", "two", "three")
RELATIONS = ("left of", "above")
VOCABULARY = {"colour": COLOURS, "shape": SHAPES, "size": SIZES, "position": POSITIONS}  # per object

# geometry in pixels of a 128-px image (scaled with the resolution), sized for a 32 x 32 latent (f = 4): the small
# shapes span 7 latent pixels and the large 9; two large shapes in neighbouring cells stay >= 4.7 px (over one latent
# pixel) apart with the jitter, so objects never touch; the texture period is 3 latent pixels (2 is the latent's
# Nyquist limit)
CELL = RESOLUTION / 3
CELL_CENTRES = (CELL / 2, 3 * CELL / 2, 5 * CELL / 2)  # centre of an object's bounding box per grid column / row
HALF_EXTENT = (14.0, 18.0)  # half the bounding-box side of small / large shapes
JITTER = 1.0
OUTLINE = 2.0  # width of the dark rim
TEXTURE_PERIOD = 12.0
DOT_RADIUS = 3.0
STRIPE_CONTRAST, DOT_CONTRAST = 0.16, 0.25
SATURATION, VALUE = 0.85, 0.92


class SceneObject(NamedTuple):
    """One object: indices into `COLOURS`, `SHAPES`, `SIZES`, `POSITIONS`."""

    colour: int
    shape: int
    size: int
    position: int


@dataclass(frozen=True)
class Scene:
    """One scene: its objects in reading order of their (distinct) cells, and the background texture."""

    objects: tuple[SceneObject, ...]
    texture: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(SceneObject(*map(int, o)) for o in self.objects))
        if not 1 <= len(self.objects) <= MAX_OBJECTS:
            raise ValueError(f"a scene has 1 to {MAX_OBJECTS} objects, got {len(self.objects)}")
        for o in self.objects:
            for name, values in VOCABULARY.items():
                if not 0 <= getattr(o, name) < len(values):
                    raise ValueError(f"{name} index must be in [0, {len(values)}), got {getattr(o, name)} in {o}")
        cells = [o.position for o in self.objects]
        if any(a >= b for a, b in zip(cells, cells[1:])):
            raise ValueError(f"objects must be in distinct cells, in reading order; got positions {cells}")
        if not 0 <= self.texture < len(TEXTURES):
            raise ValueError(f"texture index must be in [0, {len(TEXTURES)}), got {self.texture}")

    @property
    def count(self) -> int:
        return len(self.objects)

    @property
    def relation(self) -> int | None:
        """Index into `RELATIONS` of the first object to the second in a two-object scene, else None.

        Reading order puts the second object right of the first in its row or in a lower row: the first is "left
        of" it when its column is smaller, else "above" it."""
        if self.count != 2:
            return None
        a, b = (o.position for o in self.objects)
        return RELATIONS.index("left of" if a % 3 < b % 3 else "above")

    @property
    def caption(self) -> str:
        def where(position: int) -> str:
            return "in the center" if POSITIONS[position] == "center" else f"at the {POSITIONS[position]}"

        phrases = [f"a {SIZES[o.size]} {COLOURS[o.colour]} {SHAPES[o.shape]} {where(o.position)}"
                   for o in self.objects]
        if self.relation is not None:
            phrases[1] = f"{RELATIONS[self.relation]} {phrases[1]}"
        noun = "object" if self.count == 1 else "objects"
        return f"{COUNTS[self.count - 1]} {noun} on a {TEXTURES[self.texture]} background: " + ", ".join(phrases)


_HEAD = re.compile(rf"({'|'.join(COUNTS)}) objects? on a ({'|'.join(TEXTURES)}) background")
_PHRASE = re.compile(rf"a ({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) "
                     rf"(?:at the|in the) ({'|'.join(POSITIONS)})")


def parse_caption(text: str) -> Scene:
    """The scene a caption of `Scene.caption` describes (its inverse); ValueError on any other text."""
    head, separator, body = text.strip().lower().partition(": ")
    match = _HEAD.fullmatch(head)
    if not (separator and match):
        raise ValueError(f"not a scene caption (expected '<count> object(s) on a <texture> background: ...'): {text!r}")
    objects, relation = [], None
    for i, phrase in enumerate(body.split(", ")):
        for r, name in enumerate(RELATIONS):
            if i == 1 and phrase.startswith(name + " "):
                relation, phrase = r, phrase[len(name) + 1:]
        found = _PHRASE.fullmatch(phrase)
        if found is None:
            raise ValueError(f"not an object phrase (expected 'a <size> <colour> <shape> at the <cell>'): {phrase!r}")
        size, colour, shape, position = found.groups()
        objects.append(SceneObject(COLOURS.index(colour), SHAPES.index(shape), SIZES.index(size),
                                   POSITIONS.index(position)))
    scene = Scene(tuple(objects), TEXTURES.index(match.group(2)))
    if COUNTS.index(match.group(1)) + 1 != scene.count or relation != scene.relation:
        raise ValueError(f"caption contradicts itself (count or relation against its objects): {text!r}")
    return scene


@dataclass
class Scenes:
    """A batch of scenes: per object slot (B, 3) index tensors, -1 in the empty slots after the last object, and the
    (B,) background texture. Objects are in reading order of their distinct cells."""

    colour: torch.Tensor
    shape: torch.Tensor
    size: torch.Tensor
    position: torch.Tensor
    texture: torch.Tensor

    def __post_init__(self) -> None:
        if self.texture.ndim != 1:
            raise ValueError(f"texture must have shape (B,), got {tuple(self.texture.shape)}")
        slots = (len(self.texture), MAX_OBJECTS)
        for name in VOCABULARY:
            if tuple(getattr(self, name).shape) != slots:
                raise ValueError(f"{name} must have shape {slots}, got {tuple(getattr(self, name).shape)}")
        present = self.present
        if not present[:, 0].all() or (present[:, 1:] & ~present[:, :-1]).any():
            raise ValueError("every scene needs a first object, and empty slots (-1) must come after the objects")
        for name, values in VOCABULARY.items():
            index = getattr(self, name)
            if ((index >= 0) != present).any() or (index < -1).any() or (index >= len(values)).any():
                raise ValueError(f"{name} indices must be in [0, {len(values)}) for objects and -1 in empty slots")
        both = present[:, 1:] & present[:, :-1]
        if (both & (self.position[:, 1:] <= self.position[:, :-1])).any():
            raise ValueError("objects must be in distinct cells, in reading order (increasing position)")
        if ((self.texture < 0) | (self.texture >= len(TEXTURES))).any():
            raise ValueError(f"texture indices must be in [0, {len(TEXTURES)})")

    @property
    def present(self) -> torch.Tensor:
        """(B, 3) bool: the slots holding an object."""
        return self.position >= 0

    @property
    def count(self) -> torch.Tensor:
        """(B,) number of objects."""
        return self.present.sum(1)

    def __len__(self) -> int:
        return len(self.texture)

    def __getitem__(self, index: slice | torch.Tensor) -> "Scenes":
        """The scenes at `index` (a slice, index or bool tensor), as a batch; ``to_list()[i]`` gives one `Scene`."""
        if isinstance(index, int):
            raise TypeError("index a batch with a slice or a tensor (to_list()[i] gives one Scene)")
        return Scenes(*(getattr(self, name)[index] for name in (*VOCABULARY, "texture")))

    def to_list(self) -> list[Scene]:
        rows = torch.stack([getattr(self, name) for name in VOCABULARY], 2).tolist()  # (B, 3, 4)
        return [Scene(tuple(SceneObject(*o) for o in objects if o[3] >= 0), texture)
                for objects, texture in zip(rows, self.texture.tolist())]

    @classmethod
    def from_list(cls, scenes: Sequence[Scene]) -> "Scenes":
        if not scenes:
            raise ValueError("need at least one scene")
        slots = torch.full((len(scenes), MAX_OBJECTS, 4), -1, dtype=torch.long)
        for i, scene in enumerate(scenes):
            slots[i, :scene.count] = torch.tensor(scene.objects)
        return cls(*slots.unbind(2), torch.tensor([s.texture for s in scenes]))


def sample_scenes(n: int, generator: torch.Generator) -> Scenes:
    """`n` scenes: count uniform in 1..3, distinct cells uniform among the 9, every object attribute and the texture
    uniform and independent."""
    if n < 1:
        raise ValueError(f"n (number of scenes) must be >= 1, got {n}")
    count = torch.randint(1, MAX_OBJECTS + 1, (n,), generator=generator)
    present = torch.arange(MAX_OBJECTS) < count[:, None]
    # the first `count` cells of a random permutation, then sorted into reading order (empty slots sort last)
    cells = torch.rand(n, len(POSITIONS), generator=generator).argsort(1)[:, :MAX_OBJECTS]
    cells = torch.where(present, cells, len(POSITIONS)).sort(1).values

    def draw(values: tuple[str, ...]) -> torch.Tensor:
        return torch.where(present, torch.randint(len(values), (n, MAX_OBJECTS), generator=generator), -1)

    return Scenes(colour=draw(COLOURS), shape=draw(SHAPES), size=draw(SIZES), position=torch.where(present, cells, -1),
                  texture=torch.randint(len(TEXTURES), (n,), generator=generator))


def scene_captions(scenes: Scenes) -> list[str]:
    return [scene.caption for scene in scenes.to_list()]


def caption_words() -> list[str]:
    """Every word a caption can contain, in a fixed order (the tokenizer's vocabulary; punctuation is split off by
    its whitespace pre-tokenizer)."""
    words: dict[str, None] = {}
    for text in ("object objects on a background : , at the in", *COUNTS, *COLOURS, *SHAPES, *SIZES, *POSITIONS,
                 *TEXTURES, *RELATIONS):
        words.update(dict.fromkeys(text.split()))
    return list(words)


def render(scenes: Scenes, generator: torch.Generator, resolution: int = RESOLUTION, shading: bool = True,
           outline: bool = True) -> torch.Tensor:
    """Images of `scenes`, (B, 3, H, W) with H = W = `resolution`, in [0, 1]; nuisance factors from `generator`.

    `shading` / `outline` False leave out the objects' shading gradient / dark outline (constructed losses of detail);
    the nuisance draws are the same either way.
    """
    if resolution < 32:
        raise ValueError(f"resolution must be >= 32 px for the objects to stay apart, got {resolution}")
    n, s = len(scenes), resolution / RESOLUTION
    draws = BackgroundDraws.draw(n, generator, TEXTURE_PERIOD)
    jitter = uniform(n, generator, -JITTER, JITTER, MAX_OBJECTS, 2)

    coords = (torch.arange(resolution, dtype=torch.float32) + 0.5) / s  # pixel centres in 128-px units
    y, x = coords[None, :, None], coords[None, None, :]

    background = textured_background(scenes.texture, draws, x, y, RESOLUTION / 2, s,
                                     TEXTURE_PERIOD, DOT_RADIUS, STRIPE_CONTRAST, DOT_CONTRAST)
    image = background[:, None].expand(n, 3, resolution, resolution)

    # the objects, one slot at a time (they never overlap): hue, shading from the top-left, dark outline, anti-aliased
    # coverage; empty slots draw a placeholder with zero coverage
    centres = torch.tensor(CELL_CENTRES)
    for k in range(MAX_OBJECTS):
        present = scenes.present[:, k]
        position = scenes.position[:, k].clamp_min(0)
        cx = (centres[position % 3] + jitter[:, k, 0])[:, None, None]
        cy = (centres[position // 3] + jitter[:, k, 1])[:, None, None]
        r = torch.tensor(HALF_EXTENT)[scenes.size[:, k].clamp_min(0)][:, None, None]
        dx, dy = x - cx, y - cy
        distance = shape_distance(scenes.shape[:, k, None, None].clamp_min(0), dx, dy, r) * s
        rgb = hue_to_rgb(scenes.colour[:, k].clamp_min(0).float() * 60.0, SATURATION, VALUE)[:, :, None, None]
        shade = 1.0 - 0.3 * ((dx + dy) / (4 * r) + 0.5).clamp(0, 1) if shading else torch.ones_like(dx)
        dark_rim = torch.where(distance < OUTLINE * s, 0.5, 1.0) if outline else torch.ones_like(distance)
        fill = rgb * (shade * dark_rim)[:, None]
        coverage = ((distance + 0.5).clamp(0, 1) * present[:, None, None])[:, None]
        image = image * (1 - coverage) + fill * coverage
    return image
