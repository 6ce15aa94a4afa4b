"""What moves in the street: people, vehicles, riders on two-wheelers, and the ego vehicle.

Each builder adds to a `Street` and draws from its random stream in a fixed order (see
street.py). Vehicles and people get a velocity (m per video frame) and a shadow on the road.
Two-wheelers and their riders are drawn TWO_WHEELER_SCALE times their real size.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from segcompare.data.synth.outlines import (
    TWO_WHEELER_SCALE,
    billboard,
    box_rear,
    box_side,
    car_rear,
    car_side,
    enlarged,
    person_outline,
    rider_rear,
    rider_side,
    two_wheeler_rear,
    two_wheeler_side,
)
from segcompare.data.synth.palettes import (
    BICYCLES,
    BUSES,
    CAR_COLOURS,
    CLOTHES,
    MOTORCYCLES,
    RIDER_CLOTHES,
    SKIN,
    TRAIN_STRIPES,
    TRAINS,
    TROUSERS,
    TRUCKS,
    jitter,
    pick,
)
from segcompare.data.synth.scene import CURB_H, Shadow, Street

HELMETS = [(240, 240, 240), (200, 30, 30), (20, 20, 20), (240, 200, 30)]


def add_people(st: Street) -> None:
    """People on the sidewalks (and some crossing), a few of them close to the camera."""
    rng = st.rng
    n_people = int(rng.integers(5, 10)) + int(st.length / 8)
    for i in range(n_people):
        side = float(rng.choice([-1.0, 1.0]))
        inner, outer, _ = st.sides[side]
        crossing = rng.random() < 0.15
        x = rng.uniform(-st.road_hw, st.road_hw) if crossing else side * rng.uniform(
            inner + 0.4, outer - 0.3)
        z = st.visible_z(x, 5, 20) if i < 3 else rng.uniform(4, 35 + st.length)
        h = rng.uniform(1.7, 2.05)
        outline = person_outline(h, rng.uniform(0.0, 0.28), rng.uniform(0.26, 0.32))
        vel = (rng.uniform(-0.03, 0.03), rng.uniform(-0.06, 0.06))
        look = dict(kind="person", colour=jitter(rng, pick(rng, CLOTHES), 10), seed=st.seed(),
                    legs=jitter(rng, pick(rng, TROUSERS), 8),
                    skin=jitter(rng, pick(rng, SKIN), 6), height=h)
        st.add("person", *billboard(outline, np.array([x, CURB_H * (not crossing), z]), "z"),
               (x, 0, z), look, 6, velocity=vel)
        st.shadows.append((x - 0.3, x + 0.3, z - 0.3, z + 0.3, 0.0, 0.0))


# --- vehicles ------------------------------------------------------------------------------------
def _rear_outline(rng: np.random.Generator, label: str):
    """A vehicle seen from behind: (outline, (width, length) in m)."""
    if label == "car":
        w, h = rng.uniform(1.7, 1.9), rng.uniform(1.4, 1.6)
        return car_rear(w, h), (w, 4.3)
    if label in ("truck", "bus", "train"):
        w, h = {"truck": (2.5, 3.4), "bus": (2.55, 3.1), "train": (2.65, 3.5)}[label]
        return box_rear(w, h, 0.15 if label == "truck" else 0.3), (w, 9.0)
    motor = label == "motorcycle"
    return two_wheeler_rear(0.8 if motor else 0.6, 1.15 if motor else 1.05, motor), (0.7, 2.0)


def _side_outline(rng: np.random.Generator, label: str):
    """A vehicle's profile, front at x = 0: (outline, (width, length) in m)."""
    if label == "car":
        L = rng.uniform(3.9, 4.8)
        outline = car_side(L, rng.uniform(1.4, 1.55))
    elif label == "truck":
        L = rng.uniform(7, 10)
        outline = box_side(L, 3.6, [1.3, L - 1.3], cab=2.2, cab_h=3.0)
    elif label == "bus":
        L = rng.uniform(11, 13)
        outline = box_side(L, 3.1, [2.6, L - 3.0])
    elif label == "train":
        L = rng.uniform(25, 32)
        outline = box_side(L, 3.5, [3.0, L / 2, L - 3.0], round_top=0.4)
    else:
        L = 2.1 if label == "motorcycle" else 1.75
        outline = two_wheeler_side(L, 0.32 if label == "motorcycle" else 0.34,
                                   1.1 if label == "motorcycle" else 1.0,
                                   label == "motorcycle")
    return outline, (0.8, L)


def _vehicle_shadow(x: float, z: float, size: tuple[float, float], facing: str, profile: bool,
                    flip: bool, vel: tuple[float, float], speed: float) -> Shadow:
    hw, hl = size[0] / 2, size[1]
    if facing == "z" and profile:  # crossing: the shadow runs along x
        x0, x1 = (x - hl, x) if flip else (x, x + hl)
        return (x0, x1, z - 0.4, z + 0.4, vel[0], 0.0)
    return (x - hw - 0.2, x + hw + 0.2, z - 0.3, z + (hl if facing == "x" else 1.0), 0.0, speed)


