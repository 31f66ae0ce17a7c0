"""Drawing of one scene of the embedded world: a textured background, class objects and distractors.

Everything random comes from the ``numpy.random.Generator`` passed in, so a scene is a pure
function of that generator's state and the image size.
"""

import colorsys
import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import cv2
import numpy as np

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle", "star")
DISTRACTOR_SHAPES = ("cross", "ring", "hexagon", "bar", "arrow")

# Hue (0-1), saturation and value of each colour before per-object jitter.
_CLASS_HSV = {
    "red": (0.0, 0.85, 0.85),
    "green": (0.36, 0.80, 0.68),
    "blue": (0.62, 0.82, 0.85),
    "yellow": (0.145, 0.85, 0.92),
}
# Colours no class uses; distractors take these or a class colour.
_OTHER_HSV = {
    "grey": (0.0, 0.0, 0.55),
    "purple": (0.80, 0.60, 0.62),
    "brown": (0.07, 0.65, 0.45),
    "white": (0.0, 0.0, 0.93),
    "black": (0.0, 0.0, 0.12),
}
# Circumradius of each shape as a fraction of its size, chosen so that shapes of one size have
# roughly comparable areas.
_RADIUS = {"circle": 0.45, "square": 0.52, "triangle": 0.58, "star": 0.56}
_STAR_INNER = 0.46  # fat enough that a star a dozen pixels wide still reads as a star
_SUPERSAMPLE_SHIFT = 4  # cv2 sub-pixel bits for polygon vertices
_MIN_VISIBLE = 0.7  # fraction of an object that must stay visible once later objects are drawn
_MIN_INSIDE = 0.75  # fraction of an object's box that must lie inside the image
_PLACEMENT_TRIES = 30
_MAX_BG_CHROMA = 80  # max - min channel of any background pixel; class colours are far above


@dataclass
class SceneObject:
    shape: str
    colour: str
    box: Tuple[int, int, int, int]  # VOC 1-based inclusive pixel coordinates
    truncated: bool

    @property
    def name(self) -> str:
        """What the object is, class or not ("red circle", "grey cross")."""
        return f"{self.colour} {self.shape}"

    @property
    def class_name(self) -> Optional[str]:
        if self.shape in SHAPES and self.colour in COLOURS:
            return f"{self.colour} {self.shape}"
        return None


def _regular(n: int, radius: float = 1.0, phase: float = -math.pi / 2) -> np.ndarray:
    angles = phase + np.arange(n) * 2 * math.pi / n
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _unit_polygons(shape: str) -> List[np.ndarray]:
    """Outlines of ``shape`` with circumradius about 1; a second outline is a hole."""
    if shape == "circle":
        return [_regular(48)]
    if shape == "square":
        return [_regular(4, phase=math.pi / 4)]
    if shape == "triangle":
        return [_regular(3)]
    if shape == "star":
        radii = np.where(np.arange(10) % 2 == 0, 1.0, _STAR_INNER)
        return [_regular(10) * radii[:, None]]
    if shape == "hexagon":
        return [_regular(6, phase=0.0)]
    if shape == "ring":
        return [_regular(48), _regular(48, radius=0.62)]
    if shape == "cross":
        a, b = 0.3, 0.95
        pts = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a)]
        return [np.array(pts + [(-b, a), (-b, -a), (-a, -a)], dtype=np.float64)]
    if shape == "bar":
        return [np.array([(-1, -0.22), (1, -0.22), (1, 0.22), (-1, 0.22)], dtype=np.float64)]
    if shape == "arrow":
        pts = [
            (-1, -0.2),
            (0.25, -0.2),
            (0.25, -0.55),
            (1, 0),
            (0.25, 0.55),
            (0.25, 0.2),
            (-1, 0.2),
        ]
        return [np.array(pts, dtype=np.float64)]
    raise ValueError(f"unknown shape '{shape}'")


def _placed_polygons(shape, size, angle, centre) -> List[np.ndarray]:
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    radius = size * _RADIUS.get(shape, 0.5)
    return [(p @ rot.T) * radius + np.asarray(centre) for p in _unit_polygons(shape)]


