"""The look of the synthetic classes: texture, colour and lighting of each object's pixels.

`shade` colours the pixels of one object from their coordinates (a, b) in metres on the object's
plane, so textures stay fixed to the world as the camera moves. Each kind of look has its own
pattern (lamps in a bordered housing, staggered blocks, reflective bands, slats) that survives
the training pipeline's colour jitter; `_SHADERS` maps the kind to its function.
"""

from __future__ import annotations

import numpy as np


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


def _mul(col: np.ndarray, f) -> None:
    """Scale the colours (n×3) in place by a factor per pixel (n) or one for all."""
    col[:] *= np.asarray(f, dtype=np.float32).reshape(-1, 1)


def _put(col: np.ndarray, mask: np.ndarray, colour) -> None:
    """Paint the masked pixels one colour (or one colour per masked pixel)."""
    col[mask] = colour


def shade(look: dict, a: np.ndarray, b: np.ndarray, ray: np.ndarray, light: dict) -> np.ndarray:
    """Colour (n×3 float, 0-255) of one object's pixels at plane coordinates (a, b) in metres.

    For ground planes (a, b) = (x, z); for facades (z, y); for billboards local (x, y).
    ray: n×3 world view directions of the pixels; light: the scene's light."""
    kind = look["kind"]
    if kind == "sky":
        return _sky(look, ray, light)
    if "scale" in look:  # an enlarged object: shade it in its real-size coordinates
        a, b = a / look["scale"], b / look["scale"]
    base = np.asarray(look.get("colour", (128, 128, 128)), dtype=np.float32)
    col = np.broadcast_to(base, (len(a), 3)).copy()
    return _SHADERS.get(kind, _plain)(col, look, a, b, light)


def _sky(look: dict, ray: np.ndarray, light: dict) -> np.ndarray:
    """A gradient from the horizon up (grey when overcast), with clouds in view angles."""
    s = look.get("seed", 0)
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


# --- the ground ----------------------------------------------------------------------------------
def _road(col, look, a, b, light):
    """Road, parking strip or rails: asphalt and its painted markings; (a, b) = (x, z)."""
    kind, s = look["kind"], look.get("seed", 0)
    x, z = a, b
    _mul(col, 1 + 0.06 * _noise(x, z, 2.5, s) + 0.05 * _noise(x, z, 0.08, s + 1))
    if kind == "road":
        dash = (np.abs(x) < 0.08) & (_stripes(z, 9.0, 0.4) > 0)
        edge = np.abs(np.abs(x) - (np.abs(x).max() - 0.4)) < 0.07
        _put(col, dash | edge, (212, 212, 206))
        if look.get("zebra") is not None:
            zb = look["zebra"]
            zebra = (z > zb) & (z < zb + 3.5) & (_stripes(x, 1.0, 0.5) > 0)
            _put(col, zebra, (222, 222, 216))
    elif kind == "parking":
        _put(col, _stripes(z, 5.5, 0.025) > 0, (210, 210, 205))
    else:  # two rails of steel
        _put(col, (np.abs(np.abs(x) - 0.72) < 0.05), (160, 160, 168))
    return col


def _sidewalk(col, look, a, b, light):
    """Paving tiles with grout lines."""
    s = look.get("seed", 0)
    t = look.get("tile", 0.4)
    grout = (np.mod(a, t) < 0.03) | (np.mod(b, t) < 0.03)
    _mul(col, 1 + 0.05 * _noise(a, b, 1.5, s) + 0.04 * _noise(a, b, 0.05, s + 2))
    _mul(col, np.where(grout, 0.8, 1.0))
    return col


def _terrain(col, look, a, b, light):
    s = look.get("seed", 0)
    _mul(col, 1 + 0.12 * _noise(a, b, 0.6, s) + 0.12 * _noise(a, b, 0.07, s + 3))
    col[:, 0] += 12 * _noise(a, b, 1.5, s + 4)
    return col


