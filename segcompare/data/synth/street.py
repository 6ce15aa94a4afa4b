"""A random street: `build_scene`, and the builders of its fixed parts.

The street runs along +z from behind the camera; x is lateral (m, right positive), y up. Each
builder adds its things to a `Street` and draws from the street's one random stream: the order of
the calls in `build_scene`, and of the draws inside each builder, is what makes a seed reproduce
its scene exactly. What moves (people, vehicles, riders) is in traffic.py.
"""

from __future__ import annotations

import math

import numpy as np

from segcompare.data.synth.outlines import canopy, quad, sign_outline
from segcompare.data.synth.palettes import (
    FACADES,
    FENCES,
    LIGHT_BORDERS,
    LIGHT_HOUSINGS,
    POLES,
    SIGNS,
    WALLS,
    jitter,
    pick,
)
from segcompare.data.synth.scene import CURB_H, Scene, Street
from segcompare.data.synth.traffic import (
    add_ego_vehicle,
    add_parked_two_wheelers,
    add_people,
    add_riders,
    add_vehicles,
)

Z_START = -10.0  # m: the ground and the facades start this far behind the camera


def build_scene(rng: np.random.Generator, length: float = 0.0) -> Scene:
    """A random street. `length` (m) extends the street and the traffic for a video."""
    road_hw = rng.uniform(3.5, 7.0)
    cam = dict(x=rng.uniform(0.2, 0.6) * road_hw - 0.2, y=rng.uniform(1.15, 1.35),
               yaw=math.radians(rng.uniform(-5, 5)), roll=math.radians(rng.uniform(-1.5, 1.5)),
               horizon=rng.uniform(0.42, 0.5))
    light = dict(gain=rng.uniform(0.85, 1.15), tint=rng.uniform(-0.04, 0.04),
                 sun_side=float(rng.choice([-1.0, 1.0])), sun=rng.uniform(0.0, 1.0),
                 shadow_x=rng.uniform(-road_hw, road_hw), shadow_slope=rng.uniform(-0.15, 0.15),
                 overcast=bool(rng.random() < 0.3), noise=rng.uniform(2.0, 5.0))
    z_end = rng.uniform(90, 160) + length
    st = Street(rng, road_hw, cam, light, z_end, length)
    # the parts in a fixed order: each one's draws follow the previous one's
    _add_sky_and_far_end(st)
    _add_road(st)
    for side in (-1.0, 1.0):
        _add_side(st, side)
    _add_poles(st)
    _add_mast_arms(st)
    _add_street_furniture(st)
    add_people(st)
    add_vehicles(st)
    add_riders(st)
    add_parked_two_wheelers(st)
    add_ego_vehicle(st)
    return Scene(st.things, cam, light, st.shadows)


def _add_sky_and_far_end(st: Street) -> None:
    rng, add, seed = st.rng, st.add, st.seed
    far_z = st.z_end + rng.uniform(0, 20)
    add("sky", quad("z", 5000, -1e4, 1e4, -100, 3000), "z", (0, 0, 0),
        dict(kind="sky", seed=seed()), 0)
    far_w, far_h = 60.0, rng.uniform(10, 30)
    add("building", quad("z", far_z, -far_w, far_w, 0, far_h), "z", (0, 0, far_z),
        dict(kind="facade", colour=jitter(rng, pick(rng, FACADES)), seed=seed(),
             win=(rng.uniform(2.4, 4), rng.uniform(3, 3.6))), 1)


def _add_road(st: Street) -> None:
    """The road, and rails down its middle when a train runs in this street."""
    rng, add, seed, z0 = st.rng, st.add, st.seed, Z_START
    add("road", quad("y", 0, -st.road_hw, st.road_hw, z0, st.z_end), "y", (0, 0, 0),
        dict(kind="road", colour=jitter(rng, (88, 84, 92), 10), seed=seed(),
             lanes=int(rng.integers(1, 3)), zebra=rng.uniform(10, 40) if rng.random() < 0.4
             else None), 2)
    st.has_train = rng.random() < 0.35
    if st.has_train:
        add("rail track", quad("y", 0, -0.85, 0.85, z0, st.z_end), "y", (0, 0, 0),
            dict(kind="rails", colour=jitter(rng, (104, 96, 88)), seed=seed()), 2)


def _across(side: float, a: float, b: float) -> tuple[float, float]:
    """The x range (low, high) from |x| = a to |x| = b on one side of the street."""
    return min(side * a, side * b), max(side * a, side * b)


