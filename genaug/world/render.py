"""Procedural rendering of the genaug world: shapes with colours and patterns on textured scenes.

A scene is first *sampled* into a plain :class:`SceneSpec` (every random choice is made there,
from one ``numpy.random.Generator``), then *rendered* by pure functions of that spec. So an
image depends only on its generator's seed, and the same seed gives the same bytes in any
process. Shapes are implicit functions evaluated on a supersampled grid and box-averaged down,
which anti-aliases edges and patterns enough to stay recognizable at 32 px.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageFilter

# --------------------------------------------------------------------------- vocabulary
BASE_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "hexagon", "diamond", "cross", "ring", "ellipse",
                                "semicircle", "trapezoid")
# Novel shapes and patterns never appear in the pretraining pool: a base model cannot draw them
# from text, only after personalization on the reference images.
NOVEL_SHAPES: tuple[str, ...] = ("star", "heart", "crescent", "arrow")
BASE_PATTERNS: tuple[str, ...] = ("plain", "striped", "dotted", "checkered", "shaded", "outlined")
NOVEL_PATTERNS: tuple[str, ...] = ("zigzag", "wavy")
ALL_SHAPES = BASE_SHAPES + NOVEL_SHAPES
ALL_PATTERNS = BASE_PATTERNS + NOVEL_PATTERNS

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (240, 135, 30),
    "yellow": (235, 210, 45),
    "green": (45, 165, 60),
    "blue": (40, 90, 215),
    "purple": (135, 60, 185),
    "pink": (240, 130, 180),
    "white": (238, 238, 238),
}
BACKGROUNDS: tuple[str, ...] = ("sky", "grass", "sand", "water", "wall", "noise")

BACKGROUND_PHRASES: dict[str, tuple[str, ...]] = {
    "sky": ("in the sky", "against a blue sky", "in front of the sky"),
    "grass": ("on grass", "on a lawn", "on green grass"),
    "sand": ("on sand", "on a beach", "on sandy ground"),
    "water": ("on water", "floating on water", "on a lake"),
    "wall": ("against a wall", "indoors", "in front of a wall"),
    "noise": ("on a noisy background", "on a colourful texture", "on a patterned backdrop"),
}
CAPTION_TEMPLATES: tuple[str, ...] = (
    "{a_obj}{second} {bg}{extras}",
    "photo of {a_obj}{second} {bg}{extras}",
    "a picture of {a_obj} {bg}{second}{extras}",
    "{obj}{second} {bg}{extras}",
    "a close-up photo of {a_obj}{second}{extras}",
    "an image showing {a_obj}{second} {bg}{extras}",
    "a rendering of {a_obj} {bg}{second}{extras}",
)

# Objects are drawn inside this radius (in units of the object's nominal radius), so a bounding
# box of BBOX_MARGIN * radius around the centre holds every shape.
BBOX_MARGIN = 1.3


# --------------------------------------------------------------------------- scene specification
@dataclass(frozen=True)
class SceneOptions:
    """How scenes are sampled and rendered (the world config's rendering knobs)."""

    image_size: int = 32
    supersample: int = 4
    second_object_prob: float = 0.35
    occlusion_prob: float = 0.2
    nuisance_strength: float = 1.0


@dataclass
class ObjectSpec:
    """One object: identity (shape, pattern, colour) and pose, all in final-image pixels."""

    shape: str
    pattern: str
    colour: str
    rgb: tuple[float, float, float]
    secondary_rgb: tuple[float, float, float]
    cx: float
    cy: float
    radius: float
    angle: float
    pattern_period: float
    pattern_phase: tuple[float, float]


@dataclass
class SceneSpec:
    """Everything needed to render one image; rendering is a pure function of this."""

    size: int
    background: str
    background_tint: tuple[float, float, float]
    background_seed: int
    objects: list[ObjectSpec]
    occluder: tuple[int, int, int, int, float, float, float] | None = None  # x0, y0, x1, y1, mean r, g, b
    brightness: float = 1.0
    contrast: float = 1.0
    light_gradient: tuple[float, float] = (0.0, 0.0)
    blur_radius: float = 0.0
    noise_sigma: float = 0.0
    noise_seed: int = 0


# --------------------------------------------------------------------------- shapes
# Each shape maps object-frame coordinates (u, v), in units of the object radius, to a boolean mask.
ShapeFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _convex_polygon(u: np.ndarray, v: np.ndarray, normals_deg: tuple[float, ...], apothem: float) -> np.ndarray:
    inside = np.ones(u.shape, dtype=bool)
    for deg in normals_deg:
        a = math.radians(deg)
        inside &= u * math.cos(a) + v * math.sin(a) <= apothem
    return inside


def _star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    outer, inner, points = 1.15, 0.47, 5
    sector = math.pi / points
    # Fold every angle into [0, sector]: the boundary there is the segment from the outer tip
    # (angle 0) to the inner notch (angle sector), so one half-plane test decides.
    phi = np.abs(np.mod(np.arctan2(v, u) + math.pi / 2 + sector, 2 * sector) - sector)
    r = np.hypot(u, v)
    x, y = r * np.cos(phi), r * np.sin(phi)
    p1 = (outer, 0.0)
    p2 = (inner * math.cos(sector), inner * math.sin(sector))
    # Inside when on the origin's side of the line p1-p2.
    cross = (p2[0] - p1[0]) * (y - p1[1]) - (p2[1] - p1[1]) * (x - p1[0])
    origin_side = (p2[0] - p1[0]) * (0 - p1[1]) - (p2[1] - p1[1]) * (0 - p1[0])
    return cross * origin_side >= 0


def _heart(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    x = u * 1.15
    y = -v * 1.15 + 0.15  # y points up so the lobes are on top before the pose rotation
    return (x * x + y * y - 1.0) ** 3 - x * x * y ** 3 <= 0


def _crescent(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    u = u + 0.3  # centre the crescent's mass on the object centre
    return (u * u + v * v <= 1.0) & ((u - 0.5) ** 2 + v * v >= 0.8 ** 2)


def _arrow(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    shaft = (np.abs(v) <= 0.22) & (u >= -1.05) & (u <= 0.2)
    head = (u >= 0.1) & (u <= 1.1) & (np.abs(v) <= 0.68 * (1.1 - u))
    return shaft | head


SHAPE_FUNCTIONS: dict[str, ShapeFn] = {
    "circle": lambda u, v: u * u + v * v <= 0.92 ** 2,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.8,
    "triangle": lambda u, v: _convex_polygon(u, v, (90.0, 210.0, 330.0), 0.6),
    "hexagon": lambda u, v: (np.abs(u) <= 0.84) & (np.abs(u * 0.5 + v * 0.8660254) <= 0.84)
    & (np.abs(u * 0.5 - v * 0.8660254) <= 0.84),
    # A rhombus, not a square turned by 45 degrees: poses are random, so only the aspect tells them apart.
    "diamond": lambda u, v: np.abs(u) / 1.12 + np.abs(v) / 0.62 <= 1.0,
    "cross": lambda u, v: ((np.abs(u) <= 0.33) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.33) & (np.abs(u) <= 1.0)),
    "ring": lambda u, v: (u * u + v * v <= 0.95 ** 2) & (u * u + v * v >= 0.52 ** 2),
    "ellipse": lambda u, v: u * u + (v / 0.55) ** 2 <= 1.05 ** 2,
    "semicircle": lambda u, v: (u * u + (v - 0.42) ** 2 <= 1.05 ** 2) & (v <= 0.42),
    "trapezoid": lambda u, v: (np.abs(v) <= 0.62) & (np.abs(u) <= 0.55 + 0.45 * (v + 0.62) / 1.24),
    "star": _star,
    "heart": _heart,
    "crescent": _crescent,
    "arrow": _arrow,
}


# --------------------------------------------------------------------------- patterns
def _pattern_map(obj: ObjectSpec, a: np.ndarray, b: np.ndarray, size: int) -> np.ndarray | None:
    """Fraction of the secondary colour at each sample; ``a, b`` are object-frame offsets in pixels.

    Periods are tied to the image size rather than the object, so stripes and dots stay a few
    pixels wide (resolvable) on small objects too.
    """
    period = obj.pattern_period
    ph_a, ph_b = obj.pattern_phase
    kind = obj.pattern
    if kind == "plain":
        return None
    if kind == "striped":
        return (np.mod(a / period + ph_a, 1.0) < 0.5).astype(np.float32)
    if kind == "dotted":
        spacing = period * 1.25
        da = np.mod(a / spacing + ph_a, 1.0) - 0.5
        db = np.mod(b / spacing + ph_b, 1.0) - 0.5
        return (da * da + db * db <= 0.31 ** 2).astype(np.float32)
    if kind == "checkered":
        cell = period * 0.85
        return (np.mod(np.floor(a / cell + ph_a) + np.floor(b / cell + ph_b), 2.0)).astype(np.float32)
    if kind == "shaded":
        return np.clip(0.5 + a / (2.0 * obj.radius), 0.0, 1.0).astype(np.float32)
    if kind == "outlined":
        border = 0.085 * size
        scale = obj.radius / max(obj.radius - border, 1e-3)
        inner = SHAPE_FUNCTIONS[obj.shape](a / obj.radius * scale, b / obj.radius * scale)
        return (~inner).astype(np.float32)
    if kind == "zigzag":
        # Chevron stripes: the stripe offset follows a triangle wave along the stripe direction.
        wave = 2.0 * np.abs(np.mod(b / (period * 1.3) + ph_b, 1.0) - 0.5)
        return (np.mod((a + wave * period * 1.1) / (period * 1.45) + ph_a, 1.0) < 0.5).astype(np.float32)
    if kind == "wavy":
        wave = np.sin(2.0 * math.pi * (b / (period * 3.2) + ph_b))
        return (np.mod((a + wave * period * 0.55) / (period * 1.3) + ph_a, 1.0) < 0.5).astype(np.float32)
    raise ValueError(f"unknown pattern {kind!r}")


# --------------------------------------------------------------------------- backgrounds
def _smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int = 1) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid upsampled bicubically."""
    coarse = (rng.random((cells, cells, channels)) * 255).astype(np.uint8)
    mode = "RGB" if channels == 3 else "L"
    img = Image.fromarray(coarse if channels == 3 else coarse[..., 0], mode=mode)
    up = np.asarray(img.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    return up if channels == 3 else up[..., None]


def render_background(kind: str, size: int, tint: tuple[float, float, float], seed: int) -> np.ndarray:
    """A ``size x size x 3`` float32 scene in 0..255 (textures scale with the image size)."""
    rng = np.random.default_rng(seed)
    ys = ((np.arange(size, dtype=np.float32) + 0.5) / size)[:, None, None]
    xs = ((np.arange(size, dtype=np.float32) + 0.5) / size)[None, :, None]
    tint_arr = np.asarray(tint, dtype=np.float32)
    if kind == "sky":
        top, bottom = np.array([60, 120, 215], np.float32), np.array([170, 205, 240], np.float32)
        img = top + (bottom - top) * ys + tint_arr
        clouds = np.clip(_smooth_noise(rng, size, 4) * 1.8 - 1.0, 0.0, 1.0)
        img = img + (250.0 - img) * clouds * 0.8
    elif kind == "grass":
        base = np.array([60, 140, 45], np.float32) + tint_arr
        blades = rng.normal(0.0, 1.0, (1, size, 1)).astype(np.float32) * 14.0
        fine = rng.normal(0.0, 1.0, (size, size, 1)).astype(np.float32) * 10.0
        img = base * (0.75 + 0.35 * ys) + blades + fine
    elif kind == "sand":
        base = np.array([215, 190, 135], np.float32) + tint_arr
        angle = rng.uniform(0, math.pi)
        ripples = np.sin((xs * math.cos(angle) + ys * math.sin(angle)) * size * 0.9 + rng.uniform(0, 6.3))
        img = base + ripples * 10.0 + rng.normal(0.0, 1.0, (size, size, 1)).astype(np.float32) * 9.0
    elif kind == "water":
        base = np.array([35, 95, 165], np.float32) + tint_arr
        ripples = np.sin(ys * size * 1.3 + 2.5 * np.sin(xs * 7.0 + rng.uniform(0, 6.3)) + rng.uniform(0, 6.3))
        img = base + np.clip(ripples, 0.4, 1.0) * 40.0 - 16.0 + _smooth_noise(rng, size, 5) * 20.0
    elif kind == "wall":
        palette = np.array([[200, 185, 160], [170, 170, 175], [180, 195, 205], [205, 170, 140]], np.float32)
        base = palette[rng.integers(len(palette))] + tint_arr
        lines = (np.mod(ys * size / max(size / 6.0, 1.0) + rng.uniform(0, 1), 1.0) < 0.12).astype(np.float32)
        img = base * (1.05 - 0.2 * xs) - lines * 25.0 + rng.normal(0.0, 1.0, (size, size, 1)).astype(np.float32) * 4.0
    elif kind == "noise":
        img = _smooth_noise(rng, size, 6, channels=3) * 200.0 + 30.0 + tint_arr
        img = img + rng.normal(0.0, 1.0, (size, size, 3)).astype(np.float32) * 14.0
    else:
        raise ValueError(f"unknown background {kind!r}")
    return np.broadcast_to(img, (size, size, 3)).astype(np.float32)


# --------------------------------------------------------------------------- rendering
def _object_geometry(obj: ObjectSpec, size: int, supersample: int):
    """Sub-pixel object-frame coordinates (a, b), the supersampled shape mask, its per-pixel coverage and
    the box ``(x0, y0, x1, y1)`` they cover; None when the object lies outside the frame."""
    reach = obj.radius * BBOX_MARGIN
    x0, x1 = max(0, int(math.floor(obj.cx - reach))), min(size, int(math.ceil(obj.cx + reach)))
    y0, y1 = max(0, int(math.floor(obj.cy - reach))), min(size, int(math.ceil(obj.cy + reach)))
    if x1 <= x0 or y1 <= y0:
        return None
    ss = supersample
    # Sample points at sub-pixel centres, in final-image pixel units.
    xs = x0 + (np.arange((x1 - x0) * ss, dtype=np.float32) + 0.5) / ss - obj.cx
    ys = y0 + (np.arange((y1 - y0) * ss, dtype=np.float32) + 0.5) / ss - obj.cy
    cos_t, sin_t = math.cos(obj.angle), math.sin(obj.angle)
    a = xs[None, :] * cos_t + ys[:, None] * sin_t
    b = -xs[None, :] * sin_t + ys[:, None] * cos_t
    mask = SHAPE_FUNCTIONS[obj.shape](a / obj.radius, b / obj.radius).astype(np.float32)
    coverage = mask.reshape(y1 - y0, ss, x1 - x0, ss).mean(axis=(1, 3))
    return a, b, mask, coverage, (x0, y0, x1, y1)


def _draw_object(canvas: np.ndarray, obj: ObjectSpec, supersample: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Composite ``obj`` onto ``canvas`` in place; returns its coverage and the box it was drawn in."""
    geometry = _object_geometry(obj, canvas.shape[0], supersample)
    if geometry is None:
        return np.zeros((0, 0), np.float32), (0, 0, 0, 0)
    a, b, mask, coverage, (x0, y0, x1, y1) = geometry
    size, ss = canvas.shape[0], supersample
    h, w = y1 - y0, x1 - x0
    rgb = np.asarray(obj.rgb, np.float32)
    region = canvas[y0:y1, x0:x1]
    colour = coverage[..., None] * rgb
    pattern = _pattern_map(obj, a, b, size)
    if pattern is not None:
        # Colour mixing is linear, so averaging mask*pattern gives the exact box-filtered blend.
        secondary_cover = (mask * pattern).reshape(h, ss, w, ss).mean(axis=(1, 3))
        colour = colour + secondary_cover[..., None] * (np.asarray(obj.secondary_rgb, np.float32) - rgb)
    canvas[y0:y1, x0:x1] = region * (1.0 - coverage[..., None]) + colour
    return coverage, (x0, y0, x1, y1)


def render_scene(spec: SceneSpec, supersample: int = 4) -> np.ndarray:
    """Render ``spec`` to a ``size x size x 3`` uint8 array."""
    size = spec.size
    canvas = render_background(spec.background, size, spec.background_tint, spec.background_seed).copy()
    # Draw the main object last so it is never hidden by the second one.
    for obj in reversed(spec.objects):
        _draw_object(canvas, obj, supersample)
    if spec.occluder is not None:
        # A coarse grey noise texture: reads as "something in front", not as one more flat shape.
        x0, y0, x1, y1, r, g, b = spec.occluder
        rng = np.random.default_rng(spec.noise_seed + 1)
        grain = rng.normal(0.0, 38.0, (y1 - y0, x1 - x0, 1)).astype(np.float32)
        canvas[y0:y1, x0:x1] = np.asarray((r, g, b), np.float32) + grain
    # Lighting: global contrast and brightness, then a directional gradient across the frame.
    mean = canvas.mean(axis=(0, 1), keepdims=True)
    canvas = (canvas - mean) * spec.contrast + mean
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    gx, gy = spec.light_gradient
    light = spec.brightness * (1.0 + gx * coords[None, :] + gy * coords[:, None])
    canvas = canvas * light[..., None]
    image = np.clip(canvas, 0, 255).round().astype(np.uint8)
    if spec.blur_radius > 0:
        image = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(spec.blur_radius)))
    if spec.noise_sigma > 0:
        noise = np.random.default_rng(spec.noise_seed).normal(0.0, spec.noise_sigma, image.shape)
        image = np.clip(image.astype(np.float32) + noise.astype(np.float32), 0, 255).round().astype(np.uint8)
    return image


