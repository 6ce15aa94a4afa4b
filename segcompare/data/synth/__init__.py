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

The package, in the order a sample is made:
    street.py    build_scene: the random street and its fixed parts (ground, buildings, poles)
    traffic.py   what moves: people, vehicles, riders on two-wheelers, the ego vehicle
    outlines.py  the silhouettes the objects are cut from; palettes.py their colour families
    scene.py     Thing, Scene, and Street (a scene while it is built)
    camera.py    the pinhole camera and polygon clipping
    render.py    render: label images from the polygons, the shaded and noised photo
    shading.py   the texture and colour of each kind of object
    io.py        make_synthetic_cityscapes: the files in the Cityscapes layout, the video
"""

from segcompare.data.synth.camera import FOCAL_PER_WIDTH, NEAR, Camera
from segcompare.data.synth.io import (
    CITIES,
    VIDEO_CITY,
    make_synthetic_cityscapes,
    synthetic_sample,
    write_sample,
)
from segcompare.data.synth.outlines import TWO_WHEELER_SCALE
from segcompare.data.synth.render import render
from segcompare.data.synth.scene import Scene, Thing
from segcompare.data.synth.street import build_scene

__all__ = [
    "CITIES", "FOCAL_PER_WIDTH", "NEAR", "TWO_WHEELER_SCALE", "VIDEO_CITY", "Camera", "Scene",
    "Thing", "build_scene", "make_synthetic_cityscapes", "render", "synthetic_sample",
    "write_sample",
]
