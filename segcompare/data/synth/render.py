"""Rendering a scene: label images drawn from the projected polygons, then the shaded photo.

Polygons are drawn far to near into an image of object indices, exactly as cityscapesscripts
draws annotation polygons, so `json2labelImg` / `json2instanceImg` reproduce our labelIds and
instanceIds. Each object's pixels are then coloured from where their view ray hits its plane,
lit (exposure, tint, sun side, shadows) and noised.
"""

from __future__ import annotations

from typing import Optional

import cv2
import numpy as np
from PIL import Image, ImageDraw

from segcompare.data.labels import LABEL_BY_NAME
from segcompare.data.synth.camera import FOCAL_PER_WIDTH, Camera, clip_near, clip_rect
from segcompare.data.synth.scene import Scene, Thing
from segcompare.data.synth.shading import shade

# One polygon to draw: (sort key, thing, integer pixel points N×2, its shift (m) at this frame).
Drawn = tuple[tuple, Thing, np.ndarray, np.ndarray]


def render(scene: Scene, size: tuple[int, int], frame: int = 0, speed: float = 0.0,
           noise_seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict]]:
    """Render one view: (RGB uint8 H×W×3, labelIds uint8, instanceIds uint16, polygons).

    frame/speed: the camera sits at z = frame * speed and moving things have moved
    frame * velocity. The polygons (label, integer pixel points) are in drawing order, so
    drawing them in order reproduces the label images (as cityscapesscripts does).
    """
    cam = _camera(scene, size, frame * speed)
    drawn = _visible_polygons(scene, cam, size, frame)
    objmap, label_ids, instance_ids, polygons = _draw_labels(drawn, size)
    rgb = _shade_objects(drawn, objmap, scene, cam, frame)
    image = _sensor(rgb, scene.light, size, noise_seed)
    return image, label_ids, instance_ids, polygons


def _camera(scene: Scene, size: tuple[int, int], z: float) -> Camera:
    h, w = size
    c = scene.camera
    return Camera(width=w, height=h, f=FOCAL_PER_WIDTH * w, cx=w / 2, cy=c["horizon"] * h,
                  x=c["x"], y=c["y"], z=z, yaw=c["yaw"], roll=c["roll"])


def _visible_polygons(scene: Scene, cam: Camera, size: tuple[int, int],
                      frame: int) -> list[Drawn]:
    """The things in view as pixel polygons, sorted into drawing order."""
    drawn = []
    for i, t in enumerate(scene.things):
        d = _project(t, i, cam, size, frame)
        if d is not None:
            drawn.append(d)
    drawn.sort(key=lambda d: d[0])
    return drawn


def _project(t: Thing, i: int, cam: Camera, size: tuple[int, int],
             frame: int) -> Optional[Drawn]:
    """Thing number i as a polygon of integer pixels, with its drawing-order key; None when it
    is out of view or degenerate."""
    h, w = size
    shift = np.array([t.velocity[0] * frame, 0.0, t.velocity[1] * frame])
    if t.image_space:
        pts = t.poly[:, :2] * np.array([w, h])
        key = (t.layer, 0.0, i)
    else:
        pc = clip_near(cam.to_camera(t.poly + shift))
        if len(pc) < 3:
            return None
        pts = cam.to_pixels(pc)
        if t.plane == "y" or t.layer <= 1:
            dist = 0.0
        elif t.attached < -0.5:  # side planes: outer ones first
            dist = -t.attached
        else:
            camp = np.array([cam.x, cam.z])
            dist = float(np.hypot(*(t.origin[[0, 2]] + shift[[0, 2]] - camp))) - t.attached
        key = (t.layer, -dist, i)
    pts = clip_rect(pts, -1, -1, w, h)
    if len(pts) < 3:
        return None
    pts = np.round(pts).astype(np.int64)
    # drop repeated points after rounding; need a non-degenerate polygon
    keep = np.any(pts != np.roll(pts, 1, axis=0), axis=1)
    pts = pts[keep]
    if len(pts) < 3 or np.ptp(pts[:, 0]) == 0 or np.ptp(pts[:, 1]) == 0:
        return None
    return key, t, pts, shift


def _draw_labels(drawn: list[Drawn], size: tuple[int, int]):
    """Draw object indices (1-based) in order; classes and instances follow from them.

    Returns (object map int32 H×W, labelIds uint8 H×W, instanceIds uint16 H×W, polygons)."""
    h, w = size
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
    return objmap, label_ids, instance_ids, polygons


def _shade_objects(drawn: list[Drawn], objmap: np.ndarray, scene: Scene, cam: Camera,
                   frame: int) -> np.ndarray:
    """Colour every object's pixels from its plane coordinates: float32 (H*W)×3, 0-255."""
    h, w = objmap.shape
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
            col = shade(t.look, a, b, ray, light)
        else:
            hit, a, b = _hit_on_plane(t, shift, origin, ray)
            col = shade(t.look, a, b, ray, light)
            if t.plane == "y" and t.label != "sky":
                col *= _ground_shadow(hit, scene, frame, light)[:, None]
        rgb[idx] = col
    return rgb


def _hit_on_plane(t: Thing, shift: np.ndarray, origin: np.ndarray, ray: np.ndarray):
    """Where the rays (n×3) from the camera at `origin` hit the thing's plane: (world points
    n×3, and the plane coordinates a, b in m that its texture is laid out in)."""
    axis = "xyz".index(t.plane)
    value = (t.poly[0] + shift)[axis]
    d = ray[:, axis]
    d = np.where(np.abs(d) < 1e-6, 1e-6, d)
    hit = origin + np.clip((value - origin[axis]) / d, 0, 5000)[:, None] * ray
    local = hit - (t.origin + shift)
    a, b = {"x": (local[:, 2], local[:, 1]), "y": (hit[:, 0], hit[:, 2]),
            "z": (local[:, 0], local[:, 1])}[t.plane]
    return hit, a, b


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


def _sensor(rgb: np.ndarray, light: dict, size: tuple[int, int], noise_seed: int) -> np.ndarray:
    """Lighting and sensor: exposure, tint, vignette, slight blur, noise -> RGB uint8 H×W×3."""
    h, w = size
    img = rgb.reshape(h, w, 3)
    gain = light["gain"] * np.array([1 + light["tint"], 1.0, 1 - light["tint"]], np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    vignette = 1 - 0.18 * (((xx - w / 2) / w) ** 2 + ((yy - h / 2) / h) ** 2) * 2
    img = img * gain * vignette[..., None]
    img = cv2.GaussianBlur(img, (0, 0), 0.6)
    noise_rng = np.random.default_rng(noise_seed)
    img = img + noise_rng.normal(0, light["noise"], img.shape).astype(np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)