def object_masks(spec: SceneSpec, supersample: int = 4) -> list[np.ndarray]:
    """Each object's visible coverage in [0, 1] (``size x size``, float32), in ``spec.objects`` order.

    What a perfect segmenter would return: an object loses what objects drawn over it and the
    occluder hide. Used as the given concept masks of masked-loss personalization (Break-A-Scene).
    """
    size = spec.size
    masks = []
    for obj in spec.objects:
        full = np.zeros((size, size), np.float32)
        geometry = _object_geometry(obj, size, supersample)
        if geometry is not None:
            x0, y0, x1, y1 = geometry[4]
            full[y0:y1, x0:x1] = geometry[3]
        masks.append(full)
    # render_scene draws the objects in reverse order, so object i is painted over by objects 0..i-1.
    for i in range(len(masks)):
        for above in masks[:i]:
            masks[i] *= 1.0 - above
    if spec.occluder is not None:
        x0, y0, x1, y1 = spec.occluder[:4]
        for m in masks:
            m[y0:y1, x0:x1] = 0.0
    return masks


# --------------------------------------------------------------------------- sampling
def _secondary_colour(rgb: np.ndarray, rng: np.random.Generator) -> tuple[float, float, float]:
    """A contrasting tone of the same hue: darker for light colours, lighter for dark ones."""
    luminance = float(rgb @ np.array([0.299, 0.587, 0.114]))
    strength = rng.uniform(0.55, 0.75)
    out = rgb * (1.0 - strength) if luminance > 115 else rgb + (255.0 - rgb) * strength
    return tuple(float(c) for c in out)


