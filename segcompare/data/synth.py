"""A synthetic Cityscapes: street scenes in the real layout, for tests, the demo and examples.

Each scene is a small 3-D street (road, sidewalks, facades, poles, lights, signs, trees, walls,
fences, people, riders and vehicles) seen by a pinhole camera at the height and focal length of
the Cityscapes car (fx/width = 1.1). Every object is a planar polygon; its projection is drawn into
the label images exactly as cityscapesscripts draws annotation polygons, and the same polygons are
written to ``*_gtFine_polygons.json``, so `json2labelImg` / `json2instanceImg` reproduce our
labelIds / instanceIds. Pixels are coloured per class (own colour range, texture in world
coordinates, per-object variation), then lit (exposure, tint, sun side, shadows) and noised.
Classes overlap in colour (silver cars vs poles vs walls, vegetation vs terrain, dark clothes vs
tyres and glass) so shape and context matter, yet a small network learns the set in minutes on a
CPU: the small classes (lights, signs, people, riders, two-wheelers) are drawn larger than life,
several per image and some close to the camera, so they stay several pixels wide at the models'
1/4 output resolution; each class has its own pattern (lamps in a bordered housing, staggered
blocks, reflective bands, slats) that survives the training pipeline's colour jitter.

Video (`video_frames`): one scene, the camera driving forward ~0.5 m per frame while vehicles and
people move, written as ``leftImg8bit_demoVideo/stuttgart_00/stuttgart_00_000000_0000NN_...``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import cv2
import numpy as np
from PIL import Image, ImageDraw

from segcompare.data.labels import ID_TO_COLOR, LABEL_BY_NAME
from segcompare.utils import SegcompareError, atomic_write_bytes, atomic_write_text

CITIES = {
    "train": ("aachen", "bochum", "bremen"),
    "val": ("frankfurt", "lindau"),
    "test": ("berlin", "bielefeld"),
}
VIDEO_CITY = "stuttgart_00"
FOCAL_PER_WIDTH = 1.1  # Cityscapes camera: fx ~ 2262 px for 2048 px wide images
NEAR = 0.8  # m; polygons are clipped here before projection
# Bicycles, motorcycles and their riders are drawn this many times their real size, so that a
# small model sees them several output pixels wide (it has 1/4 of the input resolution).
TWO_WHEELER_SCALE = 1.35


# --- camera ------------------------------------------------------------------------------------
@dataclass
class Camera:
    width: int
    height: int
    f: float
    cx: float
    cy: float
    x: float  # lateral position (m)
    y: float  # height above the road (m)
    z: float  # position along the street (m)
    yaw: float  # rad, positive turns right
    roll: float  # rad

    def to_camera(self, p: np.ndarray) -> np.ndarray:
        """World N×3 -> camera N×3 (x right, y up, z forward)."""
        d = p - np.array([self.x, self.y, self.z])
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        return np.stack([c * d[:, 0] - s * d[:, 2], d[:, 1], s * d[:, 0] + c * d[:, 2]], 1)

    def to_pixels(self, pc: np.ndarray) -> np.ndarray:
        """Camera N×3 (z > 0) -> pixels N×2."""
        a, b = self.f * pc[:, 0] / pc[:, 2], -self.f * pc[:, 1] / pc[:, 2]
        c, s = math.cos(self.roll), math.sin(self.roll)
        return np.stack([self.cx + c * a - s * b, self.cy + s * a + c * b], 1)

    def rays(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Pixels -> world ray directions N×3 (not normalised, camera z = 1)."""
        c, s = math.cos(self.roll), math.sin(self.roll)
        a, b = u - self.cx, v - self.cy
        a, b = c * a + s * b, -s * a + c * b
        xc, yc = a / self.f, -b / self.f
        cy_, sy_ = math.cos(self.yaw), math.sin(self.yaw)
        return np.stack([cy_ * xc + sy_, yc, -sy_ * xc + cy_], 1)


def _clip_near(pc: np.ndarray) -> np.ndarray:
    """Sutherland-Hodgman: keep the part of a camera-space polygon with z >= NEAR."""
    out = []
    n = len(pc)
    for i in range(n):
        a, b = pc[i], pc[(i + 1) % n]
        ina, inb = a[2] >= NEAR, b[2] >= NEAR
        if ina:
            out.append(a)
        if ina != inb:
            t = (NEAR - a[2]) / (b[2] - a[2])
            out.append(a + t * (b - a))
    return np.array(out).reshape(-1, 3)


def _clip_rect(pts: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """Clip a 2-D polygon to a rectangle (Sutherland-Hodgman, one edge at a time)."""
    for axis, bound, keep_less in ((0, x0, False), (0, x1, True), (1, y0, False), (1, y1, True)):
        if len(pts) == 0:
            break
        out = []
        n = len(pts)
        for i in range(n):
            a, b = pts[i], pts[(i + 1) % n]
            ina = a[axis] <= bound if keep_less else a[axis] >= bound
            inb = b[axis] <= bound if keep_less else b[axis] >= bound
            if ina:
                out.append(a)
            if ina != inb:
                t = (bound - a[axis]) / (b[axis] - a[axis])
                out.append(a + t * (b - a))
        pts = np.array(out).reshape(-1, 2)
    return pts


# --- scene description ----------------------------------------------------------------------------
@dataclass
class Thing:
    """One annotated polygon: a planar piece of the world with a class and a look."""

    label: str  # Cityscapes label name
    poly: np.ndarray  # N×3 world points (m), relative to `origin` when moving
    plane: str  # "x", "y" or "z": the world axis that is constant on the polygon
    origin: np.ndarray  # world point that local texture coordinates start from
    look: dict[str, Any]
    layer: int  # drawing order: lower first; within a layer, far to near
    velocity: tuple[float, float] = (0.0, 0.0)  # (vx, vz) m per video frame
    attached: float = 0.0  # drawn just after its carrier (a lamp on a pole)
    image_space: bool = False  # poly holds pixel fractions (the ego vehicle)


@dataclass
class Scene:
    things: list[Thing]
    camera: dict[str, float]
    light: dict[str, Any]
    shadows: list[tuple[float, float, float, float, float, float]] = field(default_factory=list)


def _quad(axis: str, value: float, a0: float, a1: float, b0: float, b1: float) -> np.ndarray:
    """Axis-aligned rectangle in the plane `axis = value`; (a, b) are the other two axes."""
    if axis == "y":  # (x, z)
        return np.array([[a0, value, b0], [a1, value, b0], [a1, value, b1], [a0, value, b1]])
    if axis == "x":  # (z, y)
        return np.array([[value, b0, a0], [value, b1, a0], [value, b1, a1], [value, b0, a1]])
    return np.array([[a0, b0, value], [a0, b1, value], [a1, b1, value], [a1, b0, value]])


def _billboard(outline: Sequence[tuple[float, float]], anchor: np.ndarray, facing: str,
               flip: bool = False) -> tuple[np.ndarray, str]:
    """A 2-D outline (local x, y in m; y up, origin at the ground) stood up in the world.

    facing "z": the outline faces the camera (plane z = anchor z, local x -> world x);
    facing "x": seen from the side (plane x = anchor x, local x -> world z).
    """
    pts = np.asarray(outline, dtype=np.float64)
    lx = -pts[:, 0] if flip else pts[:, 0]
    if facing == "z":
        world = np.stack([anchor[0] + lx, anchor[1] + pts[:, 1], np.full(len(pts), anchor[2])], 1)
    else:
        world = np.stack([np.full(len(pts), anchor[0]), anchor[1] + pts[:, 1], anchor[2] + lx], 1)
    return world, facing


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 14, rng=None, jitter=0.0):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = 1.0 + (rng.uniform(-jitter, jitter, n) if rng is not None and jitter else 0.0)
    return list(zip(cx + rx * r * np.cos(t), cy + ry * r * np.sin(t)))


# Silhouettes, in metres, origin at the ground below the object's centre (or its rear end).
def _person_outline(h: float, stride: float, width: float) -> list[tuple[float, float]]:
    """Walking person facing the camera: feet, legs, arms, shoulders, head."""
    s, w = stride * h / 2, width * h
    foot = 0.06 * h + s  # foot centres at +-foot
    feet = [(-foot - 0.035 * h, 0.0), (-foot + 0.035 * h, 0.0), (0.0, 0.44 * h),
            (foot - 0.035 * h, 0.0), (foot + 0.035 * h, 0.0)]
    right = [(0.62 * w, 0.50 * h), (0.80 * w, 0.44 * h), (0.9 * w, 0.47 * h), (0.95 * w, 0.62 * h),
             (0.80 * w, 0.81 * h), (0.22 * w, 0.84 * h), (0.30 * w, 0.89 * h),
             (0.30 * w, 0.95 * h), (0.15 * w, 1.0 * h)]
    left = [(-x, y) for x, y in reversed(right)]
    return feet + right + left


