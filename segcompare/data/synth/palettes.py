"""Colour families of the synthetic classes (RGB 0-255) and the two draws that pick from them."""

from __future__ import annotations

import numpy as np

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
POLES = [(112, 114, 126), (100, 104, 116), (150, 150, 146)]


def jitter(rng, colour, amount: float = 9.0) -> np.ndarray:
    """`colour` with Gaussian noise of `amount` per channel (one draw of 3 normals), 0-255."""
    return np.clip(np.asarray(colour, dtype=np.float32) + rng.normal(0, amount, 3), 0, 255)


def pick(rng, options):
    """One of `options`, uniformly (one integer draw)."""
    return options[int(rng.integers(len(options)))]

