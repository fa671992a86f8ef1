"""The shapes world: seeded pictures of one coloured shape on a plain grey background.

Every picture is drawn from a `ShapeSpec` whose attributes are known (shape, hue, saturation,
value, size, position), and captioned from them ("a large red circle"). `slider_cn.shapes.measure`
recovers the same attributes from any RGB image, so a slider trained on the `shapes` model can be
judged by what its pictures show.
"""

from __future__ import annotations

import colorsys
import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Named hues (degrees). A hue is named by the nearest centre, so every hue has a name.
COLOURS: dict[str, float] = {
    "red": 0.0,
    "orange": 30.0,
    "yellow": 60.0,
    "green": 120.0,
    "cyan": 180.0,
    "blue": 235.0,
    "purple": 275.0,
    "pink": 320.0,
}
# Half-extent of the shape as a fraction of the image side, per size word.
SIZES: dict[str, tuple[float, float]] = {"small": (0.16, 0.24), "large": (0.28, 0.38)}
BACKGROUND: tuple[int, int, int] = (128, 128, 128)
# Warm hues (the positive side of the demo's slider) and cool ones (the negative side).
WARM_HUES: tuple[float, float] = (-5.0, 55.0)
COOL_HUES: tuple[float, float] = (175.0, 245.0)
WARMTH_CENTRE = 30.0  # warmth = cos(hue - 30 deg): +1 orange, -1 azure
SUPERSAMPLE = 4  # shapes are drawn 4x larger and box-filtered: smooth, exact-area edges


def hue_distance(a: float, b: float) -> float:
    """Distance between two hues on the colour circle, in degrees (0..180)."""
    d = abs(a - b) % 360.0
    return min(d, 360.0 - d)


def colour_name(hue: float) -> str:
    return min(COLOURS, key=lambda name: hue_distance(hue, COLOURS[name]))


def warmth(hue: float) -> float:
    """+1 for orange, -1 for azure: the one-number axis of a warm/cool slider."""
    return math.cos(math.radians(hue - WARMTH_CENTRE))


@dataclasses.dataclass(frozen=True)
class ShapeSpec:
    """One picture of the world: what is drawn and where (fractions of the image side)."""

    shape: str
    hue: float
    saturation: float
    value: float
    radius: float
    cx: float
    cy: float

    @property
    def colour(self) -> str:
        return colour_name(self.hue)

    @property
    def size(self) -> str:
        return "large" if self.radius >= (SIZES["small"][1] + SIZES["large"][0]) / 2 else "small"

    @property
    def rgb(self) -> tuple[int, int, int]:
        r, g, b = colorsys.hsv_to_rgb((self.hue % 360.0) / 360.0, self.saturation, self.value)
        return round(r * 255), round(g * 255), round(b * 255)

    @property
    def area(self) -> float:
        """Area as a fraction of the image."""
        side = 2 * self.radius
        return {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}[self.shape] * side * side

    @property
    def centroid(self) -> tuple[float, float]:
        """Centre of mass (fractions of the side): a triangle's sits a third of the way down."""
        return self.cx, self.cy + (self.radius / 3 if self.shape == "triangle" else 0.0)

    def caption(self, words: Sequence[str] = ("size", "colour", "shape")) -> str:
        """ "a large red circle"; ``words`` picks which attribute words appear, in that order."""
        parts = ["a"]
        if "size" in words:
            parts.append(self.size)
        if "colour" in words:
            parts.append(self.colour)
        parts.append(self.shape)
        return " ".join(parts)


def sample_spec(
    rng: np.random.Generator,
    *,
    shape: str | None = None,
    colour: str | None = None,
    size: str | None = None,
    hue_range: tuple[float, float] | None = None,
) -> ShapeSpec:
    """A random spec; any attribute named here is held to that value (or hue range)."""
    shape = shape or SHAPES[int(rng.integers(len(SHAPES)))]
    if hue_range is not None:
        hue = float(rng.uniform(*hue_range)) % 360.0
    elif colour is not None:
        # within the colour's own range (nearest-centre naming), away from its borders
        hue = float(COLOURS[colour] + rng.uniform(-8.0, 8.0)) % 360.0
    else:
        hue = float(rng.uniform(0.0, 360.0))
    size = size or ("small", "large")[int(rng.integers(2))]
    radius = float(rng.uniform(*SIZES[size]))
    # the whole shape stays inside the picture, with a margin
    low, high = radius + 0.06, 1.0 - radius - 0.06
    cx, cy = (float(v) for v in rng.uniform(low, high, size=2))
    return ShapeSpec(
        shape=shape,
        hue=hue,
        saturation=float(rng.uniform(0.65, 1.0)),
        value=float(rng.uniform(0.7, 1.0)),
        radius=radius,
        cx=cx,
        cy=cy,
    )


def render(
    spec: ShapeSpec, resolution: int = 32, background: tuple[int, int, int] = BACKGROUND
) -> Image.Image:
    """The picture of ``spec`` at ``resolution`` pixels square."""
    big = resolution * SUPERSAMPLE
    image = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(image)
    cx, cy, r = spec.cx * big, spec.cy * big, spec.radius * big
    if spec.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=spec.rgb)
    elif spec.shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=spec.rgb)
    elif spec.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=spec.rgb)
    else:
        raise ValueError(f"unknown shape {spec.shape!r}; known: {', '.join(SHAPES)}")
    return image.reduce(SUPERSAMPLE)


def with_hue(spec: ShapeSpec, hue: float) -> ShapeSpec:
    """The same outline in another hue (the demo's contrastive pairs)."""
    return dataclasses.replace(spec, hue=hue % 360.0)