def _curb_or_ground(col, look, a, b, light):
    s = look.get("seed", 0)
    _mul(col, 1 + 0.08 * _noise(a, b, 0.3, s) + 0.05 * _noise(a, b, 0.05, s + 2))
    return col


# --- buildings and street furniture --------------------------------------------------------------
def _facade(col, look, a, b, light):
    """Rows of windows above a shop front; the sunny side lighter. (a, b) = (z, y)."""
    s = look.get("seed", 0)
    base = np.asarray(look["colour"], dtype=np.float32)
    z, y = a, b
    wx, wy = look["win"]
    _mul(col, 1 + 0.05 * _noise(z, y, 3, s) + 0.05 * _noise(z, y, 0.1, s + 1))
    win = (_stripes(z + s % 7, wx, 0.45) > 0) & (_stripes(y - 0.9, wy, 0.45) > 0) & (y > 3.0)
    shop = (y > 0.3) & (y < 2.6) & (_stripes(z + s % 5, wx * 2, 0.7) > 0)
    glass = np.array([52, 62, 78]) + 30 * _noise(z, y, 4, s + 5)[:, None]
    col[win | shop] = glass[win | shop]
    frame = win & ((np.mod(z + s % 7, wx) < 0.08) | (np.mod(y - 0.9, wy) < 0.08))
    _put(col, frame, base * 1.15)
    if "lit" in look:
        _mul(col, 1.0 + (0.12 if look["lit"] else -0.25) * light["sun"])
    return col


def _wall(col, look, a, b, light):
    """Concrete blocks in staggered courses under a lighter coping."""
    s = look.get("seed", 0)
    base = np.asarray(look["colour"], dtype=np.float32)
    _mul(col, 1 + 0.07 * _noise(a, b, 1.0, s) + 0.05 * _noise(a, b, 0.04, s + 1))
    course = np.floor(b / 0.3)
    joint = (np.mod(b, 0.3) < 0.04) | (np.mod(a + 0.3 * np.mod(course, 2), 0.6) < 0.04)
    _mul(col, np.where(joint, 0.68, 1.0))
    _put(col, b > look["height"] - 0.12, np.minimum(base * 1.25, 255))
    return col


def _fence(col, look, a, b, light):
    s = look.get("seed", 0)
    slat = _stripes(a, look["slat"], 0.6) > 0
    _mul(col, np.where(slat, 1.0, 0.55) * (1 + 0.06 * _noise(a, b, 0.2, s)))
    _mul(col, np.where(np.abs(np.mod(b, 0.9) - 0.45) < 0.04, 0.7, 1.0))
    return col


def _pole(col, look, a, b, light):
    """A cylinder: shaded across its width."""
    s = look.get("seed", 0)
    w = b - 0.11 if look.get("across") else a
    _mul(col, 1 + 0.25 * np.cos(w * 12) - 0.1 + 0.04 * _noise(a, b, 0.2, s))
    return col


def _traffic_light(col, look, a, b, light):
    """Three lamps in a bordered housing, one of them lit."""
    lw, lh = look["size"]
    _put(col, (np.abs(a) > lw / 2 - 0.07) | (b < 0.07) | (b > lh - 0.07), look["border"])
    for k in range(3):  # red top, amber, green bottom
        cy = lh * (0.8 - 0.3 * k)
        lamp = (a ** 2 + (b - cy) ** 2) < (0.32 * lw) ** 2
        on = [(255, 50, 40), (255, 180, 40), (60, 250, 130)][k]
        off = [(70, 24, 20), (70, 56, 20), (20, 64, 40)][k]
        _put(col, lamp, on if k == look["lit"] else off)
    return col