def _rasterize(polygons: List[np.ndarray], image_size: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 255]; holes are cut out of the first outline."""
    mask = np.zeros((image_size, image_size), np.uint8)
    scale = 1 << _SUPERSAMPLE_SHIFT
    for i, poly in enumerate(polygons):
        # cv2 puts pixel centres at integer coordinates; ours are at +0.5.
        pts = np.round((poly - 0.5) * scale).astype(np.int32)
        cv2.fillPoly(mask, [pts], 255 if i == 0 else 0, cv2.LINE_AA, _SUPERSAMPLE_SHIFT)
    return mask


def _jittered_rgb(rng: np.random.Generator, hsv: Tuple[float, float, float]) -> np.ndarray:
    h, s, v = hsv
    h = (h + rng.uniform(-0.025, 0.025)) % 1.0
    s = min(1.0, s * rng.uniform(0.8, 1.1))
    v = min(1.0, v * rng.uniform(0.78, 1.1))
    return np.array(colorsys.hsv_to_rgb(h, s, v), np.float32) * 255


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(60, 200) + np.clip(rng.normal(0, 22, 3), -35, 35)


def _linear_ramp(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A ramp from 0 to 1 across an HxW patch in a random direction, shape (H, W, 1)."""
    angle = rng.uniform(0, 2 * math.pi)
    side = max(height, width)
    xs = (np.arange(width, dtype=np.float32) + 0.5) / side - 0.5 * width / side
    ys = (np.arange(height, dtype=np.float32) + 0.5) / side - 0.5 * height / side
    ramp = math.cos(angle) * xs[None, :] + math.sin(angle) * ys[:, None]
    return (ramp / math.sqrt(0.5) * 0.5 + 0.5)[..., None]