def _car_rear(w: float, h: float) -> list[tuple[float, float]]:
    hw = w / 2
    return [(-hw + 0.05, 0.0), (-hw + 0.33, 0.0), (-hw + 0.33, 0.18), (hw - 0.33, 0.18),
            (hw - 0.33, 0.0), (hw - 0.05, 0.0), (hw, 0.12), (hw, 0.8 * h / 1.45),
            (hw - 0.12, 0.92 * h / 1.45), (hw - 0.25, h), (-hw + 0.25, h),
            (-hw + 0.12, 0.92 * h / 1.45), (-hw, 0.8 * h / 1.45), (-hw, 0.12)]


def _wheels_bottom(length: float, wheels: Sequence[float], r: float, base: float):
    """Bottom edge from rear (x = length) to front (x = 0) with wheel bumps reaching y = 0."""
    pts = [(length, base)]
    for wx in sorted(wheels, reverse=True):
        pts += [(wx + r, base), (wx + 0.6 * r, 0.0), (wx - 0.6 * r, 0.0), (wx - r, base)]
    pts.append((0.0, base))
    return pts


def _car_side(length: float, h: float) -> list[tuple[float, float]]:
    k = length / 4.3
    top = [(0.0, 0.3), (0.0, 0.55), (0.12 * k, 0.72), (0.95 * k, 0.85), (1.7 * k, h - 0.05),
           (1.9 * k, h), (3.1 * k, h), (3.45 * k, h - 0.12), (3.95 * k, 0.9), (length, 0.85),
           (length, 0.3)]
    return _wheels_bottom(length, [0.85 * k, 3.45 * k], 0.33, 0.16) + top


def _box_side(length: float, h: float, wheels: Sequence[float], cab: Optional[float] = None,
              cab_h: float = 0.0, round_top: float = 0.15) -> list[tuple[float, float]]:
    """Bus / truck / tram side profile; front at x = 0."""
    pts = _wheels_bottom(length, wheels, 0.5, 0.35)
    if cab is not None:  # truck: cab (lower) at the front, box behind
        pts += [(0.0, cab_h - 0.5), (0.25, cab_h), (cab, cab_h), (cab, cab_h + 0.05),
                (cab + 0.2, h), (length, h)]
    else:
        pts += [(0.0, h - round_top - 0.3), (round_top, h), (length - round_top, h),
                (length, h - round_top)]
    return pts


def _box_rear(w: float, h: float, r: float = 0.15) -> list[tuple[float, float]]:
    hw = w / 2
    return [(-hw + 0.1, 0.0), (-hw + 0.45, 0.0), (-hw + 0.45, 0.3), (hw - 0.45, 0.3),
            (hw - 0.45, 0.0), (hw - 0.1, 0.0), (hw, 0.35), (hw, h - r), (hw - r, h),
            (-hw + r, h), (-hw, h - r), (-hw, 0.35)]


