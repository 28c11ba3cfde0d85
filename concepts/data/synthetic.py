"""A procedural synthetic concept world: scenes with objects built from parts, colours and textures.

Every scene is drawn from ``np.random.default_rng([seed, index])`` and comes with an exact pixel
mask per concept (object classes, parts, paint colours, paint textures, background regions), a
tight box and a class label per object. It serves as concept data for probing and as a small
detection data set.

Drawing works on a label map: every painted surface (a "part") gets a part id, and a later part
overwrites the ids of the pixels it covers, so occlusion is exact by construction. All concept
masks are then read off the label map through one lookup table, so that

* an object's mask is the union of its parts' visible pixels,
* background masks (``sky``, ``ground``, ``water``) cover exactly the pixels no object covers,
* colour and texture masks cover the visible pixels of painted surfaces with that attribute.

Painted surfaces (car body, house wall, roof and door, boat hull and sails) get one of the
colours of :data:`PAINT_COLOURS` (with a per-surface jitter of at most :data:`COLOUR_JITTER` per
channel) and are either plain or carry one texture of :data:`TEXTURE_CONCEPTS`, drawn with a darker shade
(:data:`TEXTURE_SHADE`) of the same colour. Other parts (wheels, windows, trunks, crowns, masts)
have natural colours that belong to no colour concept.

The renderer uses numpy only; :meth:`SyntheticWorld.detection_target` is the only place that
builds torch tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from conceptlens.concepts.data.generated import GeneratedDataset, check_integer, scene_cache
from conceptlens.concepts.errors import DataError

__all__ = [
    "GENERATOR_VERSION",
    "OBJECT_CLASSES",
    "PART_CONCEPTS",
    "COLOUR_CONCEPTS",
    "TEXTURE_CONCEPTS",
    "BACKGROUND_CONCEPTS",
    "CONCEPTS",
    "PAINT_COLOURS",
    "COLOUR_JITTER",
    "TEXTURE_SHADE",
    "MAX_SIDE",
    "SceneObject",
    "Scene",
    "render_scene",
    "SyntheticWorld",
]

#: Bump whenever the drawing changes, so that cached activations keyed on the fingerprint expire.
GENERATOR_VERSION = "synthetic-world-1"

#: Object classes; detection label ``i + 1`` is ``OBJECT_CLASSES[i]`` (0 is background).
OBJECT_CLASSES: tuple[str, ...] = ("car", "house", "tree", "boat")
#: Part concepts. ``window`` occurs on cars and houses.
PART_CONCEPTS: tuple[str, ...] = (
    "body",
    "wheel",
    "window",
    "wall",
    "roof",
    "door",
    "trunk",
    "crown",
    "hull",
    "sail",
    "mast",
)
#: Colours of painted surfaces.
COLOUR_CONCEPTS: tuple[str, ...] = ("red", "green", "blue", "yellow", "white")
#: Textures of painted surfaces (a painted surface is plain or has one of these).
TEXTURE_CONCEPTS: tuple[str, ...] = ("stripes", "dots", "checker")
#: Background regions.
BACKGROUND_CONCEPTS: tuple[str, ...] = ("sky", "ground", "water")
#: Every concept, in the order of the mask stack.
CONCEPTS: tuple[str, ...] = (
    OBJECT_CLASSES + PART_CONCEPTS + COLOUR_CONCEPTS + TEXTURE_CONCEPTS + BACKGROUND_CONCEPTS
)

#: Base RGB of each paint colour; a surface's colour is its base plus a uniform integer jitter in
#: ``[-COLOUR_JITTER, COLOUR_JITTER]`` per channel.
PAINT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 35, 35),
    "green": (40, 190, 65),
    "blue": (35, 75, 215),
    "yellow": (240, 205, 35),
    "white": (238, 238, 238),
}
COLOUR_JITTER = 12
#: Texture pixels of a painted surface have colour ``floor(surface colour * TEXTURE_SHADE)``.
TEXTURE_SHADE = 0.5
#: Largest supported image side.
MAX_SIDE = 2048

_K = len(CONCEPTS)
_CONCEPT_INDEX = {name: k for k, name in enumerate(CONCEPTS)}

# Natural (unpainted) colours: base RGB and jitter.
_WHEEL = ((30, 30, 32), 6)
_HUB = ((150, 150, 155), 10)
_CAR_GLASS = ((55, 75, 100), 8)
_HOUSE_GLASS = ((150, 190, 215), 10)
_WINDOW_FRAME = ((70, 60, 55), 6)
_TRUNK = ((100, 68, 42), 10)
_CROWN = ((42, 105, 45), 12)
_MAST = ((80, 60, 42), 8)

_P_WATER = 0.24  # probability that a scene is a water scene (with boats)
_COUNT_WEIGHTS = (0.25, 0.30, 0.25, 0.20)  # 1..4 objects
_P_PLAIN = 0.5  # probability that a painted surface has no texture
_MAX_OVERLAP = 0.25  # max box intersection / smaller box area between two objects
_NOISE = 5  # background noise amplitude (noise in -5 .. +5)

# Precomputed coordinates: pixel centres (float) and integer pixel indices.
_CENTRES = np.arange(MAX_SIDE + 1, dtype=np.float32) + np.float32(0.5)
_INDICES = np.arange(2 * MAX_SIDE + 64, dtype=np.int32)

_EPS = 1e-4  # tolerance of the pixel-centre inside tests

# Canvas pixel format: RGB packed little-endian into uint32 (one write per pixel when drawing).
_PIXEL = np.dtype("<u4")

# Background part ids (object parts start after these).
_SKY, _GROUND, _WATER = 0, 1, 2


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene.

    Attributes
    ----------
    label : str
        Object class, one of :data:`OBJECT_CLASSES`.
    box : tuple of float
        ``(x0, y0, x1, y1)`` in pixel edge coordinates, tight around the object's visible pixels:
        the visible pixels have columns ``x0 .. x1 - 1`` and rows ``y0 .. y1 - 1``.
    """

    label: str
    box: tuple[float, float, float, float]