def sample_object(rng: np.random.Generator, options: SceneOptions, shape: str, pattern: str, *,
                  radius_range: tuple[float, float], cx: float, cy: float,
                  colour: str | None = None) -> ObjectSpec:
    """Draw colour (with jitter), size, rotation and pattern phase for one object at (cx, cy)."""
    size = options.image_size
    colour = colour or str(rng.choice(list(COLOURS)))
    rgb = np.clip(np.asarray(COLOURS[colour], np.float64) + rng.uniform(-20, 20, 3), 0, 255)
    secondary = _secondary_colour(rgb, rng)
    return ObjectSpec(
        shape=shape, pattern=pattern, colour=colour, rgb=tuple(float(c) for c in rgb), secondary_rgb=secondary,
        cx=cx, cy=cy, radius=float(rng.uniform(*radius_range) * size), angle=float(rng.uniform(0, 2 * math.pi)),
        pattern_period=float(0.14 * size * rng.uniform(0.9, 1.12)),
        pattern_phase=(float(rng.random()), float(rng.random())),
    )


def _sample_nuisances(rng: np.random.Generator, options: SceneOptions, spec: SceneSpec, *, mild: bool) -> None:
    strength = options.nuisance_strength * (0.5 if mild else 1.0)
    spec.brightness = float(math.exp(rng.uniform(-0.4, 0.25) * strength))
    spec.contrast = float(math.exp(rng.uniform(-0.35, 0.2) * strength))
    spec.light_gradient = (float(rng.uniform(-0.35, 0.35) * strength), float(rng.uniform(-0.35, 0.35) * strength))
    spec.blur_radius = float(rng.uniform(0.35, 0.85) * options.image_size / 32 * strength) \
        if rng.random() < 0.25 and strength > 0 else 0.0
    spec.noise_sigma = float(rng.uniform(0.0, 10.0) * strength) if rng.random() < 0.6 else 0.0
    spec.noise_seed = int(rng.integers(2 ** 31))