def _traffic_sign(col, look, a, b, light):
    """White and the sign's colour in a ring and a core, a bar by shape; or a grey back."""
    if look["back"]:
        col[:] = (140, 140, 144)
        return col
    r = np.sqrt(a ** 2 + b ** 2)
    rmax = max(float(r.max()), 1e-3) if len(a) else 1.0
    inner = r < 0.62 * rmax
    if look["shape"] in ("circle", "triangle"):
        _put(col, inner, (236, 236, 236))
        _put(col, inner & (np.abs(a) < 0.05), (20, 20, 20))
    elif look["shape"] == "rect":
        _put(col, inner & (np.abs(b) < 0.06), (240, 240, 240))
    else:
        _put(col, ~inner, (236, 236, 236))
    return col


def _vegetation(col, look, a, b, light):
    s = look.get("seed", 0)
    leaf = _noise(a, b, 0.12, s) * 0.35 + _noise(a, b, 0.5, s + 1) * 0.25
    _mul(col, 1 + leaf)
    col[:, 1] += 18 * _noise(a, b, 1.2, s + 2)
    return col


def _trunk(col, look, a, b, light):
    _mul(col, 1 + 0.12 * _noise(a, b, 0.05, look.get("seed", 0)))
    return col


# --- people --------------------------------------------------------------------------------------
def _person(col, look, a, b, light):
    """Trousers, a top and skin by height."""
    s = look.get("seed", 0)
    h = look["height"]
    _put(col, b < 0.46 * h, look["legs"])
    _put(col, b > 0.86 * h, look["skin"])
    _mul(col, 1 + 0.08 * _noise(a, b, 0.15, s) + 0.05 * np.cos(a * 6))
    return col


def _rider(col, look, a, b, light):
    """Seated: legs below the seat, a jacket with reflective bands, a helmet."""
    s = look.get("seed", 0)
    seat, k = look["seat"], look["k"]
    _put(col, b < seat + 0.05, look["legs"])
    _put(col, (np.abs(b - seat - 0.25 * k) < 0.04) | (np.abs(b - seat - 0.42 * k) < 0.04),
         (232, 232, 226))
    _put(col, b > seat + 0.64 * k, look["skin"])
    _put(col, b > seat + 0.72 * k, look["helmet"])
    _mul(col, 1 + 0.08 * _noise(a, b, 0.15, s) + 0.05 * np.cos(a * 6))
    return col


# --- vehicles ------------------------------------------------------------------------------------
def _car(col, look, a, b, light):
    """From behind: rear window, tail lights, bumper, plate; in profile: windows and wheels."""
    s, n = look.get("seed", 0), len(a)
    base = np.asarray(look["colour"], dtype=np.float32)
    if not look.get("profile"):
        w = np.abs(a)
        hmax = float(b.max()) if n else 1.0
        glass = (b > 0.68 * hmax) & (b < hmax - 0.08) & (w < w.max() - 0.28)
        _put(col, glass, (44, 52, 64))
        tail = (b > 0.5) & (b < 0.66) & (w > w.max() - 0.32)
        _put(col, tail, (230, 240, 250) if look.get("front") else (200, 20, 20))
        _put(col, (b < 0.32) & (b > 0.2), base * 0.5)
        _put(col, b < 0.2, (22, 22, 24))
        plate = (b > 0.3) & (b < 0.45) & (w < 0.25)
        _put(col, plate, (236, 236, 230))
    else:
        x = a if not look.get("flip") else -a
        L = float(np.max(np.abs(x))) if n else 4.3
        k = L / 4.3
        glass = (b > 0.9) & (b < 1.35) & (x > 1.75 * k) & (x < 3.5 * k)
        _put(col, glass, (44, 52, 64))
        for wx in (0.85 * k, 3.45 * k):
            d = np.sqrt((x - wx) ** 2 + (b - 0.33) ** 2)
            _put(col, d < 0.33, (22, 22, 24))
            _put(col, d < 0.17, (150, 150, 150))
    _mul(col, 1 + 0.15 * (np.clip(b, 0, 2) / 2 - 0.5) + 0.03 * _noise(a, b, 0.1, s))
    return col