@dataclass(frozen=True, eq=False)
class Scene:
    """A rendered scene.

    Attributes
    ----------
    image : numpy.ndarray
        ``uint8`` array (H, W, 3).
    masks : numpy.ndarray
        ``bool`` array (K, H, W), one mask per concept of :data:`CONCEPTS`, in that order.
    objects : tuple of SceneObject
        The objects with at least one visible pixel, in drawing order (back to front).
    """

    image: np.ndarray
    masks: np.ndarray
    objects: tuple[SceneObject, ...]


# --------------------------------------------------------------------------------------------
# random draws
# --------------------------------------------------------------------------------------------


class _Draws:
    """Scalar random draws served from blocks of ``rng.random`` (much faster than one call each)."""

    __slots__ = ("_rng", "_buffer", "_position")

    def __init__(self, rng: np.random.Generator) -> None:
        self._rng = rng
        self._buffer: list[float] = []
        self._position = 0

    def u(self, low: float = 0.0, high: float = 1.0) -> float:
        if self._position >= len(self._buffer):
            self._buffer = self._rng.random(128).tolist()
            self._position = 0
        value = self._buffer[self._position]
        self._position += 1
        return low + (high - low) * value

    def i(self, low: int, high: int) -> int:
        """Uniform integer in ``[low, high]`` (inclusive)."""
        return low + min(int(self.u() * (high - low + 1)), high - low)

    def chance(self, p: float) -> bool:
        return self.u() < p

    def weighted(self, weights: tuple[float, ...]) -> int:
        x = self.u() * sum(weights)
        for k, w in enumerate(weights):
            x -= w
            if x < 0:
                return k
        return len(weights) - 1

    def colour(self, base: tuple[int, int, int], jitter: int) -> tuple[int, int, int]:
        r, g, b = (min(255, max(0, c + self.i(-jitter, jitter))) for c in base)
        return r, g, b


# --------------------------------------------------------------------------------------------
# canvas: image + part-id label map
# --------------------------------------------------------------------------------------------


def _pack(rgb: tuple[int, int, int]) -> int:
    """Pack an RGB triple into the canvas's little-endian uint32 pixel format (R in the low byte)."""
    return rgb[0] | (rgb[1] << 8) | (rgb[2] << 16)


class _Paint:
    """How a surface is filled: one colour, or a colour plus a texture in a darker shade."""

    __slots__ = ("rgb", "value", "shade", "colour_index", "texture", "period", "phase_y", "phase_x", "orient")

    def __init__(self, rgb: tuple[int, int, int], colour_index: int = -1, texture: int = -1) -> None:
        self.rgb = rgb
        self.value = np.uint32(_pack(rgb))
        self.shade = np.uint32(_pack(tuple(int(c * TEXTURE_SHADE) for c in rgb)))  # type: ignore[arg-type]
        self.colour_index = colour_index
        self.texture = texture
        self.period = self.phase_y = self.phase_x = self.orient = 0