def _sample_occluder(rng: np.random.Generator, obj: ObjectSpec, size: int) -> tuple[int, int, int, int, float, float, float]:
    """A textured patch that covers part of ``obj`` from one side, never all of it."""
    direction = rng.uniform(0, 2 * math.pi)
    distance = obj.radius * rng.uniform(0.85, 1.15)
    ox, oy = obj.cx + distance * math.cos(direction), obj.cy + distance * math.sin(direction)
    half_w, half_h = obj.radius * rng.uniform(0.4, 0.65), obj.radius * rng.uniform(0.4, 0.65)
    x0, x1 = int(round(max(0, ox - half_w))), int(round(min(size, ox + half_w)))
    y0, y1 = int(round(max(0, oy - half_h))), int(round(min(size, oy + half_h)))
    grey = rng.uniform(50, 200)
    r, g, b = (float(np.clip(grey + t, 0, 255)) for t in rng.uniform(-25, 25, 3))
    return (x0, y0, max(x1, x0 + 1), max(y1, y0 + 1), r, g, b)


def sample_scene(rng: np.random.Generator, options: SceneOptions, shape: str, pattern: str, *,
                 second_shapes: tuple[str, ...] = BASE_SHAPES, allow_second: bool = True,
                 allow_occlusion: bool = True, mild: bool = False) -> SceneSpec:
    """A scene whose main object has ``shape`` and ``pattern``; the rest is within-class variation.

    The optional second object is smaller and always plain, so the main object stays the one a
    label or caption is about.
    """
    size = options.image_size
    background = str(rng.choice(BACKGROUNDS))
    tint = tuple(float(t) for t in rng.uniform(-18, 18, 3))
    two = allow_second and rng.random() < options.second_object_prob
    if two:
        side = 1.0 if rng.random() < 0.5 else -1.0
        main_cx = size * (0.5 + side * rng.uniform(0.14, 0.2))
        main_cy = size * rng.uniform(0.36, 0.64)
        main = sample_object(rng, options, shape, pattern, radius_range=(0.19, 0.28), cx=main_cx, cy=main_cy)
        second_shape = str(rng.choice(second_shapes))
        second = sample_object(rng, options, second_shape, "plain", radius_range=(0.1, 0.15),
                               cx=size * (0.5 - side * rng.uniform(0.26, 0.33)), cy=size * rng.uniform(0.25, 0.75))
        objects = [main, second]
    else:
        radius_range = (0.2, 0.36)
        main = sample_object(rng, options, shape, pattern, radius_range=radius_range, cx=0.0, cy=0.0)
        # Keep most of the object in frame; the jitter still moves it around noticeably.
        slack = max(0.0, size / 2 - main.radius * 1.05)
        main.cx = float(size / 2 + rng.uniform(-slack, slack))
        main.cy = float(size / 2 + rng.uniform(-slack, slack))
        objects = [main]
    spec = SceneSpec(size=size, background=background, background_tint=tint,
                     background_seed=int(rng.integers(2 ** 31)), objects=objects)
    if allow_occlusion and rng.random() < options.occlusion_prob:
        spec.occluder = _sample_occluder(rng, main, size)
    _sample_nuisances(rng, options, spec, mild=mild)
    return spec


