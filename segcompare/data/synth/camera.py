"""The pinhole camera of the synthetic street, and the clipping of polygons before projection."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

FOCAL_PER_WIDTH = 1.1  # Cityscapes camera: fx ~ 2262 px for 2048 px wide images
NEAR = 0.8  # m; polygons are clipped here before projection


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


def clip_near(pc: np.ndarray) -> np.ndarray:
    """Sutherland-Hodgman: keep the part of a camera-space polygon (N×3) with z >= NEAR."""
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


def clip_rect(pts: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """Clip a 2-D polygon (N×2) to a rectangle (Sutherland-Hodgman, one edge at a time)."""
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