def _add_side(st: Street, side: float) -> None:
    """One side of the street (side -1 left, +1 right), from the curb out to the facades."""
    rng = st.rng
    sw = rng.uniform(2.5, 5.0)  # m, the sidewalk's width
    setback = rng.uniform(1.0, 6.0) if rng.random() < 0.85 else 0.0  # m, sidewalk to facades
    inner, outer = st.road_hw, st.road_hw + sw
    facade_x = outer + setback
    st.sides[side] = (inner, outer, facade_x)
    sw_colour = _add_curb_and_sidewalk(st, side, inner, outer)
    _add_verge_and_parking(st, side, inner)
    if setback > 0.3:
        _add_setback(st, side, outer, facade_x, sw_colour)
    _add_facades(st, side, facade_x)
    _add_hedges(st, side, facade_x)
    _add_trees(st, side, outer, setback)
    _add_walls_and_fences(st, side, outer)
    if setback > 1.0 and rng.random() < 0.9:
        _add_wall_or_fence_across(st, side, outer, facade_x)


def _add_curb_and_sidewalk(st: Street, side: float, inner: float, outer: float) -> np.ndarray:
    """The curb's face and the sidewalk on top; returns the sidewalk's colour (RGB)."""
    rng, add, seed, z0, z_end = st.rng, st.add, st.seed, Z_START, st.z_end
    add("sidewalk", quad("x", side * inner, z0, z_end, 0, CURB_H), "x",
        (side * inner, 0, 0), dict(kind="curb", colour=jitter(rng, (168, 162, 156)),
                                   seed=seed()), 2)
    sw_colour = jitter(rng, (178, 140, 156), 8)
    add("sidewalk", quad("y", CURB_H, *_across(side, inner, outer), z0, z_end), "y", (0, 0, 0),
        dict(kind="sidewalk", colour=sw_colour, seed=seed(), tile=rng.uniform(0.3, 0.6)), 2)
    return sw_colour


def _add_verge_and_parking(st: Street, side: float, inner: float) -> None:
    """Maybe a grass verge on the sidewalk, maybe a parking strip on the road, along the curb."""
    rng, add, seed = st.rng, st.add, st.seed
    if rng.random() < 0.6:  # grass verge between the curb and the footpath
        vz = st.visible_z(side * inner, 0, 10) - 8
        add("terrain", quad("y", CURB_H, *_across(side, inner, inner + rng.uniform(0.8, 1.8)), vz,
                            vz + rng.uniform(15, 60)), "y", (0, 0, 0),
            dict(kind="terrain", colour=jitter(rng, (130, 165, 70), 8), seed=seed()), 2)
    if rng.random() < 0.5:  # parking strip on the road along the curb
        pz0 = rng.uniform(0, 30)
        add("parking", quad("y", 0, *_across(side, inner - 2.2, inner), pz0,
                            pz0 + rng.uniform(10, 30)),
            "y", (0, 0, 0), dict(kind="parking", colour=jitter(rng, (118, 108, 114)),
                                 seed=seed()), 2)


def _add_setback(st: Street, side: float, outer: float, facade_x: float,
                 sw_colour: np.ndarray) -> None:
    """Between the sidewalk and the facades: pieces of terrain, sidewalk and ground."""
    rng = st.rng
    z = Z_START
    first = True
    while z < st.z_end:
        seg = rng.uniform(10, 35)
        r = rng.random()
        if first or r < 0.6:
            kind, label = "terrain", "terrain"
            colour = jitter(rng, (130, 165, 70), 8)
        elif r < 0.85:
            kind, label, colour = "sidewalk", "sidewalk", sw_colour
        else:
            kind, label, colour = "ground", "ground", jitter(rng, (124, 106, 80))
        st.add(label, quad("y", CURB_H, *_across(side, outer, facade_x), z, z + seg), "y",
               (0, 0, 0), dict(kind=kind, colour=colour, seed=st.seed(), tile=0.5), 2)
        z, first = z + seg, False


def _add_facades(st: Street, side: float, facade_x: float) -> None:
    """Facades along the street (rooflines with steps and gables)."""
    rng = st.rng
    z = Z_START
    while z < st.z_end:
        seg = rng.uniform(8, 30)
        gap = rng.uniform(3, 8) if rng.random() < 0.2 else 0.0
        bx = facade_x + (rng.uniform(0, 3) if rng.random() < 0.3 else 0.0)
        h = rng.uniform(6, 24)
        za, zb = z, min(z + seg, st.z_end)
        top = [(zb, h), (za, h)]
        if rng.random() < 0.35:  # gable
            top = [(zb, h), ((za + zb) / 2, h + rng.uniform(2, 5)), (za, h)]
        poly = [(bx * side, 0, za), (bx * side, 0, zb)] + [(bx * side, y, zz) for zz, y in top]
        st.add("building", poly, "x", (bx * side, 0, 0),
               dict(kind="facade", colour=jitter(rng, pick(rng, FACADES)), seed=st.seed(),
                    win=(rng.uniform(2.2, 4.0), rng.uniform(3, 3.6)),
                    lit=st.light["sun_side"] == side), 3, attached=-abs(bx))
        z = zb + gap