def _add_vehicle(st: Street, label: str, x: float, z: float, facing: str, look: dict,
                 speed: float, flip: bool = False, profile: Optional[bool] = None) -> None:
    """A vehicle standing at (x, z). facing "z": in a plane facing the camera, from behind
    (or its profile when `profile`: crossing the street); "x": along the street."""
    profile = facing == "x" if profile is None else profile
    outline, size = _side_outline(st.rng, label) if profile else _rear_outline(st.rng, label)
    if label in ("bicycle", "motorcycle"):
        outline = enlarged(outline)
        look = dict(look, scale=TWO_WHEELER_SCALE)
    look = dict(look, seed=st.seed(), facing=facing, flip=flip, profile=profile)
    anchor = np.array([x, 0.0, z])
    vel = (0.0, speed) if facing == "x" or not profile else (speed if flip else -speed, 0.0)
    st.add(label, *billboard(outline, anchor, facing, flip), anchor, look, 6, velocity=vel)
    st.shadows.append(_vehicle_shadow(x, z, size, facing, profile, flip, vel, speed))


def _car_look(rng: np.random.Generator) -> dict:
    return dict(kind="car", colour=jitter(rng, pick(rng, CAR_COLOURS), 8))


def add_vehicles(st: Street) -> None:
    """Traffic ahead in the lanes, parked cars along the curbs, oncoming traffic; then maybe a
    truck, a bus and (on a street with rails) a train."""
    lane_xs = [st.cam["x"]] + [x for x in np.arange(-st.road_hw + 1.6, st.road_hw - 1.5, 3.2)]
    _add_cars(st, lane_xs)
    _add_truck_and_bus(st, lane_xs)
    if st.has_train:
        _add_train(st)


def _add_cars(st: Street, lane_xs: list[float]) -> None:
    rng, road_hw, length = st.rng, st.road_hw, st.length
    n_ahead = int(rng.integers(1, 4)) + int(length / 20)
    for i in range(n_ahead):
        x = pick(rng, lane_xs) + rng.uniform(-0.3, 0.3)
        z = rng.uniform(8, 45) if i == 0 else rng.uniform(8, 70 + length)
        _add_vehicle(st, "car", x, z, "z", _car_look(rng), rng.uniform(0.3, 0.6))
    for side in (-1.0, 1.0):
        z = rng.uniform(-5, 15)
        while z < 40 + length:
            if rng.random() < 0.5:
                _add_vehicle(st, "car", side * (road_hw - 1.0), z, "x", _car_look(rng), 0.0,
                             flip=rng.random() < 0.5)
            z += rng.uniform(5, 12)
    if road_hw > 4.5:  # oncoming traffic on the left
        for _ in range(int(rng.integers(0, 3))):
            _add_vehicle(st, "car", -road_hw + 1.7, rng.uniform(10, 60 + length), "z",
                         dict(_car_look(rng), front=True), -rng.uniform(0.3, 0.6))


def _add_truck_and_bus(st: Street, lane_xs: list[float]) -> None:
    rng, road_hw = st.rng, st.road_hw
    if rng.random() < 0.55:
        look = dict(kind="truck", colour=jitter(rng, pick(rng, TRUCKS), 8),
                    cab=jitter(rng, pick(rng, TRUCKS), 8))
        if rng.random() < 0.5:
            _add_vehicle(st, "truck", pick(rng, lane_xs), rng.uniform(12, 45), "z", look, 0.4)
        else:
            _add_vehicle(st, "truck", float(rng.choice([-1, 1])) * (road_hw - 1.3),
                         rng.uniform(8, 30), "x", look, 0.0, flip=rng.random() < 0.5)
    if rng.random() < 0.5:
        look = dict(kind="bus", colour=jitter(rng, pick(rng, BUSES), 8))
        if rng.random() < 0.5:
            _add_vehicle(st, "bus", pick(rng, lane_xs), rng.uniform(12, 45), "z", look, 0.45)
        else:
            _add_vehicle(st, "bus", road_hw - 1.4, rng.uniform(8, 25), "x", look, 0.0,
                         flip=rng.random() < 0.5)


def _add_train(st: Street) -> None:
    rng = st.rng
    look = dict(kind="train", colour=jitter(rng, pick(rng, TRAINS), 8),
                stripe=jitter(rng, pick(rng, TRAIN_STRIPES), 8))
    if rng.random() < 0.6:
        _add_vehicle(st, "train", 0.0, rng.uniform(15, 45), "z", look, 0.3)
    else:
        _add_vehicle(st, "train", 0.0 if st.road_hw < 4.5 else -1.5, rng.uniform(10, 30), "x",
                     look, -0.2, flip=True)