def sample_pair_scene(rng: np.random.Generator, options: SceneOptions, left: tuple[str, str],
                      right: tuple[str, str]) -> SceneSpec:
    """Two equally prominent objects side by side, ``(shape, pattern)`` each (multi-concept images)."""
    size = options.image_size
    background = str(rng.choice(BACKGROUNDS))
    tint = tuple(float(t) for t in rng.uniform(-18, 18, 3))
    objects = []
    for (shape, pattern), side in ((left, -1.0), (right, 1.0)):
        objects.append(sample_object(rng, options, shape, pattern, radius_range=(0.18, 0.22),
                                     cx=size * (0.5 + side * rng.uniform(0.23, 0.27)),
                                     cy=size * rng.uniform(0.4, 0.6)))
    spec = SceneSpec(size=size, background=background, background_tint=tint,
                     background_seed=int(rng.integers(2 ** 31)), objects=objects)
    _sample_nuisances(rng, options, spec, mild=True)
    return spec


# --------------------------------------------------------------------------- captions and labels
def size_word(obj: ObjectSpec, size: int) -> str:
    ratio = obj.radius / size
    return "small" if ratio < 0.24 else "large" if ratio > 0.31 else "medium"


def lighting_word(spec: SceneSpec) -> str:
    return "dim" if spec.brightness < 0.8 else "bright" if spec.brightness > 1.15 else "normal"


