"""What a synthetic scene is: annotated planar polygons, a camera, a light, and ground shadows.

`Street` is a scene while it is being built: the builders in street.py and traffic.py add to it
and draw from its one random stream, in a fixed order, so that a seed always gives the same scene.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

CURB_H = 0.12  # m: sidewalks lie this high above the road

# A shadow on the road: the rectangle x0..x1, z0..z1 (m) under an object, moving with the
# object's velocity (vx, vz) in m per video frame.
Shadow = tuple[float, float, float, float, float, float]


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
    shadows: list[Shadow] = field(default_factory=list)


@dataclass
class Street:
    """A street being built: its random stream, its layout, and the things added so far."""

    rng: np.random.Generator
    road_hw: float  # m, half the width of the road
    cam: dict[str, float]
    light: dict[str, Any]
    z_end: float  # m, where the street ends
    length: float  # m the video drives: it extends the street and the traffic
    has_train: bool = False
    # side (-1 left, +1 right) -> (inner, outer, facade_x): |x| in m of the curb, the outer edge
    # of the sidewalk and the facades
    sides: dict[float, tuple[float, float, float]] = field(default_factory=dict)
    things: list[Thing] = field(default_factory=list)
    shadows: list[Shadow] = field(default_factory=list)

    def add(self, label, poly, plane, origin, look, layer, **kw) -> None:
        self.things.append(Thing(label, np.asarray(poly, dtype=np.float64), plane,
                                 np.asarray(origin, dtype=np.float64), look, layer, **kw))

    def seed(self) -> int:
        """A per-object texture seed (one integer draw)."""
        return int(self.rng.integers(1 << 30))

    def visible_z(self, x: float, zmin: float, zmax: float) -> float:
        # a z at which lateral offset x is inside the field of view (|x/z| < ~0.38)
        lo = max(zmin, abs(x - self.cam["x"]) / 0.36 + 2.0)
        return float(self.rng.uniform(lo, max(lo + 1.0, zmax)))
