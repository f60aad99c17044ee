"""Procedural captioned images: one shaded shape on a textured grey background, rendered on the fly.

Every image has *structure* (which shape, its colour, size and position on a 3 x 3 grid) and *detail* (the
background texture, a shading gradient on the shape, its dark outline, a tonal gradient of the background), all
named by the caption except the nuisance factors (background tone, gradient direction, stripe orientation, texture
phase, position jitter). The early, high-noise denoising steps decide the structure, the late ones the detail: the
premise of structure-then-detail merging.

    scenes = sample_scenes(8, torch.Generator().manual_seed(0))
    images = render(scenes, torch.Generator().manual_seed(1))   # (8, 3, 64, 64) in [0, 1]
    captions = scene_captions(scenes)                            # "a large red circle at the top left on a ..."

Rendering is vectorised over the batch (analytic distances, 1-pixel anti-aliased edges); the same scenes and
generator seeds give the same pixels on every machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

RESOLUTION = 64
COLOURS = ("red", "yellow", "green", "cyan", "blue", "magenta")  # hues 0, 60, ..., 300 degrees
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
TEXTURES = ("plain", "striped", "dotted")
ATTRIBUTES = ("colour", "shape", "size", "position", "texture")

# geometry in pixels of a 64-px image (scaled with the resolution)
# a 16 x 16 latent (f = 4) must be able to tell the shapes and textures apart: shapes span 4 / 7 latent pixels,
# texture periods 4 (finer ones sit at the latent's Nyquist limit and come out as noise)
HALF_EXTENT = (8.0, 14.0)  # half the bounding-box side of small / large shapes
CELL_CENTRES = (16.0, 32.0, 48.0)  # centre of the bounding box per grid column / row
JITTER = 2.0
TEXTURE_PERIOD = 16.0
DOT_RADIUS = 3.5
SATURATION, VALUE = 0.85, 0.92


@dataclass
class Scenes:
    """A batch of scene descriptions, one index tensor (B,) per attribute plus the nuisance factors."""

    colour: torch.Tensor
    shape: torch.Tensor
    size: torch.Tensor
    position: torch.Tensor
    texture: torch.Tensor

    def __len__(self) -> int:
        return len(self.colour)

    def __getitem__(self, index) -> "Scenes":
        return Scenes(**{name: getattr(self, name)[index] for name in ATTRIBUTES})

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in ATTRIBUTES}


VOCABULARY = {"colour": COLOURS, "shape": SHAPES, "size": SIZES, "position": POSITIONS, "texture": TEXTURES}


def sample_scenes(n: int, generator: torch.Generator) -> Scenes:
    """`n` scenes with every attribute uniform and independent."""
    return Scenes(**{
        name: torch.randint(len(values), (n,), generator=generator) for name, values in VOCABULARY.items()
    })


def scene_grid() -> Scenes:
    """Every combination of the captioned attributes once (6 x 3 x 2 x 9 x 3 = 972 scenes)."""
    axes = torch.meshgrid(*[torch.arange(len(v)) for v in VOCABULARY.values()], indexing="ij")
    return Scenes(**{name: axis.reshape(-1) for name, axis in zip(VOCABULARY, axes)})


def caption(colour: int, shape: int, size: int, position: int, texture: int) -> str:
    where = "in the center" if POSITIONS[position] == "center" else f"at the {POSITIONS[position]}"
    return f"a {SIZES[size]} {COLOURS[colour]} {SHAPES[shape]} {where} on a {TEXTURES[texture]} background"


def scene_captions(scenes: Scenes) -> list[str]:
    rows = torch.stack([getattr(scenes, name) for name in ATTRIBUTES], dim=1).tolist()
    return [caption(*row) for row in rows]


def caption_words() -> list[str]:
    """Every word a caption can contain, in a fixed order (the tokenizer's vocabulary)."""
    words: dict[str, None] = {}
    for text in ("a at the in on background", *COLOURS, *SHAPES, *SIZES, *POSITIONS, *TEXTURES):
        words.update(dict.fromkeys(text.split()))
    return list(words)


def hue_to_rgb(hue_deg: torch.Tensor, saturation: float, value: float) -> torch.Tensor:
    """(B,) hues in degrees -> (B, 3) RGB in [0, 1] (HSV model)."""
    k = (torch.tensor([5.0, 3.0, 1.0]) + hue_deg[:, None] / 60.0) % 6
    return value - value * saturation * (torch.minimum(k, 4 - k).clamp(0, 1))


def shape_distance(shape: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distance in pixels, positive inside, of circle / square / triangle with bounding-box half-side `r`.

    Args:
        shape: (B, 1, 1) shape indices; dx, dy: (B, H, W) offsets from the bounding-box centre; r: (B, 1, 1).
    """
    circle = r - torch.sqrt(dx**2 + dy**2)
    square = r - torch.maximum(dx.abs(), dy.abs())
    # isosceles triangle, apex up, filling the bounding box: base y = +r, sides through (0, -r) and (+-r, +r)
    base = r - dy
    side = (dy + r - 2 * dx.abs()) / math.sqrt(5.0)  # distance to the sides 2|x| = y + r
    triangle = torch.minimum(base, side)
    return torch.where(shape == 0, circle, torch.where(shape == 1, square, triangle))


def uniform(n: int, generator: torch.Generator, low: float, high: float, *shape: int) -> torch.Tensor:
    """(n, *shape) uniform draws in [low, high)."""
    return low + (high - low) * torch.rand(n, *shape, generator=generator)


@dataclass(frozen=True)
class BackgroundDraws:
    """The nuisance factors of a batch's backgrounds: tone (B,) dark or light, gradient slope (B,) along angle (B,),
    stripe orientation vertical (B,) bool, texture phase (B, 2) in pixels."""

    tone: torch.Tensor
    slope: torch.Tensor
    angle: torch.Tensor
    vertical: torch.Tensor
    phase: torch.Tensor

    @classmethod
    def draw(cls, n: int, generator: torch.Generator, period: float) -> "BackgroundDraws":
        dark = torch.rand(n, generator=generator) < 0.5
        tone = torch.where(dark, uniform(n, generator, 0.18, 0.38), uniform(n, generator, 0.62, 0.82))
        slope = uniform(n, generator, -0.12, 0.12)
        angle = uniform(n, generator, 0, 2 * math.pi)
        vertical = torch.rand(n, generator=generator) < 0.5
        return cls(tone, slope, angle, vertical, uniform(n, generator, 0, period, 2))


def textured_background(texture: torch.Tensor, draws: BackgroundDraws, x: torch.Tensor, y: torch.Tensor, half: float,
                        scale: float, period: float, dot_radius: float, stripe_contrast: float,
                        dot_contrast: float) -> torch.Tensor:
    """(B, H, W) grey background in [0, 1]: per-image tone, a linear gradient, and the texture (0 plain, 1 striped,
    2 dotted), its contrast towards the far side of the tone range.

    Args:
        texture: (B,); draws: the nuisance factors; x: (1, 1, W), y: (1, H, 1) pixel centres in native-resolution
        units; half: half the native side; scale: rendered / native resolution.
    """
    tone, slope, angle, vertical, phase = draws.tone, draws.slope, draws.angle, draws.vertical, draws.phase
    u = (x - half) * torch.cos(angle)[:, None, None] + (y - half) * torch.sin(angle)[:, None, None]
    background = tone[:, None, None] + slope[:, None, None] * u / half
    sign = torch.where(tone < 0.5, 1.0, -1.0)[:, None, None]
    along = torch.where(vertical[:, None, None], x, y) + phase[:, 0, None, None]
    stripes = torch.tanh(4 * torch.sin(2 * math.pi * along / period)).clamp_min(0)
    ddx = (x + phase[:, 0, None, None]) % period - period / 2
    ddy = (y + phase[:, 1, None, None]) % period - period / 2
    dots = ((dot_radius - torch.sqrt(ddx**2 + ddy**2)) * scale).clamp(0, 1)
    texture = texture[:, None, None]
    pattern = torch.where(texture == 1, stripe_contrast * stripes,
                          torch.where(texture == 2, dot_contrast * dots, torch.zeros(())))
    return (background + sign * pattern).clamp(0, 1)


def render(scenes: Scenes, generator: torch.Generator, resolution: int = RESOLUTION, shading: bool = True,
           outline: bool = True) -> torch.Tensor:
    """Images of `scenes`, (B, 3, H, W) in [0, 1]; the nuisance factors are drawn from `generator`.

    `shading` / `outline` False leave out the shape's shading gradient / dark outline (constructed losses of detail,
    for testing the detail measure); the nuisance draws are the same either way.
    """
    n, s = len(scenes), resolution / RESOLUTION
    draws = BackgroundDraws.draw(n, generator, TEXTURE_PERIOD)
    jitter = uniform(n, generator, -JITTER, JITTER, 2)

    coords = (torch.arange(resolution, dtype=torch.float32) + 0.5) / s  # pixel centres in 64-px units
    y, x = coords[None, :, None], coords[None, None, :]
    centres = torch.tensor(CELL_CENTRES)
    cx = (centres[scenes.position % 3] + jitter[:, 0])[:, None, None]
    cy = (centres[scenes.position // 3] + jitter[:, 1])[:, None, None]
    r = torch.tensor(HALF_EXTENT)[scenes.size][:, None, None]

    background = textured_background(scenes.texture, draws, x, y, 32.0, s,
                                     TEXTURE_PERIOD, DOT_RADIUS, 0.14, 0.22)
    image = background[:, None].expand(n, 3, resolution, resolution)

    # the shape: hue, shading from the top-left, dark outline, anti-aliased coverage
    dx, dy = x - cx, y - cy
    distance = shape_distance(scenes.shape[:, None, None], dx, dy, r) * s
    rgb = hue_to_rgb(scenes.colour.float() * 60.0, SATURATION, VALUE)[:, :, None, None]
    shade = 1.0 - 0.3 * ((dx + dy) / (4 * r) + 0.5).clamp(0, 1) if shading else torch.ones_like(dx)
    dark_rim = torch.where(distance < 1.5 * s, 0.5, 1.0) if outline else torch.ones_like(distance)
    fill = rgb * (shade * dark_rim)[:, None]
    coverage = (distance + 0.5).clamp(0, 1)[:, None]
    return image * (1 - coverage) + fill * coverage