def _add_hedges(st: Street, side: float, facade_x: float) -> None:
    """Hedges in front of facades."""
    rng = st.rng
    for _ in range(int(rng.integers(0, 3))):
        hz = rng.uniform(0, 60) + st.length * rng.random()
        st.add("vegetation", quad("x", side * (facade_x - 0.4), hz, hz + rng.uniform(4, 15), 0,
                                  rng.uniform(0.8, 1.8)), "x", (0, 0, 0),
               dict(kind="vegetation", colour=jitter(rng, (60, 105, 40), 10), seed=st.seed()), 3,
               attached=-(facade_x - 0.4))


def _add_trees(st: Street, side: float, outer: float, setback: float) -> None:
    """Trees in the setback or at the outer edge of the sidewalk: a trunk, a canopy on top."""
    rng, add, seed = st.rng, st.add, st.seed
    n_trees = int(rng.integers(2, 5)) + int(st.length / 15)
    for i in range(n_trees):
        tx = side * (outer + (setback / 2 if setback > 1.5 else -0.6))
        tz = st.visible_z(tx, 8, 45) if i == 0 else rng.uniform(5, st.z_end - 20)
        th, tr = rng.uniform(2.0, 3.5), rng.uniform(1.8, 3.5)
        colour = jitter(rng, (60, 105, 40), 10)
        add("vegetation", quad("z", tz, tx - 0.16, tx + 0.16, 0, th + 0.5 * tr), "z",
            (tx, 0, tz), dict(kind="trunk", colour=jitter(rng, (88, 70, 52)), seed=seed()),
            4)
        add("vegetation", [(tx + a, b, tz) for a, b in canopy(rng, 0.0, th + tr, tr)],
            "z", (tx, 0, tz), dict(kind="vegetation", colour=colour, seed=seed()), 4,
            attached=0.01)


def _wall_look(st: Street, height: float) -> dict:
    rng = st.rng
    return dict(kind="wall", colour=jitter(rng, pick(rng, WALLS)), seed=st.seed(), height=height)


def _fence_look(st: Street) -> dict:
    rng = st.rng
    return dict(kind="fence", colour=jitter(rng, pick(rng, FENCES)), seed=st.seed(),
                slat=rng.uniform(0.1, 0.2))


def _add_walls_and_fences(st: Street, side: float, outer: float) -> None:
    """Walls and fences at the outer edge of the sidewalk, along the street."""
    rng, z_end = st.rng, st.z_end
    for label in ("wall", "fence"):
        for i in range(int(rng.integers(1, 3))):
            wz = st.visible_z(side * outer, 4, 20) - 2 if i == 0 else rng.uniform(0, z_end - 20)
            wl, wh = rng.uniform(6, 18), rng.uniform(1.1, 2.4)
            look = _wall_look(st, wh) if label == "wall" else _fence_look(st)
            x = side * (outer + (0.05 if label == "wall" else 0.15))
            st.add(label, quad("x", x, wz, wz + wl, 0, wh), "x", (x, 0, 0), look, 5,
                   attached=-abs(x))


def _add_wall_or_fence_across(st: Street, side: float, outer: float, facade_x: float) -> None:
    """A wall or fence across the setback, facing the camera."""
    rng = st.rng
    label = "fence" if rng.random() < 0.65 else "wall"
    wz = st.visible_z(side * outer, 6, 25)
    wh = rng.uniform(1.1, 2.2)
    look = _wall_look(st, wh) if label == "wall" else _fence_look(st)
    x0, x1 = sorted((side * (outer + 0.2), side * facade_x))
    st.add(label, quad("z", wz, x0, x1, 0, wh), "z", (side * outer, 0, wz), look, 5)