def _article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def object_phrase(obj: ObjectSpec, rng: np.random.Generator, *, size: int | None = None,
                  drop_plain: float = 0.5, colour_prob: float = 0.85) -> str:
    """E.g. "small red striped triangle": shape always, pattern unless a plain one is left unsaid."""
    words = []
    if size is not None:
        word = size_word(obj, size)
        if word != "medium" and rng.random() < 0.7:
            words.append(word)
    if rng.random() < colour_prob:
        words.append(obj.colour)
    if obj.pattern != "plain" or rng.random() >= drop_plain:
        words.append(obj.pattern)
    words.append(obj.shape)
    return " ".join(words)


def caption_scene(spec: SceneSpec, rng: np.random.Generator) -> str:
    """A caption from a random template that always names the main object's shape and pattern."""
    main = spec.objects[0]
    obj = object_phrase(main, rng, size=spec.size)
    second = ""
    if len(spec.objects) > 1 and rng.random() < 0.9:
        other = spec.objects[1]
        joiner = str(rng.choice(["next to", "beside", "and"]))
        second = f" {joiner} {_article(f'{other.colour} {other.shape}')}"
    bg = str(rng.choice(BACKGROUND_PHRASES[spec.background])) if rng.random() < 0.85 else ""
    extras = []
    light = lighting_word(spec)
    if light != "normal" and rng.random() < 0.7:
        extras.append(f"{light} light")
    if spec.blur_radius > 0 and rng.random() < 0.5:
        extras.append("blurry")
    if spec.occluder is not None and rng.random() < 0.5:
        extras.append("partly hidden")
    template = str(rng.choice(CAPTION_TEMPLATES))
    text = template.format(obj=obj, a_obj=_article(obj), second=second, bg=bg,
                           extras="".join(f", {e}" for e in extras))
    return " ".join(text.split()).replace(" ,", ",")