def _texture(paint: _Paint, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Boolean texture pattern on the window rows ``y0:y1``, columns ``x0:x1``."""
    ys = _INDICES[y0 + paint.phase_y : y1 + paint.phase_y, None]
    xs = _INDICES[None, x0 + paint.phase_x : x1 + paint.phase_x]
    p = paint.period
    if paint.texture == 0:  # stripes
        half = p // 2
        if paint.orient == 0:
            pattern = np.broadcast_to(ys % p < half, (y1 - y0, x1 - x0))
        elif paint.orient == 1:
            pattern = np.broadcast_to(xs % p < half, (y1 - y0, x1 - x0))
        elif paint.orient == 2:
            pattern = (xs + ys) % p < half
        else:
            pattern = (xs - ys) % p < half
    elif paint.texture == 1:  # dots
        dy = ys % p - (p - 1) / 2
        dx = xs % p - (p - 1) / 2
        pattern = dx * dx + dy * dy <= (0.3 * p) ** 2 + 0.3
    else:  # checker
        pattern = (ys // p + xs // p) % 2 == 0
    return pattern


class _Canvas:
    def __init__(self, image: np.ndarray, part_id: np.ndarray, dr: _Draws) -> None:
        self.image = image
        self.part_id = part_id
        self.height, self.width = part_id.shape
        self.dr = dr
        # per part id: (object index, part concept index, colour index, texture index); -1 = none
        self.parts: list[tuple[int, int, int, int]] = [
            (-1, _CONCEPT_INDEX["sky"], -1, -1),
            (-1, _CONCEPT_INDEX["ground"], -1, -1),
            (-1, _CONCEPT_INDEX["water"], -1, -1),
        ]

    # -- parts and paints ------------------------------------------------------------------
    def add_part(self, obj: int, part: str, paint: _Paint) -> int:
        self.parts.append((obj, _CONCEPT_INDEX[part], paint.colour_index, paint.texture))
        return len(self.parts) - 1

    def painted(self, avoid: int = -1) -> _Paint:
        """A random paint colour (different from ``avoid``), plain or textured."""
        dr = self.dr
        index = dr.i(0, len(COLOUR_CONCEPTS) - 2 if avoid >= 0 else len(COLOUR_CONCEPTS) - 1)
        if avoid >= 0 and index >= avoid:
            index += 1
        colour = dr.colour(PAINT_COLOURS[COLOUR_CONCEPTS[index]], COLOUR_JITTER)
        texture = -1 if dr.chance(_P_PLAIN) else dr.i(0, len(TEXTURE_CONCEPTS) - 1)
        paint = _Paint(colour, index, texture)
        if texture == 0:
            paint.period = dr.i(4, 7)
            paint.orient = dr.i(0, 3)
        elif texture == 1:
            paint.period = dr.i(5, 7)
        elif texture == 2:
            paint.period = dr.i(3, 5)
        paint.phase_y = dr.i(0, 15)
        paint.phase_x = dr.i(0, 15)
        return paint

    def natural(self, spec: tuple[tuple[int, int, int], int]) -> _Paint:
        return _Paint(self.dr.colour(*spec))

    # -- windows -----------------------------------------------------------------------------
    def window(self, x0: float, y0: float, x1: float, y1: float) -> tuple[int, int, int, int] | None:
        """Integer pixel window covering the float box, clipped to the image (None if empty)."""
        iy0 = max(0, int(math.floor(y0)))
        ix0 = max(0, int(math.floor(x0)))
        iy1 = min(self.height, int(math.ceil(y1)))
        ix1 = min(self.width, int(math.ceil(x1)))
        if iy1 <= iy0 or ix1 <= ix0:
            return None
        return iy0, iy1, ix0, ix1

    def fill(self, win: tuple[int, int, int, int], mask: np.ndarray | None, pid: int, paint: _Paint) -> None:
        """Paint ``mask`` (None: the whole window) of window ``win`` and claim it for part ``pid``."""
        y0, y1, x0, x1 = win
        image = self.image[y0:y1, x0:x1]
        ids = self.part_id[y0:y1, x0:x1]
        if mask is None:
            image[...] = paint.value
            ids[...] = pid
            if paint.texture >= 0:
                np.putmask(image, _texture(paint, y0, y1, x0, x1), paint.shade)
        else:
            np.putmask(image, mask, paint.value)
            np.putmask(ids, mask, np.uint8(pid))
            if paint.texture >= 0:
                np.putmask(image, mask & _texture(paint, y0, y1, x0, x1), paint.shade)

    # -- shapes ------------------------------------------------------------------------------
    def rect(self, x0: float, y0: float, x1: float, y1: float, pid: int, paint: _Paint) -> None:
        """Axis-aligned rectangle, rounded to whole pixels (at least one pixel per side)."""
        ix0, iy0 = int(round(x0)), int(round(y0))
        ix1, iy1 = max(ix0 + 1, int(round(x1))), max(iy0 + 1, int(round(y1)))
        win = self.window(ix0, iy0, ix1, iy1)
        if win is not None:
            self.fill(win, None, pid, paint)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, pid: int, paint: _Paint) -> None:
        """Ellipse (a disc when ``rx == ry``): pixels whose centre lies inside."""
        rx, ry = max(rx, 0.5), max(ry, 0.5)
        win = self.window(cx - rx, cy - ry, cx + rx, cy + ry)
        if win is None:
            return
        y0, y1, x0, x1 = win
        dy = ((_CENTRES[y0:y1] - cy) / ry) ** 2
        dx = ((_CENTRES[x0:x1] - cx) / rx) ** 2
        mask = dy[:, None] + dx[None, :] <= 1.0
        self.fill(win, mask, pid, paint)

    def polygon(self, points: list[tuple[float, float]], pid: int, paint: _Paint) -> None:
        """Convex polygon given by its vertices (x, y) in order: pixels whose centre lies inside."""
        xs_p = [p[0] for p in points]
        ys_p = [p[1] for p in points]
        # window = pixels whose centres lie in the polygon's bounding box, so that axis-aligned
        # edges (which bound a convex polygon's box) need no test
        y0 = max(0, math.ceil(min(ys_p) - 0.5 - _EPS))
        y1 = min(self.height, math.floor(max(ys_p) - 0.5 + _EPS) + 1)
        x0 = max(0, math.ceil(min(xs_p) - 0.5 - _EPS))
        x1 = min(self.width, math.floor(max(xs_p) - 0.5 + _EPS) + 1)
        if y1 <= y0 or x1 <= x0:
            return
        n = len(points)
        area2 = sum(xs_p[k] * ys_p[(k + 1) % n] - xs_p[(k + 1) % n] * ys_p[k] for k in range(n))
        sign = 1.0 if area2 >= 0 else -1.0
        mask = None
        for k in range(n):
            px, py = points[k]
            qx, qy = points[(k + 1) % n]
            if px == qx or py == qy:
                continue
            # inside when sign * cross(q - p, pixel - p) >= 0, i.e. a * x + b * y + c >= 0
            a = -sign * (qy - py)
            b = sign * (qx - px)
            c = -(a * px + b * py) + _EPS * math.hypot(a, b)
            inside = _CENTRES[y0:y1, None] * np.float32(b) + np.float32(c) >= _CENTRES[None, x0:x1] * np.float32(-a)
            mask = inside if mask is None else mask & inside
        self.fill((y0, y1, x0, x1), mask, pid, paint)


# --------------------------------------------------------------------------------------------
# objects
# --------------------------------------------------------------------------------------------

# Height / width aspect range per class.
_ASPECT = {"car": (0.45, 0.6), "house": (0.9, 1.3), "tree": (1.25, 1.8), "boat": (0.95, 1.35)}


def _draw_car(cv: _Canvas, obj: int, x: float, y: float, w: float, h: float) -> None:
    dr = cv.dr
    yb = y + h
    right = dr.chance(0.5)  # facing direction

    def fx(t: float) -> float:  # horizontal position t in [0, 1] of the car, mirrored if facing left
        return x + w * (t if right else 1.0 - t)

    r = min(dr.u(0.1, 0.13) * w, 0.28 * h)
    body_paint = cv.painted()
    body = cv.add_part(obj, "body", body_paint)
    chassis_top = y + dr.u(0.36, 0.48) * h
    chassis_bottom = yb - 0.55 * r
    bevel = dr.u(0.06, 0.12)
    cv.polygon(
        [
            (fx(0.0), chassis_top),
            (fx(1.0 - bevel), chassis_top),
            (fx(1.0), chassis_top + 0.4 * (chassis_bottom - chassis_top)),
            (fx(1.0), chassis_bottom),
            (fx(0.0), chassis_bottom),
        ],
        body,
        body_paint,
    )
    # cabin: trapezoid, narrower at the top
    b0, b1 = dr.u(0.1, 0.2), dr.u(0.72, 0.84)
    t0, t1 = b0 + dr.u(0.1, 0.18), b1 - dr.u(0.1, 0.2)
    cabin_bottom = chassis_top + 1.0
    cv.polygon([(fx(t0), y), (fx(t1), y), (fx(b1), cabin_bottom), (fx(b0), cabin_bottom)], body, body_paint)
    # windows on the cabin, inside its narrow top part
    cab_h = chassis_top - y
    wy0 = y + 0.2 * cab_h
    wy1 = chassis_top - 0.1 * cab_h
    frac = 0.2 * cab_h / max(cab_h + 1.0, 1e-6)
    l0 = t0 + (b0 - t0) * frac + 0.04
    l1 = t1 + (b1 - t1) * frac - 0.04
    glass = cv.natural(_CAR_GLASS)
    if (l1 - l0) * w >= 8 and dr.chance(0.75):
        pillar = max(1.0, 0.05 * w) / w
        mid = (l0 + l1) / 2 + dr.u(-0.05, 0.05) * (l1 - l0)
        spans = [(l0, mid - pillar / 2), (mid + pillar / 2, l1)]
    else:
        spans = [(l0, l1)]
    for s0, s1 in spans:
        pid = cv.add_part(obj, "window", glass)
        a, b = sorted((fx(s0), fx(s1)))
        cv.rect(a, wy0, b, wy1, pid, glass)
    # wheels (discs with a hub), drawn over the body
    for t in (dr.u(0.17, 0.24), dr.u(0.76, 0.83)):
        cx = fx(t)
        cx = min(max(cx, x + r), x + w - r)
        tyre = cv.natural(_WHEEL)
        pid = cv.add_part(obj, "wheel", tyre)
        cv.ellipse(cx, yb - r, r, r, pid, tyre)
        cv.ellipse(cx, yb - r, 0.45 * r, 0.45 * r, pid, cv.natural(_HUB))


def _draw_house(cv: _Canvas, obj: int, x: float, y: float, w: float, h: float) -> None:
    dr = cv.dr
    yb = y + h
    roof_h = dr.u(0.28, 0.42) * h
    overhang = dr.u(0.04, 0.09) * w
    wall_x0, wall_x1 = x + overhang, x + w - overhang
    wall_y0 = y + roof_h
    wall_w, wall_h = wall_x1 - wall_x0, yb - wall_y0
    wall_paint = cv.painted()
    wall = cv.add_part(obj, "wall", wall_paint)
    cv.rect(wall_x0, wall_y0, wall_x1, yb, wall, wall_paint)
    roof_paint = cv.painted(avoid=wall_paint.colour_index)
    roof = cv.add_part(obj, "roof", roof_paint)
    apex = x + w * dr.u(0.42, 0.58)
    cv.polygon([(x, wall_y0 + 1.0), (apex, y), (x + w, wall_y0 + 1.0)], roof, roof_paint)
    # door and windows in columns
    n_cols = 3 if wall_w >= 30 and dr.chance(0.5) else 2
    col_w = wall_w / n_cols
    door_col = dr.i(0, n_cols - 1)
    door_w = dr.u(0.4, 0.6) * col_w
    door_h = dr.u(0.38, 0.52) * wall_h
    door_cx = wall_x0 + (door_col + 0.5) * col_w
    door_paint = cv.painted(avoid=wall_paint.colour_index)
    door = cv.add_part(obj, "door", door_paint)
    cv.rect(door_cx - door_w / 2, yb - door_h, door_cx + door_w / 2, yb, door, door_paint)
    glass = cv.natural(_HOUSE_GLASS)
    frame = cv.natural(_WINDOW_FRAME)
    win_w = dr.u(0.45, 0.6) * col_w
    win_h = dr.u(0.2, 0.28) * wall_h
    row_y = wall_y0 + 0.3 * wall_h
    rows = [row_y]
    if wall_h > 1.3 * wall_w:  # tall wall: a second row beside the door
        rows.append(wall_y0 + 0.62 * wall_h)
    for row, cy in enumerate(rows):
        for col in range(n_cols):
            if col == door_col and row > 0:
                continue
            if col == door_col and n_cols == 2 and dr.chance(0.5):
                continue  # some houses have no window above the door
            cx = wall_x0 + (col + 0.5) * col_w
            x0, y0 = int(round(cx - win_w / 2)), int(round(cy - win_h / 2))
            x1, y1 = max(x0 + 1, int(round(cx + win_w / 2))), max(y0 + 1, int(round(cy + win_h / 2)))
            pid = cv.add_part(obj, "window", glass)
            cv.rect(x0, y0, x1, y1, pid, glass)
            if x1 - x0 >= 6 and y1 - y0 >= 6:  # window cross
                mx, my = (x0 + x1) // 2, (y0 + y1) // 2
                cv.rect(mx, y0, mx + 1, y1, pid, frame)
                cv.rect(x0, my, x1, my + 1, pid, frame)


def _draw_tree(cv: _Canvas, obj: int, x: float, y: float, w: float, h: float) -> None:
    dr = cv.dr
    yb = y + h
    crown_h = dr.u(0.55, 0.72) * h
    trunk_w = max(2.0, dr.u(0.12, 0.18) * w)
    trunk_cx = x + w / 2 + dr.u(-0.05, 0.05) * w
    trunk_paint = cv.natural(_TRUNK)
    trunk = cv.add_part(obj, "trunk", trunk_paint)
    cv.rect(trunk_cx - trunk_w / 2, y + 0.6 * crown_h, trunk_cx + trunk_w / 2, yb, trunk, trunk_paint)
    crown_paint = cv.natural(_CROWN)
    crown = cv.add_part(obj, "crown", crown_paint)
    if dr.chance(0.6):
        cv.ellipse(x + w / 2, y + crown_h / 2, w / 2, crown_h / 2, crown, crown_paint)
    else:  # a cluster of three discs
        r_side = min(dr.u(0.28, 0.34) * w, 0.45 * crown_h)
        r_top = min(dr.u(0.3, 0.36) * w, 0.42 * crown_h)
        cv.ellipse(x + r_side, y + crown_h - r_side, r_side, r_side, crown, crown_paint)
        cv.ellipse(x + w - r_side, y + crown_h - r_side, r_side, r_side, crown, crown_paint)
        cv.ellipse(x + w / 2, y + r_top, r_top, r_top, crown, crown_paint)
        cv.ellipse(x + w / 2, y + crown_h - 1.1 * r_side, r_side, r_side, crown, crown_paint)


def _draw_boat(cv: _Canvas, obj: int, x: float, y: float, w: float, h: float) -> None:
    dr = cv.dr
    yb = y + h
    hull_h = dr.u(0.22, 0.32) * h
    hull_top = yb - hull_h
    mast_cx = x + dr.u(0.4, 0.58) * w
    mast_w = max(1.5, 0.025 * w)
    mast_paint = cv.natural(_MAST)
    mast = cv.add_part(obj, "mast", mast_paint)
    cv.rect(mast_cx - mast_w / 2, y, mast_cx + mast_w / 2, hull_top + 1.0, mast, mast_paint)
    side = 1.0 if dr.chance(0.5) else -1.0
    sail_bottom = hull_top - dr.u(0.04, 0.08) * h
    for k, (top, reach) in enumerate(((y + 0.04 * h, dr.u(0.75, 0.92)), (y + dr.u(0.18, 0.3) * h, dr.u(0.5, 0.7)))):
        if k == 1 and dr.chance(0.5):
            break  # no jib
        s = side if k == 0 else -side
        edge = mast_cx + s * mast_w / 2
        room = (x + w - edge) if s > 0 else (edge - x)
        tip = edge + s * reach * room
        sail_paint = cv.painted()
        sail = cv.add_part(obj, "sail", sail_paint)
        cv.polygon([(edge, top), (edge, sail_bottom), (tip, sail_bottom)], sail, sail_paint)
    hull_paint = cv.painted()
    hull = cv.add_part(obj, "hull", hull_paint)
    s0, s1 = dr.u(0.1, 0.22), dr.u(0.1, 0.22)
    cv.polygon([(x, hull_top), (x + w, hull_top), (x + w * (1 - s1), yb), (x + w * s0, yb)], hull, hull_paint)


_DRAW = {"car": _draw_car, "house": _draw_house, "tree": _draw_tree, "boat": _draw_boat}


# --------------------------------------------------------------------------------------------
# background and layout
# --------------------------------------------------------------------------------------------

_SKY_TOP = ((95, 155, 225), 18)
_SKY_HORIZON = ((190, 215, 240), 10)
_WATER_NEAR = ((65, 130, 170), 12)
_WATER_FAR = ((28, 78, 128), 10)
_GROUND_COLOURS = ((140, 150, 90), (178, 162, 122), (122, 142, 80), (150, 128, 98))


def _background(
    rng: np.random.Generator, dr: _Draws, height: int, width: int
) -> tuple[np.ndarray, np.ndarray, bool, float]:
    """Sky above a horizon, ground (gentle hills) or water below; returns image, part ids,
    whether it is a water scene, and the lowest row of the horizon line."""
    water = dr.chance(_P_WATER)
    horizon = dr.u(0.3, 0.56) * height
    sky_top = np.array(dr.colour(*_SKY_TOP), dtype=np.float32)
    sky_bottom = np.array(dr.colour(*_SKY_HORIZON), dtype=np.float32)
    if water:
        near = np.array(dr.colour(*_WATER_NEAR), dtype=np.float32)
        far = np.array(dr.colour(*_WATER_FAR), dtype=np.float32)
    else:
        near = np.array(dr.colour(_GROUND_COLOURS[dr.i(0, len(_GROUND_COLOURS) - 1)], 12), dtype=np.float32)
        far = near * np.float32(dr.u(0.72, 0.9))
    ys = _CENTRES[:height]
    t_sky = np.clip(ys / np.float32(horizon), 0.0, 1.0)[:, None]
    sky_rows = sky_top + (sky_bottom - sky_top) * t_sky
    t_low = np.clip((ys - np.float32(horizon)) / np.float32(max(height - horizon, 1.0)), 0.0, 1.0)[:, None]
    low_rows = near + (far - near) * t_low
    if water:
        line = np.full(width, horizon, dtype=np.float32)
        low_rows = low_rows + rng.standard_normal((height, 1), dtype=np.float32) * np.float32(3.0)
        lowest = horizon
    else:
        amplitude = dr.u(0.0, 0.04) * height
        period = dr.u(0.7, 1.6) * width
        phase = dr.u(0.0, 2 * math.pi)
        line = horizon + amplitude * np.sin(_CENTRES[:width] * np.float32(2 * math.pi / period) + np.float32(phase))
        lowest = horizon + amplitude
    sky = ys[:, None] < line[None, :]
    # colour table: rows 0..H-1 sky, H..2H-1 ground/water; kept in [0, 255 - 2 * _NOISE] so
    # that adding the noise (0 .. 2 * _NOISE, centred by the -_NOISE below) cannot overflow
    table = np.concatenate([sky_rows, low_rows]) - np.float32(_NOISE)
    np.clip(table, 0.0, 255.0 - 2 * _NOISE, out=table)
    table = table.astype(np.uint32)
    packed = table[:, 0] | (table[:, 1] << 8) | (table[:, 2] << 16)
    lookup = _INDICES[:height, None] + np.where(sky, 0, height)
    image = np.take(packed, lookup).astype(_PIXEL)
    # noise 0 .. 10 per channel (mean 5), added to all three channels at once without carries
    noise = np.frombuffer(rng.bytes(height * width * 4), dtype=_PIXEL).reshape(height, width)
    image += (noise & np.uint32(0x070707)) + ((noise >> np.uint32(3)) & np.uint32(0x030303))
    part_id = np.where(sky, np.uint8(_SKY), np.uint8(_WATER if water else _GROUND))
    return image, part_id, water, float(lowest)


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection area of two boxes over the smaller box's area."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller


def _layout(
    dr: _Draws, height: int, width: int, water: bool, horizon_low: float
) -> list[tuple[str, float, float, float, float]]:
    """Object classes and boxes (label, x, y, w, h), back to front (by bottom edge)."""
    n_objects = 1 + dr.weighted(_COUNT_WEIGHTS)
    largest = max(0.36, 0.6 - 0.07 * (n_objects - 1))
    placed: list[tuple[str, float, float, float, float]] = []
    for k in range(n_objects):
        label = "boat" if water else OBJECT_CLASSES[dr.i(0, 2)]
        for _attempt in range(25):
            size = dr.u(0.25, largest)
            aspect = dr.u(*_ASPECT[label])
            if aspect >= 1.0:
                h = size * height
                w = h / aspect
            else:
                w = size * width
                h = aspect * w
            w, h = min(w, 0.95 * width), min(h, 0.95 * height)
            # the object stands below the horizon (boats: hull partly below it)
            margin = 0.12 * h if label == "boat" else 0.03 * height + 1.0
            low, high = max(h, horizon_low + margin), height - 0.5
            if low > high:
                continue
            bottom = dr.u(low, high)
            x = dr.u(0.0, width - w)
            box = (x, bottom - h, x + w, bottom)
            if all(_overlap(box, (o[1], o[2], o[1] + o[3], o[2] + o[4])) <= _MAX_OVERLAP for o in placed):
                placed.append((label, x, bottom - h, w, h))
                break
        if not placed:  # cannot happen with the ranges above; keep every scene non-empty anyway
            w, h = 0.25 * width, 0.25 * height
            placed.append((label, 0.0, height - h, w, h))
    placed.sort(key=lambda o: o[2] + o[4])
    return placed


# --------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------


def _check_size_range(size_range: Any) -> tuple[int, int]:
    try:
        low, high = (int(v) for v in size_range)
        ok = all(int(v) == v for v in size_range)
    except (TypeError, ValueError):
        ok = False
    if not ok or not 16 <= low <= high <= MAX_SIDE:
        raise DataError(
            f"size_range={size_range!r}",
            "must be two integers (low, high) with 16 <= low <= high",
            f"pass e.g. size_range=(96, 128), or (112, 112) for a fixed size; at most {MAX_SIDE}",
        )
    return low, high


def _scene_size(seed: int, index: int, size_range: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of a scene without drawing it (the first draws of the scene's generator)."""
    rng = np.random.default_rng([seed, index])
    height, width = rng.integers(size_range[0], size_range[1] + 1, size=2)
    return int(height), int(width)


def _render(
    seed: int, index: int, size_range: tuple[int, int] = (96, 128), with_instances: bool = False
) -> tuple[Scene, np.ndarray | None]:
    """Render a scene; with ``with_instances``, also return its instance map.

    Returns
    -------
    scene : Scene
    instances : numpy.ndarray or None
        ``int8`` (H, W): index into ``scene.objects`` of the object visible at each pixel, -1 on
        background (None unless ``with_instances``).
    """
    seed, index = check_integer("seed", seed, 0), check_integer("index", index, 0)
    low, high = _check_size_range(size_range)
    rng = np.random.default_rng([seed, index])
    height, width = (int(v) for v in rng.integers(low, high + 1, size=2))
    dr = _Draws(rng)
    image, part_id, water, horizon_low = _background(rng, dr, height, width)
    canvas = _Canvas(image, part_id, dr)
    layout = _layout(dr, height, width, water, horizon_low)
    for obj, (label, x, y, w, h) in enumerate(layout):
        _DRAW[label](canvas, obj, x, y, w, h)

    # which part ids carry each concept
    parts = canvas.parts
    carriers: list[list[int]] = [[] for _ in range(_K)]
    object_range = [[len(parts), 0] for _ in layout]  # [first, last] part id of each object
    for pid, (obj, part, colour, texture) in enumerate(parts):
        carriers[part].append(pid)
        if obj >= 0:
            carriers[_CONCEPT_INDEX[layout[obj][0]]].append(pid)
            object_range[obj][0] = min(object_range[obj][0], pid)
            object_range[obj][1] = max(object_range[obj][1], pid)
        if colour >= 0:
            carriers[_CONCEPT_INDEX[COLOUR_CONCEPTS[colour]]].append(pid)
        if texture >= 0:
            carriers[_CONCEPT_INDEX[TEXTURE_CONCEPTS[texture]]].append(pid)
    masks = np.zeros((_K, height, width), dtype=bool)
    for k, pids in enumerate(carriers):
        if pids:
            _select(part_id, pids, masks[k])

    objects = []
    kept = []
    for obj, (label, *_rest) in enumerate(layout):
        first, last = object_range[obj]
        if first > last:
            continue
        visible = _select(part_id, list(range(first, last + 1)))
        rows = np.flatnonzero(visible.any(axis=1))
        if rows.size == 0:
            continue
        cols = np.flatnonzero(visible.any(axis=0))
        kept.append(obj)
        objects.append(
            SceneObject(label, (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)))
        )
    instances = None
    if with_instances:
        owner = np.full(len(parts), -1, dtype=np.int8)
        for position, obj in enumerate(kept):
            first, last = object_range[obj]
            owner[first : last + 1] = position
        instances = owner[part_id]
    rgb = np.empty((height, width, 3), dtype=np.uint8)
    rgb[..., 0] = image  # unpack: the uint8 casts keep the low byte
    rgb[..., 1] = image >> np.uint32(8)
    rgb[..., 2] = image >> np.uint32(16)
    rgb.setflags(write=False)
    masks.setflags(write=False)
    return Scene(image=rgb, masks=masks, objects=tuple(objects)), instances