# --- two-wheelers --------------------------------------------------------------------------------
def add_riders(st: Street) -> None:
    """Riders on bicycles / motorcycles, the first two close to the camera."""
    n_riders = 2 + int(st.rng.random() < 0.5) + int(st.length / 20)
    for i in range(n_riders):
        _add_ridden_two_wheeler(st, i)


def _add_ridden_two_wheeler(st: Street, i: int) -> None:
    """The i-th two-wheeler with its rider: riding ahead, along the street, or crossing it."""
    rng, road_hw = st.rng, st.road_hw
    motor = rng.random() < 0.5
    label = "motorcycle" if motor else "bicycle"
    side = float(rng.choice([-1.0, 1.0]))
    way = pick(rng, ["behind", "along", "crossing"])
    x = side * (road_hw - rng.uniform(0.8, 1.6))
    if way == "crossing":
        x = rng.uniform(-road_hw + 0.5, road_hw - 2.5)
    z = st.visible_z(x, 6 + 3 * (way == "crossing"), 20) if i < 2 else rng.uniform(
        9, 35 + st.length)
    facing, profile = ("x", True) if way == "along" else ("z", way == "crossing")
    flip = side < 0 if way == "along" else way == "crossing" and rng.random() < 0.5
    speed = rng.uniform(0.15, 0.3) if not motor else rng.uniform(0.3, 0.5)
    look = dict(kind="two_wheeler", motor=motor,
                colour=jitter(rng, pick(rng, MOTORCYCLES if motor else BICYCLES), 8))
    _add_vehicle(st, label, x, z, facing, look, speed, flip=flip, profile=profile)
    vel = (0.0, speed) if way != "crossing" else (speed if flip else -speed, 0.0)
    _add_rider(st, x, z, motor, facing, profile, flip, vel)


def _add_rider(st: Street, x: float, z: float, motor: bool, facing: str, profile: bool,
               flip: bool, vel: tuple[float, float]) -> None:
    """A rider seated on the two-wheeler at (x, z), drawn just after it."""
    rng = st.rng
    h = rng.uniform(1.6, 1.9)
    seat = 0.75 if motor else 0.95
    outline = rider_side(seat, h) if profile else rider_rear(seat, h, rng.uniform(0.24, 0.3))
    outline = enlarged(outline)
    rlook = dict(kind="rider", scale=TWO_WHEELER_SCALE, seat=seat, k=h / 1.75,
                 colour=jitter(rng, pick(rng, RIDER_CLOTHES), 10),
                 legs=jitter(rng, (30, 32, 40), 8), skin=jitter(rng, pick(rng, SKIN), 6),
                 helmet=jitter(rng, pick(rng, HELMETS), 6), seed=st.seed())
    anchor = np.array([x, 0.0, z - (0.05 if facing == "z" else 0.0)])
    st.add("rider", *billboard(outline, anchor, facing, flip), anchor, rlook, 6, velocity=vel,
           attached=0.05)


def add_parked_two_wheelers(st: Street) -> None:
    """Two-wheelers parked across the footpath, seen from the side."""
    rng = st.rng
    for _ in range(int(rng.integers(2, 5))):
        motor = rng.random() < 0.4
        side = float(rng.choice([-1.0, 1.0]))
        x = side * (st.road_hw + rng.uniform(0.3, 0.8))
        z = st.visible_z(x, 5, 20)
        look = dict(kind="two_wheeler", motor=motor, seed=st.seed(), facing="z", profile=True,
                    scale=TWO_WHEELER_SCALE,
                    colour=jitter(rng, pick(rng, MOTORCYCLES if motor else BICYCLES), 8))
        outline = (two_wheeler_side(2.1, 0.32, 1.1, True) if motor
                   else two_wheeler_side(1.75, 0.34, 1.0, False))
        outline = enlarged(outline)
        anchor = np.array([x, CURB_H, z])
        st.add("motorcycle" if motor else "bicycle", *billboard(outline, anchor, "z", side < 0),
               anchor, look, 6)


def add_ego_vehicle(st: Street) -> None:
    """The ego vehicle's bonnet at the bottom of the image (image space: fractions of W, H)."""
    rng = st.rng
    if rng.random() < 0.85:
        top = rng.uniform(0.86, 0.92)
        xs = np.linspace(-0.05, 1.05, 12)
        ys = top + 0.5 * (1 - top) * (2 * xs - 1) ** 2 * rng.uniform(0.6, 1.0)
        poly = np.array([(x, y, 0.0) for x, y in zip(xs, ys)] + [(1.05, 1.05, 0), (-0.05, 1.05, 0)])
        st.add("ego vehicle", poly, "z", (0, 0, 0), dict(kind="ego", colour=jitter(
            rng, (40, 44, 50), 10), seed=st.seed()), 9, image_space=True)