def caption_pair(spec: SceneSpec, rng: np.random.Generator) -> str:
    left, right = spec.objects
    joiner = str(rng.choice(["next to", "beside", "and"]))
    left_phrase = object_phrase(left, rng, drop_plain=0.0, colour_prob=0.7)
    right_phrase = object_phrase(right, rng, drop_plain=0.0, colour_prob=0.7)
    bg = str(rng.choice(BACKGROUND_PHRASES[spec.background]))
    return f"{_article(left_phrase)} {joiner} {_article(right_phrase)} {bg}"


def scene_attributes(spec: SceneSpec) -> dict[str, Any]:
    """Flat, JSON-friendly attribute labels; every image carries the same keys and value types."""
    main = spec.objects[0]
    other = spec.objects[1] if len(spec.objects) > 1 else None
    return {
        "shape": main.shape,
        "pattern": main.pattern,
        "colour": main.colour,
        "size": size_word(main, spec.size),
        "size_ratio": round(main.radius / spec.size, 4),
        "rotation_deg": round(math.degrees(main.angle), 2),
        "x": round(main.cx / spec.size, 4),
        "y": round(main.cy / spec.size, 4),
        "background": spec.background,
        "second_shape": other.shape if other else "",
        "second_pattern": other.pattern if other else "",
        "second_colour": other.colour if other else "",
        "lighting": lighting_word(spec),
        "brightness": round(spec.brightness, 4),
        "contrast": round(spec.contrast, 4),
        "blur": round(spec.blur_radius, 4),
        "noise": round(spec.noise_sigma, 4),
        "occluded": spec.occluder is not None,
    }