def _select(part_id: np.ndarray, pids: list[int], out: np.ndarray | None = None) -> np.ndarray:
    """Boolean map of the pixels whose part id is in ``pids`` (sorted ascending)."""
    runs: list[list[int]] = []
    for pid in pids:
        if runs and pid == runs[-1][1] + 1:
            runs[-1][1] = pid
        else:
            runs.append([pid, pid])
    hit: np.ndarray | None = None
    for first, last in runs:
        if first == last:
            current = part_id == first
        else:  # uint8 wrap-around turns ids below `first` into large values
            current = (part_id - np.uint8(first)) <= np.uint8(last - first)
        if hit is None:
            hit = current
        else:
            hit |= current
    assert hit is not None
    if out is not None:
        out[...] = hit
        return out
    return hit


def render_scene(seed: int, index: int, size_range: tuple[int, int] = (96, 128)) -> Scene:
    """Render scene ``index`` of the world ``seed``.

    The scene uses ``np.random.default_rng([seed, index])`` only, so an item does not depend on
    how many items are generated, and the same ``(seed, index, size_range)`` always gives
    identical bytes.

    Parameters
    ----------
    seed : int
        World seed (non-negative).
    index : int
        Scene index (non-negative).
    size_range : tuple of int, optional
        Inclusive range of the image height and width, drawn independently; ``(112, 112)`` gives
        fixed 112x112 scenes. ``16 <= low <= high``.

    Returns
    -------
    Scene
        The image, one mask per concept of :data:`CONCEPTS` and the visible objects. Its arrays
        are read-only.

    Raises
    ------
    DataError
        If ``seed``, ``index`` or ``size_range`` is invalid.

    Examples
    --------
    >>> scene = render_scene(seed=0, index=2, size_range=(96, 96))
    >>> scene.image.shape, scene.masks.shape
    ((96, 96, 3), (26, 96, 96))
    >>> scene.objects
    (SceneObject(label='boat', box=(19.0, 16.0, 61.0, 69.0)),)
    >>> [concept for concept, mask in zip(CONCEPTS, scene.masks) if mask.any()]
    ['boat', 'hull', 'sail', 'mast', 'green', 'blue', 'white', 'sky', 'water']
    """
    return _render(seed, index, size_range)[0]


