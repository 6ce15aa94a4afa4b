"""Outlines of the street's objects: flat polygons in metres, stood up in the world.

A silhouette is a list of (x, y) points in metres, y up; `billboard` stands one up in a plane of
the world, `quad` is an axis-aligned rectangle (ground, facades, poles).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

# Bicycles, motorcycles and their riders are drawn this many times their real size, so that a
# small model sees them several output pixels wide (it has 1/4 of the input resolution).
TWO_WHEELER_SCALE = 1.35


def quad(axis: str, value: float, a0: float, a1: float, b0: float, b1: float) -> np.ndarray:
    """Axis-aligned rectangle in the plane `axis = value`; (a, b) are the other two axes."""
    if axis == "y":  # (x, z)
        return np.array([[a0, value, b0], [a1, value, b0], [a1, value, b1], [a0, value, b1]])
    if axis == "x":  # (z, y)
        return np.array([[value, b0, a0], [value, b1, a0], [value, b1, a1], [value, b0, a1]])
    return np.array([[a0, b0, value], [a0, b1, value], [a1, b1, value], [a1, b0, value]])


def billboard(outline: Sequence[tuple[float, float]], anchor: np.ndarray, facing: str,
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
def person_outline(h: float, stride: float, width: float) -> list[tuple[float, float]]:
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


def car_rear(w: float, h: float) -> list[tuple[float, float]]:
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


def car_side(length: float, h: float) -> list[tuple[float, float]]:
    k = length / 4.3
    top = [(0.0, 0.3), (0.0, 0.55), (0.12 * k, 0.72), (0.95 * k, 0.85), (1.7 * k, h - 0.05),
           (1.9 * k, h), (3.1 * k, h), (3.45 * k, h - 0.12), (3.95 * k, 0.9), (length, 0.85),
           (length, 0.3)]
    return _wheels_bottom(length, [0.85 * k, 3.45 * k], 0.33, 0.16) + top


def box_side(length: float, h: float, wheels: Sequence[float], cab: Optional[float] = None,
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


def box_rear(w: float, h: float, r: float = 0.15) -> list[tuple[float, float]]:
    hw = w / 2
    return [(-hw + 0.1, 0.0), (-hw + 0.45, 0.0), (-hw + 0.45, 0.3), (hw - 0.45, 0.3),
            (hw - 0.45, 0.0), (hw - 0.1, 0.0), (hw, 0.35), (hw, h - r), (hw - r, h),
            (-hw + r, h), (-hw, h - r), (-hw, 0.35)]


def enlarged(outline: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """A two-wheeler's or rider's outline at TWO_WHEELER_SCALE times its real size."""
    return [(TWO_WHEELER_SCALE * a, TWO_WHEELER_SCALE * b) for a, b in outline]


def two_wheeler_side(length: float, r: float, top: float, motor: bool):
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


def two_wheeler_rear(w: float, h: float, motor: bool = False):
    if motor:  # wheel, engine and seat, mirrors
        return [(-0.1, 0.0), (0.1, 0.0), (0.12, 0.3), (0.3, 0.35), (0.28, 0.8), (w / 2, h - 0.1),
                (w / 2, h), (-w / 2, h), (-w / 2, h - 0.1), (-0.28, 0.8), (-0.3, 0.35),
                (-0.12, 0.3)]
    t = 0.05
    return [(-t, 0.0), (t, 0.0), (t, h - 0.12), (w / 2, h - 0.1), (w / 2, h), (-w / 2, h),
            (-w / 2, h - 0.1), (-t, h - 0.12)]


def rider_side(seat: float, h: float):
    """A seated rider leaning forward, front at x = 0; y from the ground."""
    k = h / 1.75
    pts = [(0.75, seat), (0.72, seat + 0.62 * k), (0.62, seat + 0.74 * k), (0.60, seat + 0.84 * k),
           (0.50, seat + 0.88 * k), (0.42, seat + 0.82 * k), (0.46, seat + 0.72 * k),
           (0.30, seat + 0.22 * k), (0.36, seat + 0.18 * k), (0.50, seat + 0.45 * k),
           (0.55, seat), (0.45, seat - 0.30 * k), (0.50, 0.30), (0.40, 0.28), (0.36, 0.36),
           (0.40, seat - 0.25 * k), (0.60, seat - 0.10 * k)]
    return pts


def rider_rear(seat: float, h: float, width: float):
    k = h / 1.75
    w = width * h
    right = [(0.08, 0.35), (0.16, 0.35), (0.55 * w, seat), (0.8 * w, seat + 0.3 * k),
             (0.9 * w, seat + 0.5 * k), (0.55 * w, seat + 0.6 * k), (0.3 * w, seat + 0.66 * k),
             (0.3 * w, seat + 0.8 * k), (0.15 * w, seat + 0.86 * k)]
    left = [(-x, y) for x, y in reversed(right)]
    return right + left


def canopy(rng, cx: float, cy: float, r: float):
    return _ellipse(cx, cy, r * rng.uniform(0.85, 1.15), r * rng.uniform(0.75, 1.1), 18, rng, 0.18)


def sign_outline(shape: str, size: float, y: float):
    s = size / 2
    if shape == "circle":
        return _ellipse(0.0, y, s, s, 16)
    if shape == "triangle":
        return [(-s, y + s * 0.8), (s, y + s * 0.8), (0.0, y - s * 0.9)]
    if shape == "diamond":
        return [(0.0, y - s), (s, y), (0.0, y + s), (-s, y)]
    return [(-s, y - 0.7 * s), (s, y - 0.7 * s), (s, y + 0.7 * s), (-s, y + 0.7 * s)]