# Poles near the curb carrying traffic lights and signs, and mast arms holding lights over the
# road. Lights and signs are ~1.5x their real size and the nearest ones stand within ~25 m, so
# that they stay several pixels wide at the models' 1/4 output resolution.
def _add_light(st: Street, x: float, y: float, z: float) -> None:
    """A traffic light hanging down from (x, y, z)."""
    rng = st.rng
    lw, lh = rng.uniform(0.55, 0.75), rng.uniform(1.4, 1.8)
    st.add("traffic light", quad("z", z, x - lw / 2, x + lw / 2, y, y + lh), "z", (x, y, z),
           dict(kind="light", colour=jitter(rng, pick(rng, LIGHT_HOUSINGS), 6), seed=st.seed(),
                border=jitter(rng, pick(rng, LIGHT_BORDERS), 6), lit=int(rng.integers(3)),
                size=(lw, lh)), 6, attached=0.02)


def _add_sign(st: Street, x: float, y: float, z: float, size: float) -> None:
    """A traffic sign of `size` m centred at (x, y, z)."""
    rng = st.rng
    shape = pick(rng, ["circle", "triangle", "diamond", "rect"])
    st.add("traffic sign", [(x + a, b, z) for a, b in sign_outline(shape, size, y)], "z",
           (x, y, z), dict(kind="sign", shape=shape, seed=st.seed(), back=rng.random() < 0.1,
                           colour=jitter(rng, pick(rng, SIGNS), 8)), 6, attached=0.03)


def _add_poles(st: Street) -> None:
    """Poles on both curbs, in turn; the first four near the camera carry a known mix."""
    rng, road_hw, length, z_end = st.rng, st.road_hw, st.length, st.z_end
    n_poles = int(rng.integers(6, 10)) + int(length / 10)
    for i in range(n_poles):
        side = 1.0 if i % 2 == 0 else -1.0
        px = side * (road_hw + rng.uniform(0.3, 0.7))
        pz = st.visible_z(px, 6, 24) if i < 4 else rng.uniform(4, min(z_end - 10, 60 + length))
        what = ("light", "sign", "both", "sign")[i] if i < 4 else pick(
            rng, ["light", "sign", "both"])
        size = rng.uniform(1.0, 1.5)
        sy = rng.uniform(1.9, 2.6)  # sign centre
        ly = sy + size / 2 + rng.uniform(0.2, 1.0) if what == "both" else rng.uniform(2.2, 3.6)
        ph, pw = max(rng.uniform(4.5, 8.0), ly + 2.2), rng.uniform(0.13, 0.2)
        look = dict(kind="pole", colour=jitter(rng, pick(rng, POLES)), seed=st.seed())
        st.add("pole", quad("z", pz, px - pw, px + pw, 0, ph), "z", (px, 0, pz), look, 6)
        if what in ("light", "both"):
            _add_light(st, px, ly, pz - 0.15)
        if what in ("sign", "both"):
            _add_sign(st, px, sy, pz - 0.2, size)


def _add_mast_arms(st: Street) -> None:
    """Mast arms over the road, each holding one or two lights."""
    rng, road_hw, add = st.rng, st.road_hw, st.add
    for _ in range(int(rng.random() < 0.7) + int(st.length / 40)):
        side = float(rng.choice([-1.0, 1.0]))
        px, pz = side * (road_hw + 0.4), rng.uniform(14, 32) + st.length * rng.random()
        ay, reach = rng.uniform(5.6, 6.4), rng.uniform(0.6, 0.9) * (road_hw + abs(st.cam["x"]))
        look = dict(kind="pole", colour=jitter(rng, pick(rng, POLES)), seed=st.seed())
        add("pole", quad("z", pz, px - 0.18, px + 0.18, 0, ay + 0.3), "z", (px, 0, pz), look, 6)
        ax0, ax1 = sorted((px, px - side * reach))
        add("pole", quad("z", pz, ax0, ax1, ay, ay + 0.22), "z", (px, ay, pz),
            dict(look, across=True), 6, attached=0.01)
        for k in range(1 + int(rng.random() < 0.6)):
            _add_light(st, px - side * reach * (0.45 + 0.5 * k), ay - 1.85, pz - 0.1)


def _add_street_furniture(st: Street) -> None:
    """Boxes on the sidewalks (void: static / dynamic)."""
    rng = st.rng
    for _ in range(int(rng.integers(1, 4))):
        side = float(rng.choice([-1.0, 1.0]))
        x = side * (st.road_hw + rng.uniform(1.0, 2.0))
        z = st.visible_z(x, 6, 40)
        w, h = rng.uniform(0.5, 1.6), rng.uniform(0.6, 1.2)
        label = "static" if rng.random() < 0.75 else "dynamic"
        st.add(label, quad("z", z, x - w / 2, x + w / 2, CURB_H, CURB_H + h), "z", (x, 0, z),
               dict(kind="plain", colour=jitter(rng, (90, 80, 70), 30), seed=st.seed()), 6)