_cached_scene = scene_cache(render_scene)


# --------------------------------------------------------------------------------------------
# dataset
# --------------------------------------------------------------------------------------------


class SyntheticWorld(GeneratedDataset):
    """A :class:`~conceptlens.concepts.data.generated.GeneratedDataset` of procedurally rendered scenes.

    Parameters
    ----------
    n_images : int, optional
        Number of scenes; item ``i`` is scene ``i`` of world ``seed``.
    seed : int, optional
        World seed (non-negative).
    size_range : tuple of int, optional
        Inclusive range of image height and width (drawn independently per scene).
    split_seed : int or None, optional
        Seed of the train/val/test split; ``None`` uses ``seed``.

    Raises
    ------
    DataError
        If an argument is out of range.

    Examples
    --------
    >>> world = SyntheticWorld(n_images=4, seed=0)
    >>> world.name, len(world), len(world.concepts)
    ('synthetic-s0-n4', 4, 26)
    >>> world.image_size(0) == world.image(0).shape[:2]
    True
    """

    kind = "synthetic"

    def __init__(
        self,
        n_images: int = 500,
        seed: int = 0,
        size_range: tuple[int, int] = (96, 128),
        split_seed: int | None = None,
    ) -> None:
        super().__init__(CONCEPTS, n_images, seed, split_seed)
        self.size_range = _check_size_range(size_range)

    def _scene(self, index: int) -> Scene:
        return _cached_scene(self.seed, self.check_index(index), self.size_range)

    def _generator_version(self) -> str:
        return GENERATOR_VERSION

    def _fingerprint_fields(self) -> dict[str, Any]:
        return {"size_range": list(self.size_range)}

    def scene(self, index: int) -> Scene:
        """Return scene ``index`` (cached: the last 64 scenes rendered are kept; arrays read-only)."""
        return self._scene(index)

    def objects(self, index: int) -> tuple[SceneObject, ...]:
        """Return the visible objects of scene ``index``, back to front."""
        return self._scene(index).objects

    def image_size(self, index: int) -> tuple[int, int]:
        """Return (height, width) of image ``index`` without rendering it."""
        return _scene_size(self.seed, self.check_index(index), self.size_range)

    def detection_target(self, index: int) -> dict[str, Any]:
        """Return the torchvision-style detection target of scene ``index``.

        Returns
        -------
        dict
            ``"boxes"``: ``float32`` tensor (n, 4), xyxy in pixels; ``"labels"``: ``int64``
            tensor (n,), ``OBJECT_CLASSES.index(label) + 1``.
        """
        import torch

        objects = self.objects(index)
        boxes = torch.tensor([o.box for o in objects], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([OBJECT_CLASSES.index(o.label) + 1 for o in objects], dtype=torch.int64)
        return {"boxes": boxes, "labels": labels}