def render_background(rng: np.random.Generator, image_size: int) -> np.ndarray:
    """Muted gradient, colour clouds, soft blobs and sometimes grey stripes; float32 RGB."""
    # The smooth parts are drawn at a quarter of the resolution and upsampled.
    s, low = image_size, max(8, image_size // 4)
    ramp = _linear_ramp(rng, low, low)
    bg = _muted_colour(rng) * (1 - ramp) + _muted_colour(rng) * ramp
    grid = int(rng.integers(2, 6))
    clouds = rng.normal(0, rng.uniform(8, 25), (grid, grid, 3)).astype(np.float32)
    bg = bg + cv2.resize(clouds, (low, low), interpolation=cv2.INTER_CUBIC)
    for _ in range(int(rng.integers(0, 6))):
        blob = np.zeros((low, low), np.float32)
        centre = tuple(int(c) for c in rng.uniform(0, low, 2))
        axes = tuple(max(1, int(a)) for a in rng.uniform(0.05, 0.35, 2) * low)
        cv2.ellipse(blob, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
        blob = cv2.GaussianBlur(blob, (0, 0), 0.8)[..., None]
        alpha = rng.uniform(0.25, 0.6)
        bg = bg * (1 - alpha * blob) + _muted_colour(rng) * alpha * blob
    # Cap the chroma so that no background patch passes for a class colour.
    mean = bg.mean(axis=2, keepdims=True)
    chroma = bg.max(axis=2, keepdims=True) - bg.min(axis=2, keepdims=True)
    bg = mean + (bg - mean) * np.minimum(1.0, _MAX_BG_CHROMA / np.maximum(chroma, 1e-3))
    bg = cv2.resize(bg.astype(np.float32), (s, s), interpolation=cv2.INTER_LINEAR)
    if rng.random() < 0.4:
        ramp = _linear_ramp(rng, s, s)[..., 0]
        period = rng.uniform(4, 12)
        wave = np.sin(ramp * s / period * 2 * math.pi + rng.uniform(0, 2 * math.pi))
        if rng.random() < 0.5:
            wave = np.sign(wave)
        bg += (rng.uniform(6, 20) * wave)[..., None]  # grey stripes leave the chroma as it is
    return bg


def _box_iou(a, b) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / (_area(a) + _area(b) - inter)


def _area(box) -> float:
    return (box[2] - box[0]) * (box[3] - box[1])


def _near(a, b, gap: float = 2.0) -> bool:
    return not (a[2] + gap < b[0] or b[2] + gap < a[0] or a[3] + gap < b[1] or b[3] + gap < a[1])


def _extent(polygons) -> Tuple[float, float, float, float]:
    pts = polygons[0]
    return (pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max())


def _inside_fraction(extent, image_size) -> float:
    x0, y0, x1, y1 = extent
    w = max(0.0, min(x1, image_size) - max(x0, 0.0))
    h = max(0.0, min(y1, image_size) - max(y0, 0.0))
    return w * h / ((x1 - x0) * (y1 - y0))


def _tight_box(mask: np.ndarray) -> Optional[Tuple[int, int, int, int]]:
    """VOC box (1-based, inclusive) of the pixels at least half covered by the object."""
    ys, xs = np.nonzero(mask >= 128)
    if len(xs) == 0:
        return None
    return (int(xs.min()) + 1, int(ys.min()) + 1, int(xs.max()) + 1, int(ys.max()) + 1)


class _Placer:
    """Places objects one above the other, keeping boxes apart and every object mostly visible."""

    def __init__(self, image_size: int, max_iou: float):
        self.image_size = image_size
        self.max_iou = max_iou
        self.extents = []
        self.colours = []
        self.visible = []  # per placed object: its pixels not covered by later objects
        self.areas = []

    def try_place(self, rng, shape, colour, size) -> Optional[Tuple[List[np.ndarray], np.ndarray]]:
        s = self.image_size
        for _ in range(_PLACEMENT_TRIES):
            centre = rng.uniform(-0.05 * size, s + 0.05 * size, 2)
            polygons = _placed_polygons(shape, size, rng.uniform(0, 2 * math.pi), centre)
            extent = _extent(polygons)
            if _inside_fraction(extent, s) < _MIN_INSIDE:
                continue
            if any(_box_iou(extent, e) > self.max_iou for e in self.extents):
                continue
            # Two touching objects of one colour would merge into one blob of no clear shape.
            if any(c == colour and _near(extent, e) for e, c in zip(self.extents, self.colours)):
                continue
            mask = _rasterize(polygons, s)
            solid = mask >= 128
            if self._hides_others(solid):
                continue
            for v in self.visible:
                v &= ~solid
            self.extents.append(extent)
            self.colours.append(colour)
            self.visible.append(solid)
            self.areas.append(max(1, int(solid.sum())))
            return polygons, mask
        return None

    def _hides_others(self, solid: np.ndarray) -> bool:
        for v, area in zip(self.visible, self.areas):
            if (v & ~solid).sum() < _MIN_VISIBLE * area:
                return True
        return False


def _paint(image, rng, mask: np.ndarray, rgb: np.ndarray) -> None:
    """Alpha-blends a flat colour with a slight lighting gradient into ``image`` in place."""
    ys, xs = np.nonzero(mask)
    window = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    patch, alpha = image[window], mask[window].astype(np.float32)[..., None] / 255.0
    ramp = _linear_ramp(rng, patch.shape[0], patch.shape[1])
    shade = 1.0 + rng.uniform(-0.12, 0.12) * (2 * ramp - 1)
    patch *= 1 - alpha
    patch += alpha * np.clip(rgb * shade, 0, 255)


def _sample_size(rng, image_size, min_scale, max_scale) -> float:
    # Log-uniform, so small objects are as common as large ones; never below 12 pixels.
    low = max(min_scale * image_size, min(12.0, max_scale * image_size))
    high = max(low, max_scale * image_size)
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def render_scene(
    rng: np.random.Generator,
    image_size: int,
    max_objects: int,
    max_distractors: int,
    min_scale: float,
    max_scale: float,
    max_iou: float,
) -> Tuple[np.ndarray, List[SceneObject]]:
    """One image (uint8 RGB, HxWx3) and its objects; class objects are those with a class_name."""
    while True:
        image = render_background(rng, image_size)
        kinds = ["class"] * int(rng.integers(1, max_objects + 1))
        kinds += ["distractor"] * int(rng.integers(0, max_distractors + 1))
        rng.shuffle(kinds)
        placer = _Placer(image_size, max_iou)
        objects = []
        for kind in kinds:
            obj = _draw_one(image, rng, placer, kind, image_size, min_scale, max_scale)
            if obj is not None:
                objects.append(obj)
        if any(o.class_name for o in objects):
            break
    image += rng.uniform(2, 9) * rng.standard_normal(image.shape, dtype=np.float32)
    if rng.random() < 0.3:
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.3, 0.7))
    return np.clip(np.round(image), 0, 255).astype(np.uint8), objects


def _draw_one(image, rng, placer, kind, image_size, min_scale, max_scale) -> Optional[SceneObject]:
    if kind == "class":
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = COLOURS[int(rng.integers(len(COLOURS)))]
        hsv = _CLASS_HSV[colour]
    else:
        shape = DISTRACTOR_SHAPES[int(rng.integers(len(DISTRACTOR_SHAPES)))]
        palette = {**_CLASS_HSV, **_OTHER_HSV}
        names = sorted(_OTHER_HSV) if rng.random() < 0.6 else sorted(palette)
        colour = names[int(rng.integers(len(names)))]
        hsv = palette[colour]
    size = _sample_size(rng, image_size, min_scale, max_scale)
    placed = placer.try_place(rng, shape, colour, size)
    if placed is None:
        return None
    polygons, mask = placed
    box = _tight_box(mask)
    if box is None:
        return None
    _paint(image, rng, mask, _jittered_rgb(rng, hsv))
    x0, y0, x1, y1 = _extent(polygons)
    truncated = x0 < 0 or y0 < 0 or x1 > image_size or y1 > image_size
    return SceneObject(shape, colour, box, bool(truncated))