def _large_vehicle(col, look, a, b, light):
    """Truck, bus or train: a ribbed box or a band of windows, wheels; a truck's cab in front."""
    kind, s, n = look["kind"], look.get("seed", 0), len(a)
    base = np.asarray(look["colour"], dtype=np.float32)
    x = a if not look.get("flip") else -a
    hmax = float(b.max()) if n else 3.0
    if not look.get("profile"):
        w = np.abs(x)
        if kind != "truck":
            _put(col, (b > 0.55 * hmax) & (b < hmax - 0.25) & (w < w.max() - 0.2), (40, 48, 60))
        else:
            _put(col, _stripes(x, 0.3, 0.1) > 0, base * 0.85)
        _put(col, b < 0.35, (22, 22, 24))
        _put(col, (b > 0.5) & (b < 0.7) & (w > w.max() - 0.3), (200, 20, 20))
    else:
        if kind == "truck":
            cab = x < 2.2
            col[cab] = look["cab"]
            _put(col, cab & (b > 1.7) & (b < 2.6) & (x > 0.3) & (x < 2.0), (44, 52, 64))
            _put(col, ~cab & (_stripes(x, 0.4, 0.12) > 0), base * 0.85)
        else:
            band = (b > 1.25) & (b < hmax - 0.35) & (_stripes(x, 1.6, 0.85) > 0)
            _put(col, band, (40, 48, 60))
            if kind == "train":
                _put(col, (b > 0.7) & (b < 1.0), look["stripe"])
        _put(col, b < 0.35, (22, 22, 24))
    _mul(col, 1 + 0.04 * _noise(a, b, 0.3, s))
    return col


def _two_wheeler(col, look, a, b, light):
    """In profile: tyres (a bicycle's with spokes you see through); from behind: a dark wheel."""
    s, n = look.get("seed", 0), len(a)
    if look.get("profile"):
        x = np.abs(a)
        L = float(x.max()) if n else 1.8
        r = 0.32 if look["motor"] else 0.34
        for wx in (r, L - r):
            d = np.sqrt((x - wx) ** 2 + (b - r) ** 2)
            ring = (d > r - 0.07) & (d < r)
            _put(col, ring, (20, 20, 20))
            if not look["motor"]:
                _put(col, d < r - 0.07, (110, 110, 104))  # spokes / see-through
                _put(col, (d < r - 0.07)
                     & (np.abs(np.mod(np.arctan2(b - r, x - wx), 0.5)) < 0.06), (40, 40, 40))
    else:
        _put(col, b < 0.7, (24, 24, 26))
    _mul(col, 1 + 0.05 * _noise(a, b, 0.1, s))
    return col


def _ego(col, look, a, b, light):
    """The bonnet, lighter towards the windscreen; b is 0 at 85 % of the image height."""
    _mul(col, 1 + 0.25 * np.clip(1 - b, 0, 1))
    return col


def _plain(col, look, a, b, light):
    _mul(col, 1 + 0.08 * _noise(a, b, 0.2, look.get("seed", 0)))
    return col


# look["kind"] -> its shader: (col n×3, look, a, b, light) -> col. The sky is shaded from its
# view rays instead (see `shade`); a kind not listed is shaded plain.
_SHADERS = {
    "road": _road, "parking": _road, "rails": _road,
    "sidewalk": _sidewalk, "terrain": _terrain, "curb": _curb_or_ground, "ground": _curb_or_ground,
    "facade": _facade, "wall": _wall, "fence": _fence, "pole": _pole,
    "light": _traffic_light, "sign": _traffic_sign, "vegetation": _vegetation, "trunk": _trunk,
    "person": _person, "rider": _rider,
    "car": _car, "truck": _large_vehicle, "bus": _large_vehicle, "train": _large_vehicle,
    "two_wheeler": _two_wheeler, "ego": _ego, "plain": _plain,
}