def _enlarged(outline: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """A two-wheeler's or rider's outline at TWO_WHEELER_SCALE times its real size."""
    return [(TWO_WHEELER_SCALE * a, TWO_WHEELER_SCALE * b) for a, b in outline]


def _two_wheeler_side(length: float, r: float, top: float, motor: bool):
    """Bicycle / motorcycle hull, front at x = 0 (front wheel centre at x = r)."""
    front, rear = r, length - r
    pts = [(rear + r, r), (rear + 0.7 * r, 0.2 * r), (rear, 0.0), (rear - 0.7 * r, 0.2 * r),
           (rear - r, r * (1.3 if motor else 0.8)), (front + r, r * (1.3 if motor else 0.8)),
           (front + 0.7 * r, 0.2 * r), (front, 0.0), (front - 0.7 * r, 0.2 * r), (front - r, r),
           (front - 0.1 * r, top), (front + 0.15, top + 0.05), (front + 0.25, top - 0.05)]
    if motor:
        pts += [(0.5 * length, top - 0.1), (rear - 0.1, top - 0.05), (rear + 0.2 * r, 0.8 * top)]
    else:
        pts += [(0.55 * length, 0.75 * top), (rear - 0.35 * r, top - 0.08),
                (rear - 0.1 * r, top - 0.02), (rear + 0.2 * r, 0.9 * top)]
    pts.append((rear + 0.9 * r, 1.6 * r))
    return pts


def _two_wheeler_rear(w: float, h: float, motor: bool = False):
    if motor:  # wheel, engine and seat, mirrors
        return [(-0.1, 0.0), (0.1, 0.0), (0.12, 0.3), (0.3, 0.35), (0.28, 0.8), (w / 2, h - 0.1),
                (w / 2, h), (-w / 2, h), (-w / 2, h - 0.1), (-0.28, 0.8), (-0.3, 0.35),
                (-0.12, 0.3)]
    t = 0.05
    return [(-t, 0.0), (t, 0.0), (t, h - 0.12), (w / 2, h - 0.1), (w / 2, h), (-w / 2, h),
            (-w / 2, h - 0.1), (-t, h - 0.12)]


def _rider_side(seat: float, h: float):
    """A seated rider leaning forward, front at x = 0; y from the ground."""
    k = h / 1.75
    pts = [(0.75, seat), (0.72, seat + 0.62 * k), (0.62, seat + 0.74 * k), (0.60, seat + 0.84 * k),
           (0.50, seat + 0.88 * k), (0.42, seat + 0.82 * k), (0.46, seat + 0.72 * k),
           (0.30, seat + 0.22 * k), (0.36, seat + 0.18 * k), (0.50, seat + 0.45 * k),
           (0.55, seat), (0.45, seat - 0.30 * k), (0.50, 0.30), (0.40, 0.28), (0.36, 0.36),
           (0.40, seat - 0.25 * k), (0.60, seat - 0.10 * k)]
    return pts


def _rider_rear(seat: float, h: float, width: float):
    k = h / 1.75
    w = width * h
    right = [(0.08, 0.35), (0.16, 0.35), (0.55 * w, seat), (0.8 * w, seat + 0.3 * k),
             (0.9 * w, seat + 0.5 * k), (0.55 * w, seat + 0.6 * k), (0.3 * w, seat + 0.66 * k),
             (0.3 * w, seat + 0.8 * k), (0.15 * w, seat + 0.86 * k)]
    left = [(-x, y) for x, y in reversed(right)]
    return right + left


def _canopy(rng, cx: float, cy: float, r: float):
    return _ellipse(cx, cy, r * rng.uniform(0.85, 1.15), r * rng.uniform(0.75, 1.1), 18, rng, 0.18)


def _sign_outline(shape: str, size: float, y: float):
    s = size / 2
    if shape == "circle":
        return _ellipse(0.0, y, s, s, 16)
    if shape == "triangle":
        return [(-s, y + s * 0.8), (s, y + s * 0.8), (0.0, y - s * 0.9)]
    if shape == "diamond":
        return [(0.0, y - s), (s, y), (0.0, y + s), (-s, y)]
    return [(-s, y - 0.7 * s), (s, y - 0.7 * s), (s, y + 0.7 * s), (-s, y + 0.7 * s)]


# --- palettes (RGB 0-255) -------------------------------------------------------------------------
# Each class has a colour family most of its instances come from, and a few shared, neutral
# colours (silver, black, white, gray) that make classes overlap: colour alone is not enough.
FACADES = [(192, 168, 130), (176, 146, 108), (204, 184, 146), (160, 120, 88), (186, 160, 120),
           (150, 84, 62), (142, 140, 136)]
CAR_COLOURS = [(34, 52, 140), (44, 74, 170), (24, 34, 96), (52, 64, 150), (36, 58, 120),
               (172, 174, 178), (36, 36, 42)]
CLOTHES = [(176, 40, 120), (120, 40, 150), (200, 70, 150), (150, 30, 90), (30, 32, 40)]
TROUSERS = [(40, 50, 90), (28, 28, 30), (80, 80, 84), (110, 90, 70)]
RIDER_CLOTHES = [(240, 110, 20), (246, 90, 40), (240, 130, 20), (200, 230, 40), (25, 25, 25)]
SKIN = [(228, 188, 160), (196, 150, 110), (140, 100, 70), (92, 64, 44)]
TRUCKS = [(60, 112, 100), (70, 128, 110), (50, 96, 88), (40, 104, 110)]
BUSES = [(232, 204, 36), (240, 214, 60), (222, 196, 24), (236, 192, 30)]
TRAINS = [(226, 220, 206), (236, 232, 220), (204, 212, 196)]
TRAIN_STRIPES = [(212, 40, 40), (30, 120, 70)]
MOTORCYCLES = [(200, 24, 24), (160, 20, 20), (220, 50, 20), (30, 30, 34)]
BICYCLES = [(30, 170, 190), (40, 190, 200), (30, 160, 140), (36, 36, 40)]
LIGHT_HOUSINGS = [(30, 32, 30), (44, 46, 44)]
LIGHT_BORDERS = [(232, 196, 40), (226, 226, 220)]
WALLS = [(160, 150, 180), (146, 136, 168), (166, 160, 148)]
FENCES = [(140, 100, 56), (120, 84, 48), (150, 150, 150)]
SIGNS = [(200, 30, 30), (30, 80, 180)]


def _jitter(rng, colour, amount: float = 9.0) -> np.ndarray:
    return np.clip(np.asarray(colour, dtype=np.float32) + rng.normal(0, amount, 3), 0, 255)


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


# --- building the scene -------------------------------------------------------------------------
def build_scene(rng: np.random.Generator, length: float = 0.0) -> Scene:
    """A random street. `length` (m) extends the street and the traffic for a video."""
    things: list[Thing] = []
    shadows: list[tuple[float, float, float, float, float, float]] = []
    seed = lambda: int(rng.integers(1 << 30))  # noqa: E731  (per-object texture seeds)

    road_hw = rng.uniform(3.5, 7.0)
    cam = dict(x=rng.uniform(0.2, 0.6) * road_hw - 0.2, y=rng.uniform(1.15, 1.35),
               yaw=math.radians(rng.uniform(-5, 5)), roll=math.radians(rng.uniform(-1.5, 1.5)),
               horizon=rng.uniform(0.42, 0.5))
    light = dict(gain=rng.uniform(0.85, 1.15), tint=rng.uniform(-0.04, 0.04),
                 sun_side=float(rng.choice([-1.0, 1.0])), sun=rng.uniform(0.0, 1.0),
                 shadow_x=rng.uniform(-road_hw, road_hw), shadow_slope=rng.uniform(-0.15, 0.15),
                 overcast=bool(rng.random() < 0.3), noise=rng.uniform(2.0, 5.0))
    z_end = rng.uniform(90, 160) + length
    far_z = z_end + rng.uniform(0, 20)

    def add(label, poly, plane, origin, look, layer, **kw):
        things.append(Thing(label, np.asarray(poly, dtype=np.float64), plane,
                            np.asarray(origin, dtype=np.float64), look, layer, **kw))

    def wall_look(height: float) -> dict:
        return dict(kind="wall", colour=_jitter(rng, _pick(rng, WALLS)), seed=seed(),
                    height=height)

    def fence_look() -> dict:
        return dict(kind="fence", colour=_jitter(rng, _pick(rng, FENCES)), seed=seed(),
                    slat=rng.uniform(0.1, 0.2))

    def visible_z(x: float, zmin: float, zmax: float) -> float:
        # a z at which lateral offset x is inside the field of view (|x/z| < ~0.38)
        lo = max(zmin, abs(x - cam["x"]) / 0.36 + 2.0)
        return float(rng.uniform(lo, max(lo + 1.0, zmax)))

    # sky and the far end of the street
    add("sky", _quad("z", 5000, -1e4, 1e4, -100, 3000), "z", (0, 0, 0),
        dict(kind="sky", seed=seed()), 0)
    far_w, far_h = 60.0, rng.uniform(10, 30)
    add("building", _quad("z", far_z, -far_w, far_w, 0, far_h), "z", (0, 0, far_z),
        dict(kind="facade", colour=_jitter(rng, _pick(rng, FACADES)), seed=seed(),
             win=(rng.uniform(2.4, 4), rng.uniform(3, 3.6))), 1)

    # the ground: road, then per side curb, sidewalk, setback (terrain / sidewalk / ground)
    z0 = -10.0
    add("road", _quad("y", 0, -road_hw, road_hw, z0, z_end), "y", (0, 0, 0),
        dict(kind="road", colour=_jitter(rng, (88, 84, 92), 10), seed=seed(),
             lanes=int(rng.integers(1, 3)), zebra=rng.uniform(10, 40) if rng.random() < 0.4
             else None), 2)
    has_train = rng.random() < 0.35
    if has_train:
        add("rail track", _quad("y", 0, -0.85, 0.85, z0, z_end), "y", (0, 0, 0),
            dict(kind="rails", colour=_jitter(rng, (104, 96, 88)), seed=seed()), 2)
    sides = {}
    for side in (-1.0, 1.0):
        sw = rng.uniform(2.5, 5.0)
        setback = rng.uniform(1.0, 6.0) if rng.random() < 0.85 else 0.0
        inner, outer = road_hw, road_hw + sw
        facade_x = outer + setback
        sides[side] = (inner, outer, facade_x)
        xs = lambda a, b, s=side: (min(s * a, s * b), max(s * a, s * b))  # noqa: E731
        curb_h = 0.12
        add("sidewalk", _quad("x", side * inner, z0, z_end, 0, curb_h), "x",
            (side * inner, 0, 0), dict(kind="curb", colour=_jitter(rng, (168, 162, 156)),
                                       seed=seed()), 2)
        sw_colour = _jitter(rng, (178, 140, 156), 8)
        add("sidewalk", _quad("y", curb_h, *xs(inner, outer), z0, z_end), "y", (0, 0, 0),
            dict(kind="sidewalk", colour=sw_colour, seed=seed(), tile=rng.uniform(0.3, 0.6)), 2)
        if rng.random() < 0.6:  # grass verge between the curb and the footpath
            vz = visible_z(side * inner, 0, 10) - 8
            add("terrain", _quad("y", curb_h, *xs(inner, inner + rng.uniform(0.8, 1.8)), vz,
                                 vz + rng.uniform(15, 60)), "y", (0, 0, 0),
                dict(kind="terrain", colour=_jitter(rng, (130, 165, 70), 8), seed=seed()), 2)
        if rng.random() < 0.5:  # parking strip on the road along the curb
            pz0 = rng.uniform(0, 30)
            add("parking", _quad("y", 0, *xs(inner - 2.2, inner), pz0, pz0 + rng.uniform(10, 30)),
                "y", (0, 0, 0), dict(kind="parking", colour=_jitter(rng, (118, 108, 114)),
                                     seed=seed()), 2)
        if setback > 0.3:
            z = z0
            first = True
            while z < z_end:
                seg = rng.uniform(10, 35)
                r = rng.random()
                if first or r < 0.6:
                    kind, label = "terrain", "terrain"
                    colour = _jitter(rng, (130, 165, 70), 8)
                elif r < 0.85:
                    kind, label, colour = "sidewalk", "sidewalk", sw_colour
                else:
                    kind, label, colour = "ground", "ground", _jitter(rng, (124, 106, 80))
                add(label, _quad("y", curb_h, *xs(outer, facade_x), z, z + seg), "y", (0, 0, 0),
                    dict(kind=kind, colour=colour, seed=seed(), tile=0.5), 2)
                z, first = z + seg, False
        # facades along the street (rooflines with steps and gables)
        z = z0
        while z < z_end:
            seg = rng.uniform(8, 30)
            gap = rng.uniform(3, 8) if rng.random() < 0.2 else 0.0
            bx = facade_x + (rng.uniform(0, 3) if rng.random() < 0.3 else 0.0)
            h = rng.uniform(6, 24)
            za, zb = z, min(z + seg, z_end)
            top = [(zb, h), (za, h)]
            if rng.random() < 0.35:  # gable
                top = [(zb, h), ((za + zb) / 2, h + rng.uniform(2, 5)), (za, h)]
            poly = [(bx * side, 0, za), (bx * side, 0, zb)] + [(bx * side, y, zz) for zz, y in top]
            add("building", poly, "x", (bx * side, 0, 0),
                dict(kind="facade", colour=_jitter(rng, _pick(rng, FACADES)), seed=seed(),
                     win=(rng.uniform(2.2, 4.0), rng.uniform(3, 3.6)),
                     lit=light["sun_side"] == side), 3, attached=-abs(bx))
            z = zb + gap
        # hedges in front of facades
        for _ in range(int(rng.integers(0, 3))):
            hz = rng.uniform(0, 60) + length * rng.random()
            add("vegetation", _quad("x", side * (facade_x - 0.4), hz, hz + rng.uniform(4, 15), 0,
                                    rng.uniform(0.8, 1.8)), "x", (0, 0, 0),
                dict(kind="vegetation", colour=_jitter(rng, (60, 105, 40), 10), seed=seed()), 3,
                attached=-(facade_x - 0.4))
        # trees in the setback or at the outer edge of the sidewalk
        n_trees = int(rng.integers(2, 5)) + int(length / 15)
        for i in range(n_trees):
            tx = side * (outer + (setback / 2 if setback > 1.5 else -0.6))
            tz = visible_z(tx, 8, 45) if i == 0 else rng.uniform(5, z_end - 20)
            th, tr = rng.uniform(2.0, 3.5), rng.uniform(1.8, 3.5)
            colour = _jitter(rng, (60, 105, 40), 10)
            add("vegetation", _quad("z", tz, tx - 0.16, tx + 0.16, 0, th + 0.5 * tr), "z",
                (tx, 0, tz), dict(kind="trunk", colour=_jitter(rng, (88, 70, 52)), seed=seed()),
                4)
            add("vegetation", [(tx + a, b, tz) for a, b in _canopy(rng, 0.0, th + tr, tr)],
                "z", (tx, 0, tz), dict(kind="vegetation", colour=colour, seed=seed()), 4,
                attached=0.01)
        # walls and fences at the outer edge of the sidewalk
        # ...and across the setback, facing the camera
        for label in ("wall", "fence"):
            for i in range(int(rng.integers(1, 3))):
                wz = visible_z(side * outer, 4, 20) - 2 if i == 0 else rng.uniform(0, z_end - 20)
                wl, wh = rng.uniform(6, 18), rng.uniform(1.1, 2.4)
                look = wall_look(wh) if label == "wall" else fence_look()
                x = side * (outer + (0.05 if label == "wall" else 0.15))
                add(label, _quad("x", x, wz, wz + wl, 0, wh), "x", (x, 0, 0), look, 5,
                    attached=-abs(x))
        if setback > 1.0 and rng.random() < 0.9:
            label = "fence" if rng.random() < 0.65 else "wall"
            wz = visible_z(side * outer, 6, 25)
            wh = rng.uniform(1.1, 2.2)
            look = wall_look(wh) if label == "wall" else fence_look()
            x0, x1 = sorted((side * (outer + 0.2), side * facade_x))
            add(label, _quad("z", wz, x0, x1, 0, wh), "z",
                (side * outer, 0, wz), look, 5)
    # Poles near the curb carrying traffic lights and signs, and mast arms holding lights over
    # the road. Lights and signs are ~1.5x their real size and the nearest ones stand within
    # ~25 m, so that they stay several pixels wide at the models' 1/4 output resolution.
    def add_light(x: float, y: float, z: float) -> None:
        lw, lh = rng.uniform(0.55, 0.75), rng.uniform(1.4, 1.8)
        add("traffic light", _quad("z", z, x - lw / 2, x + lw / 2, y, y + lh), "z", (x, y, z),
            dict(kind="light", colour=_jitter(rng, _pick(rng, LIGHT_HOUSINGS), 6), seed=seed(),
                 border=_jitter(rng, _pick(rng, LIGHT_BORDERS), 6), lit=int(rng.integers(3)),
                 size=(lw, lh)), 6, attached=0.02)

    def add_sign(x: float, y: float, z: float, size: float) -> None:
        shape = _pick(rng, ["circle", "triangle", "diamond", "rect"])
        add("traffic sign", [(x + a, b, z) for a, b in _sign_outline(shape, size, y)], "z",
            (x, y, z), dict(kind="sign", shape=shape, seed=seed(), back=rng.random() < 0.1,
                            colour=_jitter(rng, _pick(rng, SIGNS), 8)), 6, attached=0.03)

    poles = [(112, 114, 126), (100, 104, 116), (150, 150, 146)]
    n_poles = int(rng.integers(6, 10)) + int(length / 10)
    for i in range(n_poles):
        side = 1.0 if i % 2 == 0 else -1.0
        px = side * (road_hw + rng.uniform(0.3, 0.7))
        pz = visible_z(px, 6, 24) if i < 4 else rng.uniform(4, min(z_end - 10, 60 + length))
        what = ("light", "sign", "both", "sign")[i] if i < 4 else _pick(
            rng, ["light", "sign", "both"])
        size = rng.uniform(1.0, 1.5)
        sy = rng.uniform(1.9, 2.6)  # sign centre
        ly = sy + size / 2 + rng.uniform(0.2, 1.0) if what == "both" else rng.uniform(2.2, 3.6)
        ph, pw = max(rng.uniform(4.5, 8.0), ly + 2.2), rng.uniform(0.13, 0.2)
        look = dict(kind="pole", colour=_jitter(rng, _pick(rng, poles)), seed=seed())
        add("pole", _quad("z", pz, px - pw, px + pw, 0, ph), "z", (px, 0, pz), look, 6)
        if what in ("light", "both"):
            add_light(px, ly, pz - 0.15)
        if what in ("sign", "both"):
            add_sign(px, sy, pz - 0.2, size)
    for _ in range(int(rng.random() < 0.7) + int(length / 40)):  # mast arm over the road
        side = float(rng.choice([-1.0, 1.0]))
        px, pz = side * (road_hw + 0.4), rng.uniform(14, 32) + length * rng.random()
        ay, reach = rng.uniform(5.6, 6.4), rng.uniform(0.6, 0.9) * (road_hw + abs(cam["x"]))
        look = dict(kind="pole", colour=_jitter(rng, _pick(rng, poles)), seed=seed())
        add("pole", _quad("z", pz, px - 0.18, px + 0.18, 0, ay + 0.3), "z", (px, 0, pz), look, 6)
        ax0, ax1 = sorted((px, px - side * reach))
        add("pole", _quad("z", pz, ax0, ax1, ay, ay + 0.22), "z", (px, ay, pz),
            dict(look, across=True), 6, attached=0.01)
        for k in range(1 + int(rng.random() < 0.6)):
            add_light(px - side * reach * (0.45 + 0.5 * k), ay - 1.85, pz - 0.1)
    # street furniture (void: static / dynamic)
    for _ in range(int(rng.integers(1, 4))):
        side = float(rng.choice([-1.0, 1.0]))
        x = side * (road_hw + rng.uniform(1.0, 2.0))
        z = visible_z(x, 6, 40)
        w, h = rng.uniform(0.5, 1.6), rng.uniform(0.6, 1.2)
        label = "static" if rng.random() < 0.75 else "dynamic"
        add(label, _quad("z", z, x - w / 2, x + w / 2, 0.12, 0.12 + h), "z", (x, 0, z),
            dict(kind="plain", colour=_jitter(rng, (90, 80, 70), 30), seed=seed()), 6)

    # people on the sidewalks (and some crossing), a few of them close to the camera
    n_people = int(rng.integers(5, 10)) + int(length / 8)
    for i in range(n_people):
        side = float(rng.choice([-1.0, 1.0]))
        inner, outer, _ = sides[side]
        crossing = rng.random() < 0.15
        x = rng.uniform(-road_hw, road_hw) if crossing else side * rng.uniform(inner + 0.4,
                                                                               outer - 0.3)
        z = visible_z(x, 5, 20) if i < 3 else rng.uniform(4, 35 + length)
        h = rng.uniform(1.7, 2.05)
        outline = _person_outline(h, rng.uniform(0.0, 0.28), rng.uniform(0.26, 0.32))
        vel = (rng.uniform(-0.03, 0.03), rng.uniform(-0.06, 0.06))
        look = dict(kind="person", colour=_jitter(rng, _pick(rng, CLOTHES), 10), seed=seed(),
                    legs=_jitter(rng, _pick(rng, TROUSERS), 8),
                    skin=_jitter(rng, _pick(rng, SKIN), 6), height=h)
        add("person", *_billboard(outline, np.array([x, 0.12 * (not crossing), z]), "z"),
            (x, 0, z), look, 6, velocity=vel)
        shadows.append((x - 0.3, x + 0.3, z - 0.3, z + 0.3, 0.0, 0.0))

    # vehicles: traffic ahead in the lanes, parked cars along the curbs, oncoming traffic
    lane_xs = [cam["x"]] + [x for x in np.arange(-road_hw + 1.6, road_hw - 1.5, 3.2)]

    def vehicle(label: str, x: float, z: float, facing: str, look: dict, speed: float,
                flip: bool = False, profile: Optional[bool] = None) -> None:
        """A vehicle standing at (x, z). facing "z": in a plane facing the camera, from behind
        (or its profile when `profile`: crossing the street); "x": along the street."""
        profile = facing == "x" if profile is None else profile
        if not profile:
            if label == "car":
                w, h = rng.uniform(1.7, 1.9), rng.uniform(1.4, 1.6)
                outline, size = _car_rear(w, h), (w, 4.3)
            elif label in ("truck", "bus", "train"):
                w, h = {"truck": (2.5, 3.4), "bus": (2.55, 3.1), "train": (2.65, 3.5)}[label]
                outline, size = _box_rear(w, h, 0.15 if label == "truck" else 0.3), (w, 9.0)
            else:
                motor = label == "motorcycle"
                outline = _two_wheeler_rear(0.8 if motor else 0.6, 1.15 if motor else 1.05, motor)
                size = (0.7, 2.0)
        else:
            if label == "car":
                L = rng.uniform(3.9, 4.8)
                outline = _car_side(L, rng.uniform(1.4, 1.55))
            elif label == "truck":
                L = rng.uniform(7, 10)
                outline = _box_side(L, 3.6, [1.3, L - 1.3], cab=2.2, cab_h=3.0)
            elif label == "bus":
                L = rng.uniform(11, 13)
                outline = _box_side(L, 3.1, [2.6, L - 3.0])
            elif label == "train":
                L = rng.uniform(25, 32)
                outline = _box_side(L, 3.5, [3.0, L / 2, L - 3.0], round_top=0.4)
            else:
                L = 2.1 if label == "motorcycle" else 1.75
                outline = _two_wheeler_side(L, 0.32 if label == "motorcycle" else 0.34,
                                            1.1 if label == "motorcycle" else 1.0,
                                            label == "motorcycle")
            size = (0.8, L)
        if label in ("bicycle", "motorcycle"):
            outline = _enlarged(outline)
            look = dict(look, scale=TWO_WHEELER_SCALE)
        look = dict(look, seed=seed(), facing=facing, flip=flip, profile=profile)
        anchor = np.array([x, 0.0, z])
        vel = (0.0, speed) if facing == "x" or not profile else (speed if flip else -speed, 0.0)
        add(label, *_billboard(outline, anchor, facing, flip), anchor, look, 6, velocity=vel)
        hw, hl = size[0] / 2, size[1]
        if facing == "z" and profile:  # crossing: the shadow runs along x
            x0, x1 = (x - hl, x) if flip else (x, x + hl)
            shadows.append((x0, x1, z - 0.4, z + 0.4, vel[0], 0.0))
        else:
            shadows.append((x - hw - 0.2, x + hw + 0.2, z - 0.3,
                            z + (hl if facing == "x" else 1.0), 0.0, speed))

    def car_look():
        return dict(kind="car", colour=_jitter(rng, _pick(rng, CAR_COLOURS), 8))

    n_ahead = int(rng.integers(1, 4)) + int(length / 20)
    for i in range(n_ahead):
        x = _pick(rng, lane_xs) + rng.uniform(-0.3, 0.3)
        z = rng.uniform(8, 45) if i == 0 else rng.uniform(8, 70 + length)
        vehicle("car", x, z, "z", car_look(), rng.uniform(0.3, 0.6))
    for side in (-1.0, 1.0):
        z = rng.uniform(-5, 15)
        while z < 40 + length:
            if rng.random() < 0.5:
                vehicle("car", side * (road_hw - 1.0), z, "x", car_look(), 0.0,
                        flip=rng.random() < 0.5)
            z += rng.uniform(5, 12)
    if road_hw > 4.5:  # oncoming traffic on the left
        for _ in range(int(rng.integers(0, 3))):
            vehicle("car", -road_hw + 1.7, rng.uniform(10, 60 + length), "z",
                    dict(car_look(), front=True), -rng.uniform(0.3, 0.6))
    if rng.random() < 0.55:
        look = dict(kind="truck", colour=_jitter(rng, _pick(rng, TRUCKS), 8),
                    cab=_jitter(rng, _pick(rng, TRUCKS), 8))
        if rng.random() < 0.5:
            vehicle("truck", _pick(rng, lane_xs), rng.uniform(12, 45), "z", look, 0.4)
        else:
            vehicle("truck", float(rng.choice([-1, 1])) * (road_hw - 1.3), rng.uniform(8, 30),
                    "x", look, 0.0, flip=rng.random() < 0.5)
    if rng.random() < 0.5:
        look = dict(kind="bus", colour=_jitter(rng, _pick(rng, BUSES), 8))
        if rng.random() < 0.5:
            vehicle("bus", _pick(rng, lane_xs), rng.uniform(12, 45), "z", look, 0.45)
        else:
            vehicle("bus", road_hw - 1.4, rng.uniform(8, 25), "x", look, 0.0,
                    flip=rng.random() < 0.5)
    if has_train:
        look = dict(kind="train", colour=_jitter(rng, _pick(rng, TRAINS), 8),
                    stripe=_jitter(rng, _pick(rng, TRAIN_STRIPES), 8))
        if rng.random() < 0.6:
            vehicle("train", 0.0, rng.uniform(15, 45), "z", look, 0.3)
        else:
            vehicle("train", 0.0 if road_hw < 4.5 else -1.5, rng.uniform(10, 30), "x", look,
                    -0.2, flip=True)
    # riders on bicycles / motorcycles, and parked ones (two-wheelers and riders are drawn
    # TWO_WHEELER_SCALE times their real size)
    n_riders = 2 + int(rng.random() < 0.5) + int(length / 20)
    for i in range(n_riders):
        motor = rng.random() < 0.5
        label = "motorcycle" if motor else "bicycle"
        side = float(rng.choice([-1.0, 1.0]))
        way = _pick(rng, ["behind", "along", "crossing"])
        x = side * (road_hw - rng.uniform(0.8, 1.6))
        if way == "crossing":
            x = rng.uniform(-road_hw + 0.5, road_hw - 2.5)
        z = visible_z(x, 6 + 3 * (way == "crossing"), 20) if i < 2 else rng.uniform(
            9, 35 + length)
        facing, profile = ("x", True) if way == "along" else ("z", way == "crossing")
        flip = side < 0 if way == "along" else way == "crossing" and rng.random() < 0.5
        speed = rng.uniform(0.15, 0.3) if not motor else rng.uniform(0.3, 0.5)
        look = dict(kind="two_wheeler", motor=motor,
                    colour=_jitter(rng, _pick(rng, MOTORCYCLES if motor else BICYCLES), 8))
        vehicle(label, x, z, facing, look, speed, flip=flip, profile=profile)
        h = rng.uniform(1.6, 1.9)
        seat = 0.75 if motor else 0.95
        outline = _rider_side(seat, h) if profile else _rider_rear(seat, h, rng.uniform(0.24, 0.3))
        outline = _enlarged(outline)
        rlook = dict(kind="rider", scale=TWO_WHEELER_SCALE, seat=seat, k=h / 1.75,
                     colour=_jitter(rng, _pick(rng, RIDER_CLOTHES), 10),
                     legs=_jitter(rng, (30, 32, 40), 8), skin=_jitter(rng, _pick(rng, SKIN), 6),
                     helmet=_jitter(rng, _pick(rng, [(240, 240, 240), (200, 30, 30), (20, 20, 20),
                                                     (240, 200, 30)]), 6), seed=seed())
        anchor = np.array([x, 0.0, z - (0.05 if facing == "z" else 0.0)])
        vel = (0.0, speed) if way != "crossing" else (speed if flip else -speed, 0.0)
        add("rider", *_billboard(outline, anchor, facing, flip), anchor, rlook, 6, velocity=vel,
            attached=0.05)
    for _ in range(int(rng.integers(2, 5))):  # parked across the footpath, seen from the side
        motor = rng.random() < 0.4
        side = float(rng.choice([-1.0, 1.0]))
        x = side * (road_hw + rng.uniform(0.3, 0.8))
        z = visible_z(x, 5, 20)
        look = dict(kind="two_wheeler", motor=motor, seed=seed(), facing="z", profile=True,
                    scale=TWO_WHEELER_SCALE,
                    colour=_jitter(rng, _pick(rng, MOTORCYCLES if motor else BICYCLES), 8))
        outline = (_two_wheeler_side(2.1, 0.32, 1.1, True) if motor
                   else _two_wheeler_side(1.75, 0.34, 1.0, False))
        outline = _enlarged(outline)
        anchor = np.array([x, 0.12, z])
        add("motorcycle" if motor else "bicycle", *_billboard(outline, anchor, "z", side < 0),
            anchor, look, 6)
    # the ego vehicle's bonnet at the bottom of the image (image space: fractions of W, H)
    if rng.random() < 0.85:
        top = rng.uniform(0.86, 0.92)
        xs = np.linspace(-0.05, 1.05, 12)
        ys = top + 0.5 * (1 - top) * (2 * xs - 1) ** 2 * rng.uniform(0.6, 1.0)
        poly = np.array([(x, y, 0.0) for x, y in zip(xs, ys)] + [(1.05, 1.05, 0), (-0.05, 1.05, 0)])
        add("ego vehicle", poly, "z", (0, 0, 0), dict(kind="ego", colour=_jitter(
            rng, (40, 44, 50), 10), seed=seed()), 9, image_space=True)
    return Scene(things, cam, light, shadows)


# --- rendering -----------------------------------------------------------------------------------
def _hash01(ia: np.ndarray, ib: np.ndarray, seed: int) -> np.ndarray:
    x = (ia.astype(np.uint64) * np.uint64(0x9E3779B1) + ib.astype(np.uint64) *
         np.uint64(0x85EBCA77) + np.uint64(seed * 0xC2B2AE3D & 0xFFFFFFFF))
    x ^= x >> np.uint64(15)
    x *= np.uint64(0x2C1B3C6D)
    x ^= x >> np.uint64(12)
    x *= np.uint64(0x297A2D39)
    x ^= x >> np.uint64(15)
    return (x & np.uint64(0xFFFFFF)).astype(np.float32) / np.float32(0xFFFFFF)


def _noise(a: np.ndarray, b: np.ndarray, cell: float, seed: int) -> np.ndarray:
    """Smooth value noise in [-1, 1] over world coordinates (a, b) with the given cell size."""
    a, b = a / cell + 1e4, b / cell + 1e4
    ia, ib = np.floor(a), np.floor(b)
    fa, fb = a - ia, b - ib
    fa, fb = fa * fa * (3 - 2 * fa), fb * fb * (3 - 2 * fb)
    ia, ib = ia.astype(np.int64), ib.astype(np.int64)
    n00, n10 = _hash01(ia, ib, seed), _hash01(ia + 1, ib, seed)
    n01, n11 = _hash01(ia, ib + 1, seed), _hash01(ia + 1, ib + 1, seed)
    top, bot = n00 + (n10 - n00) * fa, n01 + (n11 - n01) * fa
    return (top + (bot - top) * fb) * 2 - 1


def _stripes(x: np.ndarray, period: float, duty: float) -> np.ndarray:
    return (np.mod(x, period) < duty * period).astype(np.float32)


def _shade(look: dict, a: np.ndarray, b: np.ndarray, ray: np.ndarray, light: dict) -> np.ndarray:
    """Colour (n×3 float, 0-255) of one object's pixels at plane coordinates (a, b) in metres.

    For ground planes (a, b) = (x, z); for facades (z, y); for billboards local (x, y)."""
    kind, s = look["kind"], look.get("seed", 0)
    if "scale" in look:  # an enlarged object: shade it in its real-size coordinates
        a, b = a / look["scale"], b / look["scale"]
    base = np.asarray(look.get("colour", (128, 128, 128)), dtype=np.float32)
    n = len(a)
    col = np.broadcast_to(base, (n, 3)).copy()

    def mul(f):
        col[:] *= np.asarray(f, dtype=np.float32).reshape(-1, 1)

    def put(mask, colour):
        col[mask] = colour

    if kind == "sky":
        el = ray[:, 1] / np.linalg.norm(ray[:, [0, 2]], axis=1)
        t = np.clip(el / 0.5, 0, 1)[:, None]
        if light["overcast"]:
            top, hor = np.array([178, 184, 192]), np.array([212, 214, 218])
        else:
            top, hor = np.array([92, 142, 212]), np.array([186, 206, 226])
        col = hor + (top - hor) * t
        az = np.arctan2(ray[:, 0], ray[:, 2])
        cloud = np.clip(_noise(az * 8, el * 16, 1.0, s) * 1.6 - 0.3, 0, 1)[:, None]
        return col + (np.array([238, 238, 240]) - col) * cloud * 0.8
    if kind in ("road", "parking", "rails"):
        x, z = a, b
        mul(1 + 0.06 * _noise(x, z, 2.5, s) + 0.05 * _noise(x, z, 0.08, s + 1))
        if kind == "road":
            dash = (np.abs(x) < 0.08) & (_stripes(z, 9.0, 0.4) > 0)
            edge = np.abs(np.abs(x) - (np.abs(x).max() - 0.4)) < 0.07
            put(dash | edge, (212, 212, 206))
            if look.get("zebra") is not None:
                zb = look["zebra"]
                zebra = (z > zb) & (z < zb + 3.5) & (_stripes(x, 1.0, 0.5) > 0)
                put(zebra, (222, 222, 216))
        elif kind == "parking":
            put(_stripes(z, 5.5, 0.025) > 0, (210, 210, 205))
        else:  # two rails of steel
            put((np.abs(np.abs(x) - 0.72) < 0.05), (160, 160, 168))
        return col
    if kind in ("sidewalk", "curb", "terrain", "ground"):
        if kind == "sidewalk":
            t = look.get("tile", 0.4)
            grout = (np.mod(a, t) < 0.03) | (np.mod(b, t) < 0.03)
            mul(1 + 0.05 * _noise(a, b, 1.5, s) + 0.04 * _noise(a, b, 0.05, s + 2))
            mul(np.where(grout, 0.8, 1.0))
        elif kind == "terrain":
            mul(1 + 0.12 * _noise(a, b, 0.6, s) + 0.12 * _noise(a, b, 0.07, s + 3))
            col[:, 0] += 12 * _noise(a, b, 1.5, s + 4)
        else:
            mul(1 + 0.08 * _noise(a, b, 0.3, s) + 0.05 * _noise(a, b, 0.05, s + 2))
        return col
    if kind == "facade":
        z, y = a, b
        wx, wy = look["win"]
        mul(1 + 0.05 * _noise(z, y, 3, s) + 0.05 * _noise(z, y, 0.1, s + 1))
        win = (_stripes(z + s % 7, wx, 0.45) > 0) & (_stripes(y - 0.9, wy, 0.45) > 0) & (y > 3.0)
        shop = (y > 0.3) & (y < 2.6) & (_stripes(z + s % 5, wx * 2, 0.7) > 0)
        glass = np.array([52, 62, 78]) + 30 * _noise(z, y, 4, s + 5)[:, None]
        col[win | shop] = glass[win | shop]
        frame = win & ((np.mod(z + s % 7, wx) < 0.08) | (np.mod(y - 0.9, wy) < 0.08))
        put(frame, base * 1.15)
        if "lit" in look:
            mul(1.0 + (0.12 if look["lit"] else -0.25) * light["sun"])
        return col
    if kind == "wall":  # concrete blocks in staggered courses under a lighter coping
        mul(1 + 0.07 * _noise(a, b, 1.0, s) + 0.05 * _noise(a, b, 0.04, s + 1))
        course = np.floor(b / 0.3)
        joint = (np.mod(b, 0.3) < 0.04) | (np.mod(a + 0.3 * np.mod(course, 2), 0.6) < 0.04)
        mul(np.where(joint, 0.68, 1.0))
        put(b > look["height"] - 0.12, np.minimum(base * 1.25, 255))
        return col
    if kind == "fence":
        slat = _stripes(a, look["slat"], 0.6) > 0
        mul(np.where(slat, 1.0, 0.55) * (1 + 0.06 * _noise(a, b, 0.2, s)))
        mul(np.where(np.abs(np.mod(b, 0.9) - 0.45) < 0.04, 0.7, 1.0))
        return col
    if kind == "pole":  # a cylinder: shaded across its width
        w = b - 0.11 if look.get("across") else a
        mul(1 + 0.25 * np.cos(w * 12) - 0.1 + 0.04 * _noise(a, b, 0.2, s))
        return col
    if kind == "light":
        lw, lh = look["size"]
        put((np.abs(a) > lw / 2 - 0.07) | (b < 0.07) | (b > lh - 0.07), look["border"])
        for k in range(3):  # red top, amber, green bottom
            cy = lh * (0.8 - 0.3 * k)
            lamp = (a ** 2 + (b - cy) ** 2) < (0.32 * lw) ** 2
            on = [(255, 50, 40), (255, 180, 40), (60, 250, 130)][k]
            off = [(70, 24, 20), (70, 56, 20), (20, 64, 40)][k]
            put(lamp, on if k == look["lit"] else off)
        return col
    if kind == "sign":
        if look["back"]:
            col[:] = (140, 140, 144)
            return col
        r = np.sqrt(a ** 2 + b ** 2)
        rmax = max(float(r.max()), 1e-3) if n else 1.0
        inner = r < 0.62 * rmax
        if look["shape"] in ("circle", "triangle"):
            put(inner, (236, 236, 236))
            put(inner & (np.abs(a) < 0.05), (20, 20, 20))
        elif look["shape"] == "rect":
            put(inner & (np.abs(b) < 0.06), (240, 240, 240))
        else:
            put(~inner, (236, 236, 236))
        return col
    if kind in ("vegetation", "trunk"):
        if kind == "trunk":
            mul(1 + 0.12 * _noise(a, b, 0.05, s))
            return col
        leaf = _noise(a, b, 0.12, s) * 0.35 + _noise(a, b, 0.5, s + 1) * 0.25
        mul(1 + leaf)
        col[:, 1] += 18 * _noise(a, b, 1.2, s + 2)
        return col
    if kind == "person":
        h = look["height"]
        put(b < 0.46 * h, look["legs"])
        put(b > 0.86 * h, look["skin"])
        mul(1 + 0.08 * _noise(a, b, 0.15, s) + 0.05 * np.cos(a * 6))
        return col
    if kind == "rider":  # seated: legs below the seat, a jacket with reflective bands, a helmet
        seat, k = look["seat"], look["k"]
        put(b < seat + 0.05, look["legs"])
        put((np.abs(b - seat - 0.25 * k) < 0.04) | (np.abs(b - seat - 0.42 * k) < 0.04),
            (232, 232, 226))
        put(b > seat + 0.64 * k, look["skin"])
        put(b > seat + 0.72 * k, look["helmet"])
        mul(1 + 0.08 * _noise(a, b, 0.15, s) + 0.05 * np.cos(a * 6))
        return col
    if kind == "car":
        if not look.get("profile"):
            w = np.abs(a)
            hmax = float(b.max()) if n else 1.0
            glass = (b > 0.68 * hmax) & (b < hmax - 0.08) & (w < w.max() - 0.28)
            put(glass, (44, 52, 64))
            tail = (b > 0.5) & (b < 0.66) & (w > w.max() - 0.32)
            put(tail, (230, 240, 250) if look.get("front") else (200, 20, 20))
            put((b < 0.32) & (b > 0.2), base * 0.5)
            put(b < 0.2, (22, 22, 24))
            plate = (b > 0.3) & (b < 0.45) & (w < 0.25)
            put(plate, (236, 236, 230))
        else:
            x = a if not look.get("flip") else -a
            L = float(np.max(np.abs(x))) if n else 4.3
            k = L / 4.3
            glass = (b > 0.9) & (b < 1.35) & (x > 1.75 * k) & (x < 3.5 * k)
            put(glass, (44, 52, 64))
            for wx in (0.85 * k, 3.45 * k):
                d = np.sqrt((x - wx) ** 2 + (b - 0.33) ** 2)
                put(d < 0.33, (22, 22, 24))
                put(d < 0.17, (150, 150, 150))
        mul(1 + 0.15 * (np.clip(b, 0, 2) / 2 - 0.5) + 0.03 * _noise(a, b, 0.1, s))
        return col
    if kind in ("truck", "bus", "train"):
        x = a if not look.get("flip") else -a
        hmax = float(b.max()) if n else 3.0
        if not look.get("profile"):
            w = np.abs(x)
            if kind != "truck":
                put((b > 0.55 * hmax) & (b < hmax - 0.25) & (w < w.max() - 0.2), (40, 48, 60))
            else:
                put(_stripes(x, 0.3, 0.1) > 0, base * 0.85)
            put(b < 0.35, (22, 22, 24))
            put((b > 0.5) & (b < 0.7) & (w > w.max() - 0.3), (200, 20, 20))
        else:
            if kind == "truck":
                cab = x < 2.2
                col[cab] = look["cab"]
                put(cab & (b > 1.7) & (b < 2.6) & (x > 0.3) & (x < 2.0), (44, 52, 64))
                put(~cab & (_stripes(x, 0.4, 0.12) > 0), base * 0.85)
            else:
                band = (b > 1.25) & (b < hmax - 0.35) & (_stripes(x, 1.6, 0.85) > 0)
                put(band, (40, 48, 60))
                if kind == "train":
                    put((b > 0.7) & (b < 1.0), look["stripe"])
            put(b < 0.35, (22, 22, 24))
        mul(1 + 0.04 * _noise(a, b, 0.3, s))
        return col
    if kind == "two_wheeler":
        if look.get("profile"):
            x = np.abs(a)
            L = float(x.max()) if n else 1.8
            r = 0.32 if look["motor"] else 0.34
            for wx in (r, L - r):
                d = np.sqrt((x - wx) ** 2 + (b - r) ** 2)
                ring = (d > r - 0.07) & (d < r)
                put(ring, (20, 20, 20))
                if not look["motor"]:
                    put(d < r - 0.07, (110, 110, 104))  # spokes / see-through
                    put((d < r - 0.07) & (np.abs(np.mod(np.arctan2(b - r, x - wx), 0.5)) < 0.06),
                        (40, 40, 40))
        else:
            put(b < 0.7, (24, 24, 26))
        mul(1 + 0.05 * _noise(a, b, 0.1, s))
        return col
    if kind == "ego":
        mul(1 + 0.25 * np.clip(1 - b, 0, 1))
        return col
    mul(1 + 0.08 * _noise(a, b, 0.2, s))  # plain
    return col


def _camera(scene: Scene, size: tuple[int, int], z: float) -> Camera:
    h, w = size
    c = scene.camera
    return Camera(width=w, height=h, f=FOCAL_PER_WIDTH * w, cx=w / 2, cy=c["horizon"] * h,
                  x=c["x"], y=c["y"], z=z, yaw=c["yaw"], roll=c["roll"])


def render(scene: Scene, size: tuple[int, int], frame: int = 0, speed: float = 0.0,
           noise_seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict]]:
    """Render one view: (RGB uint8 H×W×3, labelIds uint8, instanceIds uint16, polygons).

    frame/speed: the camera sits at z = frame * speed and moving things have moved
    frame * velocity. The polygons (label, integer pixel points) are in drawing order, so
    drawing them in order reproduces the label images (as cityscapesscripts does).
    """
    h, w = size
    cam = _camera(scene, size, frame * speed)
    camp = np.array([cam.x, cam.z])
    drawn: list[tuple[tuple, Thing, np.ndarray, np.ndarray]] = []  # (key, thing, pts, shift)
    for i, t in enumerate(scene.things):
        shift = np.array([t.velocity[0] * frame, 0.0, t.velocity[1] * frame])
        if t.image_space:
            pts = t.poly[:, :2] * np.array([w, h])
            key = (t.layer, 0.0, i)
        else:
            pc = _clip_near(cam.to_camera(t.poly + shift))
            if len(pc) < 3:
                continue
            pts = cam.to_pixels(pc)
            if t.plane == "y" or t.layer <= 1:
                dist = 0.0
            elif t.attached < -0.5:  # side planes: outer ones first
                dist = -t.attached
            else:
                dist = float(np.hypot(*(t.origin[[0, 2]] + shift[[0, 2]] - camp))) - t.attached
            key = (t.layer, -dist, i)
        pts = _clip_rect(pts, -1, -1, w, h)
        if len(pts) < 3:
            continue
        pts = np.round(pts).astype(np.int64)
        # drop repeated points after rounding; need a non-degenerate polygon
        keep = np.any(pts != np.roll(pts, 1, axis=0), axis=1)
        pts = pts[keep]
        if len(pts) < 3 or np.ptp(pts[:, 0]) == 0 or np.ptp(pts[:, 1]) == 0:
            continue
        drawn.append((key, t, pts, shift))
    drawn.sort(key=lambda d: d[0])

    # Draw object indices (1-based) in order; classes and instances follow from them.
    objmap_img = Image.new("I", (w, h), 0)
    draw = ImageDraw.Draw(objmap_img)
    label_of = np.zeros(len(drawn) + 1, dtype=np.int64)
    inst_of = np.zeros(len(drawn) + 1, dtype=np.int64)
    counters: dict[str, int] = {}
    polygons = []
    for k, (_, t, pts, _) in enumerate(drawn, start=1):
        draw.polygon([tuple(p) for p in pts.tolist()], fill=k)
        lab = LABEL_BY_NAME[t.label]
        label_of[k] = lab.id
        if lab.has_instances:
            inst_of[k] = lab.id * 1000 + counters.get(t.label, 0)
            counters[t.label] = counters.get(t.label, 0) + 1
        else:
            inst_of[k] = lab.id
        polygons.append({"label": t.label, "polygon": pts.tolist()})
    objmap = np.asarray(objmap_img, dtype=np.int32)
    label_ids = label_of[objmap].astype(np.uint8)
    instance_ids = inst_of[objmap].astype(np.uint16)

    # Colour every object's pixels from its plane coordinates.
    flat = objmap.ravel()
    order = np.argsort(flat, kind="stable")
    bounds = np.searchsorted(flat[order], np.arange(len(drawn) + 2))
    rgb = np.zeros((h * w, 3), dtype=np.float32)
    light = scene.light
    origin = np.array([cam.x, cam.y, cam.z])
    for k, (_, t, _, shift) in enumerate(drawn, start=1):
        idx = order[bounds[k]:bounds[k + 1]]
        if len(idx) == 0:
            continue
        v, u = np.divmod(idx, w)
        u, v = u + 0.5, v + 0.5
        ray = cam.rays(u, v)
        if t.image_space:
            a, b = u / w, (v / h - 0.85) / 0.15
            col = _shade(t.look, a, b, ray, light)
        else:
            axis = "xyz".index(t.plane)
            value = (t.poly[0] + shift)[axis]
            d = ray[:, axis]
            d = np.where(np.abs(d) < 1e-6, 1e-6, d)
            hit = origin + np.clip((value - origin[axis]) / d, 0, 5000)[:, None] * ray
            local = hit - (t.origin + shift)
            a, b = {"x": (local[:, 2], local[:, 1]), "y": (hit[:, 0], hit[:, 2]),
                    "z": (local[:, 0], local[:, 1])}[t.plane]
            col = _shade(t.look, a, b, ray, light)
            if t.plane == "y" and t.label != "sky":
                col *= _ground_shadow(hit, scene, frame, light)[:, None]
        rgb[idx] = col

    # Lighting and sensor: exposure, tint, vignette, slight blur, noise.
    img = rgb.reshape(h, w, 3)
    gain = light["gain"] * np.array([1 + light["tint"], 1.0, 1 - light["tint"]], np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    vignette = 1 - 0.18 * (((xx - w / 2) / w) ** 2 + ((yy - h / 2) / h) ** 2) * 2
    img = img * gain * vignette[..., None]
    img = cv2.GaussianBlur(img, (0, 0), 0.6)
    noise_rng = np.random.default_rng(noise_seed)
    img = img + noise_rng.normal(0, light["noise"], img.shape).astype(np.float32)
    image = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    return image, label_ids, instance_ids, polygons


def _ground_shadow(hit: np.ndarray, scene: Scene, frame: int, light: dict) -> np.ndarray:
    x, z = hit[:, 0], hit[:, 2]
    f = np.ones(len(x), dtype=np.float32)
    # the shadow of the buildings on the sun's far side, a slanted line across the street
    edge = light["shadow_x"] + light["shadow_slope"] * z
    shaded = (x - edge) * light["sun_side"] < 0
    f[shaded] = 1 - 0.25 * light["sun"]
    for x0, x1, z0, z1, vx, vz in scene.shadows:
        dx, dz = vx * frame, vz * frame
        f[(x > x0 + dx) & (x < x1 + dx) & (z > z0 + dz) & (z < z1 + dz)] *= 0.55
    return f


# --- writing the dataset --------------------------------------------------------------------------
def _png(array: np.ndarray) -> bytes:
    if array.ndim == 3:  # RGB(A) -> cv2's BGR(A)
        array = array[..., ::-1] if array.shape[2] == 3 else array[..., [2, 1, 0, 3]]
    ok, data = cv2.imencode(".png", np.ascontiguousarray(array), [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise SegcompareError("cannot encode PNG")
    return data.tobytes()


def write_sample(root: Path, split: str, city: str, name: str, image: np.ndarray,
                 label_ids: np.ndarray, instance_ids: np.ndarray, polygons: list[dict]) -> None:
    img_dir = root / "leftImg8bit" / split / city
    gt_dir = root / "gtFine" / split / city
    atomic_write_bytes(img_dir / f"{name}_leftImg8bit.png", _png(image))
    colour = np.concatenate([ID_TO_COLOR[label_ids], np.full(label_ids.shape + (1,), 255,
                                                             np.uint8)], axis=2)
    atomic_write_bytes(gt_dir / f"{name}_gtFine_color.png", _png(colour))
    atomic_write_bytes(gt_dir / f"{name}_gtFine_labelIds.png", _png(label_ids))
    atomic_write_bytes(gt_dir / f"{name}_gtFine_instanceIds.png", _png(instance_ids))
    h, w = label_ids.shape
    doc = {"imgHeight": h, "imgWidth": w, "objects": polygons}
    atomic_write_text(gt_dir / f"{name}_gtFine_polygons.json", json.dumps(doc))


def synthetic_sample(seed: int, index: int, size: tuple[int, int]):
    """The index-th synthetic image of a seed: (image, labelIds, instanceIds, polygons)."""
    rng = np.random.default_rng((int(seed), int(index)))
    scene = build_scene(rng)
    return render(scene, size, noise_seed=int(rng.integers(1 << 31)))


def make_synthetic_cityscapes(
    out: Any,
    train: int = 20,
    val: int = 10,
    test: int = 0,
    size: tuple[int, int] = (256, 512),
    seed: int = 0,
    video_frames: int = 0,
    progress: bool = False,
) -> dict[str, int]:
    """Write a synthetic Cityscapes under `out` in the real layout; returns counts per split.

    size is (H, W). Deterministic for a seed: sample i of a run depends only on (seed, i), so
    the first N images of a larger set equal a set of N. Images are numbered like the real ones
    (<city>_<seq>_<frame>, frame 000019 as the annotated frame of each sequence).
    """
    from tqdm import tqdm

    h, w = int(size[0]), int(size[1])
    if h < 32 or w < 32:
        raise SegcompareError(f"synthetic image size {h}x{w} is too small (at least 32x32)")
    root = Path(out)
    counts = {"train": int(train), "val": int(val), "test": int(test)}
    jobs = []
    index = 0
    for split, n in counts.items():
        cities = CITIES[split]
        for i in range(n):
            city = cities[i % len(cities)]
            name = f"{city}_{i // len(cities):06d}_000019"
            jobs.append((split, city, name, index))
            index += 1
    for split, city, name, i in tqdm(jobs, desc="synthesising", unit="image",
                                     disable=not progress):
        image, ids, inst, polys = synthetic_sample(seed, i, (h, w))
        write_sample(root, split, city, name, image, ids, inst, polys)
    if video_frames:
        rng = np.random.default_rng((int(seed), 1_000_000))
        speed = rng.uniform(0.4, 0.6)  # m per frame: ~30 km/h at 17 fps
        scene = build_scene(rng, length=speed * video_frames)
        vdir = root / "leftImg8bit_demoVideo" / VIDEO_CITY
        for f in tqdm(range(int(video_frames)), desc="video", unit="frame", disable=not progress):
            image, *_ = render(scene, (h, w), frame=f, speed=speed, noise_seed=seed * 7919 + f)
            atomic_write_bytes(vdir / f"{VIDEO_CITY}_000000_{f + 1:06d}_leftImg8bit.png",
                               _png(image))
        counts["video"] = int(video_frames)
    return counts
